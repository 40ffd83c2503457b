package main

import (
	"errors"
	"fmt"
	"io"
	"math/bits"
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
}

// report is everything a run prints.
type report struct {
	Config  config
	Setup   time.Duration // building the population
	Elapsed time.Duration // the workers' run

	Population struct {
		Users, LoggedIn, Sessions, Friendships, Subscriptions int
	}

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
		FileBytes             int64
		Restored              presence.Stats
	}

	Violations []string
}

func (r *report) print(w io.Writer) {
	c := r.Config
	fmt.Fprintf(w, "presence simulation: %d users, %d friends and %d subscriptions each, %d workers, %d readers (%d slow), seed %d\n",
		c.Users, c.Friends, c.Subs, c.Workers, c.Readers, c.Slow, c.Seed)
	fmt.Fprintf(w, "engine: HeartbeatTimeout %v, DisconnectGrace %v, FeedSize %d, ChangeFeedSize %d, quotas unlimited\n",
		c.HeartbeatTimeout, c.Grace, c.FeedSize, c.ChangeFeed)
	p := r.Population
	fmt.Fprintf(w, "setup: %v: %d users, %d logged in, %d sessions, %d friend edges, %d subscription edges\n\n",
		r.Setup.Round(time.Millisecond), p.Users, p.LoggedIn, p.Sessions, p.Friendships, p.Subscriptions)

	secs := r.Elapsed.Seconds()
	var total uint64
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(tw, "operation\tcalls\tper sec\tp50\tp99\tmax\terrors\t\n")
	for op := range numOps {
		n := r.Ops.count[op]
		total += n
		h := &r.Ops.lat[op]
		fmt.Fprintf(tw, "%v\t%d\t%.0f\t%v\t%v\t%v\t%s\t\n", op, n, float64(n)/secs,
			h.quantile(0.50), h.quantile(0.99), h.max, errSummary(&r.Ops.errs[op]))
	}
	fmt.Fprintf(tw, "total\t%d\t%.0f\t\t\t\t\t\n", total, float64(total)/secs)
	tw.Flush()
	fmt.Fprintf(w, "(%v of simulated load; latencies are bucket floors, within 12.5%%)\n\n", r.Elapsed.Round(time.Millisecond))

	f := r.Final
	fmt.Fprintf(w, "events: delivered %d, coalesced %d, lost %d; read by readers %d in %d drains, unread at the end %d\n",
		f.Delivered, f.Coalesced, f.Lost, r.Readers.Events, r.Readers.Drains,
		int64(f.Delivered)-int64(f.Coalesced)-int64(f.Lost)-int64(r.Readers.Events))
	fmt.Fprintf(w, "events read by reason: %s\n", reasonSummary(r.Readers.ByReason[:]))
	ended := make([]uint64, 9)
	for why, n := range r.Readers.Ended {
		if int(why) < len(ended) {
			ended[why] += uint64(n)
		}
	}
	fmt.Fprintf(w, "sessions followed to their end: %d; ended by: %s (None = engine closed)\n",
		r.Readers.Sessions, reasonSummary(ended))
	fmt.Fprintf(w, "change feed: %d records (%d dropped): %s\n", r.ChangeTotal, f.ChangesDropped, reasonMapSummary(r.Changes))
	fmt.Fprintf(w, "final stats (before Close): users %d, online %d, sessions %d, subscriptions %d, friendships %d\n",
		f.Users, f.Online, f.Sessions, f.Subscriptions, f.Friendships)
	if r.HeartbeatMiss > 0 {
		fmt.Fprintf(w, "note: %d heartbeating devices timed out anyway (their worker stalled past the timeout)\n", r.HeartbeatMiss)
	}
	sn := r.Snap
	fmt.Fprintf(w, "snapshots (bbolt file %s, %d bytes): save after setup %v, after the load %v, Close with its final save %v; last background save at %s\n",
		sn.Path, sn.FileBytes, sn.AfterSetup.Round(time.Microsecond), sn.AfterLoad.Round(time.Microsecond), sn.Close.Round(time.Microsecond), sn.Background.Format("15:04:05.000"))
	fmt.Fprintf(w, "restart: restored %d users, %d online (offline-pending devices), %d subscriptions, %d friendships in %v\n",
		sn.Restored.Users, sn.Restored.Online, sn.Restored.Subscriptions, sn.Restored.Friendships, sn.Restore.Round(time.Microsecond))
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
