package presence_test

// Behaviour tests of the presence engine, written as step scripts: each test
// follows what users and the host do and checks what everybody sees. The
// facts come from REFERENCE.md (the hosted service the engine reproduces)
// and from DESIGN.md ("Semantics the reference leaves open"). Anything that
// involves time runs in a synctest bubble: time.Sleep moves the fake clock,
// synctest.Wait lets the engine's timer goroutine catch up.

import (
	"context"
	"errors"
	"strconv"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"

	"github.com/presencekit/presence"
)

// Short names for the values the scripts use all the time.
const (
	online    = presence.Online
	offline   = presence.Offline
	unlogined = presence.Unlogined
)

// ---- helpers ---------------------------------------------------------------

// newEngine starts an engine and closes it when the test (or its synctest
// bubble: cleanups run inside it) ends.
func newEngine(t *testing.T, cfg presence.Config) *presence.Engine {
	t.Helper()
	e, err := presence.New(cfg)
	if err != nil {
		t.Fatalf("New(%+v): %v", cfg, err)
	}
	t.Cleanup(func() { _ = e.Close() })
	return e
}

// login logs a device in and fails the test if that fails.
func login(t *testing.T, e *presence.Engine, user, device string) *presence.Session {
	t.Helper()
	s, err := e.Login(user, device)
	if err != nil {
		t.Fatalf("Login(%q, %q): %v", user, device, err)
	}
	return s
}

// watch logs watcher in on device "w", subscribes it to targets and empties
// its mailbox, so the test sees only what happens next.
func watch(t *testing.T, e *presence.Engine, watcher string, targets ...string) *presence.Session {
	t.Helper()
	s := login(t, e, watcher, "w")
	if len(targets) > 0 {
		noErr(t, "subscribe "+watcher, second(e.SubscribeUserStatus(watcher, targets)))
	}
	s.Drain(nil)
	return s
}

// second keeps only the error of a two-result call.
func second[T any](_ T, err error) error { return err }

func noErr(t *testing.T, what string, err error) {
	t.Helper()
	if err != nil {
		t.Fatalf("%s: unexpected error %v", what, err)
	}
}

// wantErr checks that err is the sentinel want (errors.Is) and carries its
// reference code.
func wantErr(t *testing.T, what string, err error, want *presence.Error) {
	t.Helper()
	if !errors.Is(err, want) {
		t.Fatalf("%s: error = %v, want one matching %v", what, err, want)
	}
	var pe *presence.Error
	if !errors.As(err, &pe) {
		t.Fatalf("%s: error %T is not a *presence.Error", what, err)
	}
	if pe.Code != want.Code {
		t.Fatalf("%s: Code = %d, want %d", what, pe.Code, want.Code)
	}
}

// advance moves the fake clock and lets the engine act on it.
func advance(d time.Duration) {
	time.Sleep(d)
	synctest.Wait()
}

// ev is an expected event; versions are checked separately.
func ev(user string, st presence.Status, custom string, why presence.Reason) presence.Event {
	return presence.Event{UserStatus: presence.UserStatus{UserID: user, Status: st, Custom: custom}, Reason: why}
}

var (
	ignoreVersion = cmpopts.IgnoreFields(presence.UserStatus{}, "Version")
	ignoreTime    = cmpopts.IgnoreFields(presence.Change{}, "Time")
)

// wantEvents drains s and compares what was pending with want (ignoring
// versions). It returns the drained events.
func wantEvents(t *testing.T, s *presence.Session, want ...presence.Event) []presence.Event {
	t.Helper()
	got := s.Drain(nil)
	if diff := cmp.Diff(want, got, ignoreVersion, cmpopts.EquateEmpty()); diff != "" {
		t.Fatalf("events of %s/%s (-want +got):\n%s", s.UserID(), s.DeviceID(), diff)
	}
	return got
}

// state is the administrator's view of one user (no switch, no quota).
func state(t *testing.T, e *presence.Engine, id string) presence.OnlineStatus {
	t.Helper()
	r := e.QueryOnlineStatus([]string{id})
	if len(r) != 1 {
		t.Fatalf("QueryOnlineStatus(%q) returned %d entries", id, len(r))
	}
	return r[0]
}

// wantState checks a user's status, custom text and online devices
// (ignoring the version, which it returns).
func wantState(t *testing.T, e *presence.Engine, id string, st presence.Status, custom string, devices ...string) uint64 {
	t.Helper()
	got := state(t, e, id).UserStatus
	want := presence.UserStatus{UserID: id, Status: st, Custom: custom, Devices: devices}
	if diff := cmp.Diff(want, got, ignoreVersion, cmpopts.EquateEmpty()); diff != "" {
		t.Fatalf("state of %s (-want +got):\n%s", id, diff)
	}
	return got.Version
}

// changes returns the change records pending on the feed.
func changes(e *presence.Engine) []presence.Change {
	var out []presence.Change
	for {
		select {
		case c, ok := <-e.Changes():
			if !ok {
				return out
			}
			out = append(out, c)
		default:
			return out
		}
	}
}

func wantChanges(t *testing.T, e *presence.Engine, want ...presence.Change) {
	t.Helper()
	if diff := cmp.Diff(want, changes(e), ignoreTime, cmpopts.EquateEmpty()); diff != "" {
		t.Fatalf("change feed (-want +got):\n%s", diff)
	}
}

// ended reports whether the session's Done channel is closed.
func ended(s *presence.Session) bool {
	select {
	case <-s.Done():
		return true
	default:
		return false
	}
}

func wantEnded(t *testing.T, s *presence.Session, why presence.Reason) {
	t.Helper()
	if !ended(s) {
		t.Fatalf("session %s/%s: Done not closed", s.UserID(), s.DeviceID())
	}
	if got := s.EndReason(); got != why {
		t.Fatalf("session %s/%s: EndReason = %v, want %v", s.UserID(), s.DeviceID(), got, why)
	}
	wantErr(t, "Heartbeat after end", s.Heartbeat(), presence.ErrSessionEnded)
}

func wantLive(t *testing.T, s *presence.Session) {
	t.Helper()
	if ended(s) {
		t.Fatalf("session %s/%s ended (%v), want live", s.UserID(), s.DeviceID(), s.EndReason())
	}
}

// ids returns n distinct user IDs with the given prefix.
func ids(prefix string, n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = prefix + strconv.Itoa(i)
	}
	return out
}

// ---- REFERENCE: the two kinds of status ------------------------------------

func TestStatusValuesAreFixed(t *testing.T) {
	for _, tc := range []struct {
		status presence.Status
		value  uint8
		name   string
	}{
		{presence.Unknown, 0, "Unknown"},
		{presence.Online, 1, "Online"},
		{presence.Offline, 2, "Offline"},
		{presence.Unlogined, 3, "Unlogined"},
	} {
		if uint8(tc.status) != tc.value {
			t.Errorf("%s = %d, want %d", tc.name, uint8(tc.status), tc.value)
		}
		if got := tc.status.String(); got != tc.name {
			t.Errorf("Status(%d).String() = %q, want %q", tc.value, got, tc.name)
		}
	}
}

// ---- REFERENCE: how the general status moves -------------------------------

func TestLoginMakesUserOnline(t *testing.T) {
	e := newEngine(t, presence.Config{StatusQuery: true})
	wendy := watch(t, e, "wendy", "bob")

	bob := login(t, e, "bob", "laptop")

	wantState(t, e, "bob", online, "", "laptop")
	wantEvents(t, wendy, ev("bob", online, "", presence.ReasonLogin))
	wantEvents(t, bob, ev("bob", online, "", presence.ReasonLogin)) // a session hears of its own login
	wantLive(t, bob)
}

func TestDisconnectMakesUserOfflineAndKeepsDeviceLoggedIn(t *testing.T) {
	e := newEngine(t, presence.Config{StatusQuery: true})
	wendy := watch(t, e, "wendy", "bob")
	bob := login(t, e, "bob", "laptop")
	wendy.Drain(nil)

	noErr(t, "Disconnect", bob.Disconnect())

	wantState(t, e, "bob", offline, "")
	wantEvents(t, wendy, ev("bob", offline, "", presence.ReasonLinkClose))
	wantEnded(t, bob, presence.ReasonLinkClose)
	// The device stays logged in, offline.
	if got := state(t, e, "bob").Sessions; len(got) != 1 || got[0].DeviceID != "laptop" || got[0].Connected {
		t.Fatalf("bob's devices after disconnect = %+v, want laptop logged in, not connected", got)
	}
	st := e.Stats()
	if st.Users != 2 || st.Online != 1 || st.Sessions != 1 {
		t.Fatalf("Stats = %+v, want Users 2 (bob offline, wendy), Online 1, Sessions 1", st)
	}
}

func TestHeartbeatTimeoutMakesUserOffline(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		e := newEngine(t, presence.Config{StatusQuery: true}) // default timeout: 400 s
		wendy := watch(t, e, "wendy", "bob")
		bob := login(t, e, "bob", "phone")
		wendy.Drain(nil)

		advance(300 * time.Second)
		noErr(t, "wendy heartbeat", wendy.Heartbeat()) // wendy's client is alive, bob's is silent
		advance(99 * time.Second)                      // 399 s since bob's login
		wantState(t, e, "bob", online, "", "phone")
		wantEvents(t, wendy)

		advance(2 * time.Second) // 401 s: past the 400 s timeout
		wantState(t, e, "bob", offline, "")
		wantEvents(t, wendy, ev("bob", offline, "", presence.ReasonTimeout))
		wantEnded(t, bob, presence.ReasonTimeout)
		wantLive(t, wendy)
		if got := state(t, e, "bob").Sessions; len(got) != 1 || got[0].Connected {
			t.Fatalf("bob's devices after timeout = %+v, want phone logged in, not connected", got)
		}
	})
}

func TestHeartbeatPostponesTimeout(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		e := newEngine(t, presence.Config{})
		bob := login(t, e, "bob", "phone")

		// The client sends a heartbeat every 2 minutes for an hour.
		for range 30 {
			advance(2 * time.Minute)
			noErr(t, "Heartbeat", bob.Heartbeat())
		}
		wantState(t, e, "bob", online, "", "phone")

		advance(399 * time.Second) // silent since the last heartbeat
		wantState(t, e, "bob", online, "", "phone")
		advance(2 * time.Second)
		wantState(t, e, "bob", offline, "")
		wantEnded(t, bob, presence.ReasonTimeout)
	})
}

func TestLogoutMakesUserUnlogined(t *testing.T) {
	e := newEngine(t, presence.Config{StatusQuery: true})
	wendy := watch(t, e, "wendy", "bob")
	bob := login(t, e, "bob", "laptop")
	wendy.Drain(nil)

	noErr(t, "Logout", e.Logout("bob", "laptop"))

	wantState(t, e, "bob", unlogined, "")
	wantEvents(t, wendy, ev("bob", unlogined, "", presence.ReasonLogout))
	wantEnded(t, bob, presence.ReasonLogout)
	if got := state(t, e, "bob").Sessions; len(got) != 0 {
		t.Fatalf("bob's devices after logout = %+v, want none", got)
	}
	wantErr(t, "second Logout", e.Logout("bob", "laptop"), presence.ErrNotLoggedIn)
}

func TestLogoutOfOneDeviceKeepsUserLoggedIn(t *testing.T) {
	e := newEngine(t, presence.Config{StatusQuery: true})
	wendy := watch(t, e, "wendy", "bob")
	phone := login(t, e, "bob", "phone")
	laptop := login(t, e, "bob", "laptop")
	noErr(t, "laptop disconnect", laptop.Disconnect())
	wendy.Drain(nil)
	phone.Drain(nil)

	// The phone logs out; the laptop is still logged in (offline).
	noErr(t, "Session.Logout", phone.Logout())
	wantState(t, e, "bob", offline, "")
	wantEvents(t, wendy, ev("bob", offline, "", presence.ReasonLogout))
	wantEnded(t, phone, presence.ReasonLogout)
	wantErr(t, "Session.Logout again", phone.Logout(), presence.ErrSessionEnded)

	// Only when the last device logs out is the user Unlogined.
	noErr(t, "Logout laptop", e.Logout("bob", "laptop"))
	wantState(t, e, "bob", unlogined, "")
	wantEvents(t, wendy, ev("bob", unlogined, "", presence.ReasonLogout))
}

func TestOfflineDeviceExpiresAfterSevenDays(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		e := newEngine(t, presence.Config{ChangeFeedSize: 16}) // default expiry: 7 days
		bob := login(t, e, "bob", "phone")
		noErr(t, "Disconnect", bob.Disconnect())
		changes(e)

		advance(7*24*time.Hour - time.Second)
		wantState(t, e, "bob", offline, "")
		wantChanges(t, e)

		advance(2 * time.Second)
		wantState(t, e, "bob", unlogined, "")
		wantChanges(t, e, presence.Change{UserID: "bob", DeviceID: "phone", Reason: presence.ReasonExpired, Status: unlogined})
		wantErr(t, "Logout of expired device", e.Logout("bob", "phone"), presence.ErrNotLoggedIn)
		if st := e.Stats(); st.Users != 0 {
			t.Fatalf("Stats.Users = %d after expiry, want 0", st.Users)
		}
	})
}

func TestTimedOutDeviceExpiresCountingFromLastHeartbeat(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const expiry = 2 * time.Hour
		e := newEngine(t, presence.Config{SessionExpiry: expiry})
		bob := login(t, e, "bob", "phone")
		advance(100 * time.Second)
		noErr(t, "Heartbeat", bob.Heartbeat()) // last sign of life at 100 s
		advance(401 * time.Second)
		wantState(t, e, "bob", offline, "")

		// Expiry counts from the last heartbeat (100 s), not from the timeout.
		advance(expiry - 401*time.Second - time.Second)
		wantState(t, e, "bob", offline, "")
		advance(2 * time.Second)
		wantState(t, e, "bob", unlogined, "")
	})
}

func TestReconnectWithinGraceIsNotReported(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		e := newEngine(t, presence.Config{StatusQuery: true, DisconnectGrace: 10 * time.Second, ChangeFeedSize: 16})
		wendy := watch(t, e, "wendy", "bob")
		bob := login(t, e, "bob", "phone")
		v := wantState(t, e, "bob", online, "", "phone")
		wendy.Drain(nil)
		changes(e)

		// The link drops (elevator); the client is back 9 s later.
		noErr(t, "Disconnect", bob.Disconnect())
		wantEnded(t, bob, presence.ReasonLinkClose)
		wantState(t, e, "bob", online, "", "phone") // held back: still Online
		advance(9 * time.Second)
		bob = login(t, e, "bob", "phone")
		advance(time.Minute)

		// Nobody heard of the disconnect.
		if got := wantState(t, e, "bob", online, "", "phone"); got != v {
			t.Fatalf("bob's Version moved from %d to %d over a reconnect within the grace", v, got)
		}
		wantEvents(t, wendy)
		wantChanges(t, e, presence.Change{UserID: "bob", DeviceID: "phone", Reason: presence.ReasonLogin, Status: online})
		wantLive(t, bob)
	})
}

func TestDisconnectReportedWhenGracePasses(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		e := newEngine(t, presence.Config{StatusQuery: true, DisconnectGrace: 10 * time.Second, ChangeFeedSize: 16})
		wendy := watch(t, e, "wendy", "bob")
		bob := login(t, e, "bob", "phone")
		noErr(t, "SetSelfStatus", e.SetSelfStatus("bob", "on the move"))
		wendy.Drain(nil)
		changes(e)

		noErr(t, "Disconnect", bob.Disconnect())
		advance(9 * time.Second)
		wantState(t, e, "bob", online, "on the move", "phone")
		wantEvents(t, wendy)
		wantChanges(t, e)

		advance(2 * time.Second) // 11 s: the grace has passed
		wantState(t, e, "bob", offline, "")
		wantEvents(t, wendy, ev("bob", offline, "", presence.ReasonLinkClose))
		wantChanges(t, e, presence.Change{UserID: "bob", DeviceID: "phone", Reason: presence.ReasonLinkClose, Status: offline})
	})
}

func TestNoGraceForHeartbeatTimeout(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		e := newEngine(t, presence.Config{DisconnectGrace: time.Minute, HeartbeatTimeout: 100 * time.Second})
		login(t, e, "bob", "phone")
		advance(101 * time.Second)
		wantState(t, e, "bob", offline, "") // at once, not a minute later
	})
}

// REFERENCE: "When the user stops being Online, the custom status is cleared
// automatically and that clearing is itself a status change that is
// notified." DESIGN: one event, one version step.
func TestLeavingOnlineClearsCustomStatusInOneChange(t *testing.T) {
	for _, tc := range []struct {
		name   string
		leave  func(e *presence.Engine, s *presence.Session) error
		status presence.Status
		why    presence.Reason
		grace  time.Duration
	}{
		{"disconnect", func(_ *presence.Engine, s *presence.Session) error { return s.Disconnect() }, offline, presence.ReasonLinkClose, 0},
		{"logout", func(_ *presence.Engine, s *presence.Session) error { return s.Logout() }, unlogined, presence.ReasonLogout, 0},
		{"kick", func(e *presence.Engine, _ *presence.Session) error { return e.Kick("bob") }, unlogined, presence.ReasonKicked, 0},
		{"timeout", func(_ *presence.Engine, _ *presence.Session) error { advance(51 * time.Second); return nil }, offline, presence.ReasonTimeout, 0},
		{"grace passes", func(_ *presence.Engine, s *presence.Session) error {
			err := s.Disconnect()
			advance(6 * time.Second)
			return err
		}, offline, presence.ReasonLinkClose, 5 * time.Second},
	} {
		t.Run(tc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				e := newEngine(t, presence.Config{StatusQuery: true, HeartbeatTimeout: 100 * time.Second, DisconnectGrace: tc.grace, ChangeFeedSize: 16})
				bob := login(t, e, "bob", "phone")
				noErr(t, "SetSelfStatus", e.SetSelfStatus("bob", "Listening to music"))
				advance(50 * time.Second) // wendy logs in later, so only bob's heartbeat runs out first
				wendy := watch(t, e, "wendy", "bob")
				v := wantState(t, e, "bob", online, "Listening to music", "phone")
				changes(e)
				delivered := e.Stats().Delivered

				noErr(t, "leave", tc.leave(e, bob))

				got := wantEvents(t, wendy, ev("bob", tc.status, "", tc.why))
				if got[0].Version <= v {
					t.Fatalf("event Version %d, want > %d", got[0].Version, v)
				}
				// One change: one record, and exactly one delivery (to wendy;
				// bob's own session has ended), nothing replaced in between.
				wantChanges(t, e, presence.Change{UserID: "bob", DeviceID: deviceOf(tc.why), Reason: tc.why, Status: tc.status,
					Kicked: kickedOf(tc.why)})
				if d := e.Stats().Delivered - delivered; d != 1 {
					t.Fatalf("Delivered grew by %d, want 1 (one event to wendy)", d)
				}
				if nv := wantState(t, e, "bob", tc.status, ""); nv != got[0].Version {
					t.Fatalf("state Version %d, event Version %d: want equal", nv, got[0].Version)
				}
			})
		})
	}
}

func deviceOf(why presence.Reason) string {
	if why == presence.ReasonKicked {
		return ""
	}
	return "phone"
}

func kickedOf(why presence.Reason) []string {
	if why == presence.ReasonKicked {
		return []string{"phone"}
	}
	return nil
}

// ---- REFERENCE: custom status ----------------------------------------------

func TestCustomStatusIsAtMost100Bytes(t *testing.T) {
	e := newEngine(t, presence.Config{StatusQuery: true})
	wendy := watch(t, e, "wendy", "bob")
	login(t, e, "bob", "phone")
	wendy.Drain(nil)

	for _, step := range []struct {
		custom string
		want   *presence.Error // nil: accepted
	}{
		{strings.Repeat("x", 100), nil},
		{strings.Repeat("x", 100) + "y", presence.ErrInvalidParam}, // 101 bytes
		{strings.Repeat("é", 50), nil},                             // 50 runes, 100 bytes
		{strings.Repeat("é", 50) + "!", presence.ErrInvalidParam},  // 101 bytes
		{"\xff\xfe", presence.ErrInvalidParam},                     // not UTF-8
		{"Listening to music", nil},
	} {
		before := state(t, e, "bob")
		err := e.SetSelfStatus("bob", step.custom)
		if step.want != nil {
			wantErr(t, "SetSelfStatus "+step.custom, err, step.want)
			if diff := cmp.Diff(before, state(t, e, "bob")); diff != "" {
				t.Fatalf("rejected SetSelfStatus changed bob (-before +after):\n%s", diff)
			}
			wantEvents(t, wendy)
			continue
		}
		noErr(t, "SetSelfStatus", err)
		wantState(t, e, "bob", online, step.custom, "phone")
		wantEvents(t, wendy, ev("bob", online, step.custom, presence.ReasonCustomStatus))
	}
}

func TestSettingEmptyCustomStatusClearsIt(t *testing.T) {
	e := newEngine(t, presence.Config{StatusQuery: true})
	wendy := watch(t, e, "wendy", "bob")
	login(t, e, "bob", "phone")
	noErr(t, "set", e.SetSelfStatus("bob", "busy"))
	v := wantState(t, e, "bob", online, "busy", "phone")
	wendy.Drain(nil)

	noErr(t, "clear", e.SetSelfStatus("bob", ""))
	got := wantEvents(t, wendy, ev("bob", online, "", presence.ReasonCustomStatus))
	if got[0].Version <= v {
		t.Fatalf("clearing event Version %d, want > %d", got[0].Version, v)
	}
	v = wantState(t, e, "bob", online, "", "phone")

	// Clearing again (or setting the text already shown) changes nothing.
	noErr(t, "clear again", e.SetSelfStatus("bob", ""))
	wantEvents(t, wendy)
	if got := wantState(t, e, "bob", online, "", "phone"); got != v {
		t.Fatalf("a no-op SetSelfStatus moved the Version from %d to %d", v, got)
	}
}

func TestSetSelfStatusNeedsUserOnline(t *testing.T) {
	e := newEngine(t, presence.Config{})
	wantErr(t, "never logged in", e.SetSelfStatus("bob", "hi"), presence.ErrNotLoggedIn)

	bob := login(t, e, "bob", "phone")
	noErr(t, "Disconnect", bob.Disconnect())
	wantErr(t, "offline", e.SetSelfStatus("bob", "hi"), presence.ErrNotLoggedIn)

	noErr(t, "Logout", e.Logout("bob", "phone"))
	wantErr(t, "logged out", e.SetSelfStatus("bob", "hi"), presence.ErrNotLoggedIn)
	wantState(t, e, "bob", unlogined, "")
}

func TestSetSelfStatusNeedsNoSwitchAndNoQuota(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		e := newEngine(t, presence.Config{}) // both switches off
		login(t, e, "bob", "phone")
		for i := range 50 { // far past 20 calls in 5 s
			noErr(t, "SetSelfStatus", e.SetSelfStatus("bob", "mood "+strconv.Itoa(i)))
		}
		wantState(t, e, "bob", online, "mood 49", "phone")
	})
}

// ---- REFERENCE: status belongs to the user, not the device -----------------

func TestStatusBelongsToUserNotDevice(t *testing.T) {
	e := newEngine(t, presence.Config{StatusQuery: true})
	wendy := watch(t, e, "wendy", "bob")

	phone := login(t, e, "bob", "phone")
	wantEvents(t, wendy, ev("bob", online, "", presence.ReasonLogin))
	noErr(t, "SetSelfStatus", e.SetSelfStatus("bob", "commuting"))
	wendy.Drain(nil)

	// A second device: still one user, still Online, nothing to tell.
	laptop := login(t, e, "bob", "laptop")
	wantState(t, e, "bob", online, "commuting", "phone", "laptop")
	wantEvents(t, wendy)
	wantEvents(t, laptop) // the user's status did not change

	// The phone drops: the laptop keeps bob Online, custom text included.
	noErr(t, "phone Disconnect", phone.Disconnect())
	wantState(t, e, "bob", online, "commuting", "laptop")
	wantEvents(t, wendy)

	// The last connected device drops: now bob is Offline.
	noErr(t, "laptop Disconnect", laptop.Disconnect())
	wantState(t, e, "bob", offline, "")
	wantEvents(t, wendy, ev("bob", offline, "", presence.ReasonLinkClose))

	// The own view lists the online devices.
	phone = login(t, e, "bob", "phone")
	got, err := e.GetUserStatus("bob", []string{"bob"})
	noErr(t, "GetUserStatus self", err)
	if diff := cmp.Diff([]string{"phone"}, got[0].Devices); diff != "" {
		t.Fatalf("own Devices (-want +got):\n%s", diff)
	}
	// Others see the user, not its devices.
	got, err = e.GetUserStatus("wendy", []string{"bob"})
	noErr(t, "GetUserStatus other", err)
	if len(got[0].Devices) != 0 {
		t.Fatalf("wendy sees bob's Devices %v, want none", got[0].Devices)
	}
	wantLive(t, phone)
}

// ---- REFERENCE: operations and their limits --------------------------------

func TestGetOwnStatusIsFreeWithoutSwitch(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		e := newEngine(t, presence.Config{}) // switch off
		login(t, e, "bob", "phone")
		for range 50 { // unlimited
			got, err := e.GetUserStatus("bob", []string{"bob", "bob"}) // only the own ID, even twice
			noErr(t, "GetUserStatus own", err)
			want := presence.UserStatus{UserID: "bob", Status: online, Devices: []string{"phone"}}
			if diff := cmp.Diff([]presence.UserStatus{want, want}, got, ignoreVersion); diff != "" {
				t.Fatalf("own status (-want +got):\n%s", diff)
			}
		}
	})
}

func TestGetOwnStatusSpendsNoQuota(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		e := newEngine(t, presence.Config{StatusQuery: true})
		for range 30 {
			noErr(t, "GetUserStatus own", second(e.GetUserStatus("bob", []string{"bob"})))
		}
		for i := range 20 { // the full quota is still there
			noErr(t, "GetUserStatus other #"+strconv.Itoa(i+1), second(e.GetUserStatus("bob", []string{"alice"})))
		}
		wantErr(t, "21st query", second(e.GetUserStatus("bob", []string{"alice"})), presence.ErrRateLimited)
	})
}

func TestQueryingOthersNeedsSwitch(t *testing.T) {
	e := newEngine(t, presence.Config{})
	login(t, e, "bob", "phone")
	for _, list := range [][]string{{"alice"}, {"bob", "alice"}} {
		_, err := e.GetUserStatus("bob", list)
		wantErr(t, "GetUserStatus", err, presence.ErrFeatureDisabled)
	}
}

// quotaOps are the three metered operations, each 20 calls per 5 s per caller.
var quotaOps = []struct {
	name string
	call func(e *presence.Engine, caller string) error
}{
	{"GetUserStatus", func(e *presence.Engine, caller string) error {
		return second(e.GetUserStatus(caller, []string{"alice"}))
	}},
	{"SubscribeUserStatus", func(e *presence.Engine, caller string) error {
		return second(e.SubscribeUserStatus(caller, []string{"alice"}))
	}},
	{"UnsubscribeUserStatus", func(e *presence.Engine, caller string) error {
		return e.UnsubscribeUserStatus(caller, []string{"alice"})
	}},
}

func TestQuotaIs20CallsPer5SecondsPerCaller(t *testing.T) {
	for _, op := range quotaOps {
		t.Run(op.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				e := newEngine(t, presence.Config{StatusQuery: true})
				for i := range 20 {
					noErr(t, op.name+" call "+strconv.Itoa(i+1), op.call(e, "bob"))
				}
				wantErr(t, op.name+" call 21", op.call(e, "bob"), presence.ErrRateLimited)
				wantErr(t, op.name+" call 22", op.call(e, "bob"), presence.ErrRateLimited)

				// Another caller has a quota of its own.
				noErr(t, op.name+" by carol", op.call(e, "carol"))
				// Each operation has a bucket of its own.
				for _, other := range quotaOps {
					if other.name != op.name {
						noErr(t, other.name+" by bob", other.call(e, "bob"))
					}
				}

				// Five seconds later the quota is full again.
				advance(5 * time.Second)
				for i := range 20 {
					noErr(t, op.name+" after refill, call "+strconv.Itoa(i+1), op.call(e, "bob"))
				}
				wantErr(t, op.name+" after refill, call 21", op.call(e, "bob"), presence.ErrRateLimited)
			})
		})
	}
}

func TestListSizeLimits(t *testing.T) {
	e := newEngine(t, presence.Config{StatusQuery: true})
	for _, tc := range []struct {
		name string
		call func(ids []string) error
		max  int
	}{
		{"GetUserStatus", func(ids []string) error { return second(e.GetUserStatus("bob", ids)) }, 500},
		{"SubscribeUserStatus", func(ids []string) error { return second(e.SubscribeUserStatus("bob", ids)) }, 100},
		{"UnsubscribeUserStatus", func(ids []string) error { return e.UnsubscribeUserStatus("bob", ids) }, 100},
	} {
		wantErr(t, tc.name+" over the limit", tc.call(ids(tc.name+"-", tc.max+1)), presence.ErrInvalidParam)
		noErr(t, tc.name+" at the limit", tc.call(ids(tc.name+"-", tc.max)))
	}
	wantErr(t, "GetUserStatus of no IDs", second(e.GetUserStatus("bob", nil)), presence.ErrInvalidParam)
	wantErr(t, "SubscribeUserStatus to no IDs", second(e.SubscribeUserStatus("bob", nil)), presence.ErrInvalidParam)
}

func TestCannotSubscribeToYourself(t *testing.T) {
	e := newEngine(t, presence.Config{StatusQuery: true})
	bob := login(t, e, "bob", "phone")
	bob.Drain(nil)

	_, err := e.SubscribeUserStatus("bob", []string{"alice", "bob"})
	wantErr(t, "self-subscribe", err, presence.ErrInvalidParam)
	if got := e.Subscriptions("bob"); got != nil {
		t.Fatalf("Subscriptions after a rejected call = %v, want none", got)
	}
	wantEvents(t, bob) // not even alice's initial state
}

func TestUnsubscribeEmptyListCancelsAll(t *testing.T) {
	for _, list := range [][]string{nil, {}} {
		e := newEngine(t, presence.Config{StatusQuery: true})
		wendy := watch(t, e, "wendy", "alice", "bob", "carol")

		noErr(t, "Unsubscribe all", e.UnsubscribeUserStatus("wendy", list))

		if got := e.Subscriptions("wendy"); got != nil {
			t.Fatalf("Subscriptions after cancelling all = %v, want none", got)
		}
		if st := e.Stats(); st.Subscriptions != 0 {
			t.Fatalf("Stats.Subscriptions = %d, want 0", st.Subscriptions)
		}
		login(t, e, "alice", "phone")
		wantEvents(t, wendy) // no longer told
	}
}

func TestSubscribingPastLimitEvictsEarliest(t *testing.T) {
	e := newEngine(t, presence.Config{StatusQuery: true})
	wendy := watch(t, e, "wendy")
	targets := ids("t", 203)

	for _, batch := range [][]string{targets[:100], targets[100:200]} {
		evicted, err := e.SubscribeUserStatus("wendy", batch)
		noErr(t, "Subscribe", err)
		if evicted != nil {
			t.Fatalf("evicted %v while within 200", evicted)
		}
	}
	// Three more: the three earliest are evicted, oldest first, no error.
	evicted, err := e.SubscribeUserStatus("wendy", targets[200:])
	noErr(t, "Subscribe past 200", err)
	if diff := cmp.Diff(targets[:3], evicted); diff != "" {
		t.Fatalf("evicted (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff(targets[3:], e.Subscriptions("wendy")); diff != "" {
		t.Fatalf("Subscriptions (-want +got):\n%s", diff)
	}
	if st := e.Stats(); st.Subscriptions != 200 {
		t.Fatalf("Stats.Subscriptions = %d, want 200", st.Subscriptions)
	}

	// Evicted targets are no longer watched; kept ones are.
	wendy.Drain(nil)
	login(t, e, targets[0], "phone")
	login(t, e, targets[3], "phone")
	wantEvents(t, wendy, ev(targets[3], online, "", presence.ReasonLogin))
}

func TestSubscriptionToFriendCountsAgainstLimit(t *testing.T) {
	e := newEngine(t, presence.Config{StatusQuery: true, NotifyFriends: true, MaxSubscriptions: 3})

	// Friend edges alone use none of the subscription quota ...
	noErr(t, "AddFriends", e.AddFriends("wendy", "f1", "f2", "f3", "f4"))
	for _, batch := range [][]string{{"f1"}, {"x"}, {"y"}} { // ... but an explicit subscription to a friend does.
		noErr(t, "Subscribe", second(e.SubscribeUserStatus("wendy", batch)))
	}
	evicted, err := e.SubscribeUserStatus("wendy", []string{"z"})
	noErr(t, "Subscribe", err)
	if diff := cmp.Diff([]string{"f1"}, evicted); diff != "" {
		t.Fatalf("evicted (-want +got):\n%s", diff)
	}
	// f1 is still a friend: wendy still hears of it.
	wendy := watch(t, e, "wendy")
	login(t, e, "f1", "phone")
	wantEvents(t, wendy, ev("f1", online, "", presence.ReasonLogin))
}

// ---- REFERENCE: who is notified --------------------------------------------

func TestSubscribersAreNotifiedOnEveryDevice(t *testing.T) {
	e := newEngine(t, presence.Config{StatusQuery: true})
	wendyPhone := watch(t, e, "wendy", "bob")
	wendyLaptop := login(t, e, "wendy", "laptop")
	carol := watch(t, e, "carol", "bob")
	dave := watch(t, e, "dave", "alice") // watches someone else
	wendyLaptop.Drain(nil)

	login(t, e, "bob", "phone")
	noErr(t, "SetSelfStatus", e.SetSelfStatus("bob", "at lunch"))

	for _, s := range []*presence.Session{wendyPhone, wendyLaptop, carol} {
		wantEvents(t, s, ev("bob", online, "at lunch", presence.ReasonCustomStatus)) // Login, then replaced by the newer state
	}
	wantEvents(t, dave)
}

func TestFriendsAreNotifiedOnlyWithSwitch(t *testing.T) {
	for _, notify := range []bool{false, true} {
		e := newEngine(t, presence.Config{NotifyFriends: notify}) // StatusQuery off: friends need no switch
		wendy := login(t, e, "wendy", "phone")
		noErr(t, "AddFriends", e.AddFriends("wendy", "bob"))
		wendy.Drain(nil)

		login(t, e, "bob", "phone")

		if notify {
			wantEvents(t, wendy, ev("bob", online, "", presence.ReasonLogin))
		} else {
			wantEvents(t, wendy)
		}
	}
}

func TestChangeMadeOnOneDeviceReachesAllOwnDevices(t *testing.T) {
	e := newEngine(t, presence.Config{})
	phone := login(t, e, "bob", "phone")
	laptop := login(t, e, "bob", "laptop")
	phone.Drain(nil)

	noErr(t, "SetSelfStatus", e.SetSelfStatus("bob", "in a meeting"))

	for _, s := range []*presence.Session{phone, laptop} {
		wantEvents(t, s, ev("bob", online, "in a meeting", presence.ReasonCustomStatus))
	}
}

func TestFriendAndSubscriberIsNotifiedOnce(t *testing.T) {
	e := newEngine(t, presence.Config{StatusQuery: true, NotifyFriends: true})
	wendy := watch(t, e, "wendy", "bob")
	noErr(t, "AddFriends", e.AddFriends("wendy", "bob"))
	before := e.Stats()

	bob := login(t, e, "bob", "phone")

	wantEvents(t, wendy, ev("bob", online, "", presence.ReasonLogin))
	after := e.Stats()
	// Two deliveries: one to wendy, one to bob's own session; none replaced.
	if d, c := after.Delivered-before.Delivered, after.Coalesced-before.Coalesced; d != 2 || c != 0 {
		t.Fatalf("Delivered +%d, Coalesced +%d; want +2, +0 (wendy once, bob once)", d, c)
	}
	wantEvents(t, bob, ev("bob", online, "", presence.ReasonLogin))
}

// ---- REFERENCE: switches and error codes -----------------------------------

func TestBothSwitchesAreOffByDefault(t *testing.T) {
	e := newEngine(t, presence.Config{})
	wendy := login(t, e, "wendy", "phone")
	for _, call := range []struct {
		name string
		err  error
	}{
		{"GetUserStatus", second(e.GetUserStatus("wendy", []string{"bob"}))},
		{"SubscribeUserStatus", second(e.SubscribeUserStatus("wendy", []string{"bob"}))},
		{"UnsubscribeUserStatus", e.UnsubscribeUserStatus("wendy", []string{"bob"})},
		{"UnsubscribeUserStatus all", e.UnsubscribeUserStatus("wendy", nil)},
	} {
		wantErr(t, call.name, call.err, presence.ErrFeatureDisabled)
	}
	// Friends can be recorded, but are not notified.
	noErr(t, "AddFriends", e.AddFriends("wendy", "bob"))
	wendy.Drain(nil)
	login(t, e, "bob", "phone")
	wantEvents(t, wendy)
}

func TestErrorCodesMatchReference(t *testing.T) {
	for _, tc := range []struct {
		err  *presence.Error
		code int
	}{
		{presence.ErrFeatureDisabled, 72001},
		{presence.ErrRateLimited, 7008},
		{presence.ErrInvalidParam, 6017},
		{presence.ErrNotLoggedIn, 6014},
	} {
		if tc.err.Code != tc.code {
			t.Errorf("%v: Code = %d, want %d", tc.err, tc.err.Code, tc.code)
		}
	}
	// Each kind matches its own sentinel only.
	e := newEngine(t, presence.Config{})
	err := e.SetSelfStatus("bob", "hi")
	if !errors.Is(err, presence.ErrNotLoggedIn) || errors.Is(err, presence.ErrInvalidParam) || errors.Is(err, presence.ErrFeatureDisabled) {
		t.Fatalf("SetSelfStatus of an offline user: %v matches the wrong sentinels", err)
	}
}

func TestInvalidIDsAreRejected(t *testing.T) {
	e := newEngine(t, presence.Config{StatusQuery: true})
	long := strings.Repeat("a", 129)
	for _, id := range []string{"", long, "bad\xff", "tab\tbed", "nul\x00"} {
		wantErr(t, "Login user "+id, second(e.Login(id, "phone")), presence.ErrInvalidParam)
		wantErr(t, "Login device "+id, second(e.Login("bob", id)), presence.ErrInvalidParam)
		wantErr(t, "GetUserStatus", second(e.GetUserStatus("bob", []string{"alice", id})), presence.ErrInvalidParam)
		wantErr(t, "SubscribeUserStatus", second(e.SubscribeUserStatus("bob", []string{id})), presence.ErrInvalidParam)
		wantErr(t, "UnsubscribeUserStatus", e.UnsubscribeUserStatus("bob", []string{id}), presence.ErrInvalidParam)
		wantErr(t, "AddFriends", e.AddFriends("bob", id), presence.ErrInvalidParam)
		wantErr(t, "Kick", e.Kick(id), presence.ErrInvalidParam)
	}
	noErr(t, "Login with a 128-byte ID", second(e.Login(strings.Repeat("a", 128), "phone")))
}

// ---- REFERENCE: server side ------------------------------------------------

func TestServerQueryShowsPerDeviceDetail(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		e := newEngine(t, presence.Config{}) // admin query needs no switch
		t0 := time.Now()
		login(t, e, "bob", "phone")
		advance(10 * time.Second)
		laptop := login(t, e, "bob", "laptop")
		noErr(t, "SetSelfStatus", e.SetSelfStatus("bob", "gaming"))
		advance(10 * time.Second)
		noErr(t, "laptop Disconnect", laptop.Disconnect())

		sec := func(n int) time.Time { return t0.Add(time.Duration(n) * time.Second) }
		got := e.QueryOnlineStatus([]string{"bob", "nobody", "", "bad\x00id"})
		want := []presence.OnlineStatus{
			{
				UserStatus: presence.UserStatus{UserID: "bob", Status: online, Custom: "gaming", Devices: []string{"phone"}},
				Sessions: []presence.SessionInfo{ // oldest login first
					{DeviceID: "phone", Connected: true, LoginAt: sec(0), LastSeen: sec(0)},
					{DeviceID: "laptop", Connected: false, LoginAt: sec(10), LastSeen: sec(20)},
				},
			},
			{UserStatus: presence.UserStatus{UserID: "nobody", Status: unlogined}},
			{UserStatus: presence.UserStatus{UserID: "", Status: presence.Unknown}},
			{UserStatus: presence.UserStatus{UserID: "bad\x00id", Status: presence.Unknown}},
		}
		if diff := cmp.Diff(want, got, ignoreVersion, cmpopts.EquateEmpty()); diff != "" {
			t.Fatalf("QueryOnlineStatus (-want +got):\n%s", diff)
		}
		if got[1].Version != 0 {
			t.Fatalf("unknown user Version = %d, want 0", got[1].Version)
		}
		// No limit of IDs for the administrator.
		if n := len(e.QueryOnlineStatus(ids("u", 1000))); n != 1000 {
			t.Fatalf("QueryOnlineStatus of 1000 IDs returned %d entries", n)
		}
	})
}

func TestChangeFeedRecordsEveryChange(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		e := newEngine(t, presence.Config{ChangeFeedSize: 64, MaxDevices: 2, HeartbeatTimeout: time.Minute, SessionExpiry: time.Hour})
		var phone, laptop, tablet *presence.Session
		rec := func(dev string, why presence.Reason, st presence.Status, custom string, kicked ...string) presence.Change {
			return presence.Change{UserID: "bob", DeviceID: dev, Reason: why, Status: st, Custom: custom, Kicked: kicked}
		}
		for _, step := range []struct {
			do   string
			act  func()
			want []presence.Change
		}{
			{"bob logs in on his phone", func() { phone = login(t, e, "bob", "phone") },
				[]presence.Change{rec("phone", presence.ReasonLogin, online, "")}},
			{"bob sets a custom status", func() { noErr(t, "set", e.SetSelfStatus("bob", "hi")) },
				[]presence.Change{rec("", presence.ReasonCustomStatus, online, "hi")}},
			{"bob logs in on his laptop (no status change, still recorded)", func() { laptop = login(t, e, "bob", "laptop") },
				[]presence.Change{rec("laptop", presence.ReasonLogin, online, "hi")}},
			{"bob logs in on a tablet: over MaxDevices, the phone is kicked", func() { tablet = login(t, e, "bob", "tablet") },
				[]presence.Change{rec("tablet", presence.ReasonLogin, online, "hi", "phone")}},
			{"the laptop's link drops (tablet still online)", func() { noErr(t, "disconnect", laptop.Disconnect()) },
				[]presence.Change{rec("laptop", presence.ReasonLinkClose, online, "hi")}},
			{"the tablet logs out (laptop logged in, offline)", func() { noErr(t, "logout", tablet.Logout()) },
				[]presence.Change{rec("tablet", presence.ReasonLogout, offline, "")}},
			{"the laptop reconnects", func() { laptop = login(t, e, "bob", "laptop") },
				[]presence.Change{rec("laptop", presence.ReasonLogin, online, "")}},
			{"the laptop goes silent past the heartbeat timeout", func() { advance(time.Minute) },
				[]presence.Change{rec("laptop", presence.ReasonTimeout, offline, "")}},
			{"the laptop stays away until an hour after its last heartbeat (its login)", func() { advance(time.Hour - time.Minute) },
				[]presence.Change{rec("laptop", presence.ReasonExpired, unlogined, "")}},
			{"bob logs in on his phone and laptop, the server kicks him", func() {
				login(t, e, "bob", "phone")
				login(t, e, "bob", "laptop")
				changes(e)
				noErr(t, "kick", e.Kick("bob"))
			}, []presence.Change{rec("", presence.ReasonKicked, unlogined, "", "phone", "laptop")}},
		} {
			step.act()
			now := time.Now()
			got := changes(e)
			if diff := cmp.Diff(step.want, got, ignoreTime, cmpopts.EquateEmpty()); diff != "" {
				t.Fatalf("%s: change feed (-want +got):\n%s", step.do, diff)
			}
			for _, c := range got {
				if c.Time.After(now) || now.Sub(c.Time) > time.Second {
					t.Fatalf("%s: record Time %v, want within 1 s before %v", step.do, c.Time, now)
				}
			}
		}
		wantEnded(t, phone, presence.ReasonKicked)
	})
}

func TestKickLogsOutEveryDevice(t *testing.T) {
	e := newEngine(t, presence.Config{StatusQuery: true})
	wendy := watch(t, e, "wendy", "bob")
	phone := login(t, e, "bob", "phone")
	laptop := login(t, e, "bob", "laptop")
	noErr(t, "laptop Disconnect", laptop.Disconnect())
	wendy.Drain(nil)
	phone.Drain(nil)

	noErr(t, "Kick", e.Kick("bob"))

	wantState(t, e, "bob", unlogined, "")
	wantEvents(t, wendy, ev("bob", unlogined, "", presence.ReasonKicked))
	wantEnded(t, phone, presence.ReasonKicked)
	if got := state(t, e, "bob").Sessions; len(got) != 0 {
		t.Fatalf("devices after Kick = %+v, want none", got)
	}
	wantErr(t, "Kick again", e.Kick("bob"), presence.ErrNotLoggedIn)
	wantErr(t, "Kick unknown", e.Kick("nobody"), presence.ErrNotLoggedIn)
}

func TestMaxDevicesKicksOldestLogin(t *testing.T) {
	e := newEngine(t, presence.Config{StatusQuery: true, MaxDevices: 2})
	wendy := watch(t, e, "wendy", "bob")
	phone := login(t, e, "bob", "phone")
	laptop := login(t, e, "bob", "laptop")
	wendy.Drain(nil)

	tablet := login(t, e, "bob", "tablet")
	wantEnded(t, phone, presence.ReasonKicked)
	wantState(t, e, "bob", online, "", "laptop", "tablet")
	wantEvents(t, wendy) // bob stayed Online

	// Logging the laptop in again makes it the newest: the tablet goes next.
	laptop2 := login(t, e, "bob", "laptop")
	wantEnded(t, laptop, presence.ReasonLogin)
	login(t, e, "bob", "watch")
	wantEnded(t, tablet, presence.ReasonKicked)
	wantLive(t, laptop2)
	wantState(t, e, "bob", online, "", "laptop", "watch")
}

// ---- DESIGN: devices, login, disconnect, grace -----------------------------

func TestReloginOfSameDeviceReplacesSessionQuietly(t *testing.T) {
	e := newEngine(t, presence.Config{StatusQuery: true, ChangeFeedSize: 8})
	wendy := watch(t, e, "wendy", "bob")
	old := login(t, e, "bob", "phone")
	v := wantState(t, e, "bob", online, "", "phone")
	wendy.Drain(nil)

	fresh := login(t, e, "bob", "phone")

	wantEnded(t, old, presence.ReasonLogin) // not Kicked: the same device reconnecting
	wantLive(t, fresh)
	noErr(t, "Heartbeat on the new session", fresh.Heartbeat())
	if got := wantState(t, e, "bob", online, "", "phone"); got != v {
		t.Fatalf("Version moved from %d to %d over a quiet re-login", v, got)
	}
	wantEvents(t, wendy)
	if st := e.Stats(); st.Sessions != 2 { // wendy's and bob's new one
		t.Fatalf("Stats.Sessions = %d, want 2", st.Sessions)
	}
}

func TestOfflineDeviceStaysLoggedInUntilItLeaves(t *testing.T) {
	for _, tc := range []struct {
		name  string
		leave func(t *testing.T, e *presence.Engine)
		want  presence.Status
	}{
		{"logout", func(t *testing.T, e *presence.Engine) { noErr(t, "Logout", e.Logout("bob", "phone")) }, unlogined},
		{"kick", func(t *testing.T, e *presence.Engine) { noErr(t, "Kick", e.Kick("bob")) }, unlogined},
		{"login again", func(t *testing.T, e *presence.Engine) { login(t, e, "bob", "phone") }, online},
		{"expiry", func(*testing.T, *presence.Engine) { advance(2 * time.Second) }, unlogined},
	} {
		t.Run(tc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				e := newEngine(t, presence.Config{SessionExpiry: time.Hour})
				bob := login(t, e, "bob", "phone")
				advance(100 * time.Second)
				noErr(t, "Heartbeat", bob.Heartbeat())
				noErr(t, "Disconnect", bob.Disconnect())

				// Almost the whole expiry passes: the device stays, offline.
				advance(time.Hour - time.Second)
				wantState(t, e, "bob", offline, "")
				wantErr(t, "Heartbeat on the ended session", bob.Heartbeat(), presence.ErrSessionEnded)
				if got := state(t, e, "bob").Sessions; len(got) != 1 || got[0].DeviceID != "phone" {
					t.Fatalf("devices = %+v, want the phone, offline", got)
				}

				tc.leave(t, e)
				wantState(t, e, "bob", tc.want, "", devicesIf(tc.want == online, "phone")...)
			})
		})
	}
}

func devicesIf(cond bool, ids ...string) []string {
	if cond {
		return ids
	}
	return nil
}

func TestDisconnectGraceOnlyHoldsStatusChanges(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		e := newEngine(t, presence.Config{DisconnectGrace: 10 * time.Second, ChangeFeedSize: 8})
		phone := login(t, e, "bob", "phone")
		login(t, e, "bob", "laptop")
		changes(e)

		// The laptop keeps bob Online, so the phone's disconnect changes no
		// status: it is recorded at once, nothing is held.
		noErr(t, "phone Disconnect", phone.Disconnect())
		wantChanges(t, e, presence.Change{UserID: "bob", DeviceID: "phone", Reason: presence.ReasonLinkClose, Status: online})
		wantState(t, e, "bob", online, "", "laptop")
		advance(time.Minute)
		wantChanges(t, e)
	})
}

// ---- DESIGN: unknown users, callers without session, GetUserStatus ---------

func TestUnknownUserReadsUnloginedVersionZeroAndReadingCreatesNoState(t *testing.T) {
	// One shard: every change anywhere moves the counter a new record would
	// start from, so a record made by mistake would show a non-zero Version.
	e := newEngine(t, presence.Config{StatusQuery: true, Shards: 1})
	for _, id := range ids("busy", 5) {
		login(t, e, id, "phone")
		noErr(t, "SetSelfStatus", e.SetSelfStatus(id, "x"))
	}
	before := e.Stats()

	for range 2 { // read twice: the first read must not leave anything behind
		got, err := e.GetUserStatus("reader", []string{"ghost"})
		noErr(t, "GetUserStatus", err)
		if diff := cmp.Diff([]presence.UserStatus{{UserID: "ghost", Status: unlogined}}, got); diff != "" {
			t.Fatalf("unknown user (-want +got):\n%s", diff)
		}
		_ = e.QueryOnlineStatus([]string{"ghost"})
		_ = e.Subscriptions("ghost")
		wantErr(t, "Logout ghost", e.Logout("ghost", "phone"), presence.ErrNotLoggedIn)
		wantErr(t, "Kick ghost", e.Kick("ghost"), presence.ErrNotLoggedIn)
		wantErr(t, "SetSelfStatus ghost", e.SetSelfStatus("ghost", "hi"), presence.ErrNotLoggedIn)
		noErr(t, "Unsubscribe ghost", e.UnsubscribeUserStatus("ghost", []string{"busy0"}))
		noErr(t, "Unsubscribe from ghost", e.UnsubscribeUserStatus("reader", []string{"ghost"}))
		noErr(t, "RemoveFriends ghost", e.RemoveFriends("ghost", "busy0"))
		noErr(t, "RemoveFriends of ghost", e.RemoveFriends("reader", "ghost"))
	}
	if got := state(t, e, "ghost"); got.Version != 0 || got.Status != unlogined {
		t.Fatalf("after reads: ghost = %+v, want Unlogined Version 0 (no record made)", got)
	}
	if diff := cmp.Diff(before, e.Stats()); diff != "" {
		t.Fatalf("Stats changed by reads (-before +after):\n%s", diff)
	}
}

func TestCallersNeedNoSession(t *testing.T) {
	e := newEngine(t, presence.Config{StatusQuery: true})
	login(t, e, "bob", "phone")

	// "rest" is a REST endpoint of the host: it never logs in.
	got, err := e.GetUserStatus("rest", []string{"bob"})
	noErr(t, "GetUserStatus", err)
	if got[0].Status != online {
		t.Fatalf("bob read as %v, want Online", got[0].Status)
	}
	noErr(t, "Subscribe", second(e.SubscribeUserStatus("rest", []string{"bob", "carol"})))
	noErr(t, "Unsubscribe", e.UnsubscribeUserStatus("rest", []string{"carol"}))
	if diff := cmp.Diff([]string{"bob"}, e.Subscriptions("rest")); diff != "" {
		t.Fatalf("Subscriptions (-want +got):\n%s", diff)
	}

	// When rest does connect later, the subscription made without a session works.
	rest := login(t, e, "rest", "app")
	rest.Drain(nil)
	noErr(t, "SetSelfStatus", e.SetSelfStatus("bob", "hello"))
	wantEvents(t, rest, ev("bob", online, "hello", presence.ReasonCustomStatus))
}

func TestGetUserStatusAnswersInRequestOrder(t *testing.T) {
	e := newEngine(t, presence.Config{StatusQuery: true})
	login(t, e, "wendy", "phone")
	login(t, e, "bob", "phone")
	noErr(t, "SetSelfStatus", e.SetSelfStatus("bob", "here"))
	carol := login(t, e, "carol", "phone")
	noErr(t, "Disconnect", carol.Disconnect())

	got, err := e.GetUserStatus("wendy", []string{"carol", "bob", "nobody", "carol", "wendy"})
	noErr(t, "GetUserStatus", err)
	want := []presence.UserStatus{
		{UserID: "carol", Status: offline},
		{UserID: "bob", Status: online, Custom: "here"},
		{UserID: "nobody", Status: unlogined},
		{UserID: "carol", Status: offline},
		{UserID: "wendy", Status: online, Devices: []string{"phone"}}, // own entry lists devices
	}
	if diff := cmp.Diff(want, got, ignoreVersion); diff != "" {
		t.Fatalf("GetUserStatus (-want +got):\n%s", diff)
	}
	if got[0].Version != got[3].Version || got[2].Version != 0 {
		t.Fatalf("versions %d/%d for the same user, %d for an unknown one: want equal, and 0", got[0].Version, got[3].Version, got[2].Version)
	}
}

// AppendUserStatus answers exactly as GetUserStatus, after what dst already
// holds, and reuses dst's storage; a rejected call leaves dst as it was.
func TestAppendUserStatusAppendsWhatGetUserStatusReturns(t *testing.T) {
	e := newEngine(t, presence.Config{StatusQuery: true, QueryQuota: presence.Quota{Calls: 2, Per: time.Minute}})
	login(t, e, "wendy", "phone")
	login(t, e, "bob", "phone")
	noErr(t, "SetSelfStatus", e.SetSelfStatus("bob", "here"))
	ids := []string{"bob", "nobody", "wendy"}

	want, err := e.GetUserStatus("wendy", ids)
	noErr(t, "GetUserStatus", err)
	head := presence.UserStatus{UserID: "kept"}
	buf := make([]presence.UserStatus, 1, 8)
	buf[0] = head
	got, err := e.AppendUserStatus(buf, "wendy", ids)
	noErr(t, "AppendUserStatus", err)
	if diff := cmp.Diff(append([]presence.UserStatus{head}, want...), got); diff != "" {
		t.Fatalf("AppendUserStatus (-want +got):\n%s", diff)
	}
	if &got[0] != &buf[0] {
		t.Fatal("AppendUserStatus did not reuse dst's storage although it had room")
	}

	// The quota (2 a minute) is spent now: the call fails and dst comes back as it was.
	again, err := e.AppendUserStatus(got[:1], "wendy", ids)
	wantErr(t, "AppendUserStatus over quota", err, presence.ErrRateLimited)
	if len(again) != 1 || again[0].UserID != head.UserID {
		t.Fatalf("rejected AppendUserStatus returned %v, want dst unchanged", again)
	}
	bad, err := e.AppendUserStatus(got[:1], "wendy", []string{"bob", ""})
	wantErr(t, "AppendUserStatus with an empty ID", err, presence.ErrInvalidParam)
	if len(bad) != 1 {
		t.Fatalf("rejected AppendUserStatus returned %d entries, want dst's 1", len(bad))
	}
}

// ---- DESIGN: SubscribeUserStatus and UnsubscribeUserStatus -----------------

func TestSubscribeValidatesWholeListFirst(t *testing.T) {
	e := newEngine(t, presence.Config{StatusQuery: true})
	wendy := watch(t, e, "wendy", "alice")
	for _, bad := range [][]string{
		{"bob", "wendy"},                  // self
		{"bob", ""},                       // empty ID
		{"bob", "x\x00y"},                 // control character
		{"bob", strings.Repeat("a", 129)}, // too long
	} {
		_, err := e.SubscribeUserStatus("wendy", bad)
		wantErr(t, "Subscribe", err, presence.ErrInvalidParam)
		if diff := cmp.Diff([]string{"alice"}, e.Subscriptions("wendy")); diff != "" {
			t.Fatalf("Subscriptions after a rejected call (-want +got):\n%s", diff)
		}
		wantEvents(t, wendy) // no initial state of bob either
	}
}

func TestSubscribeDuplicatesCountOnce(t *testing.T) {
	e := newEngine(t, presence.Config{StatusQuery: true})
	wendy := watch(t, e, "wendy")

	noErr(t, "Subscribe", second(e.SubscribeUserStatus("wendy", []string{"a", "b", "a"})))

	// Applied in call order as "put": the second "a" moves it to the newest end.
	if diff := cmp.Diff([]string{"b", "a"}, e.Subscriptions("wendy")); diff != "" {
		t.Fatalf("Subscriptions (-want +got):\n%s", diff)
	}
	if st := e.Stats(); st.Subscriptions != 2 {
		t.Fatalf("Stats.Subscriptions = %d, want 2", st.Subscriptions)
	}
	wantEvents(t, wendy, ev("a", unlogined, "", presence.ReasonSubscribed), ev("b", unlogined, "", presence.ReasonSubscribed))
}

func TestResubscribingMovesTargetToNewest(t *testing.T) {
	e := newEngine(t, presence.Config{StatusQuery: true, MaxSubscriptions: 3})
	for _, step := range []struct {
		subscribe   []string
		wantEvicted []string
		wantList    []string
	}{
		{[]string{"a", "b", "c"}, nil, []string{"a", "b", "c"}},
		{[]string{"a"}, nil, []string{"b", "c", "a"}},                     // a is now the newest
		{[]string{"d"}, []string{"b"}, []string{"c", "a", "d"}},           // so b, not a, goes first
		{[]string{"e", "f"}, []string{"c", "a"}, []string{"d", "e", "f"}}, // oldest first
	} {
		evicted, err := e.SubscribeUserStatus("wendy", step.subscribe)
		noErr(t, "Subscribe", err)
		if diff := cmp.Diff(step.wantEvicted, evicted); diff != "" {
			t.Fatalf("Subscribe(%v): evicted (-want +got):\n%s", step.subscribe, diff)
		}
		if diff := cmp.Diff(step.wantList, e.Subscriptions("wendy")); diff != "" {
			t.Fatalf("Subscribe(%v): Subscriptions (-want +got):\n%s", step.subscribe, diff)
		}
	}
}

func TestSubscribeDeliversCurrentStateAtOnce(t *testing.T) {
	e := newEngine(t, presence.Config{StatusQuery: true})
	login(t, e, "bob", "phone")
	noErr(t, "SetSelfStatus", e.SetSelfStatus("bob", "coding"))
	carol := login(t, e, "carol", "phone")
	noErr(t, "Disconnect", carol.Disconnect())
	phone := watch(t, e, "wendy")
	laptop := login(t, e, "wendy", "laptop")
	phone.Drain(nil)

	noErr(t, "Subscribe", second(e.SubscribeUserStatus("wendy", []string{"bob", "carol", "dan"})))

	want := []presence.Event{
		ev("bob", online, "coding", presence.ReasonSubscribed),
		ev("carol", offline, "", presence.ReasonSubscribed),
		ev("dan", unlogined, "", presence.ReasonSubscribed),
	}
	got := wantEvents(t, phone, want...)
	wantEvents(t, laptop, want...) // every connected session of the caller
	if v := state(t, e, "bob").Version; got[0].Version != v {
		t.Fatalf("initial state of bob has Version %d, bob's Version is %d", got[0].Version, v)
	}

	// Subscribing again to a target already held repeats its current state
	// (same version), then changes follow.
	noErr(t, "Subscribe again", second(e.SubscribeUserStatus("wendy", []string{"bob"})))
	again := wantEvents(t, phone, ev("bob", online, "coding", presence.ReasonSubscribed))
	if again[0].Version != got[0].Version {
		t.Fatalf("re-subscription Version %d, want the current %d", again[0].Version, got[0].Version)
	}
	noErr(t, "SetSelfStatus", e.SetSelfStatus("bob", "lunch"))
	if next := wantEvents(t, phone, ev("bob", online, "lunch", presence.ReasonCustomStatus)); next[0].Version <= got[0].Version {
		t.Fatalf("change after subscription has Version %d, want > %d", next[0].Version, got[0].Version)
	}
}

func TestUnsubscribeIgnoresUnknownTargets(t *testing.T) {
	e := newEngine(t, presence.Config{StatusQuery: true})
	wendy := watch(t, e, "wendy", "alice", "bob")

	noErr(t, "Unsubscribe", e.UnsubscribeUserStatus("wendy", []string{"nobody", "bob", "carol"}))
	if diff := cmp.Diff([]string{"alice"}, e.Subscriptions("wendy")); diff != "" {
		t.Fatalf("Subscriptions (-want +got):\n%s", diff)
	}
	// Unsubscribing from nothing at all is fine too.
	noErr(t, "Unsubscribe by a user without subscriptions", e.UnsubscribeUserStatus("zed", []string{"bob"}))

	login(t, e, "bob", "phone")
	login(t, e, "alice", "phone")
	wantEvents(t, wendy, ev("alice", online, "", presence.ReasonLogin))
}

func TestSubscriptionsClearedAfterTTLWithoutBeingOnline(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		e := newEngine(t, presence.Config{StatusQuery: true, ChangeFeedSize: 8})      // default TTL: 24 h
		noErr(t, "Subscribe", second(e.SubscribeUserStatus("rest", []string{"bob"}))) // never Online

		advance(24*time.Hour - time.Second)
		if diff := cmp.Diff([]string{"bob"}, e.Subscriptions("rest")); diff != "" {
			t.Fatalf("Subscriptions before the TTL (-want +got):\n%s", diff)
		}
		advance(2 * time.Second)
		if got := e.Subscriptions("rest"); got != nil {
			t.Fatalf("Subscriptions after the TTL = %v, want none", got)
		}
		if st := e.Stats(); st.Subscriptions != 0 {
			t.Fatalf("Stats.Subscriptions = %d, want 0", st.Subscriptions)
		}
		wantChanges(t, e) // clearing is no status change
	})
}

func TestSubscriptionTTLCountsFromLeavingOnlineOrLastSubscribe(t *testing.T) {
	const ttl = time.Hour
	for _, tc := range []struct {
		name   string
		script func(t *testing.T, e *presence.Engine) // leaves wendy not Online; returns with the TTL 1 s away
	}{
		{"online keeps the list; disconnect starts the clock", func(t *testing.T, e *presence.Engine) {
			wendy := login(t, e, "wendy", "phone")
			noErr(t, "Subscribe", second(e.SubscribeUserStatus("wendy", []string{"bob"})))
			advance(2 * ttl) // Online all along: kept
			wantSubs(t, e, "wendy", "bob")
			noErr(t, "Disconnect", wendy.Disconnect())
			advance(ttl - time.Second)
		}},
		{"logout starts the clock", func(t *testing.T, e *presence.Engine) {
			wendy := login(t, e, "wendy", "phone")
			noErr(t, "Subscribe", second(e.SubscribeUserStatus("wendy", []string{"bob"})))
			noErr(t, "Logout", wendy.Logout())
			advance(ttl - time.Second)
		}},
		{"a subscribe while not Online restarts the clock", func(t *testing.T, e *presence.Engine) {
			noErr(t, "Subscribe", second(e.SubscribeUserStatus("wendy", []string{"bob"})))
			advance(ttl / 2)
			noErr(t, "Subscribe", second(e.SubscribeUserStatus("wendy", []string{"bob"})))
			advance(ttl - time.Second)
		}},
		{"coming back Online stops the clock", func(t *testing.T, e *presence.Engine) {
			wendy := login(t, e, "wendy", "phone")
			noErr(t, "Subscribe", second(e.SubscribeUserStatus("wendy", []string{"bob"})))
			noErr(t, "Disconnect", wendy.Disconnect())
			advance(ttl / 2)
			wendy = login(t, e, "wendy", "phone")
			advance(2 * ttl)
			wantSubs(t, e, "wendy", "bob")
			noErr(t, "Disconnect", wendy.Disconnect())
			advance(ttl - time.Second)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				e := newEngine(t, presence.Config{StatusQuery: true, SubscriptionTTL: ttl, HeartbeatTimeout: 10 * ttl})
				tc.script(t, e)
				wantSubs(t, e, "wendy", "bob")
				advance(2 * time.Second)
				wantSubs(t, e, "wendy")
			})
		})
	}
}

func wantSubs(t *testing.T, e *presence.Engine, user string, want ...string) {
	t.Helper()
	if diff := cmp.Diff(want, e.Subscriptions(user), cmpopts.EquateEmpty()); diff != "" {
		t.Fatalf("Subscriptions(%q) (-want +got):\n%s", user, diff)
	}
}

// ---- DESIGN: fan-out and friends -------------------------------------------

func TestFanOutReachesEachSessionOnce(t *testing.T) {
	e := newEngine(t, presence.Config{StatusQuery: true, NotifyFriends: true})
	// wendy has two devices and is both subscriber and friend of bob;
	// carol is only a friend, dave only a subscriber, erin neither.
	wPhone := watch(t, e, "wendy", "bob")
	wLaptop := login(t, e, "wendy", "laptop")
	noErr(t, "AddFriends wendy", e.AddFriends("wendy", "bob"))
	carol := login(t, e, "carol", "phone")
	noErr(t, "AddFriends carol", e.AddFriends("carol", "bob"))
	dave := watch(t, e, "dave", "bob")
	erin := login(t, e, "erin", "phone")
	bobPhone := login(t, e, "bob", "phone")
	bobLaptop := login(t, e, "bob", "laptop")
	all := []*presence.Session{wPhone, wLaptop, carol, dave, erin, bobPhone, bobLaptop}
	for _, s := range all {
		s.Drain(nil)
	}
	before := e.Stats()

	noErr(t, "SetSelfStatus", e.SetSelfStatus("bob", "away"))

	after := e.Stats()
	if d, c := after.Delivered-before.Delivered, after.Coalesced-before.Coalesced; d != 6 || c != 0 {
		t.Fatalf("Delivered +%d, Coalesced +%d; want +6, +0 (each watching session once)", d, c)
	}
	for _, s := range all[:4] {
		wantEvents(t, s, ev("bob", online, "away", presence.ReasonCustomStatus))
	}
	wantEvents(t, erin)
	for _, s := range all[5:] {
		wantEvents(t, s, ev("bob", online, "away", presence.ReasonCustomStatus))
	}
}

func TestFriendsAreDirectedAndNeedNoSwitchOrQuota(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		e := newEngine(t, presence.Config{NotifyFriends: true}) // StatusQuery off
		alice := login(t, e, "alice", "phone")
		for range 50 { // no quota: far past 20 calls in 5 s
			noErr(t, "AddFriends", e.AddFriends("alice", "bob"))
		}
		if st := e.Stats(); st.Friendships != 1 {
			t.Fatalf("Stats.Friendships = %d, want 1 (repeats ignored)", st.Friendships)
		}
		wantEvents(t, alice, ev("alice", online, "", presence.ReasonLogin)) // no initial state for friends

		// alice hears of bob; bob does not hear of alice.
		bob := login(t, e, "bob", "phone")
		bob.Drain(nil)
		wantEvents(t, alice, ev("bob", online, "", presence.ReasonLogin))
		noErr(t, "SetSelfStatus", e.SetSelfStatus("alice", "hi"))
		wantEvents(t, bob)

		// Removed friends are no longer heard of; unknown ones are ignored.
		noErr(t, "RemoveFriends", e.RemoveFriends("alice", "bob", "nobody"))
		alice.Drain(nil)
		noErr(t, "SetSelfStatus", e.SetSelfStatus("bob", "yo"))
		wantEvents(t, alice)
		if st := e.Stats(); st.Friendships != 0 {
			t.Fatalf("Stats.Friendships = %d, want 0", st.Friendships)
		}
	})
}

func TestFriendListValidation(t *testing.T) {
	e := newEngine(t, presence.Config{MaxFriends: 3})
	noErr(t, "AddFriends", e.AddFriends("alice", "f1", "f2"))
	for _, tc := range []struct {
		name string
		err  error
	}{
		{"AddFriends of no IDs", e.AddFriends("alice")},
		{"AddFriends of oneself", e.AddFriends("alice", "f3", "alice")},
		{"AddFriends of a bad ID", e.AddFriends("alice", "f3", "")},
		{"AddFriends past MaxFriends fails whole", e.AddFriends("alice", "f3", "f4")},
		{"RemoveFriends of no IDs", e.RemoveFriends("alice")},
	} {
		wantErr(t, tc.name, tc.err, presence.ErrInvalidParam)
	}
	if st := e.Stats(); st.Friendships != 2 {
		t.Fatalf("Stats.Friendships = %d after rejected calls, want 2", st.Friendships)
	}
	// Friends already listed do not count again: this fits.
	noErr(t, "AddFriends up to MaxFriends", e.AddFriends("alice", "f2", "f3", "f3"))
	if st := e.Stats(); st.Friendships != 3 {
		t.Fatalf("Stats.Friendships = %d, want 3", st.Friendships)
	}
}

// ---- DESIGN: the mailbox -----------------------------------------------------

func TestMailboxKeepsLatestEventPerUserOldestFirst(t *testing.T) {
	e := newEngine(t, presence.Config{StatusQuery: true})
	wendy := watch(t, e, "wendy", "alice", "bob", "carol")
	before := e.Stats()

	login(t, e, "alice", "phone")                              // alice pending
	login(t, e, "bob", "phone")                                // then bob
	noErr(t, "SetSelfStatus", e.SetSelfStatus("alice", "one")) // replaces alice's event and moves it last
	login(t, e, "carol", "phone")
	noErr(t, "SetSelfStatus", e.SetSelfStatus("alice", "two"))

	got := wantEvents(t, wendy,
		ev("bob", online, "", presence.ReasonLogin),
		ev("carol", online, "", presence.ReasonLogin),
		ev("alice", online, "two", presence.ReasonCustomStatus),
	)
	if v := state(t, e, "alice").Version; got[2].Version != v {
		t.Fatalf("pending alice event has Version %d, alice is at %d: want the latest", got[2].Version, v)
	}
	after := e.Stats()
	// wendy got five events, two replaced pending ones; alice's, bob's and
	// carol's own sessions got one each, plus alice's two custom changes.
	if c := after.Coalesced - before.Coalesced; c < 2 {
		t.Fatalf("Stats.Coalesced grew by %d, want at least 2", c)
	}
	if wendy.Lost() != 0 || after.Lost != 0 {
		t.Fatalf("Lost = %d (Stats %d), want 0: coalescing loses nothing", wendy.Lost(), after.Lost)
	}
}

func TestFullMailboxDropsOldestPendingUser(t *testing.T) {
	e := newEngine(t, presence.Config{StatusQuery: true, FeedSize: 3})
	users := ids("u", 5)
	wendy := watch(t, e, "wendy", users...)
	lost, statsLost := wendy.Lost(), e.Stats().Lost // the initial states overflowed already

	for _, u := range users {
		login(t, e, u, "phone")
	}

	wantEvents(t, wendy, // the three newest users; u0 and u1 were evicted
		ev("u2", online, "", presence.ReasonLogin),
		ev("u3", online, "", presence.ReasonLogin),
		ev("u4", online, "", presence.ReasonLogin),
	)
	if got := wendy.Lost() - lost; got != 2 {
		t.Fatalf("Lost() grew by %d, want 2", got)
	}
	if got := e.Stats().Lost - statsLost; got != 2 {
		t.Fatalf("Stats.Lost grew by %d, want 2", got)
	}
}

func TestSessionSeesVersionsOnlyMoveForward(t *testing.T) {
	e := newEngine(t, presence.Config{StatusQuery: true})
	wendy := watch(t, e, "wendy", "bob")
	var seen []presence.Event
	for _, step := range []func() error{
		func() error { return second(e.Login("bob", "phone")) },
		func() error { return e.SetSelfStatus("bob", "a") },
		func() error { return second(e.SubscribeUserStatus("wendy", []string{"bob"})) }, // repeats the current state
		func() error { return e.SetSelfStatus("bob", "b") },
		func() error { return e.Logout("bob", "phone") },
		func() error { return second(e.Login("bob", "laptop")) },
		func() error { return e.Kick("bob") },
	} {
		noErr(t, "step", step())
		seen = wendy.Drain(seen)
	}
	if len(seen) != 7 {
		t.Fatalf("wendy saw %d events, want 7: %+v", len(seen), seen)
	}
	for i := 1; i < len(seen); i++ {
		prev, cur := seen[i-1], seen[i]
		if cur.Version < prev.Version || (cur.Reason != presence.ReasonSubscribed && cur.Version == prev.Version) {
			t.Fatalf("event %d (%v, Version %d) after Version %d: versions must increase (a re-subscription may repeat)",
				i, cur.Reason, cur.Version, prev.Version)
		}
	}
}

func TestNextReturnsOldestAndWaitsForEvents(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		e := newEngine(t, presence.Config{StatusQuery: true})
		wendy := watch(t, e, "wendy", "alice", "bob")
		login(t, e, "alice", "phone")
		login(t, e, "bob", "phone")

		for _, want := range []string{"alice", "bob"} {
			got, err := wendy.Next(t.Context())
			noErr(t, "Next", err)
			if got.UserID != want {
				t.Fatalf("Next returned %s's event, want %s's (oldest first)", got.UserID, want)
			}
		}

		// Nothing pending: Next waits for the next event.
		type result struct {
			ev  presence.Event
			err error
		}
		done := make(chan result, 1)
		go func() {
			ev, err := wendy.Next(t.Context())
			done <- result{ev, err}
		}()
		synctest.Wait()
		select {
		case r := <-done:
			t.Fatalf("Next returned %+v with nothing pending", r)
		default:
		}
		noErr(t, "SetSelfStatus", e.SetSelfStatus("bob", "here"))
		synctest.Wait()
		r := <-done
		noErr(t, "Next", r.err)
		if diff := cmp.Diff(ev("bob", online, "here", presence.ReasonCustomStatus), r.ev, ignoreVersion); diff != "" {
			t.Fatalf("Next (-want +got):\n%s", diff)
		}

		// A context that ends first ends the wait.
		ctx, cancel := context.WithTimeout(t.Context(), time.Second)
		defer cancel()
		if _, err := wendy.Next(ctx); !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("Next with an expiring context: %v, want context.DeadlineExceeded", err)
		}
	})
}

func TestReadySignalsPendingEvents(t *testing.T) {
	e := newEngine(t, presence.Config{StatusQuery: true})
	wendy := watch(t, e, "wendy", "bob")
	select { // drop a token left from the setup
	case <-wendy.Ready():
	default:
	}

	login(t, e, "bob", "phone")

	select {
	case <-wendy.Ready():
	default:
		t.Fatal("Ready has no token after an event arrived in an empty mailbox")
	}
	wantEvents(t, wendy, ev("bob", online, "", presence.ReasonLogin))
}

func TestEndedSessionKeepsPendingEventsReadable(t *testing.T) {
	e := newEngine(t, presence.Config{StatusQuery: true})
	wendy := watch(t, e, "wendy", "bob")
	login(t, e, "bob", "phone")
	noErr(t, "Disconnect", wendy.Disconnect())

	got, err := wendy.Next(context.Background())
	noErr(t, "Next after end with an event pending", err)
	if got.UserID != "bob" {
		t.Fatalf("Next = %+v, want bob's login", got)
	}
	_, err = wendy.Next(context.Background())
	wantErr(t, "Next after end, nothing pending", err, presence.ErrSessionEnded)

	// Nothing new reaches an ended session.
	noErr(t, "SetSelfStatus", e.SetSelfStatus("bob", "x"))
	wantEvents(t, wendy)
}

func TestSessionMethodsFailAfterSessionEnded(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		e := newEngine(t, presence.Config{HeartbeatTimeout: time.Minute})
		for _, tc := range []struct {
			why presence.Reason
			end func(t *testing.T, s *presence.Session)
		}{
			{presence.ReasonLinkClose, func(t *testing.T, s *presence.Session) { noErr(t, "Disconnect", s.Disconnect()) }},
			{presence.ReasonLogout, func(t *testing.T, s *presence.Session) { noErr(t, "Logout", s.Logout()) }},
			{presence.ReasonKicked, func(t *testing.T, s *presence.Session) { noErr(t, "Kick", e.Kick(s.UserID())) }},
			{presence.ReasonLogin, func(t *testing.T, s *presence.Session) { login(t, e, s.UserID(), s.DeviceID()) }},
			{presence.ReasonTimeout, func(*testing.T, *presence.Session) { advance(time.Minute) }},
		} {
			s := login(t, e, "bob-"+tc.why.String(), "phone")
			s.Drain(nil)
			tc.end(t, s)
			wantEnded(t, s, tc.why)
			wantErr(t, tc.why.String()+": Disconnect", s.Disconnect(), presence.ErrSessionEnded)
			wantErr(t, tc.why.String()+": Logout", s.Logout(), presence.ErrSessionEnded)
			s.Drain(nil)
			wantErr(t, tc.why.String()+": Next", second(s.Next(context.Background())), presence.ErrSessionEnded)
		}
	})
}

// ---- DESIGN: versions --------------------------------------------------------

func TestVersionIncreasesWithEveryChange(t *testing.T) {
	e := newEngine(t, presence.Config{StatusQuery: true})
	if v := state(t, e, "bob").Version; v != 0 {
		t.Fatalf("unknown bob has Version %d, want 0", v)
	}
	wendy := watch(t, e, "wendy", "bob")
	last := wendy.Drain(nil)
	var phone *presence.Session
	for _, step := range []struct {
		do  string
		act func() error
	}{
		{"login", func() (err error) { phone, err = e.Login("bob", "phone"); return err }},
		{"set custom", func() error { return e.SetSelfStatus("bob", "a") }},
		{"change custom", func() error { return e.SetSelfStatus("bob", "b") }},
		{"clear custom", func() error { return e.SetSelfStatus("bob", "") }},
		{"disconnect", func() error { return phone.Disconnect() }},
		{"login", func() (err error) { phone, err = e.Login("bob", "phone"); return err }},
		{"logout", func() error { return phone.Logout() }},
	} {
		var lastV uint64
		if len(last) > 0 {
			lastV = last[0].Version
		}
		noErr(t, step.do, step.act())
		got := wendy.Drain(nil)
		if len(got) != 1 || got[0].Version <= lastV {
			t.Fatalf("after %s: events %+v, want one with Version > %d", step.do, got, lastV)
		}
		if v := state(t, e, "bob").Version; v != got[0].Version {
			t.Fatalf("after %s: bob reads Version %d, his event had %d", step.do, v, got[0].Version)
		}
		last = got
	}
}

func TestVersionNeverGoesBackAfterRecordIsDropped(t *testing.T) {
	e := newEngine(t, presence.Config{StatusQuery: true, Shards: 1})
	wendy := watch(t, e, "wendy", "bob")
	bob := login(t, e, "bob", "phone")
	noErr(t, "SetSelfStatus", e.SetSelfStatus("bob", "x"))
	noErr(t, "Logout", bob.Logout())
	seen := wendy.Drain(nil)
	high := seen[len(seen)-1].Version // bob's Logout

	// wendy lets go: nothing refers to bob any more, and the engine may
	// drop his record (it then reads as unknown, Version 0).
	noErr(t, "Unsubscribe", e.UnsubscribeUserStatus("wendy", nil))
	if v := state(t, e, "bob").Version; v != 0 && v != high {
		t.Fatalf("bob reads Version %d, want %d (kept) or 0 (dropped)", v, high)
	}

	// Subscribing again shows bob at a version no lower than seen before ...
	noErr(t, "Subscribe", second(e.SubscribeUserStatus("wendy", []string{"bob"})))
	initial := wantEvents(t, wendy, ev("bob", unlogined, "", presence.ReasonSubscribed))
	if initial[0].Version < high {
		t.Fatalf("re-created bob shows Version %d, below the %d wendy saw before", initial[0].Version, high)
	}
	// ... and his next change moves past it.
	login(t, e, "bob", "laptop")
	next := wantEvents(t, wendy, ev("bob", online, "", presence.ReasonLogin))
	if next[0].Version <= initial[0].Version {
		t.Fatalf("bob's login after re-creation has Version %d, want > %d", next[0].Version, initial[0].Version)
	}
}

// ---- DESIGN: change feed overflow --------------------------------------------

func TestFullChangeFeedDropsOldestAndCounts(t *testing.T) {
	e := newEngine(t, presence.Config{ChangeFeedSize: 2})
	for _, u := range ids("u", 5) {
		login(t, e, u, "phone") // the engine never blocks on the feed
	}
	wantChanges(t, e,
		presence.Change{UserID: "u3", DeviceID: "phone", Reason: presence.ReasonLogin, Status: online},
		presence.Change{UserID: "u4", DeviceID: "phone", Reason: presence.ReasonLogin, Status: online},
	)
	if got := e.Stats().ChangesDropped; got != 3 {
		t.Fatalf("Stats.ChangesDropped = %d, want 3", got)
	}
	if off := newEngine(t, presence.Config{}); off.Changes() != nil {
		t.Fatal("Changes() is not nil with ChangeFeedSize 0")
	}
}

// ---- Config, Close, rejected calls -------------------------------------------

func TestConfigRejectsImpossibleValuesNamingTheField(t *testing.T) {
	for _, tc := range []struct {
		field string
		cfg   presence.Config
	}{
		{"HeartbeatTimeout", presence.Config{HeartbeatTimeout: -time.Second}},
		{"DisconnectGrace", presence.Config{DisconnectGrace: -time.Second}},
		{"SessionExpiry", presence.Config{SessionExpiry: -time.Second}},
		{"SubscriptionTTL", presence.Config{SubscriptionTTL: -time.Second}},
		{"SnapshotInterval", presence.Config{SnapshotInterval: -time.Second}},
		{"Shards", presence.Config{Shards: 3}},
		{"Shards", presence.Config{Shards: 12}},
		{"Shards", presence.Config{Shards: -4}},
		{"MaxDevices", presence.Config{MaxDevices: -1}},
		{"FeedSize", presence.Config{FeedSize: -1}},
		{"MaxSubscribeIDs", presence.Config{MaxSubscribeIDs: 300}}, // more per call than the list holds
		{"QueryQuota", presence.Config{QueryQuota: presence.Quota{Calls: 5, Per: -time.Second}}},
	} {
		e, err := presence.New(tc.cfg)
		if err == nil {
			_ = e.Close()
			t.Errorf("New(%+v) succeeded, want an error naming %s", tc.cfg, tc.field)
			continue
		}
		if !strings.Contains(err.Error(), tc.field) {
			t.Errorf("New(%+v): error %q does not name the field %s", tc.cfg, err, tc.field)
		}
	}
	for _, shards := range []int{1, 2, 64} {
		e, err := presence.New(presence.Config{Shards: shards})
		noErr(t, "New with Shards "+strconv.Itoa(shards), err)
		_ = e.Close()
	}
}

func TestCloseEndsEverythingAndIsIdempotent(t *testing.T) {
	e, err := presence.New(presence.Config{StatusQuery: true, ChangeFeedSize: 8})
	noErr(t, "New", err)
	wendy := watch(t, e, "wendy", "bob")
	bob := login(t, e, "bob", "phone")

	noErr(t, "Close", e.Close())
	noErr(t, "second Close", e.Close())

	for _, s := range []*presence.Session{wendy, bob} {
		if !ended(s) || s.EndReason() != 0 {
			t.Fatalf("after Close: session %s ended=%v EndReason=%v, want ended with reason 0", s.UserID(), ended(s), s.EndReason())
		}
	}
	// Events pending at the end can still be read.
	wantEvents(t, wendy, ev("bob", online, "", presence.ReasonLogin))

	for _, tc := range []struct {
		name string
		err  error
	}{
		{"Login", second(e.Login("carol", "phone"))},
		{"Logout", e.Logout("bob", "phone")},
		{"Kick", e.Kick("bob")},
		{"SetSelfStatus", e.SetSelfStatus("bob", "x")},
		{"GetUserStatus", second(e.GetUserStatus("wendy", []string{"bob"}))},
		{"GetUserStatus own", second(e.GetUserStatus("bob", []string{"bob"}))},
		{"SubscribeUserStatus", second(e.SubscribeUserStatus("wendy", []string{"carol"}))},
		{"UnsubscribeUserStatus", e.UnsubscribeUserStatus("wendy", nil)},
		{"AddFriends", e.AddFriends("wendy", "carol")},
		{"RemoveFriends", e.RemoveFriends("wendy", "carol")},
		{"Session.Heartbeat", bob.Heartbeat()},
		{"Session.Disconnect", bob.Disconnect()},
		{"Session.Logout", bob.Logout()},
	} {
		if !errors.Is(tc.err, presence.ErrClosed) {
			t.Errorf("%s after Close: error %v, want ErrClosed", tc.name, tc.err)
		}
	}
	if got := e.Subscriptions("wendy"); got != nil {
		t.Errorf("Subscriptions after Close = %v, want nil", got)
	}
	if got := e.QueryOnlineStatus([]string{"bob"}); got != nil {
		t.Errorf("QueryOnlineStatus after Close = %v, want nil", got)
	}
	changes(e) // Close closed the feed: this returns once it is drained
	if _, open := <-e.Changes(); open {
		t.Error("Changes() still open after Close")
	}
}

func TestCloseInsideBubbleStopsBackgroundWork(t *testing.T) {
	// synctest.Test fails if any goroutine the engine started outlives Close.
	synctest.Test(t, func(t *testing.T) {
		e, err := presence.New(presence.Config{})
		noErr(t, "New", err)
		s := login(t, e, "bob", "phone")
		advance(time.Minute)
		noErr(t, "Close", e.Close())
		if !ended(s) {
			t.Fatal("session not ended by Close")
		}
	})
}

// snapshot is everything a test can observe of an engine, to compare before
// and after a call that must change nothing.
type snapshot struct {
	Users   []presence.OnlineStatus
	Subs    map[string][]string
	Events  map[string][]presence.Event
	Changes []presence.Change
	Stats   presence.Stats
}

func observe(e *presence.Engine, users []string, sessions ...*presence.Session) snapshot {
	sn := snapshot{
		Users:   e.QueryOnlineStatus(users),
		Subs:    map[string][]string{},
		Events:  map[string][]presence.Event{},
		Changes: changes(e),
		Stats:   e.Stats(),
	}
	for _, u := range users {
		sn.Subs[u] = e.Subscriptions(u)
	}
	for _, s := range sessions {
		sn.Events[s.UserID()+"/"+s.DeviceID()] = s.Drain(nil)
	}
	return sn
}

func TestRejectedCallChangesNothing(t *testing.T) {
	synctest.Test(t, func(t *testing.T) { // time stands still: no quota refills between calls
		e := newEngine(t, presence.Config{StatusQuery: true, NotifyFriends: true, MaxFriends: 3, ChangeFeedSize: 64})
		users := []string{"wendy", "bob", "alice", "carol", "zed", "dave"}
		wendy := watch(t, e, "wendy", "alice", "bob")
		noErr(t, "AddFriends", e.AddFriends("wendy", "carol"))
		bob := login(t, e, "bob", "phone")
		noErr(t, "SetSelfStatus", e.SetSelfStatus("bob", "hi"))
		zed := login(t, e, "zed", "phone")
		for range 20 { // zed spends all three quotas
			noErr(t, "zed query", second(e.GetUserStatus("zed", []string{"bob"})))
			noErr(t, "zed subscribe", second(e.SubscribeUserStatus("zed", []string{"alice"})))
			noErr(t, "zed unsubscribe", e.UnsubscribeUserStatus("zed", []string{"carol"}))
		}
		sessions := []*presence.Session{wendy, bob, zed}
		observe(e, users, sessions...) // empty the mailboxes and the feed

		for _, tc := range []struct {
			name string
			call func() error
			want *presence.Error
		}{
			{"Login with an empty user", func() error { return second(e.Login("", "phone")) }, presence.ErrInvalidParam},
			{"Login with a bad device", func() error { return second(e.Login("bob", "ph\x00ne")) }, presence.ErrInvalidParam},
			{"Logout of a device not logged in", func() error { return e.Logout("bob", "tablet") }, presence.ErrNotLoggedIn},
			{"Kick of a user not logged in", func() error { return e.Kick("alice") }, presence.ErrNotLoggedIn},
			{"SetSelfStatus too long", func() error { return e.SetSelfStatus("bob", strings.Repeat("x", 101)) }, presence.ErrInvalidParam},
			{"SetSelfStatus not UTF-8", func() error { return e.SetSelfStatus("bob", "\xff") }, presence.ErrInvalidParam},
			{"SetSelfStatus offline", func() error { return e.SetSelfStatus("alice", "x") }, presence.ErrNotLoggedIn},
			{"GetUserStatus of 501 IDs", func() error { return second(e.GetUserStatus("wendy", ids("q", 501))) }, presence.ErrInvalidParam},
			{"GetUserStatus over quota", func() error { return second(e.GetUserStatus("zed", []string{"bob"})) }, presence.ErrRateLimited},
			{"Subscribe to 101 IDs", func() error { return second(e.SubscribeUserStatus("wendy", ids("s", 101))) }, presence.ErrInvalidParam},
			{"Subscribe to oneself", func() error { return second(e.SubscribeUserStatus("wendy", []string{"dave", "wendy"})) }, presence.ErrInvalidParam},
			{"Subscribe with a bad ID", func() error { return second(e.SubscribeUserStatus("wendy", []string{"dave", ""})) }, presence.ErrInvalidParam},
			{"Subscribe over quota", func() error { return second(e.SubscribeUserStatus("zed", []string{"dave"})) }, presence.ErrRateLimited},
			{"Unsubscribe of 101 IDs", func() error { return e.UnsubscribeUserStatus("wendy", ids("s", 101)) }, presence.ErrInvalidParam},
			{"Unsubscribe with a bad ID", func() error { return e.UnsubscribeUserStatus("wendy", []string{"alice", "\t"}) }, presence.ErrInvalidParam},
			{"Unsubscribe all over quota", func() error { return e.UnsubscribeUserStatus("zed", nil) }, presence.ErrRateLimited},
			{"AddFriends of none", func() error { return e.AddFriends("wendy") }, presence.ErrInvalidParam},
			{"AddFriends of oneself", func() error { return e.AddFriends("wendy", "dave", "wendy") }, presence.ErrInvalidParam},
			{"AddFriends past MaxFriends", func() error { return e.AddFriends("wendy", "d1", "d2", "d3") }, presence.ErrInvalidParam},
			{"RemoveFriends with a bad ID", func() error { return e.RemoveFriends("wendy", "carol", "") }, presence.ErrInvalidParam},
		} {
			before := observe(e, users, sessions...)
			wantErr(t, tc.name, tc.call(), tc.want)
			after := observe(e, users, sessions...)
			if diff := cmp.Diff(before, after, cmpopts.EquateEmpty()); diff != "" {
				t.Errorf("%s changed the engine (-before +after):\n%s", tc.name, diff)
			}
		}

		// Nor did the rejected calls spend wendy's quotas (she used one
		// subscribe call in the setup).
		for i := range 19 {
			noErr(t, "wendy subscribe "+strconv.Itoa(i+2), second(e.SubscribeUserStatus("wendy", []string{"alice"})))
		}
		wantErr(t, "wendy subscribe 21", second(e.SubscribeUserStatus("wendy", []string{"alice"})), presence.ErrRateLimited)
		for i := range 20 {
			noErr(t, "wendy query "+strconv.Itoa(i+1), second(e.GetUserStatus("wendy", []string{"bob"})))
		}
	})
}

func TestRejectedCallWithSwitchOffChangesNothing(t *testing.T) {
	e := newEngine(t, presence.Config{})
	wendy := login(t, e, "wendy", "phone")
	login(t, e, "bob", "phone")
	users := []string{"wendy", "bob"}
	observe(e, users, wendy) // empty wendy's mailbox
	before := observe(e, users, wendy)
	wantErr(t, "Subscribe", second(e.SubscribeUserStatus("wendy", []string{"bob"})), presence.ErrFeatureDisabled)
	wantErr(t, "Unsubscribe", e.UnsubscribeUserStatus("wendy", nil), presence.ErrFeatureDisabled)
	wantErr(t, "GetUserStatus", second(e.GetUserStatus("wendy", []string{"bob"})), presence.ErrFeatureDisabled)
	if diff := cmp.Diff(before, observe(e, users, wendy), cmpopts.EquateEmpty()); diff != "" {
		t.Fatalf("rejected calls changed the engine (-before +after):\n%s", diff)
	}
}

// REFERENCE: "If a client reconnects before its disconnect has been
// processed, the disconnect is not reported at all" - also when the user's
// other device was itself still inside its grace at that moment.
func TestReconnectWithinGraceWhileOtherDeviceHeldIsNotReported(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		e := newEngine(t, presence.Config{StatusQuery: true, DisconnectGrace: 10 * time.Second})
		wendy := watch(t, e, "wendy", "bob")
		phone := login(t, e, "bob", "phone")
		wendy.Drain(nil)

		noErr(t, "phone Disconnect", phone.Disconnect()) // t=0: the phone is gone for good (held until t=10)
		advance(2 * time.Second)
		laptop := login(t, e, "bob", "laptop") // t=2: bob opens his laptop
		advance(3 * time.Second)
		noErr(t, "laptop Disconnect", laptop.Disconnect()) // t=5: the laptop's link drops ...
		advance(6 * time.Second)
		wantEvents(t, wendy)         // t=11: the laptop is still inside its grace (until t=15)
		login(t, e, "bob", "laptop") // ... and is back at t=11
		advance(time.Minute)

		wantState(t, e, "bob", online, "", "laptop")
		wantEvents(t, wendy) // nobody heard of the laptop's disconnect
	})
}

func TestDeviceInGraceCountsAsOnlineUntilItLogsOut(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		e := newEngine(t, presence.Config{StatusQuery: true, DisconnectGrace: 10 * time.Second, ChangeFeedSize: 16})
		wendy := watch(t, e, "wendy", "bob")
		bob := login(t, e, "bob", "phone")
		noErr(t, "Disconnect", bob.Disconnect())
		wendy.Drain(nil)
		changes(e)

		// While held, bob is Online: he may still set a custom status.
		noErr(t, "SetSelfStatus in grace", e.SetSelfStatus("bob", "brb"))
		wantEvents(t, wendy, ev("bob", online, "brb", presence.ReasonCustomStatus))
		if got := state(t, e, "bob").Sessions; len(got) != 1 || got[0].Connected {
			t.Fatalf("devices in grace = %+v, want the phone, not connected", got)
		}

		// A logout within the grace is reported at once, and nothing follows.
		noErr(t, "Logout in grace", e.Logout("bob", "phone"))
		wantState(t, e, "bob", unlogined, "")
		wantEvents(t, wendy, ev("bob", unlogined, "", presence.ReasonLogout))
		advance(time.Minute)
		wantEvents(t, wendy)
		wantChanges(t, e,
			presence.Change{UserID: "bob", Reason: presence.ReasonCustomStatus, Status: online, Custom: "brb"},
			presence.Change{UserID: "bob", DeviceID: "phone", Reason: presence.ReasonLogout, Status: unlogined},
		)
	})
}

// One user's changes carry times in the order they were applied, even when
// two devices log in at once: the clock is read under the shard lock.
func TestFeedTimesOfOneUserNeverGoBack(t *testing.T) {
	const logins = 5000
	e := newEngine(t, presence.Config{ChangeFeedSize: 2 * logins})
	var wg sync.WaitGroup
	for _, dev := range []string{"phone", "laptop"} {
		wg.Go(func() {
			for range logins {
				if _, err := e.Login("ann", dev); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	var prev presence.Change
	for range 2 * logins {
		c := <-e.Changes()
		if c.Time.Before(prev.Time) {
			t.Fatalf("record %v of %s at %v follows one at %v", c.Reason, c.DeviceID, c.Time, prev.Time)
		}
		prev = c
	}
}
