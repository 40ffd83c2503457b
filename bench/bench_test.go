package main

// Go benchmarks for DESIGN.md's performance table, one per row, beside the
// two floors the table names, so that every figure can be read as a ratio to
// a floor measured in the same process on the same machine.
//
//	go test ./bench -run '^$' -bench . -benchtime 1s -cpu 1,2
//
// Rows and benchmarks:
//
//	SetSelfStatus, no watchers, 1 core  BenchmarkSetSelfStatusNoWatchers (x-map-floor, allocs/op; read the -cpu 1 line)
//	fan-out cost per delivered event    BenchmarkFanOut (ns/event, events/s, x-chan-floor)
//	GetUserStatus, 500 IDs              BenchmarkGetUserStatus500 (ns/id, x-read-floor/id)
//	Login + Logout pair                 BenchmarkLoginLogout (pairs/s; read the -cpu 1 line)
//	2 cores vs 1 core throughput        BenchmarkMixedParallel (ops/s; x-1cpu on the -cpu 2 line)
//	memory, 1 M users                   BenchmarkMemory (B/idle-user, B/session, B/edge; -mem.users)
//	1 M idle sessions, bookkeeping      BenchmarkIdleBookkeeping (pct-core; -idle.sessions, -idle.scale)
//
// The snapshot row is measured by persist/bench_test.go, the peers row by
// bench/peers.
//
// How the ratios are computed: an engine benchmark measures both floors
// right before its loop and again right after it (bmFloors, outside the
// benchmark's timer), with the very same code as BenchmarkFloorMapUpdate and
// BenchmarkFloorChanSend: a calibrated run of 10 ms or more, repeated five
// times. The floor used is the fastest of those ten runs, printed as
// floor-ns; the benchmark reports its own ns/op (or ns per event) divided
// by it. Measuring on both sides keeps the floor and the figure under the
// same conditions on a machine that other work is using, and taking the
// fastest run makes the ratio conservative: noise can only lower the floor,
// never flatter the engine. The floor benchmarks print their own ns/op too.
//
// The GetUserStatus row has a third floor, because its figure at 100 000
// users is mostly cache misses, which an update of 1024 hot keys never pays:
// the read floor (bmReadFloor, BenchmarkFloorMapRead) reads the same lists
// of IDs from one plain map holding as many users, measured around the loop
// in the same way.
//
// BenchmarkMemory and BenchmarkIdleBookkeeping build a million users per
// iteration; one iteration takes longer than any usual -benchtime, so they
// run once (do not give them -benchtime Nx with N > 1).

import (
	"errors"
	"flag"
	"fmt"
	"hash/maphash"
	"math"
	"math/rand/v2"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/presencekit/presence"
)

var (
	bmMemUsers     = flag.Int("mem.users", 1_000_000, "users built by BenchmarkMemory")
	bmIdleSessions = flag.Int("idle.sessions", 1_000_000, "idle sessions kept by BenchmarkIdleBookkeeping")
	bmIdleScale    = flag.Int("idle.scale", 50, "BenchmarkIdleBookkeeping divides the 400 s timeout and the 120 s heartbeat interval by this")
)

// bmKeys is how many distinct users the single-user-path benchmarks (and the
// map floor) cycle through: enough that no single record stays hot, few
// enough that the comparison with the floor is about code, not cache misses.
const bmKeys = 1024

// bmTexts are the two custom texts a user alternates between, so that every
// SetSelfStatus is a change.
var bmTexts = [2]string{"in a meeting", "listening to music"}

// ---------------------------------------------------------------------------
// Floors

// bmMapFloor is the map-update floor: 256 shards, each a map of records
// under its own mutex, picked by hash/maphash of the key as the engine picks
// its shards. One op locks one shard, looks up an existing record, changes
// two of its fields and unlocks: the least any sharded in-memory status
// store has to do.
type bmMapFloor struct {
	seed   maphash.Seed
	shards [256]bmMapShard
	keys   []string
}

type bmMapShard struct {
	mu sync.Mutex
	m  map[string]*bmRecord
	_  [64]byte // as the engine's shards: neighbouring locks off one cache line
}

type bmRecord struct {
	custom  string
	version uint64
}

func newMapFloor() *bmMapFloor { return newMapFloorOf(bmKeys) }

// newMapFloorOf is a map floor holding n keys.
func newMapFloorOf(n int) *bmMapFloor {
	f := &bmMapFloor{seed: maphash.MakeSeed(), keys: bmIDs(n)}
	for i := range f.shards {
		f.shards[i].m = make(map[string]*bmRecord)
	}
	for _, k := range f.keys {
		f.shards[maphash.String(f.seed, k)&255].m[k] = &bmRecord{}
	}
	return f
}

// update is one op of the floor: the i-th key of the cycle gets the text of
// the engine benchmark's i-th call.
func (f *bmMapFloor) update(i int) { f.set(f.keys[i&(bmKeys-1)], i) }

// set is update's op on key k.
func (f *bmMapFloor) set(k string, i int) {
	sh := &f.shards[maphash.String(f.seed, k)&255]
	sh.mu.Lock()
	r := sh.m[k]
	r.custom = bmTexts[(i/bmKeys)&1]
	r.version++
	sh.mu.Unlock()
}

// bmReadFloor is the read floor: one Go map from user ID to a record held
// in the map itself, read with no lock, since nothing writes it while it is
// read. One lookup per ID (hash, probe, compare the key, read the record)
// is about the least any status store keyed by user ID does, so the floor
// is lean on purpose: it has no shards (a shard's map holding a handful of
// keys compares them one by one, which made a floor of 256 shards about
// 3 x slower at 1000 users), no pointer to follow and no lock. Its keys are
// its own copies, as the engine keeps its own copy of each ID, so no lookup
// is spared the comparison by meeting the very string it stored.
type bmReadFloor struct {
	m map[string]bmRecord
}

func newReadFloor(users int) *bmReadFloor {
	f := &bmReadFloor{m: make(map[string]bmRecord, users)}
	for _, id := range bmIDs(users) {
		f.m[id] = bmRecord{version: 1}
	}
	return f
}

// read is the read floor's op: the sum of ids' versions. Every ID must be
// there.
func (f *bmReadFloor) read(ids []string) uint64 {
	var sum uint64
	for _, id := range ids {
		sum += f.m[id].version
	}
	return sum
}

// bmChanFloor is the channel-send floor: a non-blocking send (select with
// default) on a buffered channel that never fills up. The floor proper
// carries presence.Event values, what a channel-per-session design would
// send; a pointer variant is printed beside it for reference only.
type bmChanFloor[T any] struct {
	ch chan T
	v  T
}

// bmChanCap is the floor channel's capacity: it is drained, outside the
// measured time, every bmChanCap sends.
const bmChanCap = 4096

func newChanFloor[T any](v T) *bmChanFloor[T] {
	return &bmChanFloor[T]{ch: make(chan T, bmChanCap), v: v}
}

func (f *bmChanFloor[T]) send() bool {
	select {
	case f.ch <- f.v:
		return true
	default:
		return false
	}
}

func (f *bmChanFloor[T]) drain() {
	for len(f.ch) > 0 {
		<-f.ch
	}
}

func BenchmarkFloorMapUpdate(b *testing.B) {
	f := newMapFloor()
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		f.update(i)
		i++
	}
}

// BenchmarkFloorMapUpdateParallel is the map floor called from every core
// at once, each goroutine on keys of its own, as in
// BenchmarkSetSelfStatusParallel. Its x-1cpu line (-cpu 1,2) is what this
// machine gives any store whose shard locks every core takes: each op
// pulls a lock's cache line from the core that took it last, so when that
// transfer costs as much as the op itself, a second core adds little. It is
// the ceiling to read the engine's scaling row against.
func BenchmarkFloorMapUpdateParallel(b *testing.B) {
	f := newMapFloorOf(64 * bmKeys)
	var next atomic.Int32
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		g := int(next.Add(1)-1) % 64
		mine := f.keys[g*bmKeys : (g+1)*bmKeys]
		i := 0
		for pb.Next() {
			f.set(mine[i&(bmKeys-1)], i)
			i++
		}
	})
	bmReportScaling(b, "FloorMapUpdateParallel")
}

// BenchmarkFloorMapRead is the read floor on its own, at the two
// populations of BenchmarkGetUserStatus500 and with the same lists of IDs.
func BenchmarkFloorMapRead(b *testing.B) {
	for _, users := range []int{1000, 100_000} {
		b.Run(fmt.Sprintf("users=%d", users), func(b *testing.B) {
			f := newReadFloor(users)
			queries := bmQueries(users)
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				bmReadSink += f.read(queries[i%len(queries)])
				i++
			}
			b.ReportMetric(bmNsPerOp(b)/float64(len(queries[0])), "ns/id")
		})
	}
}

// bmReadSink keeps the read floor's sums, so that the compiler cannot drop
// the reads.
var bmReadSink uint64

func BenchmarkFloorChanSend(b *testing.B) {
	b.Run("event", func(b *testing.B) { bmChanSend(b, bmEvent()) })
	b.Run("ptr", func(b *testing.B) {
		ev := bmEvent()
		bmChanSend(b, &ev)
	})
}

func bmChanSend[T any](b *testing.B, v T) {
	f := newChanFloor(v)
	b.ReportAllocs()
	n := 0
	for b.Loop() {
		if !f.send() {
			b.Fatal("floor channel full")
		}
		if n++; n == bmChanCap {
			b.StopTimer()
			f.drain()
			n = 0
			b.StartTimer()
		}
	}
}

// bmEvent is a typical event: a user online with a custom text.
func bmEvent() presence.Event {
	return presence.Event{
		UserStatus: presence.UserStatus{UserID: "user-0000042", Status: presence.Online, Custom: bmTexts[0], Version: 42},
		Reason:     presence.ReasonCustomStatus,
	}
}

// bmFloors measures the two floors, in ns/op (see the comment at the top of
// the file). It takes about half a second; call it outside the timed loop.
func bmFloors() (mapNs, chanNs float64) {
	mf := newMapFloor()
	mapNs = bmFastest(func(n int) time.Duration {
		start := time.Now()
		for i := range n {
			mf.update(i)
		}
		return time.Since(start)
	})
	cf := newChanFloor(bmEvent())
	chanNs = bmFastest(func(n int) time.Duration {
		var d time.Duration
		for n > 0 {
			k := min(n, bmChanCap)
			start := time.Now()
			for range k {
				cf.send()
			}
			d += time.Since(start)
			cf.drain()
			n -= k
		}
		return d
	})
	return mapNs, chanNs
}

// bmFloorsAgain measures the floors after a benchmark's loop and keeps the
// lower of each pair.
func bmFloorsAgain(mapNs, chanNs float64) (float64, float64) {
	m, c := bmFloors()
	return min(mapNs, m), min(chanNs, c)
}

// ns measures the read floor in ns per ID over queries, as bmFloors
// measures the others. It collects garbage first, so that a collection
// left over from building the engine or the floor does not slow the floor.
func (f *bmReadFloor) ns(queries [][]string) float64 {
	runtime.GC()
	perOp := bmFastest(func(n int) time.Duration {
		start := time.Now()
		for i := range n {
			bmReadSink += f.read(queries[i%len(queries)])
		}
		return time.Since(start)
	})
	return perOp / float64(len(queries[0]))
}

// bmFastest calibrates n so that run(n) takes at least 10 ms, then returns
// the fastest ns/op of five runs.
func bmFastest(run func(n int) time.Duration) float64 {
	n := 1 << 10
	for run(n) < 10*time.Millisecond && n < 1<<30 {
		n *= 2
	}
	best := math.Inf(1)
	for range 5 {
		best = min(best, float64(run(n).Nanoseconds())/float64(n))
	}
	return best
}

// ---------------------------------------------------------------------------
// Helpers

// bmIDs returns n user IDs of the usual shape, "user-0000000" on.
func bmIDs(n int) []string {
	ids := make([]string, n)
	for i := range ids {
		ids[i] = fmt.Sprintf("user-%07d", i)
	}
	return ids
}

// bmQueryConfig is an engine with queries and subscriptions on and their
// quotas off: the benchmarks measure the work, not the rate limiter.
func bmQueryConfig() presence.Config {
	return presence.Config{
		StatusQuery:    true,
		QueryQuota:     presence.Quota{Calls: -1},
		SubscribeQuota: presence.Quota{Calls: -1},
	}
}

// bmNew returns a running engine closed when the benchmark ends.
func bmNew(b *testing.B, cfg presence.Config) *presence.Engine {
	b.Helper()
	e, err := presence.New(cfg)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { e.Close() })
	return e
}

// bmParallel calls f(w, i) for every i < n from GOMAXPROCS workers (w is
// the worker's number) and returns the first error.
func bmParallel(n int, f func(w, i int) error) error {
	workers := runtime.GOMAXPROCS(0)
	var (
		wg    sync.WaitGroup
		once  sync.Once
		first error
	)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; i < n; i += workers {
				if err := f(w, i); err != nil {
					once.Do(func() { first = err })
					return
				}
			}
		}()
	}
	wg.Wait()
	return first
}

// bmLoginAll logs ids[i] in on "phone" for every i, drains the session of
// its own Login event and returns the sessions.
func bmLoginAll(e *presence.Engine, ids []string) ([]*presence.Session, error) {
	ss := make([]*presence.Session, len(ids))
	err := bmParallel(len(ids), func(_, i int) error {
		s, err := e.Login(ids[i], "phone")
		if err != nil {
			return err
		}
		var buf [2]presence.Event
		s.Drain(buf[:0])
		ss[i] = s
		return nil
	})
	return ss, err
}

// bmPick fills dst with distinct indexes below n, none equal to self.
func bmPick(r *rand.Rand, dst []int, n, self int) {
	for j := range dst {
		for {
			x := r.IntN(n)
			if x != self && !slices.Contains(dst[:j], x) {
				dst[j] = x
				break
			}
		}
	}
}

func bmNsPerOp(b *testing.B) float64 {
	return float64(b.Elapsed().Nanoseconds()) / float64(b.N)
}

// ---------------------------------------------------------------------------
// Rows of the table

// BenchmarkSetSelfStatusNoWatchers is the row "SetSelfStatus, no watchers,
// 1 core: <= 4 x the map-update floor, 0 allocs/op" (read the -cpu 1 line).
//
// SetSelfStatus needs its user Online, and the public API has no way to hold
// a user Online without a Session, so each user has exactly one session, its
// own: nobody else watches it. The engine delivers every change of a user to
// the user's own sessions too, so each call also puts one event in that
// mailbox. Nobody drains it: the mailbox keeps one pending event per user it
// is about, so the new event replaces the old one and it never grows
// (events/op checks that each call was one delivered change). The calls
// cycle over bmKeys users, as the floor does, alternating two texts so that
// every call is a change.
func BenchmarkSetSelfStatusNoWatchers(b *testing.B) {
	e := bmNew(b, presence.Config{})
	ids := bmIDs(bmKeys)
	if _, err := bmLoginAll(e, ids); err != nil {
		b.Fatal(err)
	}
	mapNs, _ := bmFloors()
	before := e.Stats().Delivered
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		if err := e.SetSelfStatus(ids[i&(bmKeys-1)], bmTexts[(i/bmKeys)&1]); err != nil {
			b.Fatal(err)
		}
		i++
	}
	ns := bmNsPerOp(b)
	mapNs, _ = bmFloorsAgain(mapNs, math.Inf(1))
	b.ReportMetric(float64(e.Stats().Delivered-before)/float64(b.N), "events/op")
	b.ReportMetric(mapNs, "floor-ns")
	b.ReportMetric(ns/mapNs, "x-map-floor")
}

// BenchmarkSetSelfStatusParallel is the same call from every core at once
// (each goroutine on its own users), for reading the scaling row.
func BenchmarkSetSelfStatusParallel(b *testing.B) {
	e := bmNew(b, presence.Config{})
	ids := bmIDs(64 * bmKeys)
	if _, err := bmLoginAll(e, ids); err != nil {
		b.Fatal(err)
	}
	var next atomic.Int32
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		g := int(next.Add(1)-1) % 64
		mine := ids[g*bmKeys : (g+1)*bmKeys]
		i := 0
		for pb.Next() {
			if err := e.SetSelfStatus(mine[i&(bmKeys-1)], bmTexts[(i/bmKeys)&1]); err != nil {
				b.Error(err)
				return
			}
			i++
		}
	})
	bmReportScaling(b, "SetSelfStatusParallel")
}

// BenchmarkFanOut is the row "fan-out cost per delivered event <= 3 x the
// channel-send floor". One target user has 1000 subscribers, each with one
// session; each op is one SetSelfStatus of the target, which the engine
// delivers to the 1000 subscribers' sessions and the target's own (events/op
// counts them from Stats.Delivered). ns/event is the op's time over the
// events it delivered.
//
// Three ways of reading, three sub-benchmarks:
//
// fresh: before each op, with the timer stopped, every mailbox is drained,
// so each push finds its mailbox empty: it stores a new entry and puts a
// token on the session's Ready channel (nobody is parked on it). This is
// the engine's whole cost of a fresh delivery, and the figure for the row.
// It flatters the engine a little: the drain leaves the mailboxes in this
// core's cache, where a reader on another core would not.
//
// readers: every session has a goroutine of its own waiting on Ready and
// draining, as a host's per-connection writer would; a push that finds the
// mailbox empty also wakes a parked goroutine. The readers' work shares the
// cores (with -cpu 1 it is inside the measured time, and the readers mostly
// run only when the benchmark goroutine is preempted); coalesced-frac says
// how often a push found its reader behind and replaced a pending event.
//
// coalesced: no reader at all; every push replaces the pending event about
// the target (a reader that has fallen behind). The cheapest path.
func BenchmarkFanOut(b *testing.B) {
	for _, mode := range []string{"fresh", "readers", "coalesced"} {
		b.Run(mode+"/subs=1000", func(b *testing.B) { bmFanOut(b, 1000, mode) })
	}
}

func bmFanOut(b *testing.B, subs int, mode string) {
	e := bmNew(b, bmQueryConfig())
	ids := bmIDs(subs + 1)
	target := ids[subs]
	ss, err := bmLoginAll(e, ids)
	if err != nil {
		b.Fatal(err)
	}
	for i, s := range ss[:subs] {
		if _, err := e.SubscribeUserStatus(ids[i], []string{target}); err != nil {
			b.Fatal(err)
		}
		s.Drain(nil)
	}
	if mode == "readers" {
		for _, s := range ss {
			go func() {
				buf := make([]presence.Event, 0, 4)
				for {
					select {
					case <-s.Ready():
						buf = s.Drain(buf[:0])
					case <-s.Done(): // the engine closes at the end of the benchmark
						return
					}
				}
			}()
		}
	}
	_, chanNs := bmFloors()
	st0 := e.Stats()
	b.ReportAllocs()
	buf := make([]presence.Event, 0, 4)
	i := 0
	for b.Loop() {
		if mode == "fresh" {
			b.StopTimer()
			for _, s := range ss {
				buf = s.Drain(buf[:0])
			}
			b.StartTimer()
		}
		if err := e.SetSelfStatus(target, bmTexts[i&1]); err != nil {
			b.Fatal(err)
		}
		i++
	}
	elapsed := b.Elapsed()
	_, chanNs = bmFloorsAgain(math.Inf(1), chanNs)
	st := e.Stats()
	events := float64(st.Delivered - st0.Delivered)
	nsPerEvent := float64(elapsed.Nanoseconds()) / events
	b.ReportMetric(events/float64(b.N), "events/op")
	b.ReportMetric(nsPerEvent, "ns/event")
	b.ReportMetric(events/elapsed.Seconds(), "events/s")
	b.ReportMetric(float64(st.Coalesced-st0.Coalesced)/events, "coalesced-frac")
	b.ReportMetric(chanNs, "floor-ns")
	b.ReportMetric(nsPerEvent/chanNs, "x-chan-floor")
}

// BenchmarkGetUserStatus500 is the row "GetUserStatus, 500 IDs <= 50 ns per
// ID". The users are online; each op reads 500 of them picked at random (one
// of 256 prepared lists), for a caller with no session and no quota (the
// quota costs one bucket operation per call, not per ID). With 1000 users
// the records stay in the CPU's cache and the figure is the code's cost;
// with 100 000 (tens of MB of records, as in any real deployment) each ID
// also pays for cache misses on the shard map and the record, and that is
// the figure for the row. x-read-floor/id divides it by the read floor at
// the same population, which pays cache misses of its own.
func BenchmarkGetUserStatus500(b *testing.B) {
	for _, users := range []int{1000, 100_000} {
		b.Run(fmt.Sprintf("users=%d", users), func(b *testing.B) { bmGetUserStatus(b, users, false) })
	}
}

// BenchmarkAppendUserStatus500 is the same query through AppendUserStatus,
// reusing one result slice as a host answering many queries would.
func BenchmarkAppendUserStatus500(b *testing.B) {
	for _, users := range []int{1000, 100_000} {
		b.Run(fmt.Sprintf("users=%d", users), func(b *testing.B) { bmGetUserStatus(b, users, true) })
	}
}

func bmGetUserStatus(b *testing.B, users int, reuse bool) {
	e := bmNew(b, bmQueryConfig())
	ids := bmIDs(users)
	if _, err := bmLoginAll(e, ids); err != nil {
		b.Fatal(err)
	}
	queries := bmQueries(users)
	perCall := len(queries[0])
	mapNs, _ := bmFloors()
	rf := newReadFloor(users)
	readNs := rf.ns(queries)
	b.ReportAllocs()
	i := 0
	var out []presence.UserStatus
	for b.Loop() {
		var err error
		if reuse {
			out, err = e.AppendUserStatus(out[:0], "caller", queries[i%len(queries)])
		} else {
			out, err = e.GetUserStatus("caller", queries[i%len(queries)])
		}
		if err != nil {
			b.Fatal(err)
		}
		if out[0].Status != presence.Online {
			b.Fatalf("%s reads %v", out[0].UserID, out[0].Status)
		}
		i++
	}
	perID := bmNsPerOp(b) / float64(perCall)
	mapNs, _ = bmFloorsAgain(mapNs, math.Inf(1))
	readNs = min(readNs, rf.ns(queries))
	b.ReportMetric(perID, "ns/id")
	b.ReportMetric(perID/mapNs, "x-map-floor/id")
	b.ReportMetric(readNs, "read-floor-ns/id")
	b.ReportMetric(perID/readNs, "x-read-floor/id")
}

// bmQueries returns the 256 lists of 500 IDs that the GetUserStatus
// benchmarks and the read floor read, each ID picked at random among
// bmIDs(users): the same lists on every call.
func bmQueries(users int) [][]string {
	const perCall, lists = 500, 256
	ids := bmIDs(users)
	r := rand.New(rand.NewPCG(1, 2))
	queries := make([][]string, lists)
	for q := range queries {
		queries[q] = make([]string, perCall)
		for j := range queries[q] {
			queries[q][j] = ids[r.IntN(users)]
		}
	}
	return queries
}

// BenchmarkLoginLogout is the row "Login + Logout pair >= 1 M pairs/s on 1
// core" (read the -cpu 1 line). Each op logs a device in (a new Session,
// the user becomes Online, its own session gets the Login event) and out
// again (Unlogined), cycling over 65 536 users so that records are reused
// the way a steady population reuses them.
func BenchmarkLoginLogout(b *testing.B) {
	const users = 1 << 16
	e := bmNew(b, presence.Config{})
	ids := bmIDs(users)
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		id := ids[i&(users-1)]
		if _, err := e.Login(id, "phone"); err != nil {
			b.Fatal(err)
		}
		if err := e.Logout(id, "phone"); err != nil {
			b.Fatal(err)
		}
		i++
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "pairs/s")
}

// BenchmarkMixedParallel is the row "2 cores vs 1 core throughput >= 1.6 x":
// run it with -cpu 1,2; the -cpu 2 line reports x-1cpu, its ops/s over the
// -cpu 1 line's of the same process (missing if -cpu 1 did not run first).
//
// 16 384 users are online on one device each and subscribed to 5 random
// others. Each goroutine works on its own users (index mod 64), in cycles of
// eight ops on one random user: three Heartbeats, two SetSelfStatus (each a
// change, fanned out to the user's own session and its ~5 subscribers'), one
// GetUserStatus of 10 random users, and a Login and Logout of a second
// device (no status change). Nobody drains the mailboxes: each holds at most
// one pending event per user it watches.
func BenchmarkMixedParallel(b *testing.B) {
	const users, subs, query = 1 << 14, 5, 10
	e := bmNew(b, bmQueryConfig())
	ids := bmIDs(users)
	ss, err := bmLoginAll(e, ids)
	if err != nil {
		b.Fatal(err)
	}
	err = bmParallel(users, func(w, i int) error {
		r := rand.New(rand.NewPCG(uint64(i), 7))
		var pick [subs]int
		bmPick(r, pick[:], users, i)
		targets := make([]string, subs)
		for j, t := range pick {
			targets[j] = ids[t]
		}
		_, err := e.SubscribeUserStatus(ids[i], targets)
		return err
	})
	if err != nil {
		b.Fatal(err)
	}
	for _, s := range ss {
		s.Drain(nil)
	}
	var next atomic.Int32
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		g := int(next.Add(1)-1) % 64
		r := rand.New(rand.NewPCG(uint64(g), 9))
		// Which text each of this goroutine's users shows, kept apart from
		// the other goroutines': bytes of one shared slice would put their
		// writes in the same cache lines, a cost of the benchmark's own
		// that only a second core pays.
		toggle := make([]uint8, users/64)
		u, k := 0, 0
		for pb.Next() {
			var err error
			switch k {
			case 0:
				u = r.IntN(users/64)*64 + g
				err = ss[u].Heartbeat()
			case 1, 2:
				err = ss[u].Heartbeat()
			case 3, 4:
				toggle[u/64] ^= 1
				err = e.SetSelfStatus(ids[u], bmTexts[toggle[u/64]])
			case 5:
				off := r.IntN(users - query)
				_, err = e.GetUserStatus(ids[u], ids[off:off+query])
			case 6:
				_, err = e.Login(ids[u], "tablet")
			case 7:
				err = e.Logout(ids[u], "tablet")
			}
			if err != nil {
				b.Error(err)
				return
			}
			k = (k + 1) % 8
		}
	})
	bmReportScaling(b, "MixedParallel")
}

var (
	bmScaleMu   sync.Mutex
	bmScaleBase = map[string]float64{} // benchmark -> ops/s of its last -cpu 1 run
)

// bmReportScaling reports ops/s and, above one core, the ratio to the same
// benchmark's last -cpu 1 run in this process.
func bmReportScaling(b *testing.B, name string) {
	opsPerSec := float64(b.N) / b.Elapsed().Seconds()
	b.ReportMetric(opsPerSec, "ops/s")
	bmScaleMu.Lock()
	defer bmScaleMu.Unlock()
	if runtime.GOMAXPROCS(0) == 1 {
		bmScaleBase[name] = opsPerSec
	} else if base, ok := bmScaleBase[name]; ok {
		b.ReportMetric(opsPerSec/base, "x-1cpu")
	}
}

// BenchmarkMemory is the row "memory, 1 M users, 1 session each, 20
// subscriptions each: <= 150 B per idle user, <= 400 B per session, <= 96 B
// per subscription edge". Heap is runtime.MemStats.HeapAlloc after two
// runtime.GC calls, around each phase; the IDs and the slice holding the
// sessions are made before the first reading, so they do not count (the
// engine keeps its own copy of each ID, which does).
//
// The engine keeps no record of a user without state, so "idle user" is
// measured as a user logged in on one device that is disconnected (Offline,
// no Session object): the user record, its ID, the device record and the
// timer entry. That is one engine. A second, fresh engine logs every user in
// on one device and keeps the session (each drained of its own Login event,
// as a reader would): the difference per user between the two is B/session
// (Session, mailbox, session list). Then every user subscribes to 20
// distinct random others (drained again): the growth over 20 x users is
// B/edge, both directions of the edge included.
//
// One iteration builds everything; run it with -benchtime 1x (or any
// -benchtime shorter than one build), and -mem.users to build fewer.
func BenchmarkMemory(b *testing.B) {
	const perUser = 20
	n := *bmMemUsers
	if n <= perUser {
		b.Fatalf("-mem.users %d: need more than %d", n, perUser)
	}
	ids := bmIDs(n)
	held := make([]*presence.Session, n)
	var idle, session, edge, all float64
	for b.Loop() {
		// Idle users: logged in, disconnected.
		e, err := presence.New(presence.Config{})
		if err != nil {
			b.Fatal(err)
		}
		m0 := bmHeap()
		err = bmParallel(n, func(_, i int) error {
			s, err := e.Login(ids[i], "phone")
			if err != nil {
				return err
			}
			return s.Disconnect()
		})
		if err != nil {
			b.Fatal(err)
		}
		m1 := bmHeap()
		if st := e.Stats(); st.Users != n || st.Online != 0 || st.Sessions != 0 {
			b.Fatalf("idle engine: %+v", st)
		}
		idle = float64(m1-m0) / float64(n)
		e.Close()
		e = nil

		// Users with one session each, then 20 subscriptions each.
		e, err = presence.New(bmQueryConfig())
		if err != nil {
			b.Fatal(err)
		}
		m0 = bmHeap()
		err = bmParallel(n, func(_, i int) error {
			s, err := e.Login(ids[i], "phone")
			if err != nil {
				return err
			}
			var buf [2]presence.Event
			s.Drain(buf[:0])
			held[i] = s
			return nil
		})
		if err != nil {
			b.Fatal(err)
		}
		m1 = bmHeap()
		session = float64(m1-m0)/float64(n) - idle
		bufs := make([][]presence.Event, runtime.GOMAXPROCS(0))
		err = bmParallel(n, func(w, i int) error {
			r := rand.New(rand.NewPCG(uint64(i), 3))
			var pick [perUser]int
			bmPick(r, pick[:], n, i)
			targets := make([]string, perUser)
			for j, t := range pick {
				targets[j] = ids[t]
			}
			if _, err := e.SubscribeUserStatus(ids[i], targets); err != nil {
				return err
			}
			bufs[w] = held[i].Drain(bufs[w][:0])
			return nil
		})
		if err != nil {
			b.Fatal(err)
		}
		bufs = nil
		m2 := bmHeap()
		if st := e.Stats(); st.Sessions != n || st.Subscriptions != perUser*n {
			b.Fatalf("engine with sessions: %+v", st)
		}
		edge = float64(m2-m1) / float64(perUser*n)
		all = float64(m2-m0) / float64(n)
		e.Close()
		clear(held)
	}
	b.ReportMetric(idle, "B/idle-user")
	b.ReportMetric(session, "B/session")
	b.ReportMetric(edge, "B/edge")
	b.ReportMetric(all, "B/user-all")
}

// bmHeap returns the live heap after collecting twice.
func bmHeap() int64 {
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return int64(ms.HeapAlloc)
}

// BenchmarkIdleBookkeeping is the row "1 M idle sessions, heartbeat
// bookkeeping <= 1 % of one core": sessions that do nothing but heartbeat
// every 120 s under the default 400 s timeout. The bookkeeping is what the
// engine does for them by itself: its background goroutine takes each
// session's timeout entry off the timer wheel when it falls due, finds the
// session alive (it heartbeated meanwhile) and puts a new entry on the
// wheel.
//
// Method. Waiting out 400 s timeouts is too slow for a benchmark, and the
// wheel is internal, so the regime is scaled down in time by -idle.scale
// (default 50: an 8 s timeout, heartbeats every 2.4 s) and measured in real
// time. The cost is driven by deadline visits per second, which is
// sessions / (timeout - mean heartbeat age) and so scales as 1/scale with
// the two periods kept in proportion; the measured CPU fraction is divided
// by the scale (and multiplied by 1 M / -idle.sessions if fewer are used)
// to give the figure for the real regime. The once-a-second tick of the
// wheel does not scale this way, but it costs microseconds.
//
// CPU is read from Linux's /proc (schedstat: nanoseconds of CPU per
// thread; the benchmark skips elsewhere). The benchmark's goroutine is the
// heartbeat driver, locked to its OS thread: every 10 ms it heartbeats as
// many sessions, round-robin, as keep each one on a 2.4 s period. Engine
// CPU is the whole process's CPU minus the driver thread's, over a window:
//
//   - control: after the logins and a GC, before the first timeout entry
//     falls due (no wheel visits yet): runtime and timer overhead only;
//   - steady: from two timeouts after the last login (every session visited
//     twice, visits spread over the heartbeat period) for max(2 timeouts,
//     10 s).
//
// pct-core is (steady - control) scaled to 1 M sessions at 400 s/120 s, in
// percent of one core; raw-pct-core is the same without subtracting the
// control; scaled-pct-core is steady - control as measured. timeouts counts
// sessions that timed out because the driver fell behind (it should be 0;
// otherwise the figure is not trustworthy). ns/heartbeat is the driver's
// CPU per Heartbeat call, which is the host's cost, not counted above.
func BenchmarkIdleBookkeeping(b *testing.B) {
	if _, err := bmProcCPU(); err != nil {
		b.Skipf("no per-thread CPU accounting here: %v", err)
	}
	n, scale := *bmIdleSessions, *bmIdleScale
	if n < 1 || scale < 1 {
		b.Fatalf("-idle.sessions %d, -idle.scale %d: both must be positive", n, scale)
	}
	timeout := 400 * time.Second / time.Duration(scale)
	period := 120 * time.Second / time.Duration(scale)
	ids := bmIDs(n)
	var res bmIdleResult
	for b.Loop() {
		res = bmIdle(b, ids, timeout, period)
	}
	toReal := float64(timeout) / float64(400*time.Second) * 1e6 / float64(n) * 100
	net := res.steady - res.control
	b.ReportMetric(net*toReal, "pct-core")
	b.ReportMetric(res.steady*toReal, "raw-pct-core")
	b.ReportMetric(net*100, "scaled-pct-core")
	b.ReportMetric(res.control*100, "ctl-pct-core")
	b.ReportMetric(res.nsPerHeartbeat, "ns/heartbeat")
	b.ReportMetric(float64(res.timeouts), "timeouts")
	if res.timeouts > 0 {
		b.Logf("%d sessions timed out: the heartbeat driver fell behind; the figure is not trustworthy", res.timeouts)
	}
}

type bmIdleResult struct {
	control, steady float64 // engine CPU per wall second, in cores
	nsPerHeartbeat  float64
	timeouts        int
}

func bmIdle(b *testing.B, ids []string, timeout, period time.Duration) (res bmIdleResult) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	n := len(ids)
	e, err := presence.New(presence.Config{HeartbeatTimeout: timeout})
	if err != nil {
		b.Fatal(err)
	}
	defer e.Close()
	start := time.Now()
	ss, err := bmLoginAll(e, ids)
	if err != nil {
		b.Fatal(err)
	}
	loggedIn := time.Now()
	runtime.GC()

	// Window boundaries; the control window is left out if too short.
	ctlFrom, ctlTo := time.Now().Add(200*time.Millisecond), start.Add(timeout-300*time.Millisecond)
	control := ctlTo.Sub(ctlFrom) >= time.Second
	steadyFrom := loggedIn.Add(2*timeout + time.Second)
	steadyTo := steadyFrom.Add(max(2*timeout, 10*time.Second))

	type sample struct {
		at           time.Time
		proc, thread time.Duration
	}
	take := func() sample {
		proc, err1 := bmProcCPU()
		thread, err2 := bmSchedstat("/proc/thread-self/schedstat")
		if err := errors.Join(err1, err2); err != nil {
			b.Fatal(err)
		}
		return sample{time.Now(), proc, thread}
	}
	rate := func(a, z sample) float64 {
		return float64((z.proc-a.proc)-(z.thread-a.thread)) / float64(z.at.Sub(a.at))
	}

	var ctl0, st0 sample
	ctlRunning, ctlDone, steady := false, !control, false
	calls := 0 // heartbeats sent in the steady window
	hbStart := time.Now()
	sent := 0 // heartbeats sent; session sent%n is next
	for {
		now := time.Now()
		due := int(float64(now.Sub(hbStart)) / float64(period) * float64(n))
		for ; sent < due; sent++ {
			i := sent % n
			if err := ss[i].Heartbeat(); err != nil {
				if !errors.Is(err, presence.ErrSessionEnded) {
					b.Fatal(err)
				}
				res.timeouts++
				if ss[i], err = e.Login(ids[i], "phone"); err != nil {
					b.Fatal(err)
				}
			}
			if steady {
				calls++
			}
		}
		switch {
		case !ctlDone && !ctlRunning && now.After(ctlFrom):
			ctl0, ctlRunning = take(), true
		case ctlRunning && now.After(ctlTo):
			res.control, ctlRunning, ctlDone = rate(ctl0, take()), false, true
		case ctlDone && !steady && now.After(steadyFrom):
			st0, steady = take(), true
		case steady && now.After(steadyTo):
			st1 := take()
			res.steady = rate(st0, st1)
			if calls > 0 {
				res.nsPerHeartbeat = float64(st1.thread-st0.thread) / float64(calls)
			}
			return res
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// bmProcCPU returns the CPU time used so far by every thread of the process.
func bmProcCPU() (time.Duration, error) {
	tasks, err := os.ReadDir("/proc/self/task")
	if err != nil {
		return 0, err
	}
	var sum time.Duration
	for _, t := range tasks {
		d, err := bmSchedstat("/proc/self/task/" + t.Name() + "/schedstat")
		if err != nil {
			if errors.Is(err, os.ErrNotExist) {
				continue // the thread has just exited
			}
			return 0, err
		}
		sum += d
	}
	return sum, nil
}

// bmSchedstat reads the first field of a schedstat file: nanoseconds on CPU.
func bmSchedstat(path string) (time.Duration, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	f := strings.Fields(string(data))
	if len(f) == 0 {
		return 0, fmt.Errorf("%s: empty", path)
	}
	ns, err := strconv.ParseInt(f[0], 10, 64)
	if err != nil {
		return 0, fmt.Errorf("%s: %w", path, err)
	}
	return time.Duration(ns), nil
}
