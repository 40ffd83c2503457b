package presence

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"
	"testing/synctest"
	"time"
)

// TestStressInvariants runs many goroutines doing random operations on an
// overlapping set of users, with readers draining sessions and the fake
// clock advancing through timeouts, grace periods and expiries. Afterwards
// the indexes must agree with the records (checkInvariants), and no reader
// may have seen a user's version go backwards.
func TestStressInvariants(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		e, err := New(Config{
			StatusQuery:      true,
			NotifyFriends:    true,
			HeartbeatTimeout: 5 * time.Second,
			DisconnectGrace:  2 * time.Second,
			SessionExpiry:    20 * time.Second,
			SubscriptionTTL:  10 * time.Second,
			MaxSubscriptions: 6,
			MaxSubscribeIDs:  4,
			MaxFriends:       5,
			MaxDevices:       2,
			FeedSize:         4,
			ChangeFeedSize:   16,
			Shards:           4, // few shards: more collisions between users
			QueryQuota:       Quota{Calls: -1},
			SubscribeQuota:   Quota{Calls: 50, Per: time.Second},
			UnsubscribeQuota: Quota{Calls: -1},
		})
		if err != nil {
			t.Fatal(err)
		}
		e.keyMask = e.mask | e.mask<<2 // 4 hash values a shard: records clash often
		defer e.Close()

		users := make([]string, 12)
		for i := range users {
			users[i] = fmt.Sprintf("u%d", i)
		}
		devices := []string{"phone", "laptop", "tablet"}

		var (
			mu       sync.Mutex
			sessions []*Session
			failures []string
		)
		fail := func(format string, args ...any) {
			mu.Lock()
			failures = append(failures, fmt.Sprintf(format, args...))
			mu.Unlock()
		}
		pick := func(r *rand.Rand) *Session {
			mu.Lock()
			defer mu.Unlock()
			if len(sessions) == 0 {
				return nil
			}
			return sessions[r.IntN(len(sessions))]
		}
		expected := func(err error, allowed ...error) {
			if err == nil {
				return
			}
			for _, a := range allowed {
				if errors.Is(err, a) {
					return
				}
			}
			fail("unexpected error: %v", err)
		}

		const workers, steps = 8, 1500
		var wg sync.WaitGroup
		for w := range workers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				r := rand.New(rand.NewPCG(uint64(w), 7))
				seen := map[*Session]map[string]uint64{} // this worker's view when it drains
				someIDs := func(n int) []string {
					ids := make([]string, 1+r.IntN(n))
					for i := range ids {
						ids[i] = users[r.IntN(len(users))]
					}
					return ids
				}
				for range steps {
					u := users[r.IntN(len(users))]
					switch op := r.IntN(14); op {
					case 0, 1:
						s, err := e.Login(u, devices[r.IntN(len(devices))])
						expected(err)
						if s != nil {
							mu.Lock()
							sessions = append(sessions, s)
							mu.Unlock()
						}
					case 2:
						if s := pick(r); s != nil {
							expected(s.Heartbeat(), ErrSessionEnded)
						}
					case 3:
						if s := pick(r); s != nil {
							expected(s.Disconnect(), ErrSessionEnded)
						}
					case 4:
						expected(e.Logout(u, devices[r.IntN(len(devices))]), ErrNotLoggedIn)
					case 5:
						expected(e.SetSelfStatus(u, fmt.Sprintf("busy %d", r.IntN(3))), ErrNotLoggedIn)
					case 6:
						ids := someIDs(4)
						_, err := e.SubscribeUserStatus(u, ids)
						expected(err, ErrInvalidParam, ErrRateLimited) // self in ids, or quota
					case 7:
						var ids []string
						if r.IntN(3) > 0 {
							ids = someIDs(4)
						}
						expected(e.UnsubscribeUserStatus(u, ids))
					case 8:
						expected(e.AddFriends(u, someIDs(3)...), ErrInvalidParam) // self, or over MaxFriends
					case 9:
						expected(e.RemoveFriends(u, someIDs(3)...), ErrInvalidParam)
					case 10:
						expected(e.Kick(u), ErrNotLoggedIn)
					case 11:
						_, err := e.GetUserStatus(u, someIDs(500)) // mostly long lists, read a shard at a time
						expected(err)
					case 12:
						if s := pick(r); s != nil {
							v := seen[s]
							if v == nil {
								v = map[string]uint64{}
								seen[s] = v
							}
							for _, ev := range s.Drain(nil) {
								if last, ok := v[ev.UserID]; ok && ev.Version < last {
									fail("session %s/%s saw %s go from version %d back to %d", s.UserID(), s.DeviceID(), ev.UserID, last, ev.Version)
								}
								v[ev.UserID] = ev.Version
							}
						}
					case 13:
						time.Sleep(time.Duration(r.IntN(3000)) * time.Millisecond)
					}
				}
			}()
		}
		// The change feed's reader keeps up some of the time.
		feedDone := make(chan struct{})
		go func() {
			defer close(feedDone)
			for range e.Changes() {
				time.Sleep(10 * time.Millisecond)
			}
		}()
		wg.Wait()
		synctest.Wait()
		if err := e.checkInvariants(); err != nil {
			t.Fatalf("right after the workers: %v", err)
		}
		if st := e.Stats(); st.Subscriptions == 0 || st.Friendships == 0 || st.Delivered == 0 {
			t.Errorf("the workload built too little to check: %+v", st)
		}
		time.Sleep(30 * time.Second) // let every timeout, grace and expiry play out
		synctest.Wait()
		for _, f := range failures {
			t.Error(f)
		}
		if err := e.checkInvariants(); err != nil {
			t.Fatal(err)
		}
		st := e.Stats()
		if st.Online != 0 || st.Sessions != 0 || st.Subscriptions != 0 {
			t.Errorf("after every deadline passed: %+v, want no one online, no sessions, no subscriptions", st)
		}
		e.Close()
		<-feedDone
	})
}
