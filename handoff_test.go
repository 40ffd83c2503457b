package presence

import (
	"runtime"
	"testing"
)

// A change of a user whose previous change is still being delivered is
// handed to the goroutine delivering: neither the user's next change nor
// the other users of its shard wait for that delivery. Without the hand-off
// the second SetSelfStatus in checkHandOff would wait for the first
// delivery while holding the shard lock, and the test would hang.
func TestChangeDuringLongDeliveryDoesNotHoldTheShard(t *testing.T) {
	checkHandOff(t, Config{StatusQuery: true}, func(e *Engine) error {
		_, err := e.SubscribeUserStatus("watcher", []string{"hot"})
		return err
	})
}

// A user watched only by a friend (NotifyFriends on) is watched all the
// same: its changes take the delivery lock and the hand-off queue, so the
// friend gets them, in order, and a friend's reader holding its mailbox
// holds up neither the user's next change nor the other users of its
// shard. Were friends left out of watchedLocked, the friend would get
// nothing; without the hand-off the test would hang.
func TestChangeSeenOnlyByFriendDoesNotHoldTheShard(t *testing.T) {
	checkHandOff(t, Config{NotifyFriends: true}, func(e *Engine) error {
		return e.AddFriends("watcher", "hot")
	})
}

// checkHandOff makes "watcher" watch "hot" through watch, on one shard with
// the change feed on, holds the watcher's mailbox so that the delivery of
// hot's first change stops there, and checks that hot's next change and
// another user's calls on the shard go through meanwhile; then that the
// watcher ends with hot's latest state and the feed has hot's records in
// the order they were applied.
func checkHandOff(t *testing.T, cfg Config, watch func(*Engine) error) {
	t.Helper()
	cfg.Shards, cfg.ChangeFeedSize = 1, 16
	e, err := New(cfg)
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
	if err := watch(e); err != nil {
		t.Fatal(err)
	}
	w.Drain(nil)
	for len(e.feed) > 0 {
		<-e.feed
	}

	w.mu.Lock()
	first := make(chan error)
	go func() { first <- e.SetSelfStatus("hot", "one") }()
	waitApplied(e, "hot", "one") // so its delivery has begun

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

// waitApplied returns once user id shows custom, that is once a
// SetSelfStatus running in another goroutine has been applied.
func waitApplied(e *Engine, id, custom string) {
	sh, k := e.locate(id)
	for applied := false; !applied; {
		runtime.Gosched()
		sh.mu.Lock()
		applied = sh.getLocked(k).custom == custom
		sh.mu.Unlock()
	}
}

// loginAlone makes an engine with one user, "u", logged in on one device
// that nobody watches, and returns its session with the login event pending.
func loginAlone(t *testing.T) (*Engine, *Session) {
	t.Helper()
	e, err := New(Config{})
	if err != nil {
		t.Fatal(err)
	}
	s, err := e.Login("u", "phone")
	if err != nil {
		e.Close()
		t.Fatal(err)
	}
	return e, s
}

// A change of a user nobody watches reaches the user's own sessions without
// the delivery lock, so two such changes made at once can arrive in either
// order. A session drops an event about its own user that is older than one
// it already took in, even once the newer one has been read: its reader
// never sees the user's version go back.
func TestOwnSessionDropsOlderOwnEventArrivingLate(t *testing.T) {
	e, s := loginAlone(t)
	defer e.Close()
	login := s.Drain(nil)
	if len(login) != 1 {
		t.Fatalf("drained %+v after login, want the login event", login)
	}
	v := login[0].Version
	older := Event{UserStatus: UserStatus{UserID: "u", Status: Online, Custom: "one", Version: v + 1}, Reason: ReasonCustomStatus}
	newer := Event{UserStatus: UserStatus{UserID: "u", Status: Online, Custom: "two", Version: v + 2}, Reason: ReasonCustomStatus}
	var tl tally
	s.push(&newer, &tl)
	if got := s.Drain(nil); len(got) != 1 || got[0].Custom != "two" {
		t.Fatalf("drained %+v, want the newer event", got)
	}
	s.push(&older, &tl)
	if got := s.Drain(nil); len(got) != 0 {
		t.Fatalf("drained %+v after the older event arrived late, want nothing", got)
	}
	if tl.delivered != 1 {
		t.Fatalf("counted %d delivered, want 1: the late event did not land", tl.delivered)
	}
}

// The delivered count of a change only the user's own sessions hear of is
// taken as the change is applied; an event that then does not land (its
// session ended meanwhile) is taken off again, so Stats stays exact.
func TestOwnEventToSessionEndedMeanwhileIsNotCounted(t *testing.T) {
	e, s := loginAlone(t)
	defer e.Close()
	s.Drain(nil)
	before := e.Stats().Delivered

	// Hold the mailbox so that the change's delivery waits there, then
	// end the session the way markEnded does, under the mailbox's lock.
	s.mu.Lock()
	done := make(chan error)
	go func() { done <- e.SetSelfStatus("u", "busy") }()
	waitApplied(e, "u", "busy")
	s.ended.Store(true)
	s.mu.Unlock()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if got := e.Stats().Delivered; got != before {
		t.Fatalf("Stats().Delivered = %d after an event that did not land, want %d", got, before)
	}
	if got := s.Drain(nil); len(got) != 0 {
		t.Fatalf("ended session drained %+v, want nothing", got)
	}
}
