// Command bench runs a load simulation of the presence engine and prints
// what happened.
//
// The engine runs on a bbolt snapshot file (package persist): it restores
// from it at the start, saves in the background during the run, and the
// report gives the timings of explicit saves, of Close's final save and of
// a restore into a fresh engine, which must come back with the same state.
//
// For now it is a small simulation: a few thousand users with friends and
// subscriptions, most of them logged in on one or two devices, and a set of
// workers that churn through logins, heartbeats, disconnects, logouts, kicks,
// custom status changes, status queries, subscription and friend changes for
// a few seconds. Some devices go silent so that the heartbeat timeout fires;
// a few readers drain the sessions' mailboxes, one of them slowly so that
// coalescing and lost events show up. A goroutine counts the change feed.
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
//	go run -race ./bench -duration 2s
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
	Users    int           // simulated users
	Duration time.Duration // how long the workers run
	Friends  int           // friends per user at the start
	Subs     int           // subscriptions per user at the start
	Workers  int           // goroutines doing operations
	Readers  int           // goroutines draining session mailboxes
	Slow     int           // of the readers, how many are slow
	SlowWait time.Duration // pause of a slow reader between passes
	Seed     int64         // random seed; the run's interleaving is still up to the scheduler

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
		fmt.Fprintf(fs.Output(), "Usage: go run ./bench [flags]\n\n"+
			"Runs a small load simulation of the presence engine: users with friends\n"+
			"and subscriptions, logins, heartbeats, disconnects, logouts, kicks, custom\n"+
			"status changes, queries and subscription changes for -duration, then prints\n"+
			"throughput, latency, errors, events, the change feed and snapshot timings\n"+
			"on a bbolt file. Exits 1 if the engine did something impossible.\n\nFlags:\n")
		fs.PrintDefaults()
	}
	fs.IntVar(&c.Users, "users", 5000, "number of simulated users")
	fs.DurationVar(&c.Duration, "duration", 3*time.Second, "how long the workers run")
	fs.IntVar(&c.Friends, "friends", 20, "friends per user at the start (directed edges)")
	fs.IntVar(&c.Subs, "subs", 20, "subscriptions per user at the start")
	fs.IntVar(&c.Workers, "workers", runtime.GOMAXPROCS(0), "goroutines doing operations (each owns a share of the users)")
	fs.IntVar(&c.Readers, "readers", 4, "goroutines draining session mailboxes round-robin")
	fs.IntVar(&c.Slow, "slow-readers", 1, "how many of the readers are slow")
	fs.DurationVar(&c.SlowWait, "slow-wait", 300*time.Millisecond, "pause of a slow reader between passes over its sessions")
	fs.Int64Var(&c.Seed, "seed", 1, "random seed")
	fs.Float64Var(&c.LoggedIn, "logged-in", 0.85, "fraction of users logged in at the start")
	fs.Float64Var(&c.Silent, "silent", 0.1, "fraction of logins whose device never heartbeats (and so times out)")
	fs.DurationVar(&c.HeartbeatTimeout, "heartbeat-timeout", 2*time.Second, "engine HeartbeatTimeout")
	fs.DurationVar(&c.Grace, "grace", 200*time.Millisecond, "engine DisconnectGrace")
	fs.IntVar(&c.FeedSize, "feed", 32, "engine FeedSize: pending users per session mailbox (small, so slow readers lose events)")
	fs.IntVar(&c.ChangeFeed, "change-feed", 1<<16, "engine ChangeFeedSize")
	fs.StringVar(&c.Store, "store", "", "bbolt snapshot `file` the engine restores from and saves to (default: a temporary file, removed afterwards)")
	fs.DurationVar(&c.SnapshotEvery, "snapshot-interval", time.Second, "engine SnapshotInterval: background snapshots during the run")
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
