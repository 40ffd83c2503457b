package presence_test

// Slow and stalled readers: the engine promises that a reader who never
// drains costs bounded memory, never holds up a writer, and that what it
// skipped is accounted for (coalesced or counted in Lost) while what it
// still holds is the latest truth.

import (
	"flag"
	"fmt"
	"math/rand/v2"
	"runtime"
	"runtime/debug"
	"slices"
	"strconv"
	"sync"
	"testing"
	"testing/synctest"

	"github.com/presencekit/presence"
)

var stalledChanges = flag.Int("stalled.changes", 0,
	"status changes TestStalledReaders applies; 0 means 1,000,000, or 50,000 under -race or -short")

// The shape of the workload. Each watcher hears about more users than its
// mailbox holds (itself, its subscriptions and its friend-only targets: 13
// against a FeedSize of 8), so every mailbox that is not drained is full
// from the setup on and overflows with every new user. A change of a target
// reaches stalledWatchers*(stalledSubs+stalledFriendsOnly)/stalledTargets
// = 12 watcher sessions on average, plus the target's own.
const (
	stalledWatchers    = 10_000
	stalledTargets     = 10_000
	stalledSubs        = 10  // subscriptions per watcher
	stalledBoth        = 2   // of those, also listed as friends: still one event per change
	stalledFriendsOnly = 2   // friends per watcher that it does not subscribe to
	stalledFeed        = 8   // Config.FeedSize
	stalledWriters     = 4   // goroutines applying changes, each to its own targets
	stalledRounds      = 10  // pauses to measure the heap and drain the slow readers
	stalledSlowEvery   = 100 // every 100th watcher reads at each pause; the others never do
	stalledTextMax     = 16  // longest custom text the writers set, in bytes
)

// TestStalledReaders runs 10,000 watcher sessions that never read (a few
// read at long intervals) while a million changes of the users they watch
// flow, and checks that:
//
//   - the writers finish with no reader around: had the engine made a writer
//     wait on a session, the writer would stay blocked and the test says so;
//   - the heap stops growing once the mailboxes are full: between the first
//     tenth of the changes and the end it grows by less than swapping every
//     pending event's custom text for another could cost;
//   - Stats.Delivered is exactly the fan-out of what happened (each watcher
//     session once per change of a user it watches, friend and subscriber
//     alike), and every delivered event is drained, coalesced or lost:
//     Delivered - Coalesced - Lost = what the sessions drain, and Lost is the
//     sum of Session.Lost;
//   - a full mailbox holds exactly FeedSize users, one event each, and every
//     event still held equals GetUserStatus of its user (status, custom text
//     and version); a session that reads again never sees a version go back.
func TestStalledReaders(t *testing.T) {
	changes := stalledChangeCount()
	synctest.Test(t, func(t *testing.T) {
		// The fake clock stands still while the writers run, so no session
		// times out however long a run under -race takes.
		e := newEngine(t, presence.Config{
			StatusQuery:   true,
			NotifyFriends: true,
			FeedSize:      stalledFeed,
			QueryQuota:    presence.Quota{Calls: -1}, // the audit reads every user at every pause
		})
		w := newStalledWorld()
		heapBase := liveHeap()
		w.logInTargets(t, e)
		heapTargets := liveHeap()
		w.setUpWatchers(t, e)
		heapSetup := liveHeap()

		var heapFirst, heapEnd uint64
		var firstCount int
		done := 0
		for r := range stalledRounds {
			n := changes*(r+1)/stalledRounds - done
			w.runWriters(t, e, n)
			done += n
			if r == 0 {
				heapFirst, firstCount = liveHeap(), done
			}
			if r == stalledRounds-1 {
				heapEnd = liveHeap()
			}
			if t.Failed() {
				return
			}
			if r < stalledRounds-1 {
				w.drainSlowReaders(t, e)
			}
		}
		st := e.Stats()
		w.audit(t, e, st)

		// A watcher's share: its record and session, its full mailbox, and
		// its edges in both directions.
		perWatcher := func(h uint64) uint64 { return (h - heapTargets) / stalledWatchers }
		t.Logf("%d changes by %d writers to %d targets, %d watcher sessions (FeedSize %d)",
			changes, stalledWriters, stalledTargets, stalledWatchers, stalledFeed)
		t.Logf("heap: %.1f MB before any login, %.1f MB with the targets logged in; per watcher session %d B after setup, %d B after %d changes, %d B after %d",
			mb(heapBase), mb(heapTargets), perWatcher(heapSetup), perWatcher(heapFirst), firstCount, perWatcher(heapEnd), changes)
		t.Logf("Stats: Delivered %d, Coalesced %d, Lost %d", st.Delivered, st.Coalesced, st.Lost)

		// Once the mailboxes are full, what the engine holds has a fixed
		// shape: the same records, edges, sessions and mailbox nodes, the
		// targets' own sessions coming and going. Only the texts move: each
		// pending event of a watcher, and each target's record and its own
		// session's pending event, holds one custom text of at most
		// stalledTextMax bytes (the allocator's 16-byte class). Even if every
		// one of them went from "" to a text, the heap grows by no more than
		// that; 1 MiB more covers the targets' sessions (a few hundred bytes
		// each, for the few that are offline at one pause and online at the
		// next) and the runtime's own heap bookkeeping. Spread over the
		// changes in between, that is a few bytes per change (logged): an
		// engine that kept anything per change would go over it.
		textSlots := stalledWatchers*stalledFeed + 2*stalledTargets
		bound := int64(textSlots*stalledTextMax + 1<<20)
		growth := int64(heapEnd) - int64(heapFirst)
		t.Logf("heap growth from %d to %d changes: %d B (bound %d B, %.1f B per change)",
			firstCount, changes, growth, bound, float64(bound)/float64(changes-firstCount))
		if growth > bound {
			t.Errorf("heap grew by %d B between %d and %d changes, over the bound of %d B: memory does not plateau with stalled readers",
				growth, firstCount, changes, bound)
		}
	})
}

// stalledChangeCount is -stalled.changes, or a default that keeps a run
// under the race detector (several times slower per change) short.
func stalledChangeCount() int {
	if *stalledChanges > 0 {
		return *stalledChanges
	}
	if testing.Short() || raceDetectorOn() {
		return 50_000
	}
	return 1_000_000
}

// raceDetectorOn reports whether the test binary was built with -race. The
// build records its flags, which spares a pair of build-tagged files.
func raceDetectorOn() bool {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return false
	}
	for _, s := range bi.Settings {
		if s.Key == "-race" {
			return s.Value == "true"
		}
	}
	return false
}

// liveHeap returns the bytes of live heap objects.
func liveHeap() uint64 {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc
}

func mb(b uint64) float64 { return float64(b) / (1 << 20) }

// stalledWorld is the test's model of the workload: who watches whom, and
// how many events the engine must have placed in each session's mailbox.
type stalledWorld struct {
	watchers []*stalledWatcher
	targets  []*stalledTarget
	writers  []*stalledWriter
	index    map[string]int32 // target ID -> index in targets
}

// stalledWatcher is a user with one session that watches targets.
type stalledWatcher struct {
	id        string
	s         *presence.Session
	subs      []int32 // subscribed targets, the first stalledBoth also friends
	friends   []int32 // friend-only targets
	slow      bool    // drained at every pause; the others only at the end
	delivered uint64  // events placed by the setup; the writers count theirs apart
	drained   uint64
	seen      map[string]uint64 // slow readers: the version of each user last drained
}

// stalledTarget is a watched user. Exactly one writer changes it, so the
// fields are that writer's alone while it runs.
type stalledTarget struct {
	id        string
	status    presence.Status
	s         *presence.Session // the live session of its one device, nil when not Online
	delivered uint64            // events placed in s's mailbox
	seen      uint64            // the version its own sessions last drained
	watchers  []int32           // watchers notified of its changes, each once
	changed   bool
}

// stalledWriter applies changes to the targets it owns and counts, per
// watcher, the events those changes place.
type stalledWriter struct {
	rng       *rand.Rand
	targets   []*stalledTarget
	text      int
	toWatcher []uint64 // events placed in each watcher's mailbox by this writer's changes

	// The targets' own sessions that ended: the writer, as the host would,
	// reads what is left in each and drops it.
	selfDelivered, selfDrained, selfLost uint64
}

func newStalledWorld() *stalledWorld {
	w := &stalledWorld{index: make(map[string]int32, stalledTargets)}
	for i := range stalledTargets {
		id := fmt.Sprintf("t%04d", i)
		w.targets = append(w.targets, &stalledTarget{id: id, status: presence.Unlogined})
		w.index[id] = int32(i)
	}
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range stalledWatchers {
		picked := make([]int32, 0, stalledSubs+stalledFriendsOnly)
		for len(picked) < cap(picked) {
			if x := rng.Int32N(stalledTargets); !slices.Contains(picked, x) {
				picked = append(picked, x)
			}
		}
		wa := &stalledWatcher{
			id:      fmt.Sprintf("w%05d", i),
			subs:    picked[:stalledSubs],
			friends: picked[stalledSubs:],
			slow:    i%stalledSlowEvery == 0,
		}
		if wa.slow {
			wa.seen = make(map[string]uint64, 1+len(picked))
		}
		for _, x := range picked {
			w.targets[x].watchers = append(w.targets[x].watchers, int32(i))
		}
		w.watchers = append(w.watchers, wa)
	}
	for i := range stalledWriters {
		wr := &stalledWriter{rng: rand.New(rand.NewPCG(uint64(i), 3)), toWatcher: make([]uint64, stalledWatchers)}
		for x := i; x < stalledTargets; x += stalledWriters {
			wr.targets = append(wr.targets, w.targets[x])
		}
		w.writers = append(w.writers, wr)
	}
	return w
}

// logInTargets logs every target in; its login reaches its own new session.
func (w *stalledWorld) logInTargets(t *testing.T, e *presence.Engine) {
	for _, tg := range w.targets {
		tg.s, tg.status, tg.delivered = login(t, e, tg.id, "d"), presence.Online, 1
	}
}

// setUpWatchers logs every watcher in and builds its edges, counting the
// events this places: the login reaches the watcher's own session, and each
// subscription delivers the target's state to it.
func (w *stalledWorld) setUpWatchers(t *testing.T, e *presence.Engine) {
	for _, wa := range w.watchers {
		wa.s, wa.delivered = login(t, e, wa.id, "d"), 1
		friends := append(slices.Clone(wa.subs[:stalledBoth]), wa.friends...)
		noErr(t, "AddFriends "+wa.id, e.AddFriends(wa.id, w.ids(friends)...))
		noErr(t, "SubscribeUserStatus "+wa.id, second(e.SubscribeUserStatus(wa.id, w.ids(wa.subs))))
		wa.delivered += uint64(len(wa.subs))
	}
}

func (w *stalledWorld) ids(xs []int32) []string {
	out := make([]string, len(xs))
	for i, x := range xs {
		out[i] = w.targets[x].id
	}
	return out
}

// runWriters has the writers apply n changes between them, with nobody
// reading any session meanwhile.
func (w *stalledWorld) runWriters(t *testing.T, e *presence.Engine, n int) {
	var wg sync.WaitGroup
	for i, wr := range w.writers {
		count := n*(i+1)/len(w.writers) - n*i/len(w.writers)
		wg.Go(func() {
			for range count {
				if err := wr.step(e); err != nil {
					t.Errorf("writer %d: %v", i, err)
					return
				}
			}
		})
	}
	finished := make(chan struct{})
	go func() {
		wg.Wait()
		close(finished)
	}()
	// Wait returns once every other goroutine of the bubble has exited or
	// is blocked for good (on a channel, a condition, a WaitGroup; a mutex
	// does not count). With no reader around, a writer that the engine made
	// wait for one would be blocked for good here.
	synctest.Wait()
	select {
	case <-finished:
	default:
		t.Fatal("the writers are blocked, and no session is being read: the engine made a writer wait on a reader")
	}
}

// step applies one change to one of the writer's targets: mostly a new
// custom text, sometimes a disconnect or a logout, and a login for a target
// that is not Online. Each is a change of status or text, which the engine
// delivers to the target's watchers and to its own live session.
func (wr *stalledWriter) step(e *presence.Engine) error {
	tg := wr.targets[wr.rng.IntN(len(wr.targets))]
	roll := wr.rng.IntN(100)
	switch {
	case tg.status == presence.Online && roll < 2:
		if err := tg.s.Disconnect(); err != nil {
			return fmt.Errorf("Disconnect %s: %v", tg.id, err)
		}
		tg.status = presence.Offline
		if err := wr.retire(tg); err != nil {
			return err
		}
	case tg.status == presence.Online && roll < 4, tg.status == presence.Offline && roll < 50:
		if err := e.Logout(tg.id, "d"); err != nil {
			return fmt.Errorf("Logout %s: %v", tg.id, err)
		}
		tg.status = presence.Unlogined
		if tg.s != nil {
			if err := wr.retire(tg); err != nil {
				return err
			}
		}
	case tg.status == presence.Online:
		wr.text++
		text := "busy " + strconv.Itoa(wr.text)
		if len(text) > stalledTextMax {
			return fmt.Errorf("custom text %q is longer than the %d bytes the memory bound assumes", text, stalledTextMax)
		}
		if err := e.SetSelfStatus(tg.id, text); err != nil {
			return fmt.Errorf("SetSelfStatus %s: %v", tg.id, err)
		}
	default:
		s, err := e.Login(tg.id, "d")
		if err != nil {
			return fmt.Errorf("Login %s: %v", tg.id, err)
		}
		tg.s, tg.status, tg.delivered = s, presence.Online, 0
	}
	for _, x := range tg.watchers {
		wr.toWatcher[x]++
	}
	if tg.s != nil {
		tg.delivered++
	}
	tg.changed = true
	return nil
}

// retire reads what is left in the target's ended session and drops it. A
// session hears only about its own user, so whatever it was sent since its
// login coalesced into exactly one pending event, and nothing was lost.
func (wr *stalledWriter) retire(tg *stalledTarget) error {
	evs := tg.s.Drain(nil)
	if err := checkOwnEvents(tg, evs); err != nil {
		return err
	}
	wr.selfDelivered += tg.delivered
	wr.selfDrained += uint64(len(evs))
	wr.selfLost += tg.s.Lost()
	tg.s, tg.delivered = nil, 0
	return nil
}

func checkOwnEvents(tg *stalledTarget, evs []presence.Event) error {
	if len(evs) != 1 || evs[0].UserID != tg.id {
		return fmt.Errorf("the session of %s holds %+v, want one event about %s", tg.id, evs, tg.id)
	}
	if v := evs[0].Version; v <= tg.seen {
		return fmt.Errorf("the sessions of %s saw its version go from %d to %d", tg.id, tg.seen, v)
	}
	tg.seen = evs[0].Version
	return nil
}

// current reads every user's state as GetUserStatus reports it.
func (w *stalledWorld) current(t *testing.T, e *presence.Engine) map[string]presence.UserStatus {
	ids := make([]string, 0, stalledTargets+stalledWatchers)
	for _, tg := range w.targets {
		ids = append(ids, tg.id)
	}
	for _, wa := range w.watchers {
		ids = append(ids, wa.id)
	}
	out := make(map[string]presence.UserStatus, len(ids))
	for batch := range slices.Chunk(ids, 500) {
		got, err := e.GetUserStatus("auditor", batch)
		noErr(t, "GetUserStatus", err)
		for _, us := range got {
			out[us.UserID] = us
		}
	}
	return out
}

// drainSlowReaders is a pause: the writers are idle, and the slow readers
// catch up.
func (w *stalledWorld) drainSlowReaders(t *testing.T, e *presence.Engine) {
	now := w.current(t, e)
	for _, wa := range w.watchers {
		if wa.slow {
			w.drainWatcher(t, wa, now)
		}
	}
}

// drainWatcher empties a watcher's mailbox and checks what it held: at most
// FeedSize users, one event each, each about a user it hears about and
// equal to that user's current state, and (for a reader that read before)
// newer than what it read last time.
func (w *stalledWorld) drainWatcher(t *testing.T, wa *stalledWatcher, now map[string]presence.UserStatus) []presence.Event {
	t.Helper()
	evs := wa.s.Drain(nil)
	wa.drained += uint64(len(evs))
	if len(evs) > stalledFeed {
		t.Errorf("%s holds %d events, over FeedSize %d", wa.id, len(evs), stalledFeed)
	}
	held := make(map[string]bool, len(evs))
	for _, ev := range evs {
		if held[ev.UserID] {
			t.Errorf("%s holds two events about %s: the mailbox keeps the latest one per user", wa.id, ev.UserID)
		}
		held[ev.UserID] = true
		if !w.hears(wa, ev.UserID) {
			t.Errorf("%s got an event about %s, which it neither watches nor is", wa.id, ev.UserID)
		}
		want := now[ev.UserID]
		if ev.Status != want.Status || ev.Custom != want.Custom || ev.Version != want.Version {
			t.Errorf("%s holds %s as %v %q version %d (%v); GetUserStatus says %v %q version %d",
				wa.id, ev.UserID, ev.Status, ev.Custom, ev.Version, ev.Reason, want.Status, want.Custom, want.Version)
		}
		if wa.seen != nil {
			// Every event after the first drain reports a change, and
			// changes carry strictly increasing versions.
			if last, ok := wa.seen[ev.UserID]; ok && ev.Version <= last {
				t.Errorf("%s read %s at version %d, after version %d", wa.id, ev.UserID, ev.Version, last)
			}
			wa.seen[ev.UserID] = ev.Version
		}
	}
	return evs
}

func (w *stalledWorld) hears(wa *stalledWatcher, id string) bool {
	if id == wa.id {
		return true
	}
	x, ok := w.index[id]
	return ok && (slices.Contains(wa.subs, x) || slices.Contains(wa.friends, x))
}

// audit drains every session once the writers are done and checks the
// accounting: every event the engine placed in a mailbox was drained,
// replaced by a newer one about the same user (Coalesced), or evicted from
// a full mailbox (Lost).
func (w *stalledWorld) audit(t *testing.T, e *presence.Engine, st presence.Stats) {
	now := w.current(t, e)
	var delivered, drained, lost uint64

	for i, wa := range w.watchers {
		evs := w.drainWatcher(t, wa, now)
		sent := wa.delivered
		for _, wr := range w.writers {
			sent += wr.toWatcher[i]
		}
		delivered += sent
		drained += wa.drained
		lost += wa.s.Lost()
		if wa.drained+wa.s.Lost() > sent {
			t.Errorf("%s drained %d events and lost %d, more than the %d sent to it", wa.id, wa.drained, wa.s.Lost(), sent)
		} else if !wa.slow {
			// It heard about itself, its subscriptions and every friend
			// that changed: more users than its mailbox holds. So the
			// mailbox is full, and every user it no longer holds was
			// evicted at least once.
			heard := uint64(1 + len(wa.subs))
			for _, x := range wa.friends {
				if w.targets[x].changed {
					heard++
				}
			}
			if len(evs) != stalledFeed {
				t.Errorf("%s never read and heard about %d users, but holds %d events, want FeedSize %d", wa.id, heard, len(evs), stalledFeed)
			}
			if kept := uint64(len(evs)); wa.s.Lost() < heard-kept {
				t.Errorf("%s heard about %d users and holds %d, but Lost() = %d", wa.id, heard, kept, wa.s.Lost())
			}
		}
	}
	for _, tg := range w.targets {
		if tg.s == nil {
			continue
		}
		evs := tg.s.Drain(nil)
		if err := checkOwnEvents(tg, evs); err != nil {
			t.Error(err)
		} else if want := now[tg.id]; evs[0].Status != want.Status || evs[0].Custom != want.Custom || evs[0].Version != want.Version {
			t.Errorf("%s's own session holds %v %q version %d; GetUserStatus says %v %q version %d",
				tg.id, evs[0].Status, evs[0].Custom, evs[0].Version, want.Status, want.Custom, want.Version)
		}
		delivered += tg.delivered
		drained += uint64(len(evs))
		lost += tg.s.Lost()
	}
	for _, wr := range w.writers {
		delivered += wr.selfDelivered
		drained += wr.selfDrained
		lost += wr.selfLost
	}

	if st.Delivered != delivered {
		t.Errorf("Stats.Delivered = %d, but the logins, subscriptions and changes reach sessions %d times", st.Delivered, delivered)
	}
	if st.Lost != lost {
		t.Errorf("Stats.Lost = %d, but the sessions' Lost() add up to %d", st.Lost, lost)
	}
	if st.Delivered-st.Coalesced-st.Lost != drained {
		t.Errorf("Stats: Delivered %d - Coalesced %d - Lost %d = %d, but the sessions drained %d events",
			st.Delivered, st.Coalesced, st.Lost, st.Delivered-st.Coalesced-st.Lost, drained)
	}
	if st.Coalesced == 0 || st.Lost == 0 {
		t.Errorf("Stats: Coalesced %d, Lost %d: the workload should both coalesce and overflow", st.Coalesced, st.Lost)
	}
}
