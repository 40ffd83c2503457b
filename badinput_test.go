package presence

// Bad input, everywhere: every exported function and method of Engine and
// Session is called with every kind of bad input that applies to it (bad
// IDs, bad lists, bad custom texts, spent quotas, a switch that is off,
// calls after Close, Session calls after the session ended, Close racing
// traffic). Each call must return its documented error, change nothing and
// never panic.
//
// "Changes nothing" is checked on a full dump of the engine's internals
// (this file is package presence for that): every record with its devices,
// edges in both directions and timers, the shard version counters, every
// session's mailbox (peeked, not consumed), the quota buckets, the wheel,
// the change feed's length and Stats. The clock moves between the set-up
// and each call, so a rejected call that stamps a time shows in the dump.
//
// Valid inputs that look bad, and their tests elsewhere:
//   - UnsubscribeUserStatus with a nil or empty list cancels all
//     (TestUnsubscribeEmptyListCancelsAll).
//   - SubscribeUserStatus with duplicates counts them once
//     (TestSubscribeDuplicatesCountOnce); GetUserStatus answers one entry per
//     ID, duplicates included (TestGetUserStatusAnswersInRequestOrder).
//   - AddFriends ignores friends already listed and counts a duplicate once
//     (TestBoundaryValuesAreAccepted below).
//   - QueryOnlineStatus has no limit on the number of IDs and reads a bad ID
//     as Status Unknown; Subscriptions returns nil for a bad ID; RemoveFriends
//     ignores IDs that are not friends: those are in the table as valid calls
//     that must change nothing.

import (
	"context"
	"errors"
	"fmt"
	"iter"
	"math/rand/v2"
	"reflect"
	"runtime/debug"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
	"go.uber.org/goleak"
)

// ---- the state dump ---------------------------------------------------------

// dumpedEngine is everything the engine holds, in a form go-cmp can compare.
type dumpedEngine struct {
	Users    map[string]dumpedUser
	Versions []uint64 // each shard's version counter
	Sessions map[string]dumpedSession
	Quotas   map[string]float64 // "operation/caller" -> tokens left now
	Wheel    int                // pending wheel entries
	FeedLen  int                // records waiting on the change feed
	Stats    Stats
}

type dumpedUser struct {
	Status      Status
	Custom      string
	Version     uint64
	IdleSince   int64
	TimerAt     int64
	Pins        int32
	Devices     []dumpedDevice
	Subs        []string // oldest first
	Friends     []string // sorted
	Subscribers []string // sorted
	FriendOf    []string // sorted
	Published   int      // sessions in the published list deliveries read
}

type dumpedDevice struct {
	ID         string
	LoginAt    int64
	LastSeen   int64
	GraceUntil int64
	Held       Reason
	Session    string  // the live session's address, "" when disconnected
	Pending    []Event // that session's mailbox, oldest first
}

type dumpedSession struct {
	Live    bool // its device still holds it
	Ended   bool
	Closed  bool // Done's channel is closed (or will start closed)
	Reason  Reason
	Lost    uint64
	Pending []Event
}

// dumpEngine reads the whole state, each part under the lock that guards
// it. The engine must be quiescent for two dumps to be comparable.
// sessions are the sessions the test holds, live or ended, by name.
func dumpEngine(e *Engine, sessions map[string]*Session) dumpedEngine {
	d := dumpedEngine{
		Users:    map[string]dumpedUser{},
		Sessions: map[string]dumpedSession{},
		Quotas:   map[string]float64{},
	}
	live := map[*Session]bool{} // the sessions their devices hold
	for i := range e.shards {
		sh := &e.shards[i]
		sh.mu.Lock()
		d.Versions = append(d.Versions, sh.version)
		for u := range sh.all {
			d.Users[u.id] = dumpUserLocked(u)
			for dev := range u.eachDevice {
				if dev.session != nil {
					live[dev.session] = true
				}
			}
		}
		sh.mu.Unlock()
	}
	for name, s := range sessions {
		s.mu.Lock()
		d.Sessions[name] = dumpedSession{
			Live: live[s], Ended: s.ended.Load(), Closed: s.closed,
			Reason: s.EndReason(), Lost: s.Lost(), Pending: peekLocked(s),
		}
		s.mu.Unlock()
	}
	now := e.now()
	for _, q := range []struct {
		op string
		q  *quota
	}{{"query", e.query}, {"subscribe", e.subscribe}, {"unsubscribe", e.unsubscribe}} {
		if q.q == nil {
			continue
		}
		for i := range q.q.shards {
			qs := &q.q.shards[i]
			qs.mu.Lock()
			for caller, b := range qs.buckets {
				d.Quotas[q.op+"/"+caller] = b.lim.TokensAt(now)
			}
			qs.mu.Unlock()
		}
	}
	d.Wheel = e.wheel.pending()
	d.FeedLen = len(e.feed)
	d.Stats = e.Stats()
	return d
}

// dumpUserLocked copies one record. Call with its shard lock held, which
// also guards the reverse indexes (they are written with it and fanMu held).
func dumpUserLocked(u *user) dumpedUser {
	du := dumpedUser{
		Status: u.status, Custom: u.custom, Version: u.version,
		TimerAt: int64(u.timerAt), Pins: int32(u.pins),
	}
	for dev := range u.eachDevice {
		dd := dumpedDevice{ID: dev.id, LoginAt: dev.loginAt, LastSeen: dev.lastSeen, GraceUntil: dev.graceUntil, Held: dev.held}
		if s := dev.session; s != nil {
			dd.Session = fmt.Sprintf("%p", s)
			s.mu.Lock()
			dd.Pending = peekLocked(s)
			s.mu.Unlock()
		}
		du.Devices = append(du.Devices, dd)
	}
	if l := u.sessions.Load(); l != nil {
		du.Published = len(l.all)
	}
	if ed := u.edges.Load(); ed != nil {
		du.IdleSince = ed.idleSince
		ed.subs.each(func(t *user, _ struct{}) bool {
			du.Subs = append(du.Subs, t.id)
			return true
		})
		du.Friends = sortedIDs(&ed.friends)
		du.Subscribers = sortedIDs(&ed.subscribers)
		du.FriendOf = sortedIDs(&ed.friendOf)
	}
	return du
}

// peekLocked lists a mailbox without consuming it. Call with s.mu held.
func peekLocked(s *Session) []Event {
	var evs []Event
	s.box.each(func(id string, p pending) bool {
		evs = append(evs, p.event(id))
		return true
	})
	return evs
}

func sortedIDs(set *userSet) []string {
	var ids []string
	for u := range set.all() {
		ids = append(ids, u.id)
	}
	slices.Sort(ids)
	return ids
}

// peek lists a session's mailbox without consuming it.
func peekMailbox(s *Session) []Event {
	s.mu.Lock()
	defer s.mu.Unlock()
	return peekLocked(s)
}

// ---- the world the bad calls are made in -----------------------------------

// badWorld is an engine with a bit of everything in it, so that "changes
// nothing" has something to change: users Online on several devices,
// Offline, logged out and never logged in; custom texts; subscriptions and
// friends both ways; pending mailboxes; records on the change feed; a
// caller whose three quotas are spent. Both switches are on.
type badWorld struct {
	e        *Engine
	sessions map[string]*Session // every session the set-up made, by "user/device"
}

// badConfig is the set-up's configuration: reference defaults but for a
// small MaxFriends, so going over it by one is cheap, and 16 shards rather
// than the automatic 256, since some two hundred cases each build a world
// (still enough that the set-up's edges cross shards).
func badConfig() Config {
	return Config{StatusQuery: true, NotifyFriends: true, ChangeFeedSize: 256, MaxFriends: 4, Shards: 16}
}

// newBadWorld builds the world inside the caller's synctest bubble. mod, if
// set, adjusts the configuration first; with StatusQuery off the set-up
// makes no subscriptions.
func newBadWorld(t *testing.T, mod func(*Config)) *badWorld {
	t.Helper()
	cfg := badConfig()
	if mod != nil {
		mod(&cfg)
	}
	e, err := New(cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() { _ = e.Close() })
	w := &badWorld{e: e, sessions: map[string]*Session{}}
	must := func(what string, err error) {
		t.Helper()
		if err != nil {
			t.Fatalf("set-up: %s: %v", what, err)
		}
	}
	login := func(user, device string) *Session {
		t.Helper()
		s, err := e.Login(user, device)
		must("Login "+user+"/"+device, err)
		w.sessions[user+"/"+device] = s
		return s
	}

	login("alice", "phone") // Online on two devices, with a custom text
	login("alice", "laptop")
	must("alice's text", e.SetSelfStatus("alice", "at work"))
	login("bob", "phone") // Online, a second device logged in but disconnected
	must("bob's tablet drops", login("bob", "tablet").Disconnect())
	must("bob's text", e.SetSelfStatus("bob", "☕ break"))
	carol := login("carol", "phone") // Offline: her text went with her
	must("carol's text", e.SetSelfStatus("carol", "gone"))
	must("carol drops", carol.Disconnect())
	login("dave", "phone") // Unlogined, kept by alice's subscription
	must("dave logs out", e.Logout("dave", "phone"))
	login("frank", "phone") // Online, one friend short of MaxFriends
	must("frank's friends", e.AddFriends("frank", "alice", "bob", "carol"))
	must("alice's friend", e.AddFriends("alice", "bob"))
	if cfg.StatusQuery {
		sub := func(caller string, targets ...string) {
			t.Helper()
			_, err := e.SubscribeUserStatus(caller, targets)
			must("subscribe "+caller, err)
		}
		sub("erin", "alice", "bob") // erin never logged in: a caller with no session
		sub("alice", "bob", "carol", "dave")
		sub("bob", "alice")
		for range 20 { // greedy spends all three quotas
			_, err := e.GetUserStatus("greedy", []string{"alice"})
			must("greedy queries", err)
			sub("greedy", "alice")
			must("greedy unsubscribes", e.UnsubscribeUserStatus("greedy", []string{"nobody"}))
		}
	}
	return w
}

// tick moves the fake clock a little and lets the engine settle, so that a
// call that stamps the time leaves a trace in the next dump.
func moveClock() {
	time.Sleep(10 * time.Millisecond)
	synctest.Wait()
}

// ---- running a case -----------------------------------------------------------

// badCase is one call that must return a documented result and change
// nothing.
type badCase struct {
	name  string
	mod   func(*Config)               // adjusts the set-up's configuration
	prep  func(*testing.T, *badWorld) // runs after the set-up, before the "before" dump
	call  func(*badWorld) (any, error)
	op    string                      // Error.Op the error must carry; "" for Session methods and valid calls
	want  *Error                      // the sentinel the error must match; nil: the call must succeed
	or    *Error                      // a second acceptable sentinel (see TestCallsAfterClose)
	check func(t *testing.T, got any) // checks a successful call's result
}

// errorKinds are every kind an *Error can be.
var errorKinds = []*Error{ErrFeatureDisabled, ErrRateLimited, ErrInvalidParam, ErrNotLoggedIn, ErrSessionEnded, ErrClosed}

// runBadCases runs each case in a world of its own, in a bubble of its own.
func runBadCases(t *testing.T, cases []badCase) {
	seen := map[string]bool{}
	for _, c := range cases {
		if seen[c.name] {
			t.Fatalf("two cases named %q", c.name)
		}
		seen[c.name] = true
		t.Run(c.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) { runBadCase(t, c) })
		})
	}
}

func runBadCase(t *testing.T, c badCase) {
	w := newBadWorld(t, c.mod)
	if c.prep != nil {
		c.prep(t, w)
	}
	moveClock()
	before := dumpEngine(w.e, w.sessions)
	got, panicked, err := callRecovering(func() (any, error) { return c.call(w) })
	if panicked != "" {
		t.Fatalf("%s: panicked: %s", c.name, panicked)
	}
	checkError(t, c.name, err, c.op, c.want, c.or)
	switch {
	case err != nil && !isNilResult(got):
		t.Errorf("%s: returned %#v beside its error, want nil", c.name, got)
	case err == nil && c.check != nil:
		c.check(t, got)
	}
	after := dumpEngine(w.e, w.sessions)
	if diff := cmp.Diff(before, after, cmpopts.EquateErrors()); diff != "" {
		t.Errorf("%s changed the engine (-before +after):\n%s", c.name, diff)
	}
	if !w.e.closed.Load() {
		if err := w.e.checkInvariants(); err != nil {
			t.Errorf("%s: invariants broken afterwards: %v", c.name, err)
		}
	}
}

// callRecovering makes the call and turns a panic into a description.
func callRecovering(call func() (any, error)) (got any, panicked string, err error) {
	defer func() {
		if r := recover(); r != nil {
			panicked = fmt.Sprintf("%v\n%s", r, debug.Stack())
		}
	}()
	got, err = call()
	return got, "", err
}

// checkError checks err against the documented error: want (or or), its
// reference code, the operation it names, and that it matches exactly one
// sentinel as errors.go promises. want nil means no error.
func checkError(t *testing.T, name string, err error, op string, want, or *Error) {
	t.Helper()
	if want == nil {
		if err != nil {
			t.Errorf("%s: unexpected error %v", name, err)
		}
		return
	}
	kind := want
	if or != nil && errors.Is(err, or) {
		kind = or
	}
	if !errors.Is(err, kind) {
		t.Errorf("%s: error = %v, want one matching %v", name, err, want)
		return
	}
	var pe *Error
	if !errors.As(err, &pe) {
		t.Errorf("%s: error %T is not an *Error", name, err)
		return
	}
	if pe.Code != kind.Code {
		t.Errorf("%s: Code = %d, want %d", name, pe.Code, kind.Code)
	}
	if op != "" && pe.Op != op {
		t.Errorf("%s: Op = %q, want %q", name, pe.Op, op)
	}
	if pe.Op == "" || !strings.HasPrefix(err.Error(), "presence: "+pe.Op+": ") {
		t.Errorf("%s: message %q does not start with presence: and the operation", name, err)
	}
	n := 0
	for _, s := range errorKinds {
		if errors.Is(err, s) {
			n++
		}
	}
	if n != 1 {
		t.Errorf("%s: error %v matches %d errorKinds, want exactly 1", name, err, n)
	}
}

// isNil reports whether a call's result is nil (a typed nil included).
func isNilResult(v any) bool {
	if v == nil {
		return true
	}
	rv := reflect.ValueOf(v)
	switch rv.Kind() {
	case reflect.Pointer, reflect.Slice, reflect.Map, reflect.Chan, reflect.Func, reflect.Interface:
		return rv.IsNil()
	}
	return false
}

// equals returns a check that the result is want.
func resultEquals(want any) func(*testing.T, any) {
	return func(t *testing.T, got any) {
		t.Helper()
		if diff := cmp.Diff(want, got, cmpopts.IgnoreFields(UserStatus{}, "Version")); diff != "" {
			t.Errorf("result (-want +got):\n%s", diff)
		}
	}
}

// ---- bad inputs ---------------------------------------------------------------

// badIDs break the README's rule for IDs: non-empty, at most MaxIDBytes
// (128) bytes, valid UTF-8, no control characters.
var badIDs = []struct{ name, id string }{
	{"empty", ""},
	{"129 bytes", strings.Repeat("a", 129)},
	{"129 bytes in 43 runes", strings.Repeat("€", 43)},
	{"invalid UTF-8", "bo\xffb"},
	{"truncated rune", "bob\xe2\x82"},
	{"UTF-16 surrogate", "bob\xed\xa0\x80"},
	{"NUL", "bo\x00b"},
	{"newline", "bob\n"},
	{"DEL", "bob\x7f"},
	{"C1 control U+0085", "bob\u0085"},
}

// idCalls puts a bad ID in every place an ID goes. Where a list takes it,
// the bad ID sits in the middle of IDs that would change the state if the
// call went through, so a call that applies part of its list shows.
var idCalls = []struct {
	name string
	op   string
	call func(w *badWorld, id string) (any, error)
}{
	{"Login user", "Login", func(w *badWorld, id string) (any, error) { return w.e.Login(id, "phone") }},
	{"Login device", "Login", func(w *badWorld, id string) (any, error) { return w.e.Login("alice", id) }},
	{"Logout user", "Logout", func(w *badWorld, id string) (any, error) { return nil, w.e.Logout(id, "phone") }},
	{"Logout device", "Logout", func(w *badWorld, id string) (any, error) { return nil, w.e.Logout("alice", id) }},
	{"Kick", "Kick", func(w *badWorld, id string) (any, error) { return nil, w.e.Kick(id) }},
	{"SetSelfStatus user", "SetSelfStatus", func(w *badWorld, id string) (any, error) { return nil, w.e.SetSelfStatus(id, "hi") }},
	{"GetUserStatus caller", "GetUserStatus", func(w *badWorld, id string) (any, error) {
		return w.e.GetUserStatus(id, []string{"alice"})
	}},
	{"GetUserStatus list", "GetUserStatus", func(w *badWorld, id string) (any, error) {
		return w.e.GetUserStatus("frank", []string{"alice", id, "bob"})
	}},
	{"AppendUserStatus caller", "AppendUserStatus", func(w *badWorld, id string) (any, error) {
		return w.e.AppendUserStatus(nil, id, []string{"alice"})
	}},
	{"AppendUserStatus list", "AppendUserStatus", func(w *badWorld, id string) (any, error) {
		return w.e.AppendUserStatus(nil, "frank", []string{"alice", id, "bob"})
	}},
	{"SubscribeUserStatus caller", "SubscribeUserStatus", func(w *badWorld, id string) (any, error) {
		return w.e.SubscribeUserStatus(id, []string{"alice"})
	}},
	{"SubscribeUserStatus list", "SubscribeUserStatus", func(w *badWorld, id string) (any, error) {
		return w.e.SubscribeUserStatus("frank", []string{"alice", "carol", id, "newbie"})
	}},
	{"UnsubscribeUserStatus caller", "UnsubscribeUserStatus", func(w *badWorld, id string) (any, error) {
		return nil, w.e.UnsubscribeUserStatus(id, []string{"bob"})
	}},
	{"UnsubscribeUserStatus list", "UnsubscribeUserStatus", func(w *badWorld, id string) (any, error) {
		return nil, w.e.UnsubscribeUserStatus("alice", []string{"bob", id, "carol"})
	}},
	{"AddFriends user", "AddFriends", func(w *badWorld, id string) (any, error) { return nil, w.e.AddFriends(id, "alice") }},
	{"AddFriends list", "AddFriends", func(w *badWorld, id string) (any, error) {
		return nil, w.e.AddFriends("erin", "alice", id, "bob")
	}},
	{"RemoveFriends user", "RemoveFriends", func(w *badWorld, id string) (any, error) { return nil, w.e.RemoveFriends(id, "alice") }},
	{"RemoveFriends list", "RemoveFriends", func(w *badWorld, id string) (any, error) {
		return nil, w.e.RemoveFriends("frank", "alice", id, "bob")
	}},
}

// manyIDs returns n distinct valid IDs.
func distinctIDs(prefix string, n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = fmt.Sprintf("%s%d", prefix, i)
	}
	return out
}

// TestBadIDsAreRejectedAndChangeNothing: every ID parameter of every method,
// with every kind of bad ID.
func TestBadIDsAreRejectedAndChangeNothing(t *testing.T) {
	var cases []badCase
	for _, place := range idCalls {
		for _, bad := range badIDs {
			cases = append(cases, badCase{
				name: place.name + "/" + bad.name,
				call: func(w *badWorld) (any, error) { return place.call(w, bad.id) },
				op:   place.op, want: ErrInvalidParam,
			})
		}
	}
	// The two reading calls that take bad IDs without an error.
	for _, bad := range badIDs {
		cases = append(cases,
			badCase{
				name:  "Subscriptions/" + bad.name + " reads nil",
				call:  func(w *badWorld) (any, error) { return w.e.Subscriptions(bad.id), nil },
				check: resultEquals([]string(nil)),
			},
			badCase{
				name: "QueryOnlineStatus/" + bad.name + " reads Unknown",
				call: func(w *badWorld) (any, error) { return w.e.QueryOnlineStatus([]string{"stranger", bad.id}), nil },
				check: resultEquals([]OnlineStatus{
					{UserStatus: UserStatus{UserID: "stranger", Status: Unlogined}},
					{UserStatus: UserStatus{UserID: bad.id, Status: Unknown}},
				}),
			},
		)
	}
	runBadCases(t, cases)
}

// TestBadListsAreRejectedAndChangeNothing: nil, empty, oversized lists, the
// caller's own ID where it is not allowed, and the valid lists that must
// still change nothing.
func TestBadListsAreRejectedAndChangeNothing(t *testing.T) {
	e := func(w *badWorld) *Engine { return w.e }
	cases := []badCase{
		{name: "GetUserStatus nil", op: "GetUserStatus", want: ErrInvalidParam,
			call: func(w *badWorld) (any, error) { return e(w).GetUserStatus("frank", nil) }},
		{name: "GetUserStatus empty", op: "GetUserStatus", want: ErrInvalidParam,
			call: func(w *badWorld) (any, error) { return e(w).GetUserStatus("frank", []string{}) }},
		{name: "AppendUserStatus nil", op: "AppendUserStatus", want: ErrInvalidParam,
			call: func(w *badWorld) (any, error) { return e(w).AppendUserStatus(nil, "frank", nil) }},
		{name: "AppendUserStatus 501 IDs", op: "AppendUserStatus", want: ErrInvalidParam,
			call: func(w *badWorld) (any, error) { return e(w).AppendUserStatus(nil, "frank", distinctIDs("q", 501)) }},
		{name: "GetUserStatus 501 IDs", op: "GetUserStatus", want: ErrInvalidParam,
			call: func(w *badWorld) (any, error) { return e(w).GetUserStatus("frank", distinctIDs("q", 501)) }},
		{name: "GetUserStatus 501 of own ID", op: "GetUserStatus", want: ErrInvalidParam,
			call: func(w *badWorld) (any, error) {
				return e(w).GetUserStatus("alice", slices.Repeat([]string{"alice"}, 501))
			}},
		{name: "GetUserStatus own ID twice is free", // valid: changes nothing, not even the quota
			call: func(w *badWorld) (any, error) { return e(w).GetUserStatus("alice", []string{"alice", "alice"}) },
			check: resultEquals([]UserStatus{
				{UserID: "alice", Status: Online, Custom: "at work", Devices: []string{"phone", "laptop"}},
				{UserID: "alice", Status: Online, Custom: "at work", Devices: []string{"phone", "laptop"}},
			})},

		{name: "SubscribeUserStatus nil", op: "SubscribeUserStatus", want: ErrInvalidParam,
			call: func(w *badWorld) (any, error) { return e(w).SubscribeUserStatus("frank", nil) }},
		{name: "SubscribeUserStatus empty", op: "SubscribeUserStatus", want: ErrInvalidParam,
			call: func(w *badWorld) (any, error) { return e(w).SubscribeUserStatus("frank", []string{}) }},
		{name: "SubscribeUserStatus 101 IDs", op: "SubscribeUserStatus", want: ErrInvalidParam,
			call: func(w *badWorld) (any, error) { return e(w).SubscribeUserStatus("frank", distinctIDs("s", 101)) }},
		{name: "SubscribeUserStatus self in the middle", op: "SubscribeUserStatus", want: ErrInvalidParam,
			call: func(w *badWorld) (any, error) {
				return e(w).SubscribeUserStatus("frank", []string{"alice", "newbie", "frank", "carol"})
			}},
		{name: "SubscribeUserStatus self alone", op: "SubscribeUserStatus", want: ErrInvalidParam,
			call: func(w *badWorld) (any, error) { return e(w).SubscribeUserStatus("alice", []string{"alice"}) }},

		{name: "UnsubscribeUserStatus 101 IDs", op: "UnsubscribeUserStatus", want: ErrInvalidParam,
			call: func(w *badWorld) (any, error) {
				return nil, e(w).UnsubscribeUserStatus("alice", append([]string{"bob", "carol", "dave"}, distinctIDs("s", 98)...))
			}},

		{name: "AddFriends none", op: "AddFriends", want: ErrInvalidParam,
			call: func(w *badWorld) (any, error) { return nil, e(w).AddFriends("frank") }},
		{name: "AddFriends nil slice", op: "AddFriends", want: ErrInvalidParam,
			call: func(w *badWorld) (any, error) { return nil, e(w).AddFriends("frank", []string(nil)...) }},
		{name: "AddFriends empty slice", op: "AddFriends", want: ErrInvalidParam,
			call: func(w *badWorld) (any, error) { return nil, e(w).AddFriends("frank", []string{}...) }},
		{name: "AddFriends self in the middle", op: "AddFriends", want: ErrInvalidParam,
			call: func(w *badWorld) (any, error) { return nil, e(w).AddFriends("frank", "newbie", "frank", "erin") }},
		{name: "AddFriends one over MaxFriends", op: "AddFriends", want: ErrInvalidParam, // frank has 3 of 4
			call: func(w *badWorld) (any, error) { return nil, e(w).AddFriends("frank", "newbie", "erin") }},
		{name: "AddFriends one over MaxFriends beside known ones", op: "AddFriends", want: ErrInvalidParam,
			call: func(w *badWorld) (any, error) {
				return nil, e(w).AddFriends("frank", "alice", "newbie", "bob", "erin", "newbie")
			}},
		{name: "AddFriends far over MaxFriends", op: "AddFriends", want: ErrInvalidParam,
			call: func(w *badWorld) (any, error) { return nil, e(w).AddFriends("erin", distinctIDs("f", 1000)...) }},

		{name: "RemoveFriends none", op: "RemoveFriends", want: ErrInvalidParam,
			call: func(w *badWorld) (any, error) { return nil, e(w).RemoveFriends("frank") }},
		{name: "RemoveFriends empty slice", op: "RemoveFriends", want: ErrInvalidParam,
			call: func(w *badWorld) (any, error) { return nil, e(w).RemoveFriends("frank", []string{}...) }},
		{name: "RemoveFriends self in the middle", op: "RemoveFriends", want: ErrInvalidParam,
			call: func(w *badWorld) (any, error) { return nil, e(w).RemoveFriends("frank", "alice", "frank", "bob") }},
		{name: "RemoveFriends of no friend is ignored", // valid
			call: func(w *badWorld) (any, error) {
				return nil, e(w).RemoveFriends("frank", "stranger", "dave", "stranger")
			}},
		{name: "RemoveFriends of an unknown user is ignored", // valid
			call: func(w *badWorld) (any, error) { return nil, e(w).RemoveFriends("stranger", "alice") }},

		{name: "QueryOnlineStatus nil", // valid: no limit, nothing to answer
			call:  func(w *badWorld) (any, error) { return e(w).QueryOnlineStatus(nil), nil },
			check: func(t *testing.T, got any) { wantUnloginedEntries(t, got, 0) }},
		{name: "QueryOnlineStatus 2000 unknown IDs", // valid: no limit, reading creates no state
			call:  func(w *badWorld) (any, error) { return e(w).QueryOnlineStatus(distinctIDs("q", 2000)), nil },
			check: func(t *testing.T, got any) { wantUnloginedEntries(t, got, 2000) }},

		{name: "Subscriptions of an unknown user", // valid
			call:  func(w *badWorld) (any, error) { return e(w).Subscriptions("stranger"), nil },
			check: resultEquals([]string(nil))},
		{name: "Subscriptions reads without changing", // valid
			call:  func(w *badWorld) (any, error) { return e(w).Subscriptions("alice"), nil },
			check: resultEquals([]string{"bob", "carol", "dave"})},
		{name: "Stats reads without changing", // valid
			call:  func(w *badWorld) (any, error) { return e(w).Stats(), nil },
			check: func(t *testing.T, got any) { wantStatsShape(t, got.(Stats)) }},
		{name: "Snapshot without a Store", // a plain error, as documented
			call: func(w *badWorld) (any, error) {
				err := e(w).Snapshot(context.Background())
				if err == nil {
					return nil, errors.New("Snapshot without a Store succeeded")
				}
				var pe *Error
				if errors.As(err, &pe) {
					return nil, fmt.Errorf("Snapshot without a Store: %w is an *Error, want a plain error", err)
				}
				return nil, nil
			}},
	}
	runBadCases(t, cases)
}

func wantUnloginedEntries(t *testing.T, got any, n int) {
	t.Helper()
	if l := reflect.ValueOf(got).Len(); l != n {
		t.Errorf("got %d entries, want %d", l, n)
	}
	for i := range reflect.ValueOf(got).Len() {
		if st := reflect.ValueOf(got).Index(i).Interface().(OnlineStatus); st.Status != Unlogined || st.Version != 0 || st.Sessions != nil {
			t.Errorf("entry %d = %+v, want Unlogined with version 0 and no devices", i, st)
		}
	}
}

// wantStatsShape checks the set-up's counts.
func wantStatsShape(t *testing.T, st Stats) {
	t.Helper()
	// alice, bob, carol, frank logged in; alice, bob, frank Online; alice's
	// two devices, bob's and frank's phones connected.
	if st.Users != 4 || st.Online != 3 || st.Sessions != 4 || st.Friendships != 4 {
		t.Errorf("Stats = %+v, want 4 users, 3 online, 4 sessions, 4 friendships", st)
	}
}

// TestBadCustomStatusIsRejectedAndChangesNothing: the custom text is valid
// UTF-8 of at most 100 bytes (not runes), set only while Online.
func TestBadCustomStatusIsRejectedAndChangesNothing(t *testing.T) {
	set := func(user, text string) func(*badWorld) (any, error) {
		return func(w *badWorld) (any, error) { return nil, w.e.SetSelfStatus(user, text) }
	}
	cases := []badCase{
		{name: "101 bytes", call: set("alice", strings.Repeat("a", 101))},
		{name: "101 bytes in 100 runes", call: set("alice", strings.Repeat("a", 99)+"é")},
		{name: "a rune across the 100-byte boundary", call: set("alice", strings.Repeat("a", 98)+"€")},
		{name: "10000 bytes", call: set("alice", strings.Repeat("a", 10000))},
		{name: "101 bytes while offline", call: set("carol", strings.Repeat("a", 101))},
		{name: "invalid UTF-8", call: set("alice", "at \xffwork")},
		{name: "truncated rune", call: set("alice", "at work \xe2\x82")},
		{name: "overlong encoding", call: set("alice", "\xc0\xaf")},
		{name: "UTF-16 surrogate", call: set("alice", "\xed\xa0\x80")},
	}
	for i := range cases {
		cases[i].op, cases[i].want = "SetSelfStatus", ErrInvalidParam
	}
	cases = append(cases,
		badCase{name: "Offline user", call: set("carol", "back"), op: "SetSelfStatus", want: ErrNotLoggedIn},
		badCase{name: "Offline user clearing", call: set("carol", ""), op: "SetSelfStatus", want: ErrNotLoggedIn},
		badCase{name: "logged-out user", call: set("dave", "back"), op: "SetSelfStatus", want: ErrNotLoggedIn},
		badCase{name: "user with edges but no device", call: set("erin", "hi"), op: "SetSelfStatus", want: ErrNotLoggedIn},
		badCase{name: "unknown user", call: set("stranger", "hi"), op: "SetSelfStatus", want: ErrNotLoggedIn},
		badCase{name: "the text already shown", call: set("alice", "at work")}, // valid: documented to change nothing
		badCase{name: "the text already shown, multi-byte", call: set("bob", "☕ break")},
	)
	runBadCases(t, cases)
}

// TestNotLoggedInSpentQuotaAndSwitchOffChangeNothing: the other documented
// errors of the Engine's methods.
func TestNotLoggedInSpentQuotaAndSwitchOffChangeNothing(t *testing.T) {
	switchOff := func(c *Config) { c.StatusQuery = false }
	cases := []badCase{
		{name: "Logout of a device not logged in", op: "Logout", want: ErrNotLoggedIn,
			call: func(w *badWorld) (any, error) { return nil, w.e.Logout("alice", "tablet") }},
		{name: "Logout of a logged-out device", op: "Logout", want: ErrNotLoggedIn,
			call: func(w *badWorld) (any, error) { return nil, w.e.Logout("dave", "phone") }},
		{name: "Logout of a user with edges only", op: "Logout", want: ErrNotLoggedIn,
			call: func(w *badWorld) (any, error) { return nil, w.e.Logout("erin", "phone") }},
		{name: "Logout of an unknown user", op: "Logout", want: ErrNotLoggedIn,
			call: func(w *badWorld) (any, error) { return nil, w.e.Logout("stranger", "phone") }},
		{name: "Kick of a logged-out user", op: "Kick", want: ErrNotLoggedIn,
			call: func(w *badWorld) (any, error) { return nil, w.e.Kick("dave") }},
		{name: "Kick of a user with edges only", op: "Kick", want: ErrNotLoggedIn,
			call: func(w *badWorld) (any, error) { return nil, w.e.Kick("erin") }},
		{name: "Kick of an unknown user", op: "Kick", want: ErrNotLoggedIn,
			call: func(w *badWorld) (any, error) { return nil, w.e.Kick("stranger") }},

		{name: "AppendUserStatus over quota", op: "AppendUserStatus", want: ErrRateLimited,
			call: func(w *badWorld) (any, error) { return w.e.AppendUserStatus(nil, "greedy", []string{"alice"}) }},
		{name: "GetUserStatus over quota", op: "GetUserStatus", want: ErrRateLimited,
			call: func(w *badWorld) (any, error) { return w.e.GetUserStatus("greedy", []string{"alice"}) }},
		{name: "GetUserStatus of own ID over quota is free", // valid
			call: func(w *badWorld) (any, error) { return w.e.GetUserStatus("greedy", []string{"greedy"}) }},
		{name: "SubscribeUserStatus over quota", op: "SubscribeUserStatus", want: ErrRateLimited,
			call: func(w *badWorld) (any, error) { return w.e.SubscribeUserStatus("greedy", []string{"carol", "newbie"}) }},
		{name: "UnsubscribeUserStatus over quota", op: "UnsubscribeUserStatus", want: ErrRateLimited,
			call: func(w *badWorld) (any, error) { return nil, w.e.UnsubscribeUserStatus("greedy", []string{"alice"}) }},
		{name: "UnsubscribeUserStatus all over quota", op: "UnsubscribeUserStatus", want: ErrRateLimited,
			call: func(w *badWorld) (any, error) { return nil, w.e.UnsubscribeUserStatus("greedy", nil) }},

		{name: "switch off: AppendUserStatus of others", mod: switchOff, op: "AppendUserStatus", want: ErrFeatureDisabled,
			call: func(w *badWorld) (any, error) { return w.e.AppendUserStatus(nil, "alice", []string{"alice", "bob"}) }},
		{name: "switch off: GetUserStatus of others", mod: switchOff, op: "GetUserStatus", want: ErrFeatureDisabled,
			call: func(w *badWorld) (any, error) { return w.e.GetUserStatus("alice", []string{"alice", "bob"}) }},
		{name: "switch off: GetUserStatus of own ID", mod: switchOff, // valid: no switch needed
			call:  func(w *badWorld) (any, error) { return w.e.GetUserStatus("carol", []string{"carol"}) },
			check: resultEquals([]UserStatus{{UserID: "carol", Status: Offline}})},
		{name: "switch off: SubscribeUserStatus", mod: switchOff, op: "SubscribeUserStatus", want: ErrFeatureDisabled,
			call: func(w *badWorld) (any, error) { return w.e.SubscribeUserStatus("alice", []string{"bob"}) }},
		{name: "switch off: UnsubscribeUserStatus", mod: switchOff, op: "UnsubscribeUserStatus", want: ErrFeatureDisabled,
			call: func(w *badWorld) (any, error) { return nil, w.e.UnsubscribeUserStatus("alice", []string{"bob"}) }},
		{name: "switch off: UnsubscribeUserStatus all", mod: switchOff, op: "UnsubscribeUserStatus", want: ErrFeatureDisabled,
			call: func(w *badWorld) (any, error) { return nil, w.e.UnsubscribeUserStatus("alice", nil) }},
	}
	runBadCases(t, cases)
}

// TestBoundaryValuesAreAccepted: the values right at each limit go through,
// so the rejections above are at the limit and not one short of it.
func TestBoundaryValuesAreAccepted(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		w := newBadWorld(t, nil)
		e := w.e
		ok := func(what string, err error) {
			t.Helper()
			if err != nil {
				t.Errorf("%s: %v", what, err)
			}
		}
		for _, id := range []string{strings.Repeat("a", 128), strings.Repeat("€", 42) + "ab", "ünïcødé 名前"} {
			_, err := e.Login(id, id)
			ok(fmt.Sprintf("Login of a %d-byte ID", len(id)), err)
		}
		for _, text := range []string{strings.Repeat("a", 100), strings.Repeat("a", 98) + "é", strings.Repeat("a", 97) + "€", strings.Repeat("€", 33) + "a", "tab\there"} {
			ok(fmt.Sprintf("SetSelfStatus of %d bytes", len(text)), e.SetSelfStatus("alice", text))
			st, err := e.GetUserStatus("alice", []string{"alice"})
			ok("GetUserStatus own", err)
			if err == nil && st[0].Custom != text {
				t.Errorf("custom = %q, want %q", st[0].Custom, text)
			}
		}
		st, err := e.GetUserStatus("frank", distinctIDs("q", 500))
		ok("GetUserStatus of 500 IDs", err)
		if len(st) != 500 {
			t.Errorf("GetUserStatus of 500 IDs answered %d", len(st))
		}
		_, err = e.SubscribeUserStatus("frank", distinctIDs("s", 100))
		ok("SubscribeUserStatus of 100 IDs", err)
		if n := len(e.Subscriptions("frank")); n != 100 {
			t.Errorf("frank has %d subscriptions, want 100", n)
		}
		ok("UnsubscribeUserStatus of 100 IDs", e.UnsubscribeUserStatus("frank", distinctIDs("s", 100)))
		// frank has 3 friends of 4: a known friend and a duplicate count nothing.
		ok("AddFriends up to MaxFriends", e.AddFriends("frank", "alice", "newbie", "newbie"))
		if n := dumpEngine(e, nil).Users["frank"].Friends; len(n) != 4 {
			t.Errorf("frank's friends = %v, want 4", n)
		}
		if err := e.checkInvariants(); err != nil {
			t.Error(err)
		}
	})
}

// TestNewRejectsEachImpossibleConfigField: every impossible Config value
// gives a plain error naming its field, and no engine.
func TestNewRejectsEachImpossibleConfigField(t *testing.T) {
	for _, c := range []struct {
		field string
		mod   func(*Config)
	}{
		{"HeartbeatTimeout", func(c *Config) { c.HeartbeatTimeout = -time.Nanosecond }},
		{"DisconnectGrace", func(c *Config) { c.DisconnectGrace = -time.Second }},
		{"SessionExpiry", func(c *Config) { c.SessionExpiry = -time.Hour }},
		{"SubscriptionTTL", func(c *Config) { c.SubscriptionTTL = -time.Hour }},
		{"SnapshotInterval", func(c *Config) { c.SnapshotInterval = -time.Minute }},
		{"SnapshotTimeout", func(c *Config) { c.SnapshotTimeout = -time.Minute }},
		{"MaxCustomStatusBytes", func(c *Config) { c.MaxCustomStatusBytes = -1 }},
		{"MaxQueryIDs", func(c *Config) { c.MaxQueryIDs = -1 }},
		{"MaxSubscribeIDs", func(c *Config) { c.MaxSubscribeIDs = -1 }},
		{"MaxSubscribeIDs", func(c *Config) { c.MaxSubscribeIDs = 201 }},                        // more per call than the default list holds
		{"MaxSubscribeIDs", func(c *Config) { c.MaxSubscriptions, c.MaxSubscribeIDs = 10, 11 }}, // and than a set one
		{"MaxSubscriptions", func(c *Config) { c.MaxSubscriptions = -1 }},
		{"MaxFriends", func(c *Config) { c.MaxFriends = -1 }},
		{"MaxDevices", func(c *Config) { c.MaxDevices = -1 }},
		{"MaxIDBytes", func(c *Config) { c.MaxIDBytes = -1 }},
		{"FeedSize", func(c *Config) { c.FeedSize = -1 }},
		{"ChangeFeedSize", func(c *Config) { c.ChangeFeedSize = -1 }},
		{"Shards", func(c *Config) { c.Shards = -1 }},
		{"Shards", func(c *Config) { c.Shards = 3 }},
		{"Shards", func(c *Config) { c.Shards = 6 }},
		{"Shards", func(c *Config) { c.Shards = 1000 }},
		{"Shards", func(c *Config) { c.Shards = 1<<20 + 1 }},
		{"QueryQuota", func(c *Config) { c.QueryQuota.Per = -time.Second }},
		{"SubscribeQuota", func(c *Config) { c.SubscribeQuota = Quota{Calls: 5, Per: -time.Second} }},
		{"UnsubscribeQuota", func(c *Config) { c.UnsubscribeQuota = Quota{Calls: -1, Per: -time.Second} }},
	} {
		cfg := badConfig()
		c.mod(&cfg)
		name := fmt.Sprintf("%s %+v", c.field, cfg)
		got, panicked, err := callRecovering(func() (any, error) { return New(cfg) })
		switch {
		case panicked != "":
			t.Errorf("New with a bad %s panicked: %s", name, panicked)
			continue
		case err == nil:
			_ = got.(*Engine).Close()
			t.Errorf("New with a bad %s succeeded", name)
			continue
		}
		if !isNilResult(got) {
			_ = got.(*Engine).Close()
			t.Errorf("New with a bad %s returned an engine beside its error", name)
		}
		if !strings.Contains(err.Error(), "Config."+c.field) {
			t.Errorf("New with a bad %s: error %q does not name Config.%s", name, err, c.field)
		}
		for _, s := range errorKinds {
			if errors.Is(err, s) {
				t.Errorf("New with a bad %s: error %v matches %v, want a plain error", name, err, s)
			}
		}
	}
}

// ---- after Close ---------------------------------------------------------------

// TestCallsAfterClose: every method after Close returns ErrClosed or its
// documented result, changes nothing and never panics.
func TestCallsAfterClose(t *testing.T) {
	closeIt := func(t *testing.T, w *badWorld) {
		if err := w.e.Close(); err != nil {
			t.Fatalf("Close: %v", err)
		}
	}
	phone := func(w *badWorld) *Session { return w.sessions["alice/phone"] }
	closed := func(name, op string, call func(w *badWorld) (any, error)) badCase {
		return badCase{name: name, prep: closeIt, call: call, op: op, want: ErrClosed}
	}
	valid := func(name string, call func(w *badWorld) (any, error), check func(*testing.T, any)) badCase {
		return badCase{name: name, prep: closeIt, call: call, check: check}
	}
	cases := []badCase{
		closed("Login", "Login", func(w *badWorld) (any, error) { return w.e.Login("alice", "phone") }),
		closed("Login of a new user", "Login", func(w *badWorld) (any, error) { return w.e.Login("newbie", "phone") }),
		closed("Logout", "Logout", func(w *badWorld) (any, error) { return nil, w.e.Logout("alice", "phone") }),
		closed("Logout of an offline device", "Logout", func(w *badWorld) (any, error) { return nil, w.e.Logout("carol", "phone") }),
		closed("Kick", "Kick", func(w *badWorld) (any, error) { return nil, w.e.Kick("alice") }),
		closed("SetSelfStatus", "SetSelfStatus", func(w *badWorld) (any, error) { return nil, w.e.SetSelfStatus("alice", "closed") }),
		closed("SetSelfStatus same text", "SetSelfStatus", func(w *badWorld) (any, error) { return nil, w.e.SetSelfStatus("alice", "at work") }),
		closed("GetUserStatus", "GetUserStatus", func(w *badWorld) (any, error) { return w.e.GetUserStatus("frank", []string{"alice"}) }),
		closed("GetUserStatus own", "GetUserStatus", func(w *badWorld) (any, error) { return w.e.GetUserStatus("alice", []string{"alice"}) }),
		closed("AppendUserStatus", "AppendUserStatus", func(w *badWorld) (any, error) {
			return w.e.AppendUserStatus(nil, "frank", []string{"alice"})
		}),
		closed("SubscribeUserStatus", "SubscribeUserStatus", func(w *badWorld) (any, error) {
			return w.e.SubscribeUserStatus("frank", []string{"alice"})
		}),
		closed("UnsubscribeUserStatus", "UnsubscribeUserStatus", func(w *badWorld) (any, error) {
			return nil, w.e.UnsubscribeUserStatus("alice", []string{"bob"})
		}),
		closed("UnsubscribeUserStatus all", "UnsubscribeUserStatus", func(w *badWorld) (any, error) {
			return nil, w.e.UnsubscribeUserStatus("alice", nil)
		}),
		closed("AddFriends", "AddFriends", func(w *badWorld) (any, error) { return nil, w.e.AddFriends("frank", "newbie") }),
		closed("RemoveFriends", "RemoveFriends", func(w *badWorld) (any, error) { return nil, w.e.RemoveFriends("frank", "alice") }),
		closed("Snapshot", "Snapshot", func(w *badWorld) (any, error) { return nil, w.e.Snapshot(context.Background()) }),
		closed("Session.Heartbeat", "", func(w *badWorld) (any, error) { return nil, phone(w).Heartbeat() }),
		closed("Session.Disconnect", "", func(w *badWorld) (any, error) { return nil, phone(w).Disconnect() }),
		closed("Session.Logout", "", func(w *badWorld) (any, error) { return nil, phone(w).Logout() }),
		closed("Session.Logout of an ended session", "", func(w *badWorld) (any, error) { return nil, w.sessions["bob/tablet"].Logout() }),

		valid("Close again", func(w *badWorld) (any, error) { return nil, w.e.Close() }, nil),
		valid("Subscriptions", func(w *badWorld) (any, error) { return w.e.Subscriptions("alice"), nil }, resultEquals([]string(nil))),
		valid("QueryOnlineStatus", func(w *badWorld) (any, error) { return w.e.QueryOnlineStatus([]string{"alice"}), nil }, resultEquals([]OnlineStatus(nil))),
		valid("Stats", func(w *badWorld) (any, error) { return w.e.Stats(), nil }, func(t *testing.T, got any) {
			if st := got.(Stats); st.Sessions != 0 {
				t.Errorf("Stats after Close: %d sessions, want 0", st.Sessions)
			}
		}),
		valid("Session.Done is closed", func(w *badWorld) (any, error) { return chanClosed(phone(w).Done()), nil }, resultEquals(true)),
		valid("Session.EndReason is 0", func(w *badWorld) (any, error) { return phone(w).EndReason(), nil }, resultEquals(Reason(0))),
		valid("Session.UserID and DeviceID", func(w *badWorld) (any, error) {
			return phone(w).UserID() + "/" + phone(w).DeviceID(), nil
		}, resultEquals("alice/phone")),
		valid("Session.Lost", func(w *badWorld) (any, error) { return phone(w).Lost(), nil }, resultEquals(uint64(0))),
	}
	// A bad argument after Close: the engine validates arguments before it
	// looks at Close, so these answer ErrInvalidParam, while Close's doc
	// says "Later calls of any method return ErrClosed". Both are accepted
	// here; what matters is an error, no panic and no change.
	for _, place := range idCalls {
		cases = append(cases, badCase{
			name: "bad ID: " + place.name, prep: closeIt,
			call: func(w *badWorld) (any, error) { return place.call(w, "bo\xffb") },
			op:   place.op, want: ErrClosed, or: ErrInvalidParam,
		})
	}
	runBadCases(t, cases)

	// The change feed still holds the records made before Close, then ends.
	synctest.Test(t, func(t *testing.T) {
		w := newBadWorld(t, nil)
		pending := len(w.e.Changes())
		closeIt(t, w)
		n := 0
		for range w.e.Changes() {
			n++
		}
		if n != pending || n == 0 {
			t.Errorf("after Close the feed gave %d records, want the %d pending", n, pending)
		}
	})
}

func chanClosed(c <-chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}

// ---- after a session ended -------------------------------------------------------

// TestSessionCallsAfterSessionEnded ends alice's phone session (which has
// events pending) in every way a session ends, then calls each Session
// method: Heartbeat, Disconnect and Logout return ErrSessionEnded (ErrClosed
// after Close) and change nothing, in particular not the device or the
// session that replaced it; the pending events are still read by Next and
// Drain, after which Next returns ErrSessionEnded at once.
func TestSessionCallsAfterSessionEnded(t *testing.T) {
	for _, c := range []struct {
		name   string
		mod    func(*Config)
		end    func(t *testing.T, w *badWorld, s *Session)
		reason Reason
		want   *Error
	}{
		{"Session.Logout", nil, func(t *testing.T, _ *badWorld, s *Session) { requireNil(t, s.Logout()) }, ReasonLogout, ErrSessionEnded},
		{"Engine.Logout", nil, func(t *testing.T, w *badWorld, _ *Session) { requireNil(t, w.e.Logout("alice", "phone")) }, ReasonLogout, ErrSessionEnded},
		{"Disconnect", nil, func(t *testing.T, _ *badWorld, s *Session) { requireNil(t, s.Disconnect()) }, ReasonLinkClose, ErrSessionEnded},
		{"Kick", nil, func(t *testing.T, w *badWorld, _ *Session) { requireNil(t, w.e.Kick("alice")) }, ReasonKicked, ErrSessionEnded},
		{"relogin of the device", nil, func(t *testing.T, w *badWorld, _ *Session) {
			s, err := w.e.Login("alice", "phone")
			requireNil(t, err)
			w.sessions["alice/phone (new)"] = s
		}, ReasonLogin, ErrSessionEnded},
		{"pushed out by MaxDevices", func(c *Config) { c.MaxDevices = 2 }, func(t *testing.T, w *badWorld, _ *Session) {
			s, err := w.e.Login("alice", "watch")
			requireNil(t, err)
			w.sessions["alice/watch"] = s
		}, ReasonKicked, ErrSessionEnded},
		{"heartbeat timeout", nil, func(t *testing.T, w *badWorld, s *Session) {
			// Everybody else heartbeats half-way, so only this session times out.
			time.Sleep(200 * time.Second)
			for _, other := range w.sessions {
				if other != s && other.Heartbeat() != nil && !chanClosed(other.Done()) {
					t.Fatalf("heartbeat of a live session failed")
				}
			}
			time.Sleep(201 * time.Second)
			synctest.Wait()
		}, ReasonTimeout, ErrSessionEnded},
		{"engine Close", nil, func(t *testing.T, w *badWorld, _ *Session) { requireNil(t, w.e.Close()) }, 0, ErrClosed},
	} {
		t.Run(c.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				w := newBadWorld(t, c.mod)
				s := w.sessions["alice/phone"]
				pending := peekMailbox(s)
				if len(pending) < 2 {
					t.Fatalf("set-up left %d events pending on alice's phone, want several", len(pending))
				}
				c.end(t, w, s)
				moveClock()
				if !chanClosed(s.Done()) || s.EndReason() != c.reason {
					t.Fatalf("after %s: Done closed %v, EndReason %v; want closed, %v", c.name, chanClosed(s.Done()), s.EndReason(), c.reason)
				}
				if got := peekMailbox(s); !cmp.Equal(got, pending) {
					t.Errorf("the mailbox changed as the session ended (-before +after):\n%s", cmp.Diff(pending, got))
				}
				for _, call := range []struct {
					name string
					call func() error
				}{{"Heartbeat", s.Heartbeat}, {"Disconnect", s.Disconnect}, {"Logout", s.Logout}} {
					name := c.name + ": " + call.name
					before := dumpEngine(w.e, w.sessions)
					_, panicked, err := callRecovering(func() (any, error) { return nil, call.call() })
					if panicked != "" {
						t.Fatalf("%s panicked: %s", name, panicked)
					}
					checkError(t, name, err, "", c.want, nil)
					if diff := cmp.Diff(before, dumpEngine(w.e, w.sessions), cmpopts.EquateErrors()); diff != "" {
						t.Errorf("%s changed the engine (-before +after):\n%s", name, diff)
					}
				}
				if s.UserID() != "alice" || s.DeviceID() != "phone" || s.Lost() != 0 {
					t.Errorf("ended session reads %s/%s lost %d, want alice/phone lost 0", s.UserID(), s.DeviceID(), s.Lost())
				}

				// What was pending is still read, oldest first, then the end.
				ctx, cancel := context.WithTimeout(context.Background(), time.Hour)
				defer cancel()
				first, err := s.Next(ctx)
				if err != nil || !cmp.Equal(first, pending[0]) {
					t.Errorf("Next = %+v, %v; want %+v", first, err, pending[0])
				}
				if rest := s.Drain(nil); !cmp.Equal(rest, pending[1:]) {
					t.Errorf("Drain (-want +got):\n%s", cmp.Diff(pending[1:], rest))
				}
				if _, err := s.Next(ctx); !errors.Is(err, ErrSessionEnded) {
					t.Errorf("Next with nothing left = %v, want ErrSessionEnded at once", err)
				}
				if got := s.Drain(nil); len(got) != 0 {
					t.Errorf("second Drain = %v, want nothing", got)
				}
				if !w.e.closed.Load() {
					if err := w.e.checkInvariants(); err != nil {
						t.Error(err)
					}
				}
			})
		})
	}
}

func requireNil(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// ---- Close racing traffic ------------------------------------------------------

// raceStore is a Store that keeps nothing: it lets Close and Snapshot run
// their saves while traffic goes on.
type raceStore struct{ saved atomic.Int64 }

func (s *raceStore) Save(ctx context.Context, records iter.Seq2[[]Record, error]) error {
	for batch, err := range records {
		if err != nil {
			return err
		}
		s.saved.Add(int64(len(batch)))
	}
	return nil
}

func (s *raceStore) Load(context.Context, func([]Record) error) error { return nil }

// TestCloseRacingTraffic: goroutines make every kind of call while Close
// runs (twice at once). Every call returns nil or one of its documented
// errors and none panics; afterwards every method reports ErrClosed, every
// session handed out has ended, the change feed is closed and no goroutine
// is left behind.
func TestCloseRacingTraffic(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	const (
		workers = 4
		warmUp  = 300 // calls each worker makes before Close starts
	)
	store := &raceStore{}
	e, err := New(Config{
		StatusQuery: true, NotifyFriends: true, ChangeFeedSize: 64, MaxFriends: 8,
		QueryQuota: Quota{Calls: -1}, SubscribeQuota: Quota{Calls: -1}, UnsubscribeQuota: Quota{Calls: -1},
		Store: store,
	})
	if err != nil {
		t.Fatal(err)
	}
	users := []string{"u0", "u1", "u2", "u3", "u4", "u5"}
	var (
		warm     sync.WaitGroup
		done     sync.WaitGroup
		closing  atomic.Bool  // Close has returned: workers stop
		refused  atomic.Int64 // calls refused with ErrClosed while Close ran
		mu       sync.Mutex   // protects sessions
		sessions []*Session   // every session handed out
	)
	warm.Add(workers)
	for w := range workers {
		done.Add(1)
		go func() {
			defer done.Done()
			rng := rand.New(rand.NewPCG(uint64(w), 1))
			var mine []*Session
			for n := 0; !closing.Load(); n++ {
				if n == warmUp {
					warm.Done()
				}
				if raceCall(t, e, rng, users, &mine) {
					refused.Add(1)
				}
			}
			mu.Lock()
			sessions = append(sessions, mine...)
			mu.Unlock()
		}()
	}
	warm.Wait()
	var closers sync.WaitGroup
	for range 2 {
		closers.Go(func() {
			if err := e.Close(); err != nil {
				t.Errorf("Close: %v", err)
			}
		})
	}
	closers.Wait()
	closing.Store(true)
	done.Wait()
	// How much traffic met Close depends on the scheduler: logged, not asserted.
	t.Logf("%d calls refused with ErrClosed while Close ran", refused.Load())

	// After Close: every call is refused, every session has ended.
	rng := rand.New(rand.NewPCG(99, 1))
	for range 200 {
		raceCallAfterClose(t, e, rng, users, sessions)
	}
	for _, s := range sessions {
		if !chanClosed(s.Done()) {
			t.Fatalf("session %s/%s still open after Close", s.UserID(), s.DeviceID())
		}
		if err := s.Heartbeat(); !errors.Is(err, ErrClosed) {
			t.Fatalf("Heartbeat after Close = %v, want ErrClosed", err)
		}
	}
	for {
		_, open := <-e.Changes() // never blocks once closed
		if !open {
			break
		}
	}
	if st := e.Stats(); st.Sessions != 0 {
		t.Errorf("Stats after Close: %d sessions", st.Sessions)
	}
	if len(sessions) == 0 {
		t.Error("no session was handed out: the traffic did not run")
	}
	if store.saved.Load() == 0 {
		t.Error("Close saved no final snapshot")
	}
}

// raceCall makes one random call with valid arguments and checks that its
// result is nil or one of the errors documented for it. It reports whether
// the call was refused with ErrClosed.
func raceCall(t *testing.T, e *Engine, rng *rand.Rand, users []string, mine *[]*Session) (refused bool) {
	user, other := pickTwo(rng, users)
	device := []string{"phone", "laptop"}[rng.IntN(2)]
	var s *Session
	if n := len(*mine); n > 0 {
		s = (*mine)[max(0, n-4)+rng.IntN(min(n, 4))]
	}
	pick := rng.IntN(19)
	name := fmt.Sprintf("call %d", pick)
	defer func() {
		if r := recover(); r != nil {
			t.Errorf("%s panicked: %v\n%s", name, r, debug.Stack())
		}
	}()
	allow := func(err error, ok ...*Error) {
		refused = errors.Is(err, ErrClosed)
		if err == nil || refused {
			return
		}
		for _, k := range ok {
			if errors.Is(err, k) {
				return
			}
		}
		t.Errorf("%s: undocumented error %v", name, err)
	}
	switch pick {
	case 0, 1:
		name = "Login"
		ns, err := e.Login(user, device)
		allow(err)
		if err == nil {
			*mine = append(*mine, ns)
		}
	case 2:
		name = "Logout"
		allow(e.Logout(user, device), ErrNotLoggedIn)
	case 3:
		name = "Kick"
		allow(e.Kick(user), ErrNotLoggedIn)
	case 4:
		name = "SetSelfStatus"
		allow(e.SetSelfStatus(user, []string{"", "busy", "☕"}[rng.IntN(3)]), ErrNotLoggedIn)
	case 5:
		name = "GetUserStatus"
		_, err := e.GetUserStatus(user, []string{other, user})
		allow(err)
	case 6:
		name = "SubscribeUserStatus"
		_, err := e.SubscribeUserStatus(user, []string{other})
		allow(err)
	case 7:
		name = "UnsubscribeUserStatus"
		allow(e.UnsubscribeUserStatus(user, []string{other}[:rng.IntN(2)]))
	case 8:
		name = "AddFriends"
		allow(e.AddFriends(user, other))
	case 9:
		name = "RemoveFriends"
		allow(e.RemoveFriends(user, other))
	case 10:
		name = "Subscriptions, QueryOnlineStatus, Stats"
		e.Subscriptions(user)
		e.QueryOnlineStatus([]string{user, other})
		e.Stats()
	case 11:
		name = "Changes"
		select {
		case <-e.Changes():
		default:
		}
	case 12:
		name = "Snapshot"
		if rng.IntN(8) == 0 {
			allow(e.Snapshot(context.Background()))
		}
	case 13, 14, 15, 16, 17:
		if s == nil {
			return
		}
		switch pick {
		case 13:
			name = "Session.Heartbeat"
			allow(s.Heartbeat(), ErrSessionEnded)
		case 14:
			name = "Session.Disconnect"
			allow(s.Disconnect(), ErrSessionEnded)
		case 15:
			name = "Session.Logout"
			allow(s.Logout(), ErrSessionEnded)
		case 16:
			name = "Session.Drain"
			s.Drain(nil)
		case 17:
			name = "Session.Next"
			ctx, cancel := context.WithCancel(context.Background())
			cancel() // never wait
			if _, err := s.Next(ctx); err != nil && !errors.Is(err, context.Canceled) {
				allow(err, ErrSessionEnded)
			}
		}
	case 18:
		name = "Session readers"
		if s != nil {
			_, _, _, _ = s.Ready(), s.Done(), s.EndReason(), s.Lost()
		}
	}
	return refused
}

// raceCallAfterClose makes one random call after Close and checks that it
// is refused as documented.
func raceCallAfterClose(t *testing.T, e *Engine, rng *rand.Rand, users []string, sessions []*Session) {
	user, other := pickTwo(rng, users)
	closed := func(name string, err error) {
		if !errors.Is(err, ErrClosed) {
			t.Errorf("%s after Close = %v, want ErrClosed", name, err)
		}
	}
	switch rng.IntN(12) {
	case 0:
		_, err := e.Login(user, "phone")
		closed("Login", err)
	case 1:
		closed("Logout", e.Logout(user, "phone"))
	case 2:
		closed("Kick", e.Kick(user))
	case 3:
		closed("SetSelfStatus", e.SetSelfStatus(user, "x"))
	case 4:
		_, err := e.GetUserStatus(user, []string{user})
		closed("GetUserStatus", err)
	case 5:
		_, err := e.SubscribeUserStatus(user, []string{other})
		closed("SubscribeUserStatus", err)
	case 6:
		closed("UnsubscribeUserStatus", e.UnsubscribeUserStatus(user, nil))
	case 7:
		closed("AddFriends", e.AddFriends(user, other))
	case 8:
		closed("RemoveFriends", e.RemoveFriends(user, other))
	case 9:
		closed("Snapshot", e.Snapshot(context.Background()))
	case 10:
		if e.Subscriptions(user) != nil || e.QueryOnlineStatus([]string{user}) != nil {
			t.Error("Subscriptions or QueryOnlineStatus answered after Close")
		}
	case 11:
		if len(sessions) > 0 {
			s := sessions[rng.IntN(len(sessions))]
			closed("Session.Heartbeat", s.Heartbeat())
			closed("Session.Disconnect", s.Disconnect())
			closed("Session.Logout", s.Logout())
		}
	}
}

// pickTwo picks two different users.
func pickTwo(rng *rand.Rand, users []string) (string, string) {
	i := rng.IntN(len(users))
	j := (i + 1 + rng.IntN(len(users)-1)) % len(users)
	return users[i], users[j]
}

// printableASCII, which checks every ID, reads eight bytes at a time; it
// must agree with the plain byte-by-byte rule for every byte value at
// every position, in strings of every length around the word size.
func TestPrintableASCIIAgreesWithByteByByteRule(t *testing.T) {
	byByte := func(s string) bool {
		for i := 0; i < len(s); i++ {
			if c := s[i]; c < 0x20 || c >= 0x7f {
				return false
			}
		}
		return true
	}
	base := []byte("abcdefghijklmnopq")
	for pos := range base {
		for c := range 256 {
			b := append([]byte(nil), base...)
			b[pos] = byte(c)
			for n := range len(b) + 1 {
				if got, want := printableASCII(string(b[:n])), byByte(string(b[:n])); got != want {
					t.Fatalf("printableASCII(%q) = %v, want %v", b[:n], got, want)
				}
			}
		}
	}
}
