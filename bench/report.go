package main

import (
	"errors"
	"fmt"
	"io"
	"math/bits"
	"runtime"
	"sort"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/presencekit/presence"
)

// opKind is one kind of engine call the workers make.
type opKind int

const (
	opLogin opKind = iota
	opHeartbeat
	opDisconnect
	opLogout
	opKick
	opSetStatus
	opGetStatus
	opSubscribe
	opUnsubscribe
	opAddFriends
	opRemoveFriends
	opInvalid // a call with a deliberately bad argument
	numOps
)

var opNames = [numOps]string{"login", "heartbeat", "disconnect", "logout", "kick", "set-status",
	"get-status", "subscribe", "unsubscribe", "add-friends", "remove-friends", "invalid-call"}

func (o opKind) String() string { return opNames[o] }

// errKind classifies an error returned by the engine by its sentinel.
type errKind int

const (
	errNone errKind = iota
	errFeatureDisabled
	errRateLimited
	errInvalidParam
	errNotLoggedIn
	errSessionEnded
	errClosed
	errOther // not an *presence.Error matching a sentinel: always a violation
	numErrKinds
)

var errNames = [numErrKinds]string{"ok", "FeatureDisabled", "RateLimited", "InvalidParam",
	"NotLoggedIn", "SessionEnded", "Closed", "other"}

var sentinels = [numErrKinds]*presence.Error{
	errFeatureDisabled: presence.ErrFeatureDisabled,
	errRateLimited:     presence.ErrRateLimited,
	errInvalidParam:    presence.ErrInvalidParam,
	errNotLoggedIn:     presence.ErrNotLoggedIn,
	errSessionEnded:    presence.ErrSessionEnded,
	errClosed:          presence.ErrClosed,
}

// classify returns the kind of err, checking that it is an *presence.Error
// carrying its sentinel's code and that it matches exactly one sentinel.
func classify(err error) errKind {
	if err == nil {
		return errNone
	}
	var pe *presence.Error
	if !errors.As(err, &pe) {
		return errOther
	}
	kind, n := errOther, 0
	for k, s := range sentinels {
		if s != nil && errors.Is(err, s) {
			kind = errKind(k)
			n++
		}
	}
	if n != 1 || pe.Code != sentinels[kind].Code {
		return errOther
	}
	return kind
}

// hist is a log-linear latency histogram: 8 buckets per power of two of
// nanoseconds, so a percentile is exact to within 12.5 %.
type hist struct {
	counts [512]uint64
	n      uint64
	max    time.Duration
}

const histSub = 3

func bucketOf(d time.Duration) int {
	ns := uint64(max(d, 0))
	if ns < 1<<histSub {
		return int(ns)
	}
	b := bits.Len64(ns)
	mant := (ns >> (b - 1 - histSub)) & (1<<histSub - 1)
	return (b-histSub)<<histSub | int(mant)
}

// bucketFloor is the smallest duration that falls in bucket i.
func bucketFloor(i int) time.Duration {
	if i < 1<<histSub {
		return time.Duration(i)
	}
	b := i>>histSub + histSub
	mant := uint64(i & (1<<histSub - 1))
	return time.Duration((1<<histSub | mant) << (b - 1 - histSub))
}

func (h *hist) add(d time.Duration) {
	h.counts[bucketOf(d)]++
	h.n++
	h.max = max(h.max, d)
}

func (h *hist) merge(o *hist) {
	for i, c := range o.counts {
		h.counts[i] += c
	}
	h.n += o.n
	h.max = max(h.max, o.max)
}

// quantile returns the floor of the bucket holding the q-th quantile.
func (h *hist) quantile(q float64) time.Duration {
	if h.n == 0 {
		return 0
	}
	rank := uint64(q * float64(h.n-1))
	var seen uint64
	for i, c := range h.counts {
		seen += c
		if seen > rank {
			return bucketFloor(i)
		}
	}
	return h.max
}

// opStats is what one worker counted; merged into the report at the end.
type opStats struct {
	count [numOps]uint64
	errs  [numOps][numErrKinds]uint64
	lat   [numOps]hist
}

func (s *opStats) merge(o *opStats) {
	for op := range numOps {
		s.count[op] += o.count[op]
		for k := range numErrKinds {
			s.errs[op][k] += o.errs[op][k]
		}
		s.lat[op].merge(&o.lat[op])
	}
}

// violations collects impossible observations from every goroutine.
type violations struct {
	mu    sync.Mutex
	n     int
	first []string
}

const keepViolations = 20

func (v *violations) add(format string, args ...any) {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.n++
	if len(v.first) < keepViolations {
		v.first = append(v.first, fmt.Sprintf(format, args...))
	}
}

func (v *violations) count() int {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.n
}

func (v *violations) list() []string {
	v.mu.Lock()
	defer v.mu.Unlock()
	out := append([]string(nil), v.first...)
	if v.n > len(out) {
		out = append(out, fmt.Sprintf("... and %d more", v.n-len(out)))
	}
	return out
}

// readerStats is what the session readers saw.
type readerStats struct {
	Events   uint64                  // events read from mailboxes
	Drains   uint64                  // Drain calls that returned something
	ByReason [9]uint64               // events read, by Reason
	Sessions uint64                  // sessions a reader followed to their end
	Ended    map[presence.Reason]int // how those sessions ended
	Passes   uint64                  // passes over the sessions
	Polling  time.Duration           // wall time spent in passes, draining included
}

func (s *readerStats) merge(o *readerStats) {
	s.Events += o.Events
	s.Drains += o.Drains
	for why, n := range o.ByReason {
		s.ByReason[why] += n
	}
	s.Sessions += o.Sessions
	if s.Ended == nil {
		s.Ended = make(map[presence.Reason]int)
	}
	for why, n := range o.Ended {
		s.Ended[why] += n
	}
	s.Passes += o.Passes
	s.Polling += o.Polling
}

// memPhase is one phase of the setup and the live heap it added.
type memPhase struct {
	Name     string
	Includes string        // what the per-item figure holds
	Items    int           // sessions or edges the phase added
	Bytes    int64         // live heap added, after a collection
	Took     time.Duration // the phase itself, without measuring the heap
}

// perItem returns the bytes the phase added per item, "-" if it added none.
func (m memPhase) perItem() string {
	if m.Items == 0 {
		return "-"
	}
	return fmt.Sprintf("%.0f B", float64(m.Bytes)/float64(m.Items))
}

// report is everything a run prints.
type report struct {
	Config  config
	Setup   time.Duration // building the population, measuring its heap included
	Elapsed time.Duration // the workers' run

	Population struct {
		Users, LoggedIn, Sessions, Friendships, Subscriptions int
	}

	Mem struct {
		Base, After uint64 // live heap before and after the setup
		Phases      []memPhase
	}

	// Engine counters when the load started and when the workers stopped:
	// their difference is what the load did.
	Load struct{ Before, After presence.Stats }

	Ops opStats

	Readers readerStats

	Changes        map[presence.Reason]uint64 // change feed records by reason, until the feed closed
	ChangeTotal    uint64
	HeartbeatMiss  int // devices that heartbeat regularly but still timed out (a stalled worker)
	Final          presence.Stats
	GoroutinesLeft int // goroutines above the count before the run, after everything stopped

	Snap struct {
		Path                  string
		FirstLoad             time.Duration // New, restoring from the (empty) file
		AfterSetup, AfterLoad time.Duration // explicit Snapshot calls
		Close                 time.Duration // Close, with its final snapshot
		Restore               time.Duration // New on the saved file, as after a restart
		Background            time.Time     // Stats.LastSnapshot before Close
		SetupFileBytes        int64         // the file after the save after setup
		FileBytes             int64         // the file at the end
		Restored              presence.Stats
	}

	Violations []string
}

func (r *report) print(w io.Writer) {
	c := r.Config
	fmt.Fprintf(w, "presence simulation: %d users, %d friends and %d subscriptions each, %d workers, %d readers (%d slow), seed %d\n",
		c.Users, c.Friends, c.Subs, c.Workers, c.Readers, c.Slow, c.Seed)
	fmt.Fprintf(w, "engine: HeartbeatTimeout %v, DisconnectGrace %v, FeedSize %d, ChangeFeedSize %d, SnapshotInterval %v, quotas unlimited\n",
		c.HeartbeatTimeout, c.Grace, c.FeedSize, c.ChangeFeed, c.SnapshotEvery)
	p := r.Population
	fmt.Fprintf(w, "setup: %v: %d users, %d logged in, %d sessions, %d friend edges, %d subscription edges\n\n",
		r.Setup.Round(time.Millisecond), p.Users, p.LoggedIn, p.Sessions, p.Friendships, p.Subscriptions)

	r.printMemory(w)
	r.printOps(w)
	r.printEvents(w)

	f := r.Final
	fmt.Fprintf(w, "change feed: %d records (%d dropped): %s\n", r.ChangeTotal, f.ChangesDropped, reasonMapSummary(r.Changes))
	fmt.Fprintf(w, "final stats (before Close): users %d, online %d, sessions %d, subscriptions %d, friendships %d\n",
		f.Users, f.Online, f.Sessions, f.Subscriptions, f.Friendships)
	if r.HeartbeatMiss > 0 {
		fmt.Fprintf(w, "note: %d heartbeating devices timed out anyway (their worker stalled past the timeout)\n", r.HeartbeatMiss)
	}
	r.printSnapshots(w)
	fmt.Fprintf(w, "goroutines left after Close: %d\n", r.GoroutinesLeft)
	if len(r.Violations) == 0 {
		fmt.Fprintf(w, "\nOK: no violations\n")
		return
	}
	fmt.Fprintf(w, "\nVIOLATIONS:\n")
	for _, v := range r.Violations {
		fmt.Fprintf(w, "  %s\n", v)
	}
}

func (r *report) printMemory(w io.Writer) {
	m := r.Mem
	fmt.Fprintf(w, "memory (live heap after a collection; %.1f MB before the population, %.1f MB after):\n",
		float64(m.Base)/1e6, float64(m.After)/1e6)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "  setup phase\ttook\tadded\theap\tper item\tincludes\n")
	edges := memPhase{Name: "edges"}
	for _, ph := range m.Phases {
		fmt.Fprintf(tw, "  %s\t%v\t%d\t%.1f MB\t%s\t%s\n", ph.Name, ph.Took.Round(time.Millisecond),
			ph.Items, float64(ph.Bytes)/1e6, ph.perItem(), ph.Includes)
		if strings.HasSuffix(ph.Name, "edges") {
			edges.Items += ph.Items
			edges.Bytes += ph.Bytes
		}
	}
	tw.Flush()
	if len(m.Phases) == 4 {
		user, second := m.Phases[0], m.Phases[1]
		alone := "-"
		if user.Items > 0 && second.Items > 0 {
			alone = fmt.Sprintf("%.0f B", float64(user.Bytes)/float64(user.Items)-float64(second.Bytes)/float64(second.Items))
		}
		// The difference understates the user alone: a further session
		// also pays for its user's list of sessions, which a first session
		// does not need.
		fmt.Fprintf(w, "  per user with one session %s, per further session %s, so at least %s for the user alone; per edge (friend or subscription) %s\n",
			user.perItem(), second.perItem(), alone, edges.perItem())
	}
	fmt.Fprintf(w, "  (the engine's memory only: the simulation's own model is allocated before the first measurement; user ID strings are\n"+
		"   the simulation's; records of the users not logged in are made by the edge phases and counted with the edges)\n\n")
}

func (r *report) printOps(w io.Writer) {
	secs := r.Elapsed.Seconds()
	var total uint64
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(tw, "operation\tcalls\tper sec\tp50\tp99\tp999\tmax\terrors\t\n")
	for op := range numOps {
		n := r.Ops.count[op]
		total += n
		h := &r.Ops.lat[op]
		fmt.Fprintf(tw, "%v\t%d\t%.0f\t%v\t%v\t%v\t%v\t%s\t\n", op, n, float64(n)/secs,
			h.quantile(0.50), h.quantile(0.99), h.quantile(0.999), h.max.Round(time.Microsecond), errSummary(&r.Ops.errs[op]))
	}
	fmt.Fprintf(tw, "total\t%d\t%.0f\t\t\t\t\t\t\n", total, float64(total)/secs)
	tw.Flush()
	fmt.Fprintf(w, "(%v of simulated load; latencies are bucket floors, within 12.5%%, and include the scheduler's delays on %d cores)\n\n",
		r.Elapsed.Round(time.Millisecond), runtime.GOMAXPROCS(0))
}

func (r *report) printEvents(w io.Writer) {
	secs := r.Elapsed.Seconds()
	b, a := r.Load.Before, r.Load.After
	fmt.Fprintf(w, "events during the load: delivered %d (%.0f per sec), coalesced %d (%.0f per sec), lost %d (%.0f per sec)\n",
		a.Delivered-b.Delivered, float64(a.Delivered-b.Delivered)/secs,
		a.Coalesced-b.Coalesced, float64(a.Coalesced-b.Coalesced)/secs,
		a.Lost-b.Lost, float64(a.Lost-b.Lost)/secs)
	f, rd := r.Final, r.Readers
	fmt.Fprintf(w, "events in all: delivered %d, coalesced %d, lost %d; read by readers %d in %d drains, unread at the end %d\n",
		f.Delivered, f.Coalesced, f.Lost, rd.Events, rd.Drains,
		int64(f.Delivered)-int64(f.Coalesced)-int64(f.Lost)-int64(rd.Events))
	fmt.Fprintf(w, "events read by reason: %s\n", reasonSummary(rd.ByReason[:]))
	ended := make([]uint64, 9)
	for why, n := range rd.Ended {
		if int(why) < len(ended) {
			ended[why] += uint64(n)
		}
	}
	fmt.Fprintf(w, "sessions followed to their end: %d; ended by: %s (None = engine closed)\n", rd.Sessions, reasonSummary(ended))
	fmt.Fprintf(w, "readers: %d passes over their sessions, %v in passes (polling, draining and checking; wall time, on cores shared with the rest)\n",
		rd.Passes, rd.Polling.Round(time.Millisecond))
}

func (r *report) printSnapshots(w io.Writer) {
	sn := r.Snap
	fmt.Fprintf(w, "snapshots (bbolt file %s): save after setup %v, after the load %v, Close with its final save %v; last background save at %s\n",
		sn.Path, sn.AfterSetup.Round(time.Millisecond), sn.AfterLoad.Round(time.Millisecond), sn.Close.Round(time.Millisecond), sn.Background.Format("15:04:05.000"))
	users := float64(r.Config.Users)
	fmt.Fprintf(w, "snapshot file: %.1f MB after the save after setup, %.0f B per user with its edges; %.1f MB at the end, %.0f B per user\n"+
		"  (the file keeps the pages of the snapshot a save replaced, for the next save to reuse, and bbolt grows it in 16 MB steps)\n",
		float64(sn.SetupFileBytes)/1e6, float64(sn.SetupFileBytes)/users, float64(sn.FileBytes)/1e6, float64(sn.FileBytes)/users)
	fmt.Fprintf(w, "restart: restored %d users, %d online (offline-pending devices), %d subscriptions, %d friendships in %v\n",
		sn.Restored.Users, sn.Restored.Online, sn.Restored.Subscriptions, sn.Restored.Friendships, sn.Restore.Round(time.Millisecond))
}

func errSummary(errs *[numErrKinds]uint64) string {
	var parts []string
	for k := errNone + 1; k < numErrKinds; k++ {
		if n := errs[k]; n > 0 {
			parts = append(parts, fmt.Sprintf("%s %d", errNames[k], n))
		}
	}
	if len(parts) == 0 {
		return "-"
	}
	return strings.Join(parts, ", ")
}

func reasonSummary(counts []uint64) string {
	var parts []string
	for why, n := range counts {
		if n == 0 {
			continue
		}
		name := presence.Reason(why).String()
		if why == 0 {
			name = "None"
		}
		parts = append(parts, fmt.Sprintf("%s %d", name, n))
	}
	if len(parts) == 0 {
		return "none"
	}
	return strings.Join(parts, ", ")
}

func reasonMapSummary(m map[presence.Reason]uint64) string {
	keys := make([]presence.Reason, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool { return keys[i] < keys[j] })
	var parts []string
	for _, k := range keys {
		parts = append(parts, fmt.Sprintf("%v %d", k, m[k]))
	}
	if len(parts) == 0 {
		return "none"
	}
	return strings.Join(parts, ", ")
}
