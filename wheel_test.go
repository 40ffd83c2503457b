package presence

import (
	"testing"
	"testing/synctest"
	"time"
)

// A user logging in and out in a loop reuses its record and its one wheel
// entry: the wheel does not grow with the number of cycles, and once the
// entry fires the empty record goes.
func TestLoginLogoutChurnDoesNotGrowTheWheel(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		e, err := New(Config{StatusQuery: true, SubscribeQuota: Quota{Calls: -1}, UnsubscribeQuota: Quota{Calls: -1}})
		if err != nil {
			t.Fatal(err)
		}
		defer e.Close()
		for range 10_000 {
			if _, err := e.Login("alice", "phone"); err != nil {
				t.Fatal(err)
			}
			if err := e.Logout("alice", "phone"); err != nil {
				t.Fatal(err)
			}
			// A caller with no device churning its subscriptions.
			if _, err := e.SubscribeUserStatus("bob", []string{"carol"}); err != nil {
				t.Fatal(err)
			}
			if err := e.UnsubscribeUserStatus("bob", nil); err != nil {
				t.Fatal(err)
			}
		}
		if n := e.wheel.pending(); n > 4 {
			t.Errorf("%d wheel entries after 10000 cycles, want a handful", n)
		}
		time.Sleep(horizon + 2*time.Second)
		synctest.Wait()
		if n := e.wheel.pending(); n != 0 {
			t.Errorf("%d wheel entries left once every deadline passed", n)
		}
		for i := range e.shards {
			if n := len(e.shards[i].users); n != 0 {
				t.Errorf("shard %d still holds %d records", i, n)
			}
		}
	})
}
