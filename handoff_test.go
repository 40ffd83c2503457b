package presence

import (
	"runtime"
	"testing"
)

// A change of a user whose previous change is still being delivered is
// handed to the goroutine delivering: neither the user's next change nor
// the other users of its shard wait for that delivery. Without the hand-off
// the second SetSelfStatus below would wait for the first delivery while
// holding the shard lock, and the test would hang.
func TestChangeDuringLongDeliveryDoesNotHoldTheShard(t *testing.T) {
	e, err := New(Config{StatusQuery: true, Shards: 1, ChangeFeedSize: 16})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	if _, err := e.Login("hot", "phone"); err != nil {
		t.Fatal(err)
	}
	w, err := e.Login("watcher", "phone")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.SubscribeUserStatus("watcher", []string{"hot"}); err != nil {
		t.Fatal(err)
	}
	w.Drain(nil)
	for len(e.feed) > 0 {
		<-e.feed
	}

	// Hold the watcher's mailbox: the delivery of hot's first change stops
	// there, holding hot's delivery lock, until the test lets go.
	w.mu.Lock()
	first := make(chan error)
	go func() { first <- e.SetSelfStatus("hot", "one") }()
	sh, k := e.locate("hot")
	for applied := false; !applied; {
		runtime.Gosched()
		sh.mu.Lock()
		applied = sh.getLocked(k).custom == "one" // applied, so its delivery has begun
		sh.mu.Unlock()
	}

	if err := e.SetSelfStatus("hot", "two"); err != nil {
		t.Fatal(err)
	}
	if _, err := e.Login("other", "phone"); err != nil {
		t.Fatal(err)
	}
	if err := e.SetSelfStatus("other", "free"); err != nil {
		t.Fatal(err)
	}
	w.mu.Unlock()
	if err := <-first; err != nil {
		t.Fatal(err)
	}

	// The first delivery went on to deliver the second: the watcher holds
	// hot's latest state, and the feed has hot's records in order.
	got := w.Drain(nil)
	if len(got) != 1 || got[0].UserID != "hot" || got[0].Custom != "two" {
		t.Fatalf("watcher drained %+v, want hot's latest change (custom two)", got)
	}
	st, err := e.GetUserStatus("hot", []string{"hot"})
	if err != nil || st[0].Version != got[0].Version {
		t.Fatalf("hot reads %+v (%v), the watcher got version %d", st, err, got[0].Version)
	}
	var customs []string
	for len(e.feed) > 0 {
		if c := <-e.feed; c.UserID == "hot" {
			customs = append(customs, c.Custom)
		}
	}
	if len(customs) != 2 || customs[0] != "one" || customs[1] != "two" {
		t.Fatalf("hot's feed records carry %q, want [one two]", customs)
	}
	if err := e.checkInvariants(); err != nil {
		t.Fatal(err)
	}
}
