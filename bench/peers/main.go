// Command peers runs one workload, side by side in one process, against
// four presence stacks and prints one table with each stack's throughput
// relative to this module's engine:
//
//  1. presence (this): github.com/presencekit/presence, the engine of the
//     parent module (replace ../..), with its Sessions and subscriptions.
//  2. centrifuge memory: centrifuge's in-process MemoryPresenceManager,
//     on the operations the two share (add / remove / read presence).
//  3. redis (go-redis): the Redis-backed presence Go chat servers commonly
//     write: a status key per user with a TTL, MGET for batch reads,
//     PUBLISH for fan-out, against a real redis-server on loopback (-redis;
//     run.sh starts one). Skipped, with a note, when -redis is empty.
//  4. naive map+chan: one sync.RWMutex'd map and a buffered Go channel per
//     watching connection, the baseline a server starts with.
//
// Operations (each stack implements the subset it has; see stacks.go):
//
//   - add: a user comes online on a device (engine Login; centrifuge
//     AddPresence; Redis SET key EX ttl; naive map write).
//   - remove: that device goes away (engine Logout; centrifuge
//     RemovePresence; Redis DEL; naive map delete).
//   - read-batch: the status of -batch users at once, half of all users
//     online (engine AppendUserStatus into a reused slice; centrifuge Presence per user's channel,
//     and PresenceStats as a second row; Redis MGET; naive RLock + lookups).
//   - change+fanout: a user changes its custom status and every watcher's
//     connection receives it; every user watches -watch random others and
//     has one receiving goroutine per connection (engine SetSelfStatus ->
//     Session mailboxes drained with Ready/Drain; Redis pipelined SET +
//     PUBLISH -> a node's PubSub connections -> the watchers' channels;
//     naive map write + non-blocking send per watcher). centrifuge's
//     presence manager has no fan-out (its pushes go through the Broker and
//     client connections), so that row is n/a for it.
//
// Why it is fair: every stack runs the same users, the same batches, the
// same number of worker goroutines (-workers, GOMAXPROCS by default) on the
// same machine, with a warm-up before each measured phase and a GC between
// phases; each is called through its public API the way its users call it,
// with no handicap added (centrifuge gets its cheaper PresenceStats read as
// an extra row and the better of its two reads counts; Redis gets one
// pipelined round trip for SET+PUBLISH and a connection pool of go-redis's
// default size). The engine does more per call than the others (IDs
// validated, device lists, versions, heartbeat deadlines, a Session per
// login, per-watcher coalescing mailboxes); that work is what a host gets
// and it is measured, not skipped. The engine's per-caller query and
// subscribe quotas (a client-facing rate limit) are set to unlimited, since
// the peers have none. Add and remove are measured in rounds (every worker
// logs in its share of the users, then logs them out), so each call does
// real work on every stack. For change+fanout, ops/s counts the changes the
// workers made; the note says what share of the events reached the
// watchers (the engine coalesces per watcher, latest wins; the channel
// stacks drop when a watcher's buffer is full) and how long the backlog
// took to drain after the workers stopped. Redis runs on the same 2 cores
// as the benchmark, as it would on a single-box deployment; over a real
// network each Redis round trip only gets longer.
//
// Ratio is the stack's ns/op divided by the engine's for the same operation,
// so > 1 means the engine is faster. Targets: >= 2x centrifuge and >= 50x
// Redis on the shared operations.
//
// Usage:
//
//	bash bench/peers/run.sh [flags]          # starts a redis-server, runs this, stops it
//	go run . [-redis 127.0.0.1:6379] [-users 10000] [-duration 2s]
package main

import (
	"errors"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"text/tabwriter"
	"time"
)

type options struct {
	redis    string
	users    int
	duration time.Duration
	workers  int
	batch    int
	watch    int
}

type row struct {
	stack, op string
	ops       int64
	elapsed   time.Duration
	note      string
	skipped   string // why there is no measurement
}

func (r row) nsPerOp() float64 {
	if r.ops == 0 {
		return 0
	}
	return float64(r.elapsed.Nanoseconds()) / float64(r.ops)
}

func (r row) opsPerSec() float64 {
	if r.elapsed == 0 {
		return 0
	}
	return float64(r.ops) / r.elapsed.Seconds()
}

const (
	opAdd    = "add"
	opRemove = "remove"
	opRead   = "read-batch"
	opFanout = "change+fanout"
)

func main() {
	var o options
	flag.StringVar(&o.redis, "redis", "", "address of a redis-server to compare against (empty: skip Redis)")
	flag.IntVar(&o.users, "users", 10000, "number of users")
	flag.DurationVar(&o.duration, "duration", 2*time.Second, "measured time per operation per stack")
	flag.IntVar(&o.workers, "workers", runtime.GOMAXPROCS(0), "worker goroutines per operation (same for every stack)")
	flag.IntVar(&o.batch, "batch", 100, "user IDs per read-batch")
	flag.IntVar(&o.watch, "watch", 8, "users each user watches (change+fanout)")
	flag.Parse()
	if o.users < 2*o.workers || o.users <= o.watch || o.batch < 1 || o.workers < 1 || o.duration <= 0 {
		fmt.Fprintln(os.Stderr, "peers: need -users >= 2*-workers and > -watch, -batch >= 1, -workers >= 1, -duration > 0")
		os.Exit(2)
	}
	rows, err := run(o)
	if err != nil {
		fmt.Fprintln(os.Stderr, "peers:", err)
		os.Exit(1)
	}
	printTable(os.Stdout, o, rows)
}

// workload is what every stack is run against.
type workload struct {
	o       options
	users   []string
	parts   [][]int             // worker -> indexes of the users it owns (add/remove/change)
	batches [][]string          // read batches
	watches map[string][]string // user -> the users it watches
	fans    []int               // user index -> how many watch it
}

func newWorkload(o options) *workload {
	r := rand.New(rand.NewPCG(1, 2))
	wl := &workload{o: o, users: make([]string, o.users), parts: make([][]int, o.workers),
		watches: make(map[string][]string, o.users), fans: make([]int, o.users)}
	for i := range wl.users {
		wl.users[i] = fmt.Sprintf("user-%07d", i)
		wl.parts[i%o.workers] = append(wl.parts[i%o.workers], i)
	}
	for range 1024 {
		b := make([]string, o.batch)
		for j := range b {
			b[j] = wl.users[r.IntN(o.users)]
		}
		wl.batches = append(wl.batches, b)
	}
	for i, u := range wl.users {
		seen := map[int]bool{i: true}
		for len(seen) <= o.watch {
			t := r.IntN(o.users)
			if seen[t] {
				continue
			}
			seen[t] = true
			wl.watches[u] = append(wl.watches[u], wl.users[t])
			wl.fans[t]++
		}
	}
	return wl
}

func (wl *workload) warm() time.Duration {
	return min(wl.o.duration/4, 500*time.Millisecond)
}

func run(o options) ([]row, error) {
	wl := newWorkload(o)
	var rows []row
	type maker struct {
		name string
		make func() (stack, error)
		skip string
	}
	makers := []maker{
		{name: "presence (this)", make: func() (stack, error) { return newEngineStack(o.workers) }},
		{name: "centrifuge memory", make: func() (stack, error) { return newCentrifugeStack() }},
		{name: "redis (go-redis)", make: func() (stack, error) { return newRedisStack(o.redis) }},
		{name: "naive map+chan", make: func() (stack, error) { return newNaiveStack(), nil }},
	}
	if o.redis == "" {
		makers[2].skip = "skipped: no -redis address (bash bench/peers/run.sh starts one)"
	}
	for _, m := range makers {
		if m.skip != "" {
			for _, op := range []string{opAdd, opRemove, opRead, opFanout} {
				rows = append(rows, row{stack: m.name, op: op, skipped: m.skip})
			}
			continue
		}
		fmt.Fprintf(os.Stderr, "running %s ...\n", m.name)
		s, err := m.make()
		if err != nil {
			return nil, fmt.Errorf("%s: %w", m.name, err)
		}
		rs, err := runStack(wl, s)
		if cerr := s.Close(); err == nil && cerr != nil {
			err = cerr
		}
		if err != nil {
			return nil, fmt.Errorf("%s: %w", m.name, err)
		}
		rows = append(rows, rs...)
	}
	return rows, nil
}

func runStack(wl *workload, s stack) ([]row, error) {
	var rows []row
	name := s.Name()

	// add / remove, in rounds.
	addR, remR, err := addRemove(wl, s)
	if err != nil {
		return nil, err
	}
	addR.stack, remR.stack = name, name
	rows = append(rows, addR, remR)

	// read-batch with every other user online.
	for i := 0; i < len(wl.users); i += 2 {
		if err := s.Add(0, wl.users[i], "d0"); err != nil {
			return nil, err
		}
	}
	reads := []struct {
		op string
		fn func(w int, caller string, users []string) (int, error)
	}{{opRead, s.ReadBatch}}
	if v, ok := s.(readVariant); ok {
		reads = append(reads, struct {
			op string
			fn func(w int, caller string, users []string) (int, error)
		}{v.AltName(), v.ReadBatchAlt})
	}
	for _, rd := range reads {
		var online atomic.Int64
		// callers are fixed per worker; build their IDs once, outside the timing.
		callers := make([]string, wl.o.workers)
		for w := range callers {
			callers[w] = fmt.Sprintf("reader-%d", w)
		}
		read := func(w, i int) error {
			n, err := rd.fn(w, callers[w], wl.batches[(i*wl.o.workers+w)%len(wl.batches)])
			online.Add(int64(n))
			return err
		}
		if _, _, err := runFor(wl.o.workers, wl.warm(), read); err != nil {
			return nil, err
		}
		online.Store(0)
		runtime.GC()
		ops, el, err := runFor(wl.o.workers, wl.o.duration, read)
		if err != nil {
			return nil, err
		}
		share := float64(online.Load()) / float64(ops*int64(wl.o.batch))
		rows = append(rows, row{stack: name, op: rd.op, ops: ops, elapsed: el,
			note: fmt.Sprintf("%d IDs/op, %.0f%% online", wl.o.batch, 100*share)})
	}
	for i := 0; i < len(wl.users); i += 2 {
		if err := s.Remove(0, wl.users[i], "d0"); err != nil {
			return nil, err
		}
	}

	// change + fan-out.
	f, ok := s.(fanouter)
	if !ok {
		rows = append(rows, row{stack: name, op: opFanout, skipped: "n/a: the presence manager has no fan-out"})
		return rows, nil
	}
	fr, err := fanout(wl, f)
	if err != nil {
		return nil, err
	}
	fr.stack = name
	return append(rows, fr), nil
}

// addRemove runs rounds in which every worker brings its share of the users
// online (timed as add), then takes them offline (timed as remove), until
// both have run about -duration; the first round is the warm-up.
func addRemove(wl *workload, s stack) (add, rem row, err error) {
	add.op, rem.op = opAdd, opRemove
	phase := func(fn func(w int, user, device string) error) (int64, time.Duration, error) {
		var wg sync.WaitGroup
		errs := make([]error, wl.o.workers)
		start := time.Now()
		for w := range wl.o.workers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for _, i := range wl.parts[w] {
					if err := fn(w, wl.users[i], "d0"); err != nil {
						errs[w] = err
						return
					}
				}
			}()
		}
		wg.Wait()
		return int64(len(wl.users)), time.Since(start), errors.Join(errs...)
	}
	runtime.GC()
	for round := 0; add.elapsed+rem.elapsed < 2*wl.o.duration; round++ {
		n, d, err := phase(s.Add)
		if err != nil {
			return add, rem, fmt.Errorf("add: %w", err)
		}
		m, e, err := phase(s.Remove)
		if err != nil {
			return add, rem, fmt.Errorf("remove: %w", err)
		}
		if round == 0 {
			continue
		}
		add.ops += n
		add.elapsed += d
		rem.ops += m
		rem.elapsed += e
	}
	return add, rem, nil
}

// fanout brings everyone online, sets up the watches, and has the workers
// change the custom status of their users in turn (each call is a real
// change: the text alternates per user).
func fanout(wl *workload, f fanouter) (row, error) {
	r := row{op: opFanout}
	if err := f.SetupFanout(wl.users, wl.watches); err != nil {
		return r, err
	}
	defer f.StopFanout()
	toggles := make([]uint8, len(wl.users)) // each index is owned by one worker
	var expected atomic.Int64
	change := func(w, i int) error {
		p := wl.parts[w]
		u := p[i%len(p)]
		toggles[u] ^= 1
		text := "busy"
		if toggles[u] == 1 {
			text = "in a meeting"
		}
		expected.Add(int64(wl.fans[u]))
		return f.Change(w, wl.users[u], text)
	}
	settle(f, 200*time.Millisecond, 10*time.Second) // initial states of the subscriptions
	if _, _, err := runFor(wl.o.workers, wl.warm(), change); err != nil {
		return r, err
	}
	settle(f, 200*time.Millisecond, 30*time.Second)
	base := f.Delivered()
	expected.Store(0)
	runtime.GC()
	ops, el, err := runFor(wl.o.workers, wl.o.duration, change)
	if err != nil {
		return r, err
	}
	stopped := time.Now()
	got := settle(f, 200*time.Millisecond, 30*time.Second) - base
	drain := time.Since(stopped) - 200*time.Millisecond
	r.ops, r.elapsed = ops, el
	r.note = fmt.Sprintf("%d watchers/user; %.2f events received per change (%.1f%% of watcher events), backlog drained in %s",
		wl.o.watch, float64(got)/float64(max(ops, 1)), 100*float64(got)/float64(max(expected.Load(), 1)), drain.Round(time.Millisecond).String())
	return r, nil
}

// runFor runs fn on workers goroutines for d; fn gets the worker index and
// that worker's call count so far. It returns the calls made and the time
// from start until every worker returned.
func runFor(workers int, d time.Duration, fn func(w, i int) error) (int64, time.Duration, error) {
	var stop atomic.Bool
	var total atomic.Int64
	var wg sync.WaitGroup
	errs := make([]error, workers)
	start := time.Now()
	t := time.AfterFunc(d, func() { stop.Store(true) })
	defer t.Stop()
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			n := 0
			for !stop.Load() {
				if err := fn(w, n); err != nil {
					errs[w] = err
					stop.Store(true)
					break
				}
				n++
			}
			total.Add(int64(n))
		}()
	}
	wg.Wait()
	return total.Load(), time.Since(start), errors.Join(errs...)
}

func printTable(out *os.File, o options, rows []row) {
	ref := map[string]float64{} // op -> engine ns/op
	engine := rows[0].stack
	for _, r := range rows {
		if r.stack == engine && r.skipped == "" {
			ref[r.op] = r.nsPerOp()
		}
	}
	// The better of centrifuge's two reads counts for its target.
	best := map[string]float64{} // stack/op-group -> best ratio (smallest)
	group := func(op string) string {
		if strings.HasPrefix(op, opRead) {
			return opRead
		}
		return op
	}
	refFor := func(op string) float64 { return ref[group(op)] }
	for _, r := range rows {
		if r.skipped != "" || r.stack == engine || refFor(r.op) == 0 {
			continue
		}
		ratio := r.nsPerOp() / refFor(r.op)
		k := r.stack + "/" + group(r.op)
		if b, ok := best[k]; !ok || ratio < b {
			best[k] = ratio
		}
	}
	target := func(stack string) float64 {
		switch {
		case strings.HasPrefix(stack, "centrifuge"):
			return 2
		case strings.HasPrefix(stack, "redis"):
			return 50
		}
		return 0
	}

	fmt.Fprintf(out, "\npresence peers: %d users, %d workers, GOMAXPROCS=%d, NumCPU=%d, %s per op, %s, warm-up %s\n",
		o.users, o.workers, runtime.GOMAXPROCS(0), runtime.NumCPU(), o.duration, runtime.Version(), min(o.duration/4, 500*time.Millisecond))
	fmt.Fprintf(out, "ratio = stack ns/op / engine ns/op (> 1: the engine is faster)\n\n")
	tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "stack\top\tops/s\tns/op\tratio\ttarget\tnote")
	for _, r := range rows {
		if r.skipped != "" {
			fmt.Fprintf(tw, "%s\t%s\t-\t-\t-\t-\t%s\n", r.stack, r.op, r.skipped)
			continue
		}
		ratio, tgt := "1.00", "-"
		if r.stack != engine {
			if rf := refFor(r.op); rf > 0 {
				x := r.nsPerOp() / rf
				ratio = fmt.Sprintf("%.2f", x)
				if t := target(r.stack); t > 0 {
					b := best[r.stack+"/"+group(r.op)]
					switch {
					case x != b:
						tgt = fmt.Sprintf(">=%gx: (see other read)", t)
					case x >= t:
						tgt = fmt.Sprintf(">=%gx: met", t)
					default:
						tgt = fmt.Sprintf(">=%gx: NOT met", t)
					}
				}
			}
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%.0f\t%s\t%s\t%s\n", r.stack, r.op, humanRate(r.opsPerSec()), r.nsPerOp(), ratio, tgt, r.note)
	}
	tw.Flush()

	// Summary of the targets on the shared operations.
	fmt.Fprintln(out)
	for _, stack := range []string{"centrifuge memory", "redis (go-redis)"} {
		t := target(stack)
		var met, total int
		var worst float64
		for k, b := range best {
			if !strings.HasPrefix(k, stack+"/") {
				continue
			}
			total++
			if b >= t {
				met++
			}
			if worst == 0 || b < worst {
				worst = b
			}
		}
		if total == 0 {
			fmt.Fprintf(out, "target >= %gx vs %s: not measured\n", t, stack)
			continue
		}
		fmt.Fprintf(out, "target >= %gx vs %s: met on %d of %d shared operations (lowest ratio %.2fx)\n", t, stack, met, total, worst)
	}
}

func humanRate(x float64) string {
	switch {
	case x >= 1e6:
		return fmt.Sprintf("%.2fM", x/1e6)
	case x >= 1e3:
		return fmt.Sprintf("%.1fk", x/1e3)
	}
	return fmt.Sprintf("%.0f", x)
}
