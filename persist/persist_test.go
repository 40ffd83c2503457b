package persist_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/presencekit/presence"
	"github.com/presencekit/presence/persist"
)

func open(t testing.TB, path string) *persist.Store {
	t.Helper()
	s, err := persist.Open(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// load returns every record of the file's current snapshot, sorted, with
// friends sorted (the engine keeps them unordered).
func load(t *testing.T, s *persist.Store) []presence.Record {
	t.Helper()
	var out []presence.Record
	err := s.Load(context.Background(), func(batch []presence.Record) error {
		for _, r := range batch {
			r = cloneRecord(r)
			slices.Sort(r.Friends)
			out = append(out, r)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	slices.SortFunc(out, func(a, b presence.Record) int { return strings.Compare(a.UserID, b.UserID) })
	return out
}

// cloneRecord copies r and every string it holds: Load's strings are valid
// only until add returns.
func cloneRecord(r presence.Record) presence.Record {
	r.UserID = strings.Clone(r.UserID)
	r.Custom = strings.Clone(r.Custom)
	r.Devices = slices.Clone(r.Devices)
	for i := range r.Devices {
		r.Devices[i].DeviceID = strings.Clone(r.Devices[i].DeviceID)
	}
	r.Subscriptions = cloneStrings(r.Subscriptions)
	r.Friends = cloneStrings(r.Friends)
	return r
}

func cloneStrings(list []string) []string {
	list = slices.Clone(list)
	for i := range list {
		list[i] = strings.Clone(list[i])
	}
	return list
}

// randomState drives an engine through a random mix of the operations that
// shape what a snapshot holds.
func randomState(t *testing.T, e *presence.Engine, r *rand.Rand, users []string) {
	t.Helper()
	devices := []string{"phone", "laptop", "tablet"}
	var sessions []*presence.Session
	for range 4000 {
		u := users[r.IntN(len(users))]
		v := users[r.IntN(len(users))]
		switch r.IntN(9) {
		case 0, 1, 2:
			s, err := e.Login(u, devices[r.IntN(len(devices))])
			if err != nil {
				t.Fatal(err)
			}
			sessions = append(sessions, s)
		case 3:
			if len(sessions) > 0 {
				_ = sessions[r.IntN(len(sessions))].Disconnect()
			}
		case 4:
			_ = e.Logout(u, devices[r.IntN(len(devices))])
		case 5:
			_ = e.SetSelfStatus(u, fmt.Sprintf("mood %d ✓", r.IntN(100)))
		case 6, 7:
			if u != v {
				if _, err := e.SubscribeUserStatus(u, []string{v}); err != nil {
					t.Fatal(err)
				}
			}
		case 8:
			if u != v {
				if err := e.AddFriends(u, v); err != nil {
					t.Fatal(err)
				}
			}
		}
	}
}

func TestRoundTrip(t *testing.T) {
	for seed := range uint64(5) {
		t.Run(fmt.Sprint(seed), func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "presence.db")
			users := make([]string, 60)
			for i := range users {
				users[i] = fmt.Sprintf("user-%d", i)
			}
			cfg := presence.Config{StatusQuery: true, MaxSubscriptions: 20, SubscribeQuota: presence.Quota{Calls: -1}}

			store := open(t, path)
			cfg.Store = store
			e1, err := presence.New(cfg)
			if err != nil {
				t.Fatal(err)
			}
			randomState(t, e1, rand.New(rand.NewPCG(seed, 1)), users)
			if err := e1.Snapshot(context.Background()); err != nil {
				t.Fatal(err)
			}
			saved := load(t, store)
			before := e1.QueryOnlineStatus(users)
			var subsBefore [][]string
			for _, u := range users {
				subsBefore = append(subsBefore, e1.Subscriptions(u))
			}
			if err := e1.Close(); err != nil {
				t.Fatal(err)
			}

			e2, err := presence.New(cfg)
			if err != nil {
				t.Fatal(err)
			}
			defer e2.Close()
			if err := e2.Snapshot(context.Background()); err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(saved, load(t, store)); diff != "" {
				t.Errorf("records after a save, load and save again (-first +second):\n%s", diff)
			}
			after := e2.QueryOnlineStatus(users)
			for i := range before { // a restored device is offline-pending: no session yet
				for j := range before[i].Sessions {
					before[i].Sessions[j].Connected = false
				}
			}
			if diff := cmp.Diff(before, after); diff != "" {
				t.Errorf("state before and after restart (-before +after):\n%s", diff)
			}
			for i, u := range users {
				if diff := cmp.Diff(subsBefore[i], e2.Subscriptions(u)); diff != "" {
					t.Errorf("subscriptions of %s (-before +after):\n%s", u, diff)
				}
			}
			if st := e2.Stats(); st.LastSnapshot.IsZero() || st.LastSnapshotErr != nil {
				t.Errorf("Stats after a snapshot: %+v", st)
			}
			t.Cleanup(func() { store.Close() })
		})
	}
}

// The engine copies every string it keeps from the records Load hands it:
// Load refills the memory they point into with later chunks once add has
// returned. The snapshot is big enough for the first batches' memory to be
// refilled, with every user's ID, device and text distinct, so a string the
// engine kept would now read another user's bytes.
func TestRestoreCopiesLoadedStrings(t *testing.T) {
	users := make([]string, 4*8192) // at least three of Load's batches
	for i := range users {
		users[i] = fmt.Sprintf("user-%d", i)
	}
	type view struct{ User, Custom, Device, Subscription string }
	want := make([]view, len(users))
	records := make([]presence.Record, len(users))
	now := time.Now()
	for i, u := range users {
		want[i] = view{u, fmt.Sprintf("text of %d", i), fmt.Sprintf("device-%d", i), users[(i+1)%len(users)]}
		records[i] = presence.Record{
			UserID:        u,
			Custom:        want[i].Custom,
			Version:       uint64(i + 1),
			Devices:       []presence.DeviceRecord{{DeviceID: want[i].Device, Connected: true, LoginAt: now, LastSeen: now}},
			Subscriptions: []string{want[i].Subscription},
		}
	}
	store := open(t, filepath.Join(t.TempDir(), "presence.db"))
	defer store.Close()
	err := store.Save(context.Background(), func(yield func([]presence.Record, error) bool) {
		for batch := range slices.Chunk(records, 256) {
			if !yield(batch, nil) {
				return
			}
		}
	})
	if err != nil {
		t.Fatal(err)
	}

	e, err := presence.New(presence.Config{Store: store})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	got := make([]view, len(users))
	for i, st := range e.QueryOnlineStatus(users) {
		got[i] = view{User: st.UserID, Custom: st.Custom}
		if len(st.Sessions) > 0 {
			got[i].Device = st.Sessions[0].DeviceID
		}
		if subs := e.Subscriptions(users[i]); len(subs) > 0 {
			got[i].Subscription = subs[0]
		}
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("restored users (-saved +restored):\n%s", diff)
	}
}

// The crash test's child: it keeps a set of users online and, in a loop,
// gives every one of them the custom status "gen N" and saves a snapshot,
// printing N once the save returned; meanwhile another goroutine churns
// unrelated users so snapshots run under concurrent writes.
const crashChildEnv = "PERSIST_CRASH_CHILD"

const crashUsers = 300

func TestMain(m *testing.M) {
	if path := os.Getenv(crashChildEnv); path != "" {
		crashChild(path)
		return
	}
	os.Exit(m.Run())
}

func crashChild(path string) {
	store, err := persist.Open(path, &persist.Options{LockTimeout: 10 * time.Second, ChunkBytes: 4 << 10, TxBytes: 16 << 10})
	if err != nil {
		fmt.Println("open:", err)
		os.Exit(2)
	}
	e, err := presence.New(presence.Config{Store: store, SnapshotInterval: time.Hour})
	if err != nil {
		fmt.Println("new:", err)
		os.Exit(2)
	}
	for i := range crashUsers {
		if _, err := e.Login(fmt.Sprintf("user-%d", i), "phone"); err != nil {
			os.Exit(2)
		}
	}
	go func() {
		for i := 0; ; i++ {
			u := fmt.Sprintf("churn-%d", i%500)
			if s, err := e.Login(u, "d"); err == nil && i%3 == 0 {
				_ = s.Disconnect()
			}
		}
	}()
	for gen := 1; ; gen++ {
		for i := range crashUsers {
			if err := e.SetSelfStatus(fmt.Sprintf("user-%d", i), fmt.Sprintf("gen %d", gen)); err != nil {
				fmt.Println("set:", err)
				os.Exit(2)
			}
		}
		if err := e.Snapshot(context.Background()); err != nil {
			fmt.Println("snapshot:", err)
			os.Exit(2)
		}
		fmt.Println(gen)
	}
}

// TestCrashSafety kills a process that is saving snapshots at random moments
// with SIGKILL. After every kill the file must open and hold one complete
// snapshot: every checked user at the same generation, no older than the
// last generation the child reported saved, at most one newer.
func TestCrashSafety(t *testing.T) {
	if testing.Short() {
		t.Skip("re-executes the test binary many times")
	}
	path := filepath.Join(t.TempDir(), "presence.db")
	r := rand.New(rand.NewPCG(1, 2))
	saves := 0 // rounds in which the child saved at least once
	defer func() {
		if saves < 10 {
			t.Errorf("only %d of the rounds got as far as a snapshot: the test proves little", saves)
		}
	}()
	for round := range 25 {
		var out syncBuffer
		cmd := exec.Command(os.Args[0], "-test.run=^$")
		cmd.Env = append(os.Environ(), crashChildEnv+"="+path)
		cmd.Stdout = &out
		cmd.Stderr = &out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		// Most rounds wait for the child's first save, however slow the
		// machine, then kill it somewhere in the saves that follow; every
		// fifth kills it early, during its start or its first save.
		if round%5 != 0 {
			for deadline := time.Now().Add(time.Minute); out.Len() == 0 && time.Now().Before(deadline); {
				time.Sleep(5 * time.Millisecond)
			}
		}
		time.Sleep(time.Duration(r.IntN(300)) * time.Millisecond)
		_ = cmd.Process.Signal(syscall.SIGKILL)
		_ = cmd.Wait()

		reported := 0 // the last generation the child saw saved
		for _, line := range strings.Fields(out.String()) {
			v, err := strconv.Atoi(line)
			if err != nil {
				t.Fatalf("round %d: child failed: %s", round, out.String())
			}
			reported = v
		}
		if reported > 0 {
			saves++
		}

		store, err := persist.Open(path, nil)
		if err != nil {
			t.Fatalf("round %d: after SIGKILL: %v", round, err)
		}
		gens := map[string]int{}
		checked := 0
		err = store.Load(context.Background(), func(batch []presence.Record) error {
			for _, rec := range batch {
				if strings.HasPrefix(rec.UserID, "user-") {
					checked++
					gens[strings.Clone(rec.Custom)]++ // the key outlives Load
				}
			}
			return nil
		})
		store.Close()
		if err != nil {
			t.Fatalf("round %d: load after SIGKILL: %v", round, err)
		}
		if checked == 0 && reported == 0 {
			continue // killed before its first snapshot, or before any in this file
		}
		if checked != crashUsers || len(gens) != 1 {
			t.Fatalf("round %d: snapshot holds %d checked users with customs %v: not one complete snapshot", round, checked, gens)
		}
		for custom := range gens {
			var g int
			if _, err := fmt.Sscanf(custom, "gen %d", &g); err != nil {
				t.Fatalf("round %d: custom %q", round, custom)
			}
			// A restart restores the customs of the previous round's users,
			// so generations restart at 1 each round but the file may hold
			// the previous round's last one until the first save lands.
			if reported > 0 && g != reported && g != reported+1 {
				t.Fatalf("round %d: file holds generation %d, child last reported %d", round, g, reported)
			}
		}
	}
}

// syncBuffer is a strings.Builder the child's output can be written to
// while the test polls it.
type syncBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) Len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Len()
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
