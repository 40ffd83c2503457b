package main

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/presencekit/presence"
)

// worker owns a share of the users and runs a random mix of operations on
// them. Owning its users keeps the model exact without locks: the only other
// party changing a user is the engine's timer (heartbeat timeouts, ends of a
// disconnect grace), and the checks below allow for exactly that.
type worker struct {
	sim   *sim
	e     *presence.Engine
	rng   *rand.Rand
	owned []*simUser
	seen  []uint64     // latest version this worker read per user: reads must never go back
	slab  []simSession // preallocated sessions for the setup's logins, see endSetup

	stats       opStats
	ops         atomic.Uint64 // for the progress line
	hbMiss      int
	setupLogins uint64
	lastSweep   time.Time
	ids         []string
}

// mix is the weight of each operation, per mille. Heartbeats also come from
// the periodic sweep over the worker's devices.
var mix = [numOps]int{
	opLogin:         120,
	opHeartbeat:     200,
	opDisconnect:    50,
	opLogout:        40,
	opKick:          5,
	opSetStatus:     200,
	opGetStatus:     150,
	opSubscribe:     90,
	opUnsubscribe:   50,
	opAddFriends:    45,
	opRemoveFriends: 40,
	opInvalid:       10,
}

var customTexts = []string{"", "busy", "in a meeting", "listening to music", "gaming", "brb", "🎧 focus", "on a train"}

// call runs one engine call, timing it and counting its outcome.
func (w *worker) call(op opKind, f func() error) error {
	t0 := time.Now()
	err := f()
	w.stats.lat[op].add(time.Since(t0))
	w.stats.count[op]++
	w.stats.errs[op][classify(err)]++
	w.ops.Add(1)
	return err
}

// expect reports a violation unless err is of one of the allowed kinds, and
// returns its kind.
func (w *worker) expect(op opKind, who string, err error, allowed ...errKind) errKind {
	k := classify(err)
	if !slices.Contains(allowed, k) {
		w.sim.viol.add("%v %s: unexpected error %v (kind %s)", op, who, err, errNames[k])
	}
	return k
}

// ended checks that ss has ended for one of the allowed reasons. The engine
// closes Done once it has released its locks, so when the session was ended
// by someone else (the timer) a call may learn of it a moment before Done
// closes: wait up to a second. With now set the caller ended it itself, and
// Done must already be closed.
func (w *worker) ended(ss *simSession, ctx string, now bool, allowed ...presence.Reason) {
	select {
	case <-ss.s.Done():
	default:
		if now {
			w.sim.viol.add("session %s/%s (%s): Done not closed when the call returned", ss.user, ss.device, ctx)
		}
		select {
		case <-ss.s.Done():
		case <-time.After(time.Second):
			w.sim.viol.add("session %s/%s (%s): not ended 1s later", ss.user, ss.device, ctx)
			return
		}
	}
	why := ss.s.EndReason()
	if !slices.Contains(allowed, why) {
		w.sim.viol.add("session %s/%s (%s): ended with %v, want one of %v", ss.user, ss.device, ctx, why, allowed)
	}
	if why == presence.ReasonTimeout && !ss.silent {
		w.hbMiss++
	}
}

// userIndex returns the index of a simulated user from its ID, and false
// for any other ID.
func (s *sim) userIndex(id string) (int32, bool) {
	rest, ok := strings.CutPrefix(id, userPrefix)
	n, err := strconv.Atoi(rest)
	if !ok || err != nil || n < 0 || n >= len(s.users) {
		return -1, false
	}
	return int32(n), true
}

// idxOf is userIndex for an ID the simulation made itself.
func (s *sim) idxOf(id string) int32 {
	i, ok := s.userIndex(id)
	if !ok {
		panic("bench: not a simulated user: " + id)
	}
	return i
}

func (w *worker) pickOwned() *simUser { return w.owned[w.rng.IntN(len(w.owned))] }

// pickOther returns a user other than u.
func (w *worker) pickOther(u *simUser) int32 {
	n := int32(len(w.sim.users))
	t := w.rng.Int32N(n - 1)
	if t >= u.idx {
		t++
	}
	return t
}

// pickDev returns a random device of u for which ok holds, or -1.
func (w *worker) pickDev(u *simUser, ok func(*simDev) bool) int {
	start := w.rng.IntN(len(u.devs))
	for i := range u.devs {
		d := (start + i) % len(u.devs)
		if ok(&u.devs[d]) {
			return d
		}
	}
	return -1
}

// The population is built in phases, each run by every worker on its own
// users, so that the heap can be measured between them and what a phase
// adds is what its kind of state costs (see sim.setup).

// loginFirst logs in the first device of the users that start logged in.
func (w *worker) loginFirst() {
	w.each(func(u *simUser) {
		if w.rng.Float64() < w.sim.cfg.LoggedIn {
			w.loginDev(u, 0)
		}
	})
}

// loginSecond logs in a second device for 4 in 10 of the logged-in users.
func (w *worker) loginSecond() {
	w.each(func(u *simUser) {
		if u.devs[0].loggedIn && w.rng.IntN(10) < 4 {
			w.loginDev(u, 1)
		}
	})
}

// addInitialFriends gives every user its -friends friends.
func (w *worker) addInitialFriends() {
	w.each(func(u *simUser) {
		if n := w.sim.cfg.Friends; n > 0 {
			w.addFriends(u, n)
		}
	})
}

// addInitialSubs gives every user its -subs subscriptions.
func (w *worker) addInitialSubs() {
	w.each(func(u *simUser) {
		for left := w.sim.cfg.Subs; left > 0; {
			n := min(left, maxSubscribeIDs)
			w.subscribe(u, n)
			left -= n
		}
	})
}

// each runs f on every user of the worker, heartbeating on schedule: a setup
// phase can take longer than the heartbeat timeout.
func (w *worker) each(f func(*simUser)) {
	for i, u := range w.owned {
		if i%64 == 0 {
			w.maybeSweep(time.Now())
		}
		f(u)
	}
}

// endSetup starts the count of the load from zero; the change feed check
// still needs the setup's logins. Sessions opened from now on are allocated
// one by one: the slab only keeps the simulation's bookkeeping out of the
// heap measured during the setup.
func (w *worker) endSetup() {
	w.setupLogins = w.stats.errs[opLogin][errNone]
	w.stats = opStats{}
	w.ops.Store(0)
	w.slab = nil
}

// newSession returns a zeroed simSession, from the slab while it lasts.
func (w *worker) newSession() *simSession {
	if len(w.slab) < cap(w.slab) {
		w.slab = w.slab[:len(w.slab)+1]
		return &w.slab[len(w.slab)-1]
	}
	return new(simSession)
}

// keepAlive heartbeats the worker's devices on schedule until done closes,
// as clients keep doing while their server is busy with something else.
func (w *worker) keepAlive(done <-chan struct{}) {
	t := time.NewTicker(w.sim.hbEvery / 4)
	defer t.Stop()
	for {
		select {
		case <-done:
			return
		case now := <-t.C:
			w.maybeSweep(now)
		}
	}
}

// run does random operations until the simulation stops, and heartbeats
// every device that is not silent every sim.hbEvery.
func (w *worker) run() {
	w.sweep() // every device starts the load freshly heartbeaten
	var cum [numOps]int
	total := 0
	for op, n := range mix {
		total += n
		cum[op] = total
	}
	for i := 0; ; i++ {
		if i%64 == 0 {
			if w.sim.stop.Load() {
				return
			}
			w.maybeSweep(time.Now())
		}
		r := w.rng.IntN(total)
		op, _ := slices.BinarySearch(cum[:], r+1)
		w.step(opKind(op), w.pickOwned())
	}
}

func (w *worker) step(op opKind, u *simUser) {
	switch op {
	case opLogin:
		d := 0
		if w.rng.IntN(10) < 3 {
			d = 1
		}
		w.loginDev(u, d)
	case opHeartbeat:
		d := w.pickDev(u, func(d *simDev) bool { return d.sess != nil && !d.sess.silent })
		if d < 0 {
			w.step(opLogin, u)
			return
		}
		w.heartbeat(u, d)
	case opDisconnect:
		w.disconnect(u)
	case opLogout:
		w.logout(u)
	case opKick:
		w.kick(u)
	case opSetStatus:
		w.setStatus(u)
	case opGetStatus:
		w.getStatus(u)
	case opSubscribe:
		n := 1 + w.rng.IntN(8)
		if w.rng.IntN(5) == 0 {
			n = 1 + w.rng.IntN(maxSubscribeIDs)
		}
		w.subscribe(u, n)
	case opUnsubscribe:
		w.unsubscribe(u)
	case opAddFriends:
		w.addFriends(u, 1+w.rng.IntN(3))
	case opRemoveFriends:
		w.removeFriends(u)
	case opInvalid:
		w.invalid(u)
	}
}

// maybeSweep sweeps if the last sweep is sim.hbEvery ago.
func (w *worker) maybeSweep(now time.Time) {
	if now.Sub(w.lastSweep) >= w.sim.hbEvery {
		w.sweep()
	}
}

// sweep heartbeats every connected device of the worker, like clients doing
// so on a fixed interval. Silent devices fall silent when the load starts:
// during the setup they must stay connected, or their timeouts would change
// the population while its memory is measured.
func (w *worker) sweep() {
	w.lastSweep = time.Now()
	loading := w.sim.loading.Load()
	for _, u := range w.owned {
		for d := range u.devs {
			if ss := u.devs[d].sess; ss != nil && !(ss.silent && loading) {
				w.heartbeat(u, d)
			}
		}
	}
}

func (w *worker) loginDev(u *simUser, d int) {
	dev := &u.devs[d]
	var s *presence.Session
	err := w.call(opLogin, func() (err error) {
		s, err = w.e.Login(u.id, deviceIDs[d])
		return err
	})
	if w.expect(opLogin, u.id, err, errNone) != errNone {
		return
	}
	if s.UserID() != u.id || s.DeviceID() != deviceIDs[d] {
		w.sim.viol.add("Login(%s, %s) returned the session of %s/%s", u.id, deviceIDs[d], s.UserID(), s.DeviceID())
	}
	if old := dev.sess; old != nil {
		// Replaced by this login, unless the timer took it first.
		w.ended(old, "logged in again", false, presence.ReasonLogin, presence.ReasonTimeout)
	}
	dev.loggedIn = true
	dev.sess = w.newSession()
	*dev.sess = simSession{s: s, user: u.id, device: deviceIDs[d], silent: w.rng.Float64() < w.sim.cfg.Silent}
	w.sim.open(dev.sess)

	// Right after a login the user is Online on that device (a self query is free).
	st, err := w.e.GetUserStatus(u.id, []string{u.id})
	if err != nil || len(st) != 1 {
		w.sim.viol.add("self GetUserStatus(%s) after Login: %v, %d entries", u.id, err, len(st))
		return
	}
	if st[0].Status != presence.Online || !slices.Contains(st[0].Devices, deviceIDs[d]) {
		w.sim.viol.add("self GetUserStatus(%s) right after Login on %s: %v with online devices %v", u.id, deviceIDs[d], st[0].Status, st[0].Devices)
	}
	w.sawVersion(u.idx, &st[0], "self GetUserStatus after Login")
}

// sawVersion checks that the versions this worker reads for a user never go back.
func (w *worker) sawVersion(idx int32, us *presence.UserStatus, ctx string) {
	if us.Version < w.seen[idx] {
		w.sim.viol.add("%s: %s has version %d, earlier read %d", ctx, us.UserID, us.Version, w.seen[idx])
		return
	}
	w.seen[idx] = us.Version
}

func (w *worker) heartbeat(u *simUser, d int) {
	ss := u.devs[d].sess
	err := w.call(opHeartbeat, ss.s.Heartbeat)
	if w.expect(opHeartbeat, u.id, err, errNone, errSessionEnded) == errSessionEnded {
		w.ended(ss, "Heartbeat returned ErrSessionEnded", false, presence.ReasonTimeout)
		u.devs[d].sess = nil
	}
}

func (w *worker) disconnect(u *simUser) {
	d := w.pickDev(u, func(d *simDev) bool { return d.sess != nil })
	if d < 0 {
		w.step(opLogin, u)
		return
	}
	ss := u.devs[d].sess
	err := w.call(opDisconnect, ss.s.Disconnect)
	switch w.expect(opDisconnect, u.id, err, errNone, errSessionEnded) {
	case errNone:
		w.ended(ss, "Disconnect", true, presence.ReasonLinkClose)
	case errSessionEnded:
		w.ended(ss, "Disconnect returned ErrSessionEnded", false, presence.ReasonTimeout)
	}
	u.devs[d].sess = nil // the device stays logged in, offline
}

func (w *worker) logout(u *simUser) {
	d := w.rng.IntN(len(u.devs))
	dev := &u.devs[d]
	if ss := dev.sess; ss != nil && w.rng.IntN(2) == 0 {
		err := w.call(opLogout, ss.s.Logout)
		switch w.expect(opLogout, u.id, err, errNone, errSessionEnded) {
		case errNone:
			w.ended(ss, "Session.Logout", true, presence.ReasonLogout)
			dev.loggedIn = false
		case errSessionEnded:
			w.ended(ss, "Session.Logout returned ErrSessionEnded", false, presence.ReasonTimeout)
		}
		dev.sess = nil
		return
	}
	err := w.call(opLogout, func() error { return w.e.Logout(u.id, deviceIDs[d]) })
	if !dev.loggedIn {
		w.expect(opLogout, u.id+"/"+deviceIDs[d]+" (not logged in)", err, errNotLoggedIn)
		return
	}
	if w.expect(opLogout, u.id+"/"+deviceIDs[d], err, errNone) != errNone {
		return
	}
	if ss := dev.sess; ss != nil {
		w.ended(ss, "Logout", false, presence.ReasonLogout, presence.ReasonTimeout)
	}
	*dev = simDev{}
}

func (w *worker) kick(u *simUser) {
	err := w.call(opKick, func() error { return w.e.Kick(u.id) })
	if !u.anyLoggedIn() {
		w.expect(opKick, u.id+" (not logged in)", err, errNotLoggedIn)
		return
	}
	if w.expect(opKick, u.id, err, errNone) != errNone {
		return
	}
	for d := range u.devs {
		if ss := u.devs[d].sess; ss != nil {
			w.ended(ss, "Kick", false, presence.ReasonKicked, presence.ReasonTimeout)
		}
		u.devs[d] = simDev{}
	}
}

func (w *worker) setStatus(u *simUser) {
	text := customTexts[w.rng.IntN(len(customTexts))]
	if w.rng.IntN(4) == 0 {
		text = fmt.Sprintf("note %d", w.rng.IntN(1000))
	}
	err := w.call(opSetStatus, func() error { return w.e.SetSelfStatus(u.id, text) })
	switch w.expect(opSetStatus, u.id, err, errNone, errNotLoggedIn) {
	case errNone:
		if !u.anyLoggedIn() {
			w.sim.viol.add("SetSelfStatus(%s) succeeded with no device logged in", u.id)
		}
	case errNotLoggedIn:
		// Not Online: any session the simulation left open must have timed out.
		for d := range u.devs {
			if ss := u.devs[d].sess; ss != nil {
				w.ended(ss, "SetSelfStatus returned ErrNotLoggedIn", false, presence.ReasonTimeout)
				u.devs[d].sess = nil
			}
		}
	}
}

func (w *worker) getStatus(u *simUser) {
	n := 1 + w.rng.IntN(20)
	switch r := w.rng.IntN(100); {
	case r < 5:
		n = maxQueryIDs
	case r < 30:
		n = 1 + w.rng.IntN(200)
	}
	ids := w.ids[:0]
	for range n {
		switch r := w.rng.IntN(100); {
		case r < 5:
			ids = append(ids, fmt.Sprintf("ghost-%d", w.rng.IntN(100)))
		case r < 10:
			ids = append(ids, u.id)
		default:
			ids = append(ids, w.sim.id(w.rng.Int32N(int32(len(w.sim.users)))))
		}
	}
	w.ids = ids
	var st []presence.UserStatus
	err := w.call(opGetStatus, func() (err error) {
		st, err = w.e.GetUserStatus(u.id, ids)
		return err
	})
	if w.expect(opGetStatus, u.id, err, errNone) != errNone {
		return
	}
	if len(st) != len(ids) {
		w.sim.viol.add("GetUserStatus(%s, %d IDs) returned %d entries", u.id, len(ids), len(st))
		return
	}
	for i := range st {
		s := &st[i]
		switch {
		case s.UserID != ids[i]:
			w.sim.viol.add("GetUserStatus(%s): entry %d is %q, asked for %q", u.id, i, s.UserID, ids[i])
			return
		case strings.HasPrefix(s.UserID, "ghost-"):
			if s.Status != presence.Unlogined || s.Version != 0 || s.Custom != "" || s.Devices != nil {
				w.sim.viol.add("GetUserStatus(%s): unknown user %s reads %+v", u.id, s.UserID, *s)
			}
			continue
		case s.Status < presence.Online || s.Status > presence.Unlogined:
			w.sim.viol.add("GetUserStatus(%s): %s has status %v", u.id, s.UserID, s.Status)
		case s.Custom != "" && s.Status != presence.Online:
			w.sim.viol.add("GetUserStatus(%s): %s is %v with custom status %q", u.id, s.UserID, s.Status, s.Custom)
		case s.UserID != u.id && s.Devices != nil:
			w.sim.viol.add("GetUserStatus(%s): %s, not the caller, lists devices %v", u.id, s.UserID, s.Devices)
		}
		w.sawVersion(w.sim.idxOf(s.UserID), s, "GetUserStatus")
	}
}

func (w *worker) subscribe(u *simUser, n int) {
	ids := w.ids[:0]
	targets := make([]int32, 0, n)
	for range n {
		t := w.pickOther(u)
		targets = append(targets, t)
		ids = append(ids, w.sim.id(t))
	}
	w.ids = ids
	var evicted []string
	err := w.call(opSubscribe, func() (err error) {
		evicted, err = w.e.SubscribeUserStatus(u.id, ids)
		return err
	})
	if w.expect(opSubscribe, u.id, err, errNone) != errNone {
		return
	}
	for _, t := range targets {
		u.putSub(t)
	}
	var want []int32
	if over := len(u.subs) - maxSubscriptions; over > 0 {
		want = slices.Clone(u.subs[:over])
		u.subs = slices.Delete(u.subs, 0, over)
	}
	if !slices.Equal(evicted, w.sim.names(want)) {
		w.sim.viol.add("SubscribeUserStatus(%s, %d IDs) evicted %v, the model evicts %v", u.id, len(ids), evicted, w.sim.names(want))
	}
	w.spotCheckSubs(u)
}

func (w *worker) unsubscribe(u *simUser) {
	var ids []string // nil clears all
	if w.rng.IntN(20) != 0 {
		for range 1 + w.rng.IntN(5) {
			t := w.pickOther(u)
			if len(u.subs) > 0 && w.rng.IntN(5) != 0 {
				t = u.subs[w.rng.IntN(len(u.subs))]
			}
			ids = append(ids, w.sim.id(t))
		}
	}
	err := w.call(opUnsubscribe, func() error { return w.e.UnsubscribeUserStatus(u.id, ids) })
	if w.expect(opUnsubscribe, u.id, err, errNone) != errNone {
		return
	}
	if ids == nil {
		u.subs = nil
	}
	for _, id := range ids {
		u.removeSub(w.sim.idxOf(id))
	}
	w.spotCheckSubs(u)
}

// spotCheckSubs compares one in twenty subscription lists with the model.
func (w *worker) spotCheckSubs(u *simUser) {
	if w.rng.IntN(20) != 0 {
		return
	}
	if got, want := w.e.Subscriptions(u.id), w.sim.names(u.subs); !slices.Equal(got, want) {
		w.sim.viol.add("Subscriptions(%s) = %v, the model has %v", u.id, got, want)
	}
}

func (w *worker) addFriends(u *simUser, n int) {
	ids := make([]string, 0, n)
	fresh := make([]int32, 0, n)
	for range n {
		f := w.pickOther(u)
		ids = append(ids, w.sim.id(f))
		if !slices.Contains(u.friends, f) && !slices.Contains(fresh, f) {
			fresh = append(fresh, f)
		}
	}
	if len(u.friends)+len(fresh) > maxFriends {
		return
	}
	err := w.call(opAddFriends, func() error { return w.e.AddFriends(u.id, ids...) })
	if w.expect(opAddFriends, u.id, err, errNone) == errNone {
		u.friends = append(u.friends, fresh...)
	}
}

func (w *worker) removeFriends(u *simUser) {
	var ids []string
	var gone []int32
	for range 1 + w.rng.IntN(3) {
		f := w.pickOther(u)
		if len(u.friends) > 0 && w.rng.IntN(4) != 0 {
			f = u.friends[w.rng.IntN(len(u.friends))]
		}
		ids = append(ids, w.sim.id(f))
		gone = append(gone, f)
	}
	err := w.call(opRemoveFriends, func() error { return w.e.RemoveFriends(u.id, ids...) })
	if w.expect(opRemoveFriends, u.id, err, errNone) != errNone {
		return
	}
	u.friends = slices.DeleteFunc(u.friends, func(f int32) bool { return slices.Contains(gone, f) })
}

// invalid makes a call with a bad argument: it must fail with
// ErrInvalidParam and change nothing (the final checks would see a change).
func (w *worker) invalid(u *simUser) {
	e := w.e
	other := w.sim.id(w.pickOther(u))
	many := func(n int) []string {
		ids := make([]string, n)
		for i := range ids {
			ids[i] = other
		}
		return ids
	}
	var what string
	var f func() error
	switch w.rng.IntN(10) {
	case 0:
		what, f = "Login with an empty user ID", func() error { _, err := e.Login("", "phone"); return err }
	case 1:
		what, f = "Login with a control character in the device ID", func() error { _, err := e.Login(u.id, "pho\x00ne"); return err }
	case 2:
		what, f = "SetSelfStatus too long", func() error { return e.SetSelfStatus(u.id, strings.Repeat("x", maxCustomBytes+1)) }
	case 3:
		what, f = "SetSelfStatus not UTF-8", func() error { return e.SetSelfStatus(u.id, "caf\xe9") }
	case 4:
		what, f = "SubscribeUserStatus to self", func() error { _, err := e.SubscribeUserStatus(u.id, []string{other, u.id}); return err }
	case 5:
		what, f = "SubscribeUserStatus with no IDs", func() error { _, err := e.SubscribeUserStatus(u.id, []string{}); return err }
	case 6:
		what, f = "GetUserStatus with too many IDs", func() error { _, err := e.GetUserStatus(u.id, many(maxQueryIDs+1)); return err }
	case 7:
		what, f = "GetUserStatus with a too long ID", func() error { _, err := e.GetUserStatus(u.id, []string{strings.Repeat("y", 129)}); return err }
	case 8:
		what, f = "UnsubscribeUserStatus with too many IDs", func() error { return e.UnsubscribeUserStatus(u.id, many(maxSubscribeIDs+1)) }
	default:
		what, f = "AddFriends of self", func() error { return e.AddFriends(u.id, other, u.id) }
	}
	err := w.call(opInvalid, f)
	w.expect(opInvalid, u.id+": "+what, err, errInvalidParam)
}
