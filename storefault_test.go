package presence_test

// Store faults: a Store that fails, stalls until its context ends, or hands
// back partial or damaged data. The engine must keep serving through failed
// saves and report them in Stats, bound every Save and the restoring Load by
// Config.SnapshotTimeout, and never start from half a snapshot: a failed
// restore gives no engine, leaves nothing running and leaves the stored
// snapshot as it was, so the next start with a healthy store gets all of it.
// Everything runs in synctest bubbles: the snapshot ticker and the timeouts
// run on the fake clock.

import (
	"context"
	"errors"
	"iter"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
	"go.uber.org/goleak"

	"github.com/presencekit/presence"
)

// errInjected is what a faultStore returns when a failing fault strikes.
var errInjected = errors.New("injected store failure")

// faultKind is what a faultStore does when its fault strikes.
type faultKind int

const (
	noFault  faultKind = iota
	failing            // return errInjected
	stalling           // block until ctx ends, then return ctx.Err(), as the Store contract asks
	pausing            // block until ctx ends, then carry on: a correct Store that was only slow
)

// fault strikes at one batch boundary of a Save or Load: after `after`
// batches have passed through (0: before the first).
type fault struct {
	kind  faultKind
	after int
}

func (f fault) strike(ctx context.Context, batches int) error {
	if f.kind == noFault || batches != f.after {
		return nil
	}
	switch f.kind {
	case failing:
		return errInjected
	case stalling:
		<-ctx.Done()
		return ctx.Err()
	case pausing:
		<-ctx.Done()
	}
	return nil
}

// loadBatch is how many records a faultStore hands to add at a time: small,
// so that a handful of users makes several batches and a fault can strike
// between them.
const loadBatch = 3

// faultStore is a Store held in memory that behaves as the contract asks
// (copies what it keeps, commits only a complete stream, Load's batches are
// valid only until add returns) until its fault strikes. It fails the test
// if two Saves ever overlap.
type faultStore struct {
	t      *testing.T
	saving atomic.Int32 // Saves running now

	mu        sync.Mutex
	saveFault fault
	loadFault fault
	records   []presence.Record // the committed snapshot, what Load hands out
	commits   int
	saves     []saveResult    // what each Save saw, in order
	loadCtx   context.Context // of the latest Load
}

// saveResult is what the store saw of one Save.
type saveResult struct {
	received  int           // records received, complete stream or not
	streamErr error         // the error the records stream yielded, if any
	took      time.Duration // from the call to the return
}

func newFaultStore(t *testing.T) *faultStore { return &faultStore{t: t} }

func (s *faultStore) Save(ctx context.Context, records iter.Seq2[[]presence.Record, error]) error {
	if s.saving.Add(1) != 1 {
		s.t.Error("Store.Save called while another Save is running")
	}
	defer s.saving.Add(-1)
	start := time.Now()
	s.mu.Lock()
	f := s.saveFault
	s.mu.Unlock()

	var got []presence.Record
	var streamErr error
	err := f.strike(ctx, 0)
	if err == nil {
		batches := 0
		for batch, err2 := range records {
			if err2 != nil {
				streamErr, err = err2, err2
				break
			}
			for _, r := range batch {
				got = append(got, cloneRecord(r))
			}
			batches++
			// Let the engine's copier run ahead meanwhile, as it would
			// while a real store writes.
			runtime.Gosched()
			if err = f.strike(ctx, batches); err != nil {
				break
			}
		}
	}

	s.mu.Lock()
	defer s.mu.Unlock()
	s.saves = append(s.saves, saveResult{received: len(got), streamErr: streamErr, took: time.Since(start)})
	if err != nil {
		return err // an incomplete stream replaces nothing
	}
	s.records = got
	s.commits++
	return nil
}

func (s *faultStore) Load(ctx context.Context, add func([]presence.Record) error) error {
	s.mu.Lock()
	f, records := s.loadFault, s.records
	s.loadCtx = ctx
	s.mu.Unlock()
	batch := make([]presence.Record, 0, loadBatch)
	for batches := 0; ; batches++ {
		if err := f.strike(ctx, batches); err != nil {
			return err
		}
		if len(records) == 0 {
			return nil
		}
		n := min(loadBatch, len(records))
		batch = batch[:0]
		for _, r := range records[:n] {
			batch = append(batch, cloneRecord(r))
		}
		records = records[n:]
		err := add(batch)
		scribble(batch) // the batch was valid only until add returned
		if err != nil {
			return err
		}
	}
}

func (s *faultStore) setSaveFault(f fault) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.saveFault = f
}

func (s *faultStore) setLoadFault(f fault) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.loadFault = f
}

func (s *faultStore) saved() []presence.Record {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.records
}

func (s *faultStore) setSaved(records []presence.Record) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.records = records
}

func (s *faultStore) commitCount() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.commits
}

// lastSave returns what the latest Save that has returned saw.
func (s *faultStore) lastSave() saveResult {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.saves) == 0 {
		return saveResult{}
	}
	return s.saves[len(s.saves)-1]
}

// firstSave returns what the first Save saw.
func (s *faultStore) firstSave() saveResult {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.saves) == 0 {
		return saveResult{}
	}
	return s.saves[0]
}

func (s *faultStore) lastLoadCtx() context.Context {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.loadCtx
}

func cloneRecord(r presence.Record) presence.Record {
	r.Devices = slices.Clone(r.Devices)
	r.Subscriptions = slices.Clone(r.Subscriptions)
	r.Friends = slices.Clone(r.Friends)
	return r
}

// scribble overwrites a batch the engine no longer owns, so that anything it
// kept of it shows up as a user or device called "scribbled".
func scribble(batch []presence.Record) {
	for i := range batch {
		r := &batch[i]
		for j := range r.Devices {
			r.Devices[j] = presence.DeviceRecord{DeviceID: "scribbled"}
		}
		for _, list := range [][]string{r.Subscriptions, r.Friends} {
			for j := range list {
				list[j] = "scribbled"
			}
		}
		*r = presence.Record{UserID: "scribbled", Custom: "scribbled"}
	}
}

// manyUsers is enough users that a snapshot of them comes in several
// batches, so a fault can strike in the middle of the stream.
const manyUsers = 300

// loginAll logs each user in on a "phone".
func loginAll(t *testing.T, e *presence.Engine, users []string) {
	t.Helper()
	for _, u := range users {
		login(t, e, u, "phone")
	}
}

// wantSaveFailed checks that Stats reports the latest snapshot as failed
// because of cause, and failures failed saves in all.
func wantSaveFailed(t *testing.T, e *presence.Engine, cause error, failures uint64) {
	t.Helper()
	st := e.Stats()
	if !errors.Is(st.LastSnapshotErr, cause) {
		t.Fatalf("Stats().LastSnapshotErr = %v, want an error wrapping %v", st.LastSnapshotErr, cause)
	}
	if st.SnapshotFailures != failures {
		t.Fatalf("Stats().SnapshotFailures = %d, want %d", st.SnapshotFailures, failures)
	}
}

// wantReceivedPart checks that the latest Save got some records but not all
// total of them: the fault struck in the middle of the stream.
func wantReceivedPart(t *testing.T, s *faultStore, total int) {
	t.Helper()
	if got := s.lastSave().received; got == 0 || got >= total {
		t.Fatalf("the store received %d of %d records before its fault struck; the test needs it to strike mid-stream", got, total)
	}
}

// ---- saving ----------------------------------------------------------------

func TestFailingSavesAreReportedWhileEngineKeepsServing(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s := newFaultStore(t)
		s.setSaveFault(fault{kind: failing})
		e := newEngine(t, presence.Config{StatusQuery: true, Store: s}) // a snapshot every minute
		users := ids("u", manyUsers)
		loginAll(t, e, users)
		bob := watch(t, e, "bob", "u0")

		// A periodic save whose Store fails at once.
		advance(time.Minute)
		wantSaveFailed(t, e, errInjected, 1)
		if st := e.Stats(); !st.LastSnapshot.IsZero() {
			t.Fatalf("Stats().LastSnapshot = %v after failed saves only, want zero", st.LastSnapshot)
		}

		// Serving goes on: changes are applied and delivered.
		noErr(t, "SetSelfStatus", e.SetSelfStatus("u0", "still here"))
		wantEvents(t, bob, ev("u0", online, "still here", presence.ReasonCustomStatus))
		login(t, e, "carol", "laptop")
		wantState(t, e, "carol", online, "", "laptop")

		// Snapshot reports the failure to its caller as well as in Stats.
		if err := e.Snapshot(context.Background()); !errors.Is(err, errInjected) {
			t.Fatalf("Snapshot = %v, want an error wrapping %v", err, errInjected)
		}
		wantSaveFailed(t, e, errInjected, 2)

		// A Store that fails halfway through the records.
		s.setSaveFault(fault{kind: failing, after: 1})
		advance(time.Minute)
		wantSaveFailed(t, e, errInjected, 3)
		wantReceivedPart(t, s, manyUsers+2)
		noErr(t, "SetSelfStatus", e.SetSelfStatus("u0", "and still"))
		wantEvents(t, bob, ev("u0", online, "and still", presence.ReasonCustomStatus))
		if n := s.commitCount(); n != 0 {
			t.Fatalf("the store committed %d snapshots, want none", n)
		}

		// The next tick tries again; its success clears the error.
		s.setSaveFault(fault{})
		lastFailure := time.Now()
		advance(time.Minute)
		st := e.Stats()
		if st.LastSnapshotErr != nil || st.SnapshotFailures != 3 {
			t.Fatalf("after a good save: LastSnapshotErr = %v, SnapshotFailures = %d; want nil, 3", st.LastSnapshotErr, st.SnapshotFailures)
		}
		if !st.LastSnapshot.After(lastFailure) || st.LastSnapshot.After(time.Now()) {
			t.Fatalf("Stats().LastSnapshot = %v, want after %v and not after now (%v)", st.LastSnapshot, lastFailure, time.Now())
		}
		goodAt := st.LastSnapshot
		if n, saved := s.commitCount(), len(s.saved()); n != 1 || saved != manyUsers+2 {
			t.Fatalf("the store committed %d snapshots, the latest of %d records; want 1 of %d", n, saved, manyUsers+2)
		}

		// Close returns its final save's error, and counts it.
		s.setSaveFault(fault{kind: failing})
		if err := e.Close(); !errors.Is(err, errInjected) {
			t.Fatalf("Close = %v, want an error wrapping %v", err, errInjected)
		}
		wantSaveFailed(t, e, errInjected, 4)
		if st := e.Stats(); !st.LastSnapshot.Equal(goodAt) {
			t.Fatalf("Stats().LastSnapshot = %v after a failed Close, want the last good save's %v", st.LastSnapshot, goodAt)
		}
		if n, saved := s.commitCount(), len(s.saved()); n != 1 || saved != manyUsers+2 {
			t.Fatalf("after the failed Close the store holds %d commits, the latest of %d records; want the good one (1, %d)", n, saved, manyUsers+2)
		}
	})
}

func TestStalledSaveEndsAtSnapshotTimeoutWithoutHoldingUpWriters(t *testing.T) {
	for _, tc := range []struct {
		name  string
		after int
	}{
		{"before reading any record", 0},
		{"after reading some records", 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				const timeout = 10 * time.Second
				s := newFaultStore(t)
				e := newEngine(t, presence.Config{StatusQuery: true, Store: s, SnapshotTimeout: timeout})
				users := ids("u", manyUsers)
				loginAll(t, e, users)
				bob := watch(t, e, "bob", "u0")
				s.setSaveFault(fault{kind: stalling, after: tc.after})

				advance(time.Minute) // the periodic save starts and stalls
				if s.saving.Load() != 1 {
					t.Fatal("no save is running after the first SnapshotInterval")
				}

				// Writers on every shard go through while the save is stalled.
				// (One stuck behind it would hang this test: a goroutine
				// waiting on a mutex keeps the fake clock still, so the
				// save's deadline would never come.)
				for _, u := range users {
					noErr(t, "SetSelfStatus", e.SetSelfStatus(u, "busy"))
				}
				wantEvents(t, bob, ev("u0", online, "busy", presence.ReasonCustomStatus))
				login(t, e, "dave", "phone")
				noErr(t, "Logout", e.Logout("u1", "phone"))
				noErr(t, "GetUserStatus", second(e.GetUserStatus("bob", users[:10])))
				wantState(t, e, "u1", unlogined, "")
				st := e.Stats()
				if st.LastSnapshotErr != nil || st.SnapshotFailures != 0 {
					t.Fatalf("while the save runs: LastSnapshotErr = %v, SnapshotFailures = %d; want nil, 0", st.LastSnapshotErr, st.SnapshotFailures)
				}

				// The save ends exactly at its deadline (fake clock) and
				// commits nothing.
				advance(timeout)
				if s.saving.Load() != 0 {
					t.Fatalf("the save still runs %v after it started; SnapshotTimeout is %v", timeout, timeout)
				}
				if took := s.lastSave().took; took != timeout {
					t.Fatalf("the stalled save's context ended after %v, want SnapshotTimeout (%v)", took, timeout)
				}
				wantSaveFailed(t, e, context.DeadlineExceeded, 1)
				if n := s.commitCount(); n != 0 {
					t.Fatalf("the store committed %d snapshots, want none", n)
				}
				if tc.after > 0 {
					wantReceivedPart(t, s, manyUsers+1)
				}

				// Close during the next stalled save: the save in flight is
				// given up and the final one is bounded by SnapshotTimeout.
				advance(time.Minute - timeout)
				if s.saving.Load() != 1 {
					t.Fatal("no save is running after the second SnapshotInterval")
				}
				start := time.Now()
				err := e.Close()
				if took := time.Since(start); took > timeout {
					t.Fatalf("Close took %v with a stalled store, want at most SnapshotTimeout (%v)", took, timeout)
				}
				if !errors.Is(err, context.DeadlineExceeded) {
					t.Fatalf("Close = %v, want an error wrapping %v", err, context.DeadlineExceeded)
				}
				if st := e.Stats(); !errors.Is(st.LastSnapshotErr, context.DeadlineExceeded) {
					t.Fatalf("Stats().LastSnapshotErr after Close = %v, want one wrapping %v", st.LastSnapshotErr, context.DeadlineExceeded)
				}
				if n := s.commitCount(); n != 0 {
					t.Fatalf("the store committed %d snapshots, want none", n)
				}
			})
		})
	}
}

// A Store that is still reading when its context ends must learn it from the
// stream itself: the records iterator yields the context's error, so a
// correct Store returns it instead of committing part of the state.
func TestSaveStreamYieldsErrorWhenContextEndsMidStream(t *testing.T) {
	const timeout = 10 * time.Second
	setUp := func(t *testing.T) (*faultStore, *presence.Engine) {
		s := newFaultStore(t)
		e := newEngine(t, presence.Config{Store: s, SnapshotTimeout: timeout})
		loginAll(t, e, ids("u", manyUsers))
		s.setSaveFault(fault{kind: pausing, after: 1})
		return s, e
	}
	wantStreamEnded := func(t *testing.T, s *faultStore, cause error) {
		t.Helper()
		got := s.lastSave()
		if !errors.Is(got.streamErr, cause) {
			t.Fatalf("the records stream yielded %v after its context ended, want an error wrapping %v", got.streamErr, cause)
		}
		wantReceivedPart(t, s, manyUsers)
		if n := s.commitCount(); n != 0 {
			t.Fatalf("the store committed %d snapshots, want none", n)
		}
	}

	t.Run("SnapshotTimeout", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			s, e := setUp(t)
			advance(time.Minute + timeout)
			wantStreamEnded(t, s, context.DeadlineExceeded)
			wantSaveFailed(t, e, context.DeadlineExceeded, 1)
		})
	})

	t.Run("caller cancels Snapshot", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			s, e := setUp(t)
			ctx, cancel := context.WithCancel(context.Background())
			result := make(chan error)
			go func() { result <- e.Snapshot(ctx) }()
			synctest.Wait() // the store holds part of the records and waits
			cancel()
			if err := <-result; !errors.Is(err, context.Canceled) {
				t.Fatalf("Snapshot = %v, want an error wrapping %v", err, context.Canceled)
			}
			wantStreamEnded(t, s, context.Canceled)
			wantSaveFailed(t, e, context.Canceled, 1)
		})
	})

	t.Run("Close cancels the periodic save", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			s, e := setUp(t)
			advance(time.Minute) // the periodic save holds part of the records and waits
			s.setSaveFault(fault{})
			noErr(t, "Close", e.Close())
			// The cancelled save learnt it from the stream and committed
			// nothing; Close's own save is whole.
			if first := s.firstSave(); !errors.Is(first.streamErr, context.Canceled) || first.received == 0 || first.received >= manyUsers {
				t.Fatalf("the save Close cancelled received %d of %d records, then the stream yielded %v; want part of them, then an error wrapping %v",
					first.received, manyUsers, first.streamErr, context.Canceled)
			}
			if n, saved := s.commitCount(), len(s.saved()); n != 1 || saved != manyUsers {
				t.Fatalf("the store committed %d snapshots, the latest of %d records; want Close's alone, of %d", n, saved, manyUsers)
			}
		})
	})
}

// Only one Save runs at a time, whether it comes from the ticker, from
// Snapshot or from Close; and once Close has returned no Save runs again.
func TestSavesNeverOverlap(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s := newFaultStore(t) // fails the test if two Saves overlap
		e := newEngine(t, presence.Config{Store: s, SnapshotInterval: time.Second})
		loginAll(t, e, ids("u", manyUsers))

		// The callers wake when the ticker fires, so each tick's save and
		// theirs contend for the store at the same instant. (The store takes
		// no fake time: a Snapshot waiting for another waits on a mutex,
		// which keeps the fake clock still.)
		const callers, rounds = 4, 5
		var wg sync.WaitGroup
		for range callers {
			wg.Go(func() {
				for range rounds {
					if err := e.Snapshot(context.Background()); err != nil {
						t.Errorf("Snapshot: %v", err)
						return
					}
					time.Sleep(time.Second)
				}
			})
		}
		wg.Wait()
		if n := s.commitCount(); n < callers*rounds {
			t.Fatalf("the store committed %d snapshots, want at least the %d asked for", n, callers*rounds)
		}

		// Callers that keep asking for snapshots while Close runs.
		stopped := make(chan error, callers)
		for range callers {
			go func() {
				for {
					if err := e.Snapshot(context.Background()); err != nil {
						stopped <- err
						return
					}
				}
			}()
		}
		noErr(t, "Close", e.Close())
		afterClose := s.commitCount()
		for range callers {
			wantErr(t, "Snapshot during Close", <-stopped, presence.ErrClosed)
		}
		synctest.Wait()
		if n := s.commitCount(); n != afterClose {
			t.Fatalf("%d snapshots were saved after Close returned: Close's final snapshot must be the last", n-afterClose)
		}
		if saved := len(s.saved()); saved != manyUsers {
			t.Fatalf("the last snapshot holds %d records, want %d", saved, manyUsers)
		}
	})
}

// ---- restoring -------------------------------------------------------------

// population is what Stats counts of an engine's state.
type population struct{ Users, Online, Subscriptions, Friendships int }

func populationOf(e *presence.Engine) population {
	st := e.Stats()
	return population{st.Users, st.Online, st.Subscriptions, st.Friendships}
}

// view is everything a host can read of the given users.
type view struct {
	Population    population
	Users         []presence.OnlineStatus
	Subscriptions map[string][]string
}

func viewOf(e *presence.Engine, users []string) view {
	v := view{Population: populationOf(e), Users: e.QueryOnlineStatus(users), Subscriptions: map[string][]string{}}
	for _, u := range users {
		v.Subscriptions[u] = e.Subscriptions(u)
	}
	return v
}

// A restored device has no Session until it logs in again; everything else
// comes back as it was.
var restoredAsSaved = []cmp.Option{cmpopts.IgnoreFields(presence.SessionInfo{}, "Connected"), cmpopts.EquateEmpty()}

// populate gives e a little of everything a snapshot holds: users online on
// one or two devices, with and without custom status, users offline with a
// device still logged in, subscriptions, friends, and a user who subscribes
// without ever logging in. It returns the users' IDs.
func populate(t *testing.T, e *presence.Engine) []string {
	t.Helper()
	users := ids("u", 20)
	for i, u := range users {
		s := login(t, e, u, "phone")
		if i%3 == 0 {
			login(t, e, u, "laptop")
		}
		if i%2 == 0 {
			noErr(t, "SetSelfStatus", e.SetSelfStatus(u, "status of "+u))
		}
		if i%5 == 4 {
			noErr(t, "Disconnect", s.Disconnect())
		}
	}
	for i, u := range users {
		noErr(t, "SubscribeUserStatus", second(e.SubscribeUserStatus(u, []string{users[(i+1)%20], users[(i+7)%20]})))
		noErr(t, "AddFriends", e.AddFriends(u, users[(i+3)%20]))
	}
	noErr(t, "SubscribeUserStatus", second(e.SubscribeUserStatus("lurker", users[:5])))
	return append(users, "lurker")
}

// savedWorld fills a store from a populated engine and returns the store,
// the users and what the engine showed of them.
func savedWorld(t *testing.T, cfg presence.Config) (*faultStore, []string, view) {
	t.Helper()
	s := newFaultStore(t)
	cfg.Store = s
	src, err := presence.New(cfg)
	noErr(t, "New", err)
	users := populate(t, src)
	want := viewOf(src, users)
	noErr(t, "Close", src.Close())
	if n := len(s.saved()); n != len(users) {
		t.Fatalf("the source engine saved %d records, want %d", n, len(users))
	}
	return s, users, want
}

// insertAt returns a copy of records with extra inserted at i.
func insertAt(records []presence.Record, i int, extra presence.Record) []presence.Record {
	return slices.Insert(slices.Clone(records), i, extra)
}

func TestFailedRestoreLeavesNoEngineAndNothingHalfRestored(t *testing.T) {
	const timeout = 10 * time.Second
	device := []presence.DeviceRecord{{DeviceID: "phone", Connected: true}}
	for _, tc := range []struct {
		name   string
		fault  fault
		damage func(records []presence.Record) ([]presence.Record, string) // damaged records, the user the error must name
		cause  error                                                       // the error New's must wrap, if it can be named
	}{
		{name: "Load fails before any batch", fault: fault{kind: failing}, cause: errInjected},
		{name: "Load fails after some batches", fault: fault{kind: failing, after: 2}, cause: errInjected},
		{name: "Load stalls before any batch", fault: fault{kind: stalling}, cause: context.DeadlineExceeded},
		{name: "Load stalls after some batches", fault: fault{kind: stalling, after: 2}, cause: context.DeadlineExceeded},
		{name: "user saved twice, in a later batch", damage: func(r []presence.Record) ([]presence.Record, string) {
			return insertAt(r, 7, r[0]), r[0].UserID
		}},
		{name: "user saved twice, in one batch", damage: func(r []presence.Record) ([]presence.Record, string) {
			return insertAt(r, 4, r[3]), r[3].UserID
		}},
		{name: "empty user ID", damage: func(r []presence.Record) ([]presence.Record, string) {
			return insertAt(r, 4, presence.Record{UserID: "", Devices: device}), ""
		}},
		{name: "user ID not UTF-8", damage: func(r []presence.Record) ([]presence.Record, string) {
			return insertAt(r, 4, presence.Record{UserID: "bad\xff", Devices: device}), "bad\xff"
		}},
		{name: "device saved twice", damage: func(r []presence.Record) ([]presence.Record, string) {
			return insertAt(r, 4, presence.Record{UserID: "intruder", Devices: append(slices.Clone(device), device...)}), "intruder"
		}},
		{name: "subscription to itself", damage: func(r []presence.Record) ([]presence.Record, string) {
			return insertAt(r, 4, presence.Record{UserID: "intruder", Devices: device, Subscriptions: []string{"u1", "intruder"}}), "intruder"
		}},
		{name: "friend with a control character in its ID", damage: func(r []presence.Record) ([]presence.Record, string) {
			return insertAt(r, 4, presence.Record{UserID: "intruder", Devices: device, Friends: []string{"u1", "u\x002"}}), "intruder"
		}},
		{name: "custom status not UTF-8", damage: func(r []presence.Record) ([]presence.Record, string) {
			return insertAt(r, 4, presence.Record{UserID: "intruder", Devices: device, Custom: "\xfe"}), "intruder"
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				cfg := presence.Config{StatusQuery: true, NotifyFriends: true, SnapshotTimeout: timeout}
				s, users, want := savedWorld(t, cfg)
				good := s.saved()
				cfg.Store = s

				faulty := good
				var named string
				if tc.damage != nil {
					faulty, named = tc.damage(good)
					s.setSaved(faulty)
				}
				s.setLoadFault(tc.fault)
				before := goleak.IgnoreCurrent()
				start := time.Now()
				e, err := presence.New(cfg)
				took := time.Since(start)

				if e != nil || err == nil {
					if e != nil {
						_ = e.Close()
					}
					t.Fatalf("New returned an engine: %t, and the error %v; want no engine and an error", e != nil, err)
				}
				if tc.cause != nil && !errors.Is(err, tc.cause) {
					t.Fatalf("New's error %q does not wrap %v", err, tc.cause)
				}
				if tc.damage != nil && !strings.Contains(err.Error(), strconv.Quote(named)) {
					t.Fatalf("New's error %q does not name the user %q whose record is damaged", err, named)
				}
				if took > timeout {
					t.Fatalf("New took %v, want at most SnapshotTimeout (%v)", took, timeout)
				}
				// Nothing of the attempt lives on: no goroutine, no running
				// context, and no snapshot saved over the stored one.
				goleak.VerifyNone(t, before)
				if s.lastLoadCtx().Err() == nil {
					t.Fatal("the context New gave Load is still live after New returned")
				}
				if n := s.commitCount(); n != 1 {
					t.Fatalf("the failed New saved %d snapshots, want none", n-1)
				}
				if diff := cmp.Diff(faulty, s.saved()); diff != "" {
					t.Fatalf("the stored records changed during the failed New (-before +after):\n%s", diff)
				}

				// The same records without the fault come back whole.
				s.setLoadFault(fault{})
				s.setSaved(good)
				e = newEngine(t, cfg)
				if diff := cmp.Diff(want, viewOf(e, users), restoredAsSaved...); diff != "" {
					t.Fatalf("restored state differs from the saved engine's (-saved +restored):\n%s", diff)
				}

				// And it works: the restored subscription and friendship
				// both deliver. u19 subscribes to u0; u17 lists u0 as a friend.
				sub := watch(t, e, "u19")
				friend := watch(t, e, "u17")
				noErr(t, "SetSelfStatus", e.SetSelfStatus("u0", "back"))
				wantEvents(t, sub, ev("u0", online, "back", presence.ReasonCustomStatus))
				wantEvents(t, friend, ev("u0", online, "back", presence.ReasonCustomStatus))
			})
		})
	}
}

// A Snapshot call queued behind a stalled save gives up when its own ctx
// ends, and Close ends every save in flight before its own, so with a
// stalled store Close takes at most one SnapshotTimeout.
func TestSnapshotQueuedBehindStalledSaveHonoursCtxAndClose(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const timeout = 10 * time.Second
		s := newFaultStore(t)
		e := newEngine(t, presence.Config{Store: s, SnapshotTimeout: timeout})
		loginAll(t, e, ids("u", 10))
		s.setSaveFault(fault{kind: stalling})
		advance(time.Minute) // the periodic save starts and stalls
		if s.saving.Load() != 1 {
			t.Fatal("no save is running after the first SnapshotInterval")
		}

		ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
		defer cancel()
		start := time.Now()
		err := e.Snapshot(ctx)
		if took := time.Since(start); took != 100*time.Millisecond || !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("Snapshot queued behind a stalled save: %v after %v, want DeadlineExceeded after 100ms", err, took)
		}

		// A caller without a deadline of its own waits; Close ends its wait.
		queued := make(chan error, 1)
		go func() { queued <- e.Snapshot(context.Background()) }()
		advance(time.Second)
		start = time.Now()
		err = e.Close()
		if took := time.Since(start); took != timeout {
			t.Fatalf("Close with a stalled store took %v, want exactly one SnapshotTimeout (%v)", took, timeout)
		}
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("Close = %v, want its own save's DeadlineExceeded", err)
		}
		if err := <-queued; err == nil {
			t.Fatal("the queued Snapshot succeeded although Close ended it")
		}
		if n := s.commitCount(); n != 0 {
			t.Fatalf("the store committed %d snapshots, want none", n)
		}
	})
}
