package persist_test

import (
	"path/filepath"
	"testing"
	"testing/synctest"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/presencekit/presence"
)

// A restart is invisible to watchers: users whose devices log in again
// within the heartbeat timeout cause no event at all; users whose devices
// do not come back go Offline, with their custom text cleared, once the
// timeout has passed. Subscriptions and friends survive.
func TestRestartIsInvisible(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "presence.db")
		store := open(t, path)
		defer store.Close()
		cfg := presence.Config{StatusQuery: true, NotifyFriends: true, Store: store}

		// Before the restart: alice and bob online with custom texts;
		// carol subscribes to alice, dave lists bob as a friend.
		e1, err := presence.New(cfg)
		if err != nil {
			t.Fatal(err)
		}
		for _, u := range []string{"alice", "bob"} {
			if _, err := e1.Login(u, "phone"); err != nil {
				t.Fatal(err)
			}
			if err := e1.SetSelfStatus(u, u+" is busy"); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := e1.SubscribeUserStatus("carol", []string{"alice", "bob"}); err != nil {
			t.Fatal(err)
		}
		if err := e1.AddFriends("dave", "bob"); err != nil {
			t.Fatal(err)
		}
		before, _ := e1.GetUserStatus("carol", []string{"alice", "bob"})
		if err := e1.Close(); err != nil { // the final snapshot
			t.Fatal(err)
		}

		// The restart.
		e2, err := presence.New(cfg)
		if err != nil {
			t.Fatal(err)
		}
		defer e2.Close()
		after, _ := e2.GetUserStatus("carol", []string{"alice", "bob"})
		if diff := cmp.Diff(before, after); diff != "" {
			t.Fatalf("status right after the restart (-before +after):\n%s", diff)
		}
		if diff := cmp.Diff([]string{"alice", "bob"}, e2.Subscriptions("carol")); diff != "" {
			t.Errorf("carol's subscriptions after the restart (-want +got):\n%s", diff)
		}
		carol, _ := e2.Login("carol", "laptop")
		dave, _ := e2.Login("dave", "laptop")
		carol.Drain(nil) // their own logins
		dave.Drain(nil)

		// alice's phone reconnects within the window; bob's never does.
		time.Sleep(time.Minute)
		if _, err := e2.Login("alice", "phone"); err != nil {
			t.Fatal(err)
		}
		synctest.Wait()
		if evs := carol.Drain(nil); len(evs) != 0 {
			t.Errorf("carol saw %+v when alice came back: a quick restart must be invisible", evs)
		}

		time.Sleep(341 * time.Second) // 401 s after the restart: past the window

		synctest.Wait()
		bobOffline := []presence.Event{{UserStatus: presence.UserStatus{UserID: "bob", Status: presence.Offline}, Reason: presence.ReasonTimeout}}
		for name, s := range map[string]*presence.Session{"carol (subscriber)": carol, "dave (friend)": dave} {
			got := s.Drain(nil)
			for i := range got {
				if got[i].Version <= after[1].Version {
					t.Errorf("%s: version %d not past bob's %d before the restart", name, got[i].Version, after[1].Version)
				}
				got[i].Version = 0
			}
			if diff := cmp.Diff(bobOffline, got); diff != "" {
				t.Errorf("%s after the timeout (-want +got):\n%s", name, diff)
			}
		}
		// alice's phone logged in again at 60 s; its own timeout is at 460 s.
		st, _ := e2.GetUserStatus("carol", []string{"alice"})
		if st[0].Status != presence.Online || st[0].Custom != "alice is busy" {
			t.Errorf("alice after the window: %+v, want Online with her text", st[0])
		}
	})
}
