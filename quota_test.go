package presence

import (
	"errors"
	"fmt"
	"testing"
	"testing/synctest"
	"time"
)

// Buckets exist only while callers are active: once a bucket has refilled it
// is deleted, so memory does not grow with every caller ever seen, and the
// wheel is left with nothing to do.
func TestQuotaBucketsAreReclaimedWhenFull(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		e, err := New(Config{StatusQuery: true, QueryQuota: Quota{Calls: 2, Per: 4 * time.Second}})
		if err != nil {
			t.Fatal(err)
		}
		defer e.Close()

		for i := range 1000 {
			caller := fmt.Sprintf("caller%d", i)
			for range 2 {
				if _, err := e.GetUserStatus(caller, []string{"someone"}); err != nil {
					t.Fatal(err)
				}
			}
			if _, err := e.GetUserStatus(caller, []string{"someone"}); !errors.Is(err, ErrRateLimited) {
				t.Fatalf("third call of %s in a burst of 2: err = %v, want ErrRateLimited", caller, err)
			}
		}
		if n := e.query.size(); n != 1000 {
			t.Fatalf("%d buckets while 1000 callers are throttled, want 1000", n)
		}

		time.Sleep(3 * time.Second) // one of two tokens back: still not full
		synctest.Wait()
		if n := e.query.size(); n != 1000 {
			t.Fatalf("%d buckets before refill, want 1000", n)
		}
		time.Sleep(2 * time.Second) // full at 4 s, reclaimed at the next tick
		synctest.Wait()
		if n := e.query.size(); n != 0 {
			t.Errorf("%d buckets after every bucket refilled, want 0", n)
		}
		if n := e.wheel.pending(); n != 0 {
			t.Errorf("%d wheel entries left, want 0", n)
		}
	})
}
