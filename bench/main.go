// Command bench is the load simulation of the presence engine: the first
// thing to run. With the defaults it takes about half a minute on two cores.
//
// It builds a population (100 k users, each with 20 friends and 20
// subscriptions, 85 % of them logged in on one or two devices), then runs a
// set of workers for -duration that churn through logins, heartbeats,
// disconnects, logouts, kicks, custom status changes, status queries,
// subscription and friend changes. Some devices fall silent when the load
// starts, so the heartbeat timeout fires. Readers drain the sessions'
// mailboxes, one of them slowly, so that coalescing and lost events show
// up; a goroutine counts the change feed.
//
// The setup runs in phases (first devices, second devices, friend edges,
// subscription edges) with the live heap measured after each, which gives
// the engine's memory per user, per session and per edge. The engine runs
// on a bbolt snapshot file (package persist): it saves in the background
// during the run, and the report gives the timings of explicit saves, of
// Close's final save and of a restore into a fresh engine, which must come
// back with the same state, and the size of the file.
//
// A progress line is printed every second of the load (to stderr); the
// report (to stdout) gives operations per second by kind with p50, p99 and
// p999 latency, events delivered, coalesced and lost per second, memory and
// snapshot figures.
//
// The simulation keeps a model of what it did, so it can check what the
// engine reports through its public API: errors of the expected kind only, a
// session never seeing a user's version go backwards, subscription lists and
// devices matching the model at the end, counters adding up. Anything
// impossible is a violation: it is printed and the exit status is 1.
//
// Usage:
//
//	go run ./bench [flags]
//	go run ./bench -users 20000 -duration 5s
//	go run -race ./bench -users 5000 -duration 2s
package main

import (
	"flag"
	"fmt"
	"os"
	"runtime"
	"time"
)

// config is what a run is made of, filled from the command line.
type config struct {
	Users     int           // simulated users
	Duration  time.Duration // how long the workers run
	Friends   int           // friends per user at the start
	Subs      int           // subscriptions per user at the start
	Workers   int           // goroutines doing operations
	Readers   int           // goroutines draining session mailboxes
	ReadEvery time.Duration // pause of a reader between passes over its sessions
	Slow      int           // of the readers, how many are slow
	SlowWait  time.Duration // pause of a slow reader between passes during the load
	Seed      int64         // random seed; the run's interleaving is still up to the scheduler

	LoggedIn float64 // fraction of users logged in at the start
	Silent   float64 // fraction of logins whose device never heartbeats

	HeartbeatTimeout time.Duration // engine Config.HeartbeatTimeout
	Grace            time.Duration // engine Config.DisconnectGrace
	FeedSize         int           // engine Config.FeedSize (per-session mailbox)
	ChangeFeed       int           // engine Config.ChangeFeedSize

	Store         string        // bbolt snapshot file; "" means a temporary file, removed afterwards
	SnapshotEvery time.Duration // engine Config.SnapshotInterval

	CPUProfile string // write a CPU profile of the load phase here
}

func parseFlags(args []string) (config, error) {
	var c config
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), `Usage: go run ./bench [flags]

Load simulation of the presence engine. It builds -users users with -friends
friends and -subs subscriptions each, logs -logged-in of them in on one or two
devices, measuring the live heap after each step (memory per user, session and
edge), then runs -workers goroutines of logins, heartbeats, disconnects,
logouts, kicks, custom status changes, queries, subscription and friend
changes for -duration. A -silent fraction of devices stops heartbeating and
times out; -readers drain the sessions' mailboxes, -slow-readers of them only
every -slow-wait. The engine saves to a bbolt file in the background; saves,
Close and a restore are timed.

Progress goes to stderr once a second; the report to stdout: operations per
second by kind with p50/p99/p999 latency, events delivered/coalesced/lost per
second, memory per user/session/edge, snapshot timings and file size. The
defaults finish in about half a minute on two cores; setup, checks, saves and
the restore grow with -users, the load phase is -duration.

Exit status: 0 if all is well, 1 if the engine did something impossible (a
violation), 2 for bad flags or a failure to start.

Flags:
`)
		fs.PrintDefaults()
	}
	fs.IntVar(&c.Users, "users", 100_000, "number of simulated users")
	fs.DurationVar(&c.Duration, "duration", 15*time.Second, "how long the load runs, after the setup")
	fs.IntVar(&c.Friends, "friends", 20, "friends per user at the start (directed edges)")
	fs.IntVar(&c.Subs, "subs", 20, "subscriptions per user at the start")
	fs.IntVar(&c.Workers, "workers", runtime.GOMAXPROCS(0), "goroutines doing operations (each owns a share of the users)")
	fs.IntVar(&c.Readers, "readers", 4, "goroutines draining session mailboxes round-robin")
	fs.DurationVar(&c.ReadEvery, "read-every", 50*time.Millisecond, "pause of a reader between passes over its sessions (a pass polls every session: shorter costs CPU)")
	fs.IntVar(&c.Slow, "slow-readers", 1, "how many of the readers are slow")
	fs.DurationVar(&c.SlowWait, "slow-wait", time.Second, "pause of a slow reader between passes during the load")
	fs.Int64Var(&c.Seed, "seed", 1, "random seed")
	fs.Float64Var(&c.LoggedIn, "logged-in", 0.85, "fraction of users logged in at the start")
	fs.Float64Var(&c.Silent, "silent", 0.1, "fraction of devices that stop heartbeating when the load starts, or never heartbeat if they log in later (and so time out)")
	fs.DurationVar(&c.HeartbeatTimeout, "heartbeat-timeout", time.Second, "engine HeartbeatTimeout (devices heartbeat every quarter of it; short, so timeouts happen within a short run)")
	fs.DurationVar(&c.Grace, "grace", 200*time.Millisecond, "engine DisconnectGrace")
	fs.IntVar(&c.FeedSize, "feed", 32, "engine FeedSize: pending users per session mailbox (small, so slow readers lose events)")
	fs.IntVar(&c.ChangeFeed, "change-feed", 1<<16, "engine ChangeFeedSize")
	fs.StringVar(&c.Store, "store", "", "bbolt snapshot `file` the engine restores from and saves to (default: a temporary file, removed afterwards)")
	fs.DurationVar(&c.SnapshotEvery, "snapshot-interval", 5*time.Second, "engine SnapshotInterval: background snapshots during the run")
	fs.StringVar(&c.CPUProfile, "cpuprofile", "", "write a CPU profile of the load phase to `file`")
	if err := fs.Parse(args); err != nil {
		return c, err
	}
	if fs.NArg() > 0 {
		return c, fmt.Errorf("unexpected arguments: %q", fs.Args())
	}
	switch {
	case c.Users < 2:
		return c, fmt.Errorf("-users must be at least 2")
	case c.Duration <= 0:
		return c, fmt.Errorf("-duration must be positive")
	case c.Friends < 0 || c.Friends >= c.Users || c.Friends > maxFriends:
		return c, fmt.Errorf("-friends must be in [0, min(users-1, %d)]", maxFriends)
	case c.Subs < 0 || c.Subs >= c.Users || c.Subs > maxSubscriptions:
		return c, fmt.Errorf("-subs must be in [0, min(users-1, %d)]", maxSubscriptions)
	case c.Workers < 1 || c.Workers > c.Users || c.Readers < 1:
		return c, fmt.Errorf("-workers must be in [1, users] and -readers at least 1")
	case c.Slow < 0 || c.Slow > c.Readers:
		return c, fmt.Errorf("-slow-readers must be in [0, readers]")
	case c.ReadEvery <= 0 || c.SlowWait <= 0:
		return c, fmt.Errorf("-read-every and -slow-wait must be positive")
	case c.LoggedIn < 0 || c.LoggedIn > 1 || c.Silent < 0 || c.Silent > 1:
		return c, fmt.Errorf("-logged-in and -silent are fractions in [0, 1]")
	case c.HeartbeatTimeout < 100*time.Millisecond || c.Grace < 0:
		return c, fmt.Errorf("-heartbeat-timeout must be at least 100ms and -grace not negative")
	case c.FeedSize < 1 || c.ChangeFeed < 1:
		return c, fmt.Errorf("-feed and -change-feed must be at least 1")
	case c.SnapshotEvery <= 0:
		return c, fmt.Errorf("-snapshot-interval must be positive")
	}
	return c, nil
}

func main() {
	cfg, err := parseFlags(os.Args[1:])
	if err == flag.ErrHelp {
		return
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(2)
	}
	rep, err := run(cfg, os.Stderr)
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(2)
	}
	rep.print(os.Stdout)
	if len(rep.Violations) > 0 {
		os.Exit(1)
	}
}
