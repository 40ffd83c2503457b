package presence

import (
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"testing"
	"testing/synctest"
	"time"
	"unicode"
	"unicode/utf8"
)

// FuzzEngine decodes its input into a configuration and a script of
// operations, runs the script on a real engine inside a synctest bubble and
// on a small model written for obviousness (plain slices and maps, one
// second of fake time at a time), and compares the two after every step:
// every user's status, custom text, devices and subscriptions, what every
// session has been told, the Stats counters, the change feed, the errors of
// rejected calls, and the engine's own index invariants.
//
// Input layout: two config bytes, then operations of one to five bytes each
// (see the fz* op constants). Time only moves with the sleep operations.
func FuzzEngine(f *testing.F) {
	for _, seed := range fzSeeds() {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		synctest.Test(t, func(t *testing.T) {
			newFzRun(t, data).run()
		})
	})
}

// Durations of every run, in whole seconds.
const (
	fzHeartbeat = 10
	fzExpiry    = 30
	fzTTL       = 20
	fzMaxSteps  = 400
)

// Operations: the first byte of a step, taken modulo fzOps. 0xFF closes the engine.
const (
	fzLogin         = iota // user, device
	fzLogout               // user, device: Engine.Logout
	fzSessionLogout        // session: b < 0x80 picks a live one, else any
	fzDisconnect           // session
	fzHeartbeatOp          // session; n%4 == 1: every live session of user n>>2%4, n%4 == 0: every live session
	fzSleep                // n: 1 + n%4 seconds
	fzSleepLong            // n: 5 + n%30 seconds
	fzSetCustom            // user, text
	fzGet                  // caller, count, ids...
	fzSubscribe            // caller, count, ids...
	fzUnsubscribe          // caller, count (bit 0: nil or empty when 0), ids...
	fzAddFriends           // user, count, ids...
	fzRemoveFriends        // user, count, ids...
	fzKick                 // user
	fzDrain                // session (n%4 == 0: every session)
	fzLogin2               // same as fzLogin, to make logins frequent
	fzHeartbeat2           // same as fzHeartbeatOp
	fzOps
	fzClose = 0xFF
)

// IDs: a byte picks fzUsers[b%4] (or fzDevices[b%3]); b >= fzBad picks an invalid ID.
const fzBad = 240

var (
	fzUsers   = []string{"ann", "bob", "chloé", strings.Repeat("d", 128)}
	fzDevices = []string{"phone", "laptop", "tab"}
	fzBadIDs  = []string{"", strings.Repeat("x", 129), "bad\xff", "tab\tid"}
	fzTexts   = []string{"", "busy", "away", "🎮 in a match", strings.Repeat("m", 100), strings.Repeat("m", 101), "bad\xffutf8"}
)

// fzSeeds are inputs that reach the interesting corners quickly; the same
// inputs are committed under testdata/fuzz/FuzzEngine.
func fzSeeds() [][]byte {
	seed := func(cfg0, cfg1 byte, ops ...byte) []byte { return append([]byte{cfg0, cfg1}, ops...) }
	return [][]byte{
		// Two users, a subscription, a custom status, a drain, heartbeat timeouts.
		seed(0x01, 0x00,
			fzLogin, 0, 0, fzLogin, 1, 1, fzSubscribe, 1, 1, 0, fzSetCustom, 0, 1,
			fzDrain, 0, fzSleep, 2, fzHeartbeatOp, 0, fzSleepLong, 6, fzDrain, 0, fzSleepLong, 29, fzDrain, 0),
		// Disconnect grace of 2 s: reconnect inside it, then let it pass; friends notified.
		seed(0x05, 0x00,
			fzLogin, 0, 0, fzLogin, 1, 0, fzAddFriends, 1, 1, 0, fzSetCustom, 0, 3, fzDisconnect, 0,
			fzSleep, 0, fzLogin, 0, 0, fzDrain, 0, fzDisconnect, 1, fzSleep, 1, fzDrain, 0, fzSleepLong, 25, fzDrain, 0),
		// MaxDevices 2, FeedSize 1, small quotas: kicks, evictions, rate limits.
		seed(0x38, 0x3b,
			fzLogin, 0, 0, fzLogin, 0, 1, fzLogin, 0, 2, fzLogin, 1, 0, fzSubscribe, 1, 2, 0, 2,
			fzSubscribe, 1, 1, 3, fzSubscribe, 1, 2, 0, 3, fzGet, 1, 2, 0, 2, fzGet, 1, 1, 3, fzGet, 1, 1, 2,
			fzSetCustom, 0, 2, fzLogin, 2, 1, fzSetCustom, 2, 1, fzDrain, 0, fzUnsubscribe, 1, 0, fzKick, 0, fzDrain, 0),
		// Invalid IDs and texts everywhere, then Close and calls after it.
		seed(0x00, 0x00,
			fzLogin, fzBad, 0, fzLogin, 0, fzBad+2, fzLogin, 0, 0, fzSetCustom, 0, 5, fzSetCustom, 0, 6,
			fzSetCustom, 0, 4, fzSubscribe, 0, 1, 0, fzSubscribe, 0, 2, 1, fzBad+3, fzGet, fzBad+1, 1, 0,
			fzAddFriends, 0, 0, fzAddFriends, 0, 1, 0, fzKick, fzBad, fzLogout, 1, 0,
			fzClose, fzLogin, 1, 1, fzDisconnect, 0, fzGet, 0, 1, 0, fzDrain, 0),
		// FeedSize 3 with four users all changing: mailbox overflow; subscription TTL and device expiry.
		seed(0x11, 0x13,
			fzLogin, 0, 0, fzSubscribe, 0, 3, 1, 2, 3, fzLogin, 1, 0, fzLogin, 2, 0, fzLogin, 3, 0,
			fzSetCustom, 1, 1, fzSetCustom, 2, 2, fzSetCustom, 3, 3, fzDrain, 1, fzDisconnect, 0,
			fzSleepLong, 16, fzDrain, 0, fzSleepLong, 30, fzDrain, 0),
		// Two watched users time out in the same tick while the watcher lives: one
		// group of events in unknown order; then the same with FeedSize 2 and a
		// 1 s grace, where the group overflows the mailbox.
		seed(0x01, 0x03,
			fzLogin, 0, 0, fzLogin, 1, 0, fzSubscribe, 2, 2, 0, 1, fzSleepLong, 0, fzLogin, 2, 0,
			fzHeartbeatOp, 2, fzSleepLong, 0, fzDrain, 0, fzSleepLong, 20, fzDrain, 0),
		seed(0x03, 0x23,
			fzLogin, 0, 0, fzLogin, 1, 0, fzLogin, 3, 1, fzSubscribe, 2, 3, 0, 1, 3, fzLogin, 2, 0,
			fzDisconnect, 0, fzDisconnect, 0, fzSetCustom, 3, 1, fzSleep, 0, fzHeartbeatOp, 0, fzSleepLong, 2,
			fzDrain, 3, fzDrain, 0, fzSleepLong, 20, fzLogin, 0, 0, fzUnsubscribe, 2, 0, fzDrain, 0),
	}
}

// fzEvent is an event the model expects a session to have been told.
type fzEvent struct {
	target   string
	status   Status
	custom   string
	reason   Reason
	ver      uint64 // the version it carries, once read back from the engine
	verKnown bool
}

func (ev *fzEvent) String() string {
	return fmt.Sprintf("{%s %v %q %v v%d}", ev.target, ev.status, ev.custom, ev.reason, ev.ver)
}

// fzEntry is a pending event in a session's modelled mailbox. Consecutive
// entries of one group arrived within one tick from different users, in an
// order the model does not know.
type fzEntry struct {
	ev    *fzEvent
	group int
}

type fzSession struct {
	s    *Session
	name string
	user *fzUser
	live bool
	end  Reason

	// Exact mailbox: pending events, oldest first.
	box    []fzEntry
	groups int
	// When the order of pushes into a full mailbox was not knowable (a
	// tick delivering several users' changes, or a session ending in the
	// tick in which others changed), the model only knows, per target, the
	// events that may be pending, and which targets surely were pushed.
	fuzzy    bool
	cand     map[string][]*fzEvent
	definite map[string]bool
	possible map[string]bool

	lost    uint64            // expected Lost() while exact
	lastVer map[string]uint64 // per target, the version last drained
}

type fzDevice struct {
	id         string
	sess       *fzSession
	loginAt    int64
	lastSeen   int64
	graceUntil int64
}

func (d *fzDevice) online() bool { return d.sess != nil || d.graceUntil != 0 }

type fzUser struct {
	id        string
	devices   []*fzDevice // oldest login first
	status    Status
	custom    string
	subs      []string // oldest first
	idleSince int64
	friends   map[string]bool

	maxVer   uint64 // highest version read back so far
	lastRead uint64 // version read back after the previous step

	// This step's changes.
	changed bool
	events  []*fzEvent
	records []Change
}

func (u *fzUser) derive() Status {
	if len(u.devices) == 0 {
		return Unlogined
	}
	for _, d := range u.devices {
		if d.online() {
			return Online
		}
	}
	return Offline
}

func (u *fzUser) liveSessions() []*fzSession {
	var ss []*fzSession
	for _, d := range u.devices {
		if d.sess != nil {
			ss = append(ss, d.sess)
		}
	}
	return ss
}

func (u *fzUser) onlineDevices() []string {
	var ids []string
	for _, d := range u.devices {
		if d.online() {
			ids = append(ids, d.id)
		}
	}
	return ids
}

func (u *fzUser) device(id string) (int, *fzDevice) {
	for i, d := range u.devices {
		if d.id == id {
			return i, d
		}
	}
	return -1, nil
}

func (u *fzUser) deviceOf(s *fzSession) (int, *fzDevice) {
	for i, d := range u.devices {
		if d.sess == s {
			return i, d
		}
	}
	return -1, nil
}

// fzBucket models a token bucket of x/time/rate at whole seconds.
type fzBucket struct {
	tokens float64
	last   int64
}

type fzRun struct {
	t    *testing.T
	data []byte
	pos  int

	cfg    Config
	quota  Quota
	e      *Engine
	start  time.Time
	now    int64 // seconds since start
	closed bool

	users    []*fzUser
	byID     map[string]*fzUser
	sessions []*fzSession
	buckets  map[string]*fzBucket

	delivered, coalesced uint64
	countersExact        bool // no ambiguity yet: Delivered and Coalesced are predicted exactly

	log []string
}

func newFzRun(t *testing.T, data []byte) *fzRun {
	r := &fzRun{t: t, data: data, byID: map[string]*fzUser{}, buckets: map[string]*fzBucket{}, countersExact: true}
	b0, b1 := r.next(), r.next()
	r.quota = Quota{Calls: -1}
	switch b0 >> 5 & 3 {
	case 1:
		r.quota = Quota{Calls: 2, Per: 2 * time.Second}
	case 2:
		r.quota = Quota{Calls: 3, Per: 6 * time.Second}
	}
	r.cfg = Config{
		StatusQuery:      b1>>4 != 0xC,
		NotifyFriends:    b0&1 != 0,
		HeartbeatTimeout: fzHeartbeat * time.Second,
		DisconnectGrace:  []time.Duration{0, time.Second, 2 * time.Second, 5 * time.Second}[b0>>1&3],
		SessionExpiry:    fzExpiry * time.Second,
		SubscriptionTTL:  fzTTL * time.Second,
		MaxQueryIDs:      3,
		MaxSubscriptions: 2 + int(b1>>1&1),
		MaxFriends:       1 + int(b1>>2&1),
		MaxDevices:       []int{0, 2}[b0>>4&1],
		QueryQuota:       r.quota,
		SubscribeQuota:   r.quota,
		UnsubscribeQuota: r.quota,
		FeedSize:         []int{64, 3, 2, 1}[b1>>4&3],
		ChangeFeedSize:   []int{0, 256}[b1>>3&1],
		Shards:           []int{0, 1}[b0>>7],
	}
	r.cfg.MaxSubscribeIDs = min(2+int(b1&1), r.cfg.MaxSubscriptions)
	for _, id := range fzUsers {
		u := &fzUser{id: id, status: Unlogined, friends: map[string]bool{}}
		r.users = append(r.users, u)
		r.byID[id] = u
	}
	return r
}

func (r *fzRun) next() byte {
	if r.pos >= len(r.data) {
		return 0
	}
	b := r.data[r.pos]
	r.pos++
	return b
}

func (r *fzRun) logf(format string, args ...any) {
	r.log = append(r.log, fmt.Sprintf("t=%d ", r.now)+fmt.Sprintf(format, args...))
}

func (r *fzRun) fail(format string, args ...any) {
	r.t.Helper()
	log := r.log
	if len(log) > 80 {
		log = log[len(log)-80:]
	}
	r.t.Fatalf("%s\nconfig: %+v\nsteps (last %d):\n  %s", fmt.Sprintf(format, args...), r.cfg, len(log), strings.Join(log, "\n  "))
}

func (r *fzRun) userID() string {
	b := r.next()
	if b >= fzBad {
		return fzBadIDs[b%4]
	}
	return fzUsers[b%4]
}

func (r *fzRun) deviceID() string {
	b := r.next()
	if b >= fzBad {
		return fzBadIDs[b%4]
	}
	return fzDevices[b%3]
}

// idList reads up to max+1 user IDs, the count taken from n.
func (r *fzRun) idList(n byte, max int) []string {
	var ids []string
	for range int(n) % (max + 2) {
		ids = append(ids, r.userID())
	}
	return ids
}

// pickSession picks a live session (b < 0x80, when there is one), or any
// session ever returned, ended ones included.
func (r *fzRun) pickSession(b byte) *fzSession {
	var live []*fzSession
	for _, s := range r.sessions {
		if s.live {
			live = append(live, s)
		}
	}
	if b < 0x80 && len(live) > 0 {
		return live[int(b)%len(live)]
	}
	if len(r.sessions) == 0 {
		return nil
	}
	return r.sessions[int(b)%len(r.sessions)]
}

func fzValid(id string) bool {
	return id != "" && len(id) <= 128 && utf8.ValidString(id) && strings.IndexFunc(id, unicode.IsControl) < 0
}

func fzAllValid(ids []string) bool {
	for _, id := range ids {
		if !fzValid(id) {
			return false
		}
	}
	return true
}

// check compares an engine error with the expected one (nil: success) and
// reports whether the call succeeded.
func (r *fzRun) check(op string, got error, want *Error) bool {
	r.t.Helper()
	if want != nil {
		r.log[len(r.log)-1] += " -> " + want.Msg
	}
	if want == nil {
		if got != nil {
			r.fail("%s: unexpected error %v", op, got)
		}
		return true
	}
	var pe *Error
	if !errors.Is(got, want) || !errors.As(got, &pe) || pe.Code != want.Code {
		r.fail("%s: error %v, want %v", op, got, want)
	}
	return false
}

// preCheck is the common start of every call: validation, then Close.
func (r *fzRun) preCheck(valid bool) *Error {
	if !valid {
		return ErrInvalidParam
	}
	if r.closed {
		return ErrClosed
	}
	return nil
}

// allow spends one call of caller's quota for op, as x/time/rate would.
func (r *fzRun) allow(op, caller string) bool {
	if r.quota.Calls < 0 {
		return true
	}
	burst := float64(r.quota.Calls)
	rate := burst / r.quota.Per.Seconds()
	b := r.buckets[op+"/"+caller]
	if b == nil {
		b = &fzBucket{tokens: burst, last: r.now}
		r.buckets[op+"/"+caller] = b
	}
	tokens := min(burst, b.tokens+float64(r.now-b.last)*rate)
	if tokens < 1 {
		return false
	}
	b.tokens, b.last = tokens-1, r.now
	return true
}

func (r *fzRun) run() {
	r.start = time.Now()
	e, err := New(r.cfg)
	if err != nil {
		r.t.Fatalf("New(%+v): %v", r.cfg, err)
	}
	if r.cfg.Shards == 1 {
		e.keyMask = 3 // four hash values for all users: their records clash
	}
	r.e = e
	defer e.Close()
	r.logf("config %+v", r.cfg)
	r.afterStep()
	for steps := 0; r.pos < len(r.data) && steps < fzMaxSteps; steps++ {
		r.step()
	}
	if !r.closed {
		r.opClose()
	}
	// Whatever is still pending can be read after Close.
	for _, s := range r.sessions {
		r.drain(s)
	}
	// FZ_TRACE=1 go test -run=FuzzEngine/NAME -v prints the script a run executed.
	if os.Getenv("FZ_TRACE") != "" {
		r.t.Logf("steps:\n  %s", strings.Join(r.log, "\n  "))
	}
}

func (r *fzRun) step() {
	op := r.next()
	if op == fzClose {
		r.opClose()
		return
	}
	switch op % fzOps {
	case fzLogin, fzLogin2:
		r.opLogin()
	case fzLogout:
		r.opLogout()
	case fzSessionLogout:
		r.opSessionLogout()
	case fzDisconnect:
		r.opDisconnect()
	case fzHeartbeatOp, fzHeartbeat2:
		r.opHeartbeat()
	case fzSleep:
		r.sleep(1 + int(r.next())%4)
	case fzSleepLong:
		r.sleep(5 + int(r.next())%30)
	case fzSetCustom:
		r.opSetCustom()
	case fzGet:
		r.opGet()
	case fzSubscribe:
		r.opSubscribe()
	case fzUnsubscribe:
		r.opUnsubscribe()
	case fzAddFriends:
		r.opFriends(true)
	case fzRemoveFriends:
		r.opFriends(false)
	case fzKick:
		r.opKick()
	case fzDrain:
		r.opDrain()
	}
}

// --- model changes -------------------------------------------------------

func (r *fzRun) endSession(s *fzSession, why Reason) {
	s.live, s.end = false, why
}

// settle is the model of one applied change: derive the status, clear the
// custom text off Online, note the feed record, and return the event to
// deliver, or nil when nothing visible moved.
func (r *fzRun) settle(u *fzUser, prevStatus Status, prevCustom string, why Reason, dev string, kicked []string) *fzEvent {
	st := u.derive()
	if st != Online {
		u.custom = ""
	}
	if st != prevStatus {
		if prevStatus == Online {
			u.idleSince = r.now
		}
		u.status = st
	}
	u.records = append(u.records, Change{Time: r.at(r.now), UserID: u.id, DeviceID: dev, Reason: why, Status: st, Custom: u.custom, Kicked: kicked})
	if st == prevStatus && u.custom == prevCustom {
		return nil
	}
	ev := &fzEvent{target: u.id, status: st, custom: u.custom, reason: why}
	u.changed = true
	u.events = append(u.events, ev)
	return ev
}

func (r *fzRun) at(sec int64) time.Time { return r.start.Add(time.Duration(sec) * time.Second) }

func (r *fzRun) watches(w *fzUser, target string) bool {
	return w.id != target && (slices.Contains(w.subs, target) || (r.cfg.NotifyFriends && w.friends[target]))
}

// deliver pushes ev, the change of a call, to every session that hears of its user.
func (r *fzRun) deliver(ev *fzEvent) {
	if ev == nil {
		return
	}
	for _, w := range r.users {
		if w.id == ev.target || r.watches(w, ev.target) {
			for _, s := range w.liveSessions() {
				r.push(s, ev)
			}
		}
	}
}

func (s *fzSession) find(target string) int {
	return slices.IndexFunc(s.box, func(en fzEntry) bool { return en.ev.target == target })
}

func (s *fzSession) newGroup() int { s.groups++; return s.groups }

// push is one delivery in a known order.
func (r *fzRun) push(s *fzSession, ev *fzEvent) {
	r.delivered++
	if s.fuzzy {
		s.pushFuzzy(ev, true)
		return
	}
	if i := s.find(ev.target); i >= 0 {
		r.coalesced++
		s.box = slices.Delete(s.box, i, i+1)
		s.box = append(s.box, fzEntry{ev, s.newGroup()})
		return
	}
	if len(s.box) >= r.cfg.FeedSize && len(s.box) > 1 && s.box[0].group == s.box[1].group {
		r.goFuzzy(s) // which of the oldest group goes is unknown
		s.pushFuzzy(ev, true)
		return
	}
	s.box = append(s.box, fzEntry{ev, s.newGroup()})
	if len(s.box) > r.cfg.FeedSize {
		s.box = slices.Delete(s.box, 0, 1)
		s.lost++
	}
}

// pushGroup delivers one tick's changes of several users to s, in an unknown order.
func (r *fzRun) pushGroup(s *fzSession, batch map[string][]*fzEvent, order []string) {
	union := len(s.box)
	for _, t := range order {
		if s.find(t) < 0 {
			union++
		}
	}
	if s.fuzzy || union > r.cfg.FeedSize {
		r.goFuzzy(s)
		for _, t := range order {
			s.pushFuzzy(batch[t][len(batch[t])-1], true)
		}
		return
	}
	g := s.newGroup()
	for _, t := range order {
		evs := batch[t]
		r.delivered += uint64(len(evs))
		r.coalesced += uint64(len(evs) - 1)
		if i := s.find(t); i >= 0 {
			r.coalesced++
			s.box = slices.Delete(s.box, i, i+1)
		}
	}
	for _, t := range order {
		s.box = append(s.box, fzEntry{batch[t][len(batch[t])-1], g})
	}
}

func (r *fzRun) goFuzzy(s *fzSession) {
	if s.fuzzy {
		return
	}
	r.countersExact = false
	s.fuzzy = true
	s.cand, s.definite, s.possible = map[string][]*fzEvent{}, map[string]bool{}, map[string]bool{}
	for _, en := range s.box {
		s.cand[en.ev.target] = []*fzEvent{en.ev}
		s.definite[en.ev.target] = true
	}
	s.box = nil
}

// pushFuzzy notes ev as pushed (definite) or perhaps pushed.
func (s *fzSession) pushFuzzy(ev *fzEvent, definite bool) {
	if definite {
		s.cand[ev.target] = []*fzEvent{ev}
		s.definite[ev.target] = true
	} else {
		s.cand[ev.target] = append(s.cand[ev.target], ev)
		s.possible[ev.target] = true
	}
}

// tick applies everything due at the current second, as the engine's wheel
// does: per user, the first due device deadline in login order, again until
// none is due, then the subscription TTL. Users are independent; only the
// delivery order across users within the tick is unknown, which the
// mailbox model absorbs.
func (r *fzRun) tick() {
	watchers := map[string][]*fzUser{}
	for _, t := range r.users {
		for _, w := range r.users {
			if r.watches(w, t.id) {
				watchers[t.id] = append(watchers[t.id], w)
			}
		}
	}
	var startLive []*fzSession
	for _, s := range r.sessions {
		if s.live {
			startLive = append(startLive, s)
		}
	}
	ended := map[*fzSession]bool{}
	own := map[*fzSession][]*fzEvent{}
	for _, u := range r.users {
		for r.expireOne(u, ended, own) {
		}
		if len(u.subs) > 0 && u.status != Online && r.now >= u.idleSince+fzTTL {
			r.logf("  TTL clears %s's subscriptions %v", u.id, u.subs)
			u.subs = nil
		}
	}
	for _, s := range startLive {
		batch := map[string][]*fzEvent{}
		var order []string
		if evs := own[s]; len(evs) > 0 {
			batch[s.user.id] = evs
			order = append(order, s.user.id)
		}
		var maybe []*fzEvent
		for _, t := range r.users {
			if len(t.events) == 0 || !slices.Contains(watchers[t.id], s.user) {
				continue
			}
			if ended[s] {
				maybe = append(maybe, t.events[len(t.events)-1])
				continue
			}
			batch[t.id] = t.events
			order = append(order, t.id)
		}
		switch {
		case len(maybe) > 0:
			r.goFuzzy(s)
			for _, t := range order {
				s.pushFuzzy(batch[t][len(batch[t])-1], true)
			}
			for _, ev := range maybe {
				s.pushFuzzy(ev, false)
			}
		case len(order) == 1:
			for _, ev := range batch[order[0]] {
				r.push(s, ev)
			}
		case len(order) > 1:
			r.pushGroup(s, batch, order)
		}
	}
}

func (r *fzRun) expireOne(u *fzUser, ended map[*fzSession]bool, own map[*fzSession][]*fzEvent) bool {
	for i, d := range u.devices {
		prevStatus, prevCustom := u.status, u.custom
		var ev *fzEvent
		switch {
		case d.sess != nil && r.now >= d.lastSeen+fzHeartbeat:
			r.logf("  timeout %s/%s", u.id, d.id)
			ended[d.sess] = true
			r.endSession(d.sess, ReasonTimeout)
			d.sess = nil
			ev = r.settle(u, prevStatus, prevCustom, ReasonTimeout, d.id, nil)
		case d.sess == nil && d.graceUntil != 0 && r.now >= d.graceUntil:
			r.logf("  grace over %s/%s", u.id, d.id)
			d.graceUntil = 0
			ev = r.settle(u, prevStatus, prevCustom, ReasonLinkClose, d.id, nil)
		case d.sess == nil && d.graceUntil == 0 && r.now >= d.lastSeen+fzExpiry:
			r.logf("  expiry %s/%s", u.id, d.id)
			u.devices = slices.Delete(u.devices, i, i+1)
			ev = r.settle(u, prevStatus, prevCustom, ReasonExpired, d.id, nil)
		default:
			continue
		}
		if ev != nil {
			for _, s := range u.liveSessions() {
				own[s] = append(own[s], ev)
			}
		}
		return true
	}
	return false
}

// --- operations ----------------------------------------------------------

func (r *fzRun) sleep(n int) {
	r.logf("sleep %ds", n)
	for range n {
		time.Sleep(time.Second)
		synctest.Wait()
		r.now++
		if !r.closed {
			r.tick()
		}
		r.afterStep()
	}
}

func (r *fzRun) opLogin() {
	uid, did := r.userID(), r.deviceID()
	r.logf("Login(%q, %q)", uid, did)
	want := r.preCheck(fzValid(uid) && fzValid(did))
	s, err := r.e.Login(uid, did)
	if !r.check("Login", err, want) {
		if s != nil {
			r.fail("Login returned a session with an error")
		}
		r.afterStep()
		return
	}
	if s == nil || s.UserID() != uid || s.DeviceID() != did {
		r.fail("Login returned session %v", s)
	}
	u := r.byID[uid]
	prevStatus, prevCustom := u.status, u.custom
	i, d := u.device(did)
	if d != nil {
		if d.sess != nil {
			r.endSession(d.sess, ReasonLogin)
		}
		d.graceUntil = 0
		u.devices = slices.Delete(u.devices, i, i+1)
	} else {
		d = &fzDevice{id: did}
	}
	u.devices = append(u.devices, d)
	var kicked []string
	if max := r.cfg.MaxDevices; max > 0 && len(u.devices) > max {
		for _, old := range u.devices[:len(u.devices)-max] {
			if old.sess != nil {
				r.endSession(old.sess, ReasonKicked)
			}
			kicked = append(kicked, old.id)
		}
		u.devices = slices.Clone(u.devices[len(u.devices)-max:])
	}
	ms := &fzSession{s: s, name: fmt.Sprintf("%s/%s#%d", uid, did, len(r.sessions)), user: u, live: true, lastVer: map[string]uint64{}}
	r.sessions = append(r.sessions, ms)
	d.sess, d.loginAt, d.lastSeen = ms, r.now, r.now
	r.deliver(r.settle(u, prevStatus, prevCustom, ReasonLogin, did, kicked))
	r.afterStep()
}

func (r *fzRun) logoutDevice(u *fzUser, i int) {
	prevStatus, prevCustom := u.status, u.custom
	d := u.devices[i]
	if d.sess != nil {
		r.endSession(d.sess, ReasonLogout)
	}
	u.devices = slices.Delete(u.devices, i, i+1)
	r.deliver(r.settle(u, prevStatus, prevCustom, ReasonLogout, d.id, nil))
}

func (r *fzRun) opLogout() {
	uid, did := r.userID(), r.deviceID()
	r.logf("Logout(%q, %q)", uid, did)
	want := r.preCheck(fzValid(uid) && fzValid(did))
	i := -1
	if want == nil {
		if i, _ = r.byID[uid].device(did); i < 0 {
			want = ErrNotLoggedIn
		}
	}
	if r.check("Logout", r.e.Logout(uid, did), want) {
		r.logoutDevice(r.byID[uid], i)
	}
	r.afterStep()
}

// sessionCall is the common start of the Session methods.
func (r *fzRun) sessionCall(s *fzSession) *Error {
	switch {
	case r.closed:
		return ErrClosed
	case !s.live:
		return ErrSessionEnded
	}
	return nil
}

func (r *fzRun) opSessionLogout() {
	s := r.pickSession(r.next())
	if s == nil {
		return
	}
	r.logf("%s.Logout()", s.name)
	if r.check("Session.Logout", s.s.Logout(), r.sessionCall(s)) {
		i, _ := s.user.deviceOf(s)
		r.logoutDevice(s.user, i)
	}
	r.afterStep()
}

func (r *fzRun) opDisconnect() {
	s := r.pickSession(r.next())
	if s == nil {
		return
	}
	r.logf("%s.Disconnect()", s.name)
	if r.check("Disconnect", s.s.Disconnect(), r.sessionCall(s)) {
		u := s.user
		prevStatus, prevCustom := u.status, u.custom
		_, d := u.deviceOf(s)
		r.endSession(s, ReasonLinkClose)
		d.sess, d.lastSeen = nil, r.now
		// Held while no device is connected, even when another device's
		// disconnect is already held: each device gets its own grace
		// (engine commit b19456c; the semantics notes still say "no online
		// device", which would count held devices).
		if r.cfg.DisconnectGrace > 0 && len(u.liveSessions()) == 0 {
			d.graceUntil = r.now + int64(r.cfg.DisconnectGrace/time.Second)
		} else {
			r.deliver(r.settle(u, prevStatus, prevCustom, ReasonLinkClose, d.id, nil))
		}
	}
	r.afterStep()
}

// opHeartbeat beats one session, every live session of one user (n%4 == 1),
// or every live session (n%4 == 0), as a host's heartbeat loop would: that
// keeps watchers alive while the users they watch time out together.
func (r *fzRun) opHeartbeat() {
	b := r.next()
	if len(r.sessions) == 0 {
		return
	}
	var targets []*fzSession
	switch b % 4 {
	case 0:
		for _, s := range r.sessions {
			if s.live {
				targets = append(targets, s)
			}
		}
	case 1:
		targets = r.users[b>>2%4].liveSessions()
	default:
		targets = []*fzSession{r.pickSession(b)}
	}
	for _, s := range targets {
		r.logf("%s.Heartbeat()", s.name)
		if r.check("Heartbeat", s.s.Heartbeat(), r.sessionCall(s)) {
			_, d := s.user.deviceOf(s)
			d.lastSeen = r.now
		}
	}
	r.afterStep()
}

func (r *fzRun) opSetCustom() {
	uid, text := r.userID(), fzTexts[int(r.next())%len(fzTexts)]
	r.logf("SetSelfStatus(%q, %.12q)", uid, text)
	want := r.preCheck(fzValid(uid) && len(text) <= 100 && utf8.ValidString(text))
	if want == nil && r.byID[uid].status != Online {
		want = ErrNotLoggedIn
	}
	if r.check("SetSelfStatus", r.e.SetSelfStatus(uid, text), want) {
		u := r.byID[uid]
		if u.custom != text {
			prevCustom := u.custom
			u.custom = text
			r.deliver(r.settle(u, Online, prevCustom, ReasonCustomStatus, "", nil))
		}
	}
	r.afterStep()
}

func (r *fzRun) opGet() {
	caller := r.userID()
	ids := r.idList(r.next(), r.cfg.MaxQueryIDs)
	r.logf("GetUserStatus(%q, %q)", caller, ids)
	selfOnly := !slices.ContainsFunc(ids, func(id string) bool { return id != caller })
	want := r.preCheck(fzValid(caller) && len(ids) >= 1 && len(ids) <= r.cfg.MaxQueryIDs && fzAllValid(ids))
	switch {
	case want != nil, selfOnly:
	case !r.cfg.StatusQuery:
		want = ErrFeatureDisabled
	case !r.allow("query", caller):
		want = ErrRateLimited
	}
	got, err := r.e.GetUserStatus(caller, ids)
	if r.check("GetUserStatus", err, want) {
		if len(got) != len(ids) {
			r.fail("GetUserStatus returned %d entries for %d IDs", len(got), len(ids))
		}
		for i, id := range ids {
			u := r.byID[id]
			var devices []string
			if id == caller {
				devices = u.onlineDevices()
			}
			g := got[i]
			if g.UserID != id || g.Status != u.status || g.Custom != u.custom || !slices.Equal(g.Devices, devices) || g.Version != u.lastRead {
				r.fail("GetUserStatus entry %d = %+v, want %s %v %q devices %q version %d", i, g, id, u.status, u.custom, devices, u.lastRead)
			}
		}
	} else if got != nil {
		r.fail("GetUserStatus returned entries with an error")
	}
	r.afterStep()
}

func (r *fzRun) opSubscribe() {
	caller := r.userID()
	ids := r.idList(r.next(), r.cfg.MaxSubscribeIDs)
	r.logf("SubscribeUserStatus(%q, %q)", caller, ids)
	want := r.preCheck(fzValid(caller) && len(ids) >= 1 && len(ids) <= r.cfg.MaxSubscribeIDs && fzAllValid(ids) && !slices.Contains(ids, caller))
	switch {
	case want != nil:
	case !r.cfg.StatusQuery:
		want = ErrFeatureDisabled
	case !r.allow("subscribe", caller):
		want = ErrRateLimited
	}
	evicted, err := r.e.SubscribeUserStatus(caller, ids)
	if !r.check("SubscribeUserStatus", err, want) {
		if evicted != nil {
			r.fail("SubscribeUserStatus evicted %q with an error", evicted)
		}
		r.afterStep()
		return
	}
	cu := r.byID[caller]
	seen := map[string]bool{}
	for _, id := range ids {
		if seen[id] {
			continue
		}
		seen[id] = true
		t := r.byID[id]
		ev := &fzEvent{target: id, status: t.status, custom: t.custom, reason: ReasonSubscribed}
		t.events = append(t.events, ev)
		for _, s := range cu.liveSessions() {
			r.push(s, ev)
		}
	}
	for _, id := range ids {
		cu.subs = append(slices.DeleteFunc(cu.subs, func(s string) bool { return s == id }), id)
	}
	var wantEvicted []string
	for len(cu.subs) > r.cfg.MaxSubscriptions {
		wantEvicted = append(wantEvicted, cu.subs[0])
		cu.subs = slices.Delete(cu.subs, 0, 1)
	}
	if cu.status != Online {
		cu.idleSince = r.now
	}
	if !slices.Equal(evicted, wantEvicted) || (evicted == nil) != (wantEvicted == nil) {
		r.fail("SubscribeUserStatus evicted %q, want %q", evicted, wantEvicted)
	}
	r.afterStep()
}

func (r *fzRun) opUnsubscribe() {
	caller := r.userID()
	n := r.next()
	ids := r.idList(n>>1, r.cfg.MaxSubscribeIDs)
	if ids == nil && n&1 != 0 {
		ids = []string{}
	}
	r.logf("UnsubscribeUserStatus(%q, %#v)", caller, ids)
	want := r.preCheck(fzValid(caller) && len(ids) <= r.cfg.MaxSubscribeIDs && fzAllValid(ids))
	switch {
	case want != nil:
	case !r.cfg.StatusQuery:
		want = ErrFeatureDisabled
	case !r.allow("unsubscribe", caller):
		want = ErrRateLimited
	}
	if r.check("UnsubscribeUserStatus", r.e.UnsubscribeUserStatus(caller, ids), want) {
		cu := r.byID[caller]
		if len(ids) == 0 {
			cu.subs = nil
		}
		cu.subs = slices.DeleteFunc(cu.subs, func(s string) bool { return slices.Contains(ids, s) })
	}
	r.afterStep()
}

func (r *fzRun) opFriends(add bool) {
	uid := r.userID()
	ids := r.idList(r.next(), 2)
	name := "RemoveFriends"
	if add {
		name = "AddFriends"
	}
	r.logf("%s(%q, %q)", name, uid, ids)
	want := r.preCheck(fzValid(uid) && len(ids) >= 1 && fzAllValid(ids) && !slices.Contains(ids, uid))
	var err error
	if add {
		if want == nil {
			fresh := map[string]bool{}
			for _, id := range ids {
				if !r.byID[uid].friends[id] {
					fresh[id] = true
				}
			}
			if len(r.byID[uid].friends)+len(fresh) > r.cfg.MaxFriends {
				want = ErrInvalidParam
			}
		}
		err = r.e.AddFriends(uid, ids...)
	} else {
		err = r.e.RemoveFriends(uid, ids...)
	}
	if r.check(name, err, want) {
		for _, id := range ids {
			if add {
				r.byID[uid].friends[id] = true
			} else {
				delete(r.byID[uid].friends, id)
			}
		}
	}
	r.afterStep()
}

func (r *fzRun) opKick() {
	uid := r.userID()
	r.logf("Kick(%q)", uid)
	want := r.preCheck(fzValid(uid))
	if want == nil && len(r.byID[uid].devices) == 0 {
		want = ErrNotLoggedIn
	}
	if r.check("Kick", r.e.Kick(uid), want) {
		u := r.byID[uid]
		prevStatus, prevCustom := u.status, u.custom
		var kicked []string
		for _, d := range u.devices {
			if d.sess != nil {
				r.endSession(d.sess, ReasonKicked)
			}
			kicked = append(kicked, d.id)
		}
		u.devices = nil
		r.deliver(r.settle(u, prevStatus, prevCustom, ReasonKicked, "", kicked))
	}
	r.afterStep()
}

func (r *fzRun) opDrain() {
	b := r.next()
	if len(r.sessions) == 0 {
		return
	}
	if b%4 == 0 {
		r.logf("drain all")
		for _, s := range r.sessions {
			r.drain(s)
		}
	} else {
		s := r.pickSession(b)
		r.logf("drain %s", s.name)
		r.drain(s)
	}
	r.afterStep()
}

func (r *fzRun) opClose() {
	r.logf("Close")
	if err := r.e.Close(); err != nil {
		r.fail("Close: %v", err)
	}
	if err := r.e.Close(); err != nil {
		r.fail("second Close: %v", err)
	}
	if !r.closed {
		for _, s := range r.sessions {
			if s.live {
				r.endSession(s, 0)
			}
		}
		for _, u := range r.users {
			for _, d := range u.devices {
				d.sess = nil
			}
		}
	}
	r.closed = true
	if ch := r.e.Changes(); ch != nil {
		for range ch { // records of earlier steps were all read: the channel must be closed and empty
			r.fail("change feed holds a record after Close")
		}
	}
	r.afterStep()
}

// --- comparisons ---------------------------------------------------------

// drain takes s's pending events and compares them with the model.
func (r *fzRun) drain(s *fzSession) {
	var token bool
	select {
	case <-s.s.Ready():
		token = true
	default:
	}
	got := s.s.Drain(nil)
	if token != (len(got) > 0) {
		r.fail("%s: Ready token %v with %d events pending", s.name, token, len(got))
	}
	if len(got) > r.cfg.FeedSize {
		r.fail("%s: drained %d events, FeedSize %d", s.name, len(got), r.cfg.FeedSize)
	}
	targets := map[string]bool{}
	for _, g := range got {
		if targets[g.UserID] {
			r.fail("%s: two pending events about %s: %+v", s.name, g.UserID, got)
		}
		targets[g.UserID] = true
		if len(g.Devices) != 0 {
			r.fail("%s: event lists devices: %+v", s.name, g)
		}
		if last, ok := s.lastVer[g.UserID]; ok && g.Version <= last && !(g.Version == last && g.Reason == ReasonSubscribed) {
			r.fail("%s: version of %s went from %d to %d (%v)", s.name, g.UserID, last, g.Version, g.Reason)
		}
		s.lastVer[g.UserID] = g.Version
	}
	if s.fuzzy {
		r.drainFuzzy(s, got, targets)
		return
	}
	if len(got) != len(s.box) {
		r.fail("%s: drained %s, want %s", s.name, fzFmtEvents(got), fzFmtBox(s.box))
	}
	for i := 0; i < len(s.box); {
		j := i
		for j < len(s.box) && s.box[j].group == s.box[i].group {
			j++
		}
		// got[i:j] must hold the group's events in any order.
		for _, en := range s.box[i:j] {
			k := slices.IndexFunc(got[i:j], func(g Event) bool { return g.UserID == en.ev.target })
			if k < 0 || !fzMatch(got[i+k], en.ev) {
				r.fail("%s: drained %s, want %s", s.name, fzFmtEvents(got), fzFmtBox(s.box))
			}
		}
		i = j
	}
	s.box = nil
}

func (r *fzRun) drainFuzzy(s *fzSession, got []Event, targets map[string]bool) {
	for _, g := range got {
		if !slices.ContainsFunc(s.cand[g.UserID], func(ev *fzEvent) bool { return fzMatch(g, ev) }) {
			r.fail("%s: drained %s: %+v is none of %v", s.name, fzFmtEvents(got), g, s.cand[g.UserID])
		}
	}
	if min(r.cfg.FeedSize, len(s.definite)) > len(got) {
		r.fail("%s: drained %s, but %d users' events were surely pushed", s.name, fzFmtEvents(got), len(s.definite))
	}
	all := len(s.definite)
	for t := range s.possible {
		if !s.definite[t] {
			all++
		}
	}
	missing := 0
	for t := range s.definite {
		if !targets[t] {
			missing++
		}
	}
	if all <= r.cfg.FeedSize && missing > 0 {
		r.fail("%s: drained %s: %d surely pushed users missing with no overflow possible (%v)", s.name, fzFmtEvents(got), missing, s.cand)
	}
	if lost := s.s.Lost(); lost-s.lost < uint64(missing) {
		r.fail("%s: %d users' events missing but Lost grew by %d", s.name, missing, lost-s.lost)
	}
	s.lost = s.s.Lost()
	s.fuzzy, s.box, s.cand, s.definite, s.possible = false, nil, nil, nil, nil
}

func fzMatch(g Event, ev *fzEvent) bool {
	return g.UserID == ev.target && g.Status == ev.status && g.Custom == ev.custom && g.Reason == ev.reason &&
		len(g.Devices) == 0 && (!ev.verKnown || g.Version == ev.ver)
}

func fzFmtEvents(evs []Event) string {
	var b strings.Builder
	for _, g := range evs {
		fmt.Fprintf(&b, "{%s %v %q %v v%d}", g.UserID, g.Status, g.Custom, g.Reason, g.Version)
	}
	return "[" + b.String() + "]"
}

func fzFmtBox(box []fzEntry) string {
	var b strings.Builder
	for _, en := range box {
		fmt.Fprintf(&b, "%d:%v", en.group, en.ev)
	}
	return "[" + b.String() + "]"
}

// afterStep compares everything observable with the model and closes the step.
func (r *fzRun) afterStep() {
	r.t.Helper()
	if r.closed {
		r.checkClosed()
	} else {
		r.checkUsers()
		r.checkSessions()
		r.checkStats()
		r.checkFeed()
		if err := r.e.checkInvariants(); err != nil {
			r.fail("invariants: %v", err)
		}
	}
	for _, u := range r.users {
		u.changed, u.events, u.records = false, nil, nil
	}
}

func (r *fzRun) checkUsers() {
	ids := append(slices.Clone(fzUsers), fzBadIDs[2])
	qs := r.e.QueryOnlineStatus(ids)
	if len(qs) != len(ids) {
		r.fail("QueryOnlineStatus returned %d entries for %d IDs", len(qs), len(ids))
	}
	if q := qs[len(ids)-1]; q.UserID != fzBadIDs[2] || q.Status != Unknown || q.Version != 0 || q.Sessions != nil {
		r.fail("QueryOnlineStatus of an invalid ID = %+v", q)
	}
	for i, u := range r.users {
		q := qs[i]
		if q.UserID != u.id || q.Status != u.status || q.Custom != u.custom || !slices.Equal(q.Devices, u.onlineDevices()) {
			r.fail("%s: engine %v %q devices %q, model %v %q devices %q", u.id, q.Status, q.Custom, q.Devices, u.status, u.custom, u.onlineDevices())
		}
		if len(q.Sessions) != len(u.devices) {
			r.fail("%s: engine devices %+v, model %d devices", u.id, q.Sessions, len(u.devices))
		}
		for j, d := range u.devices {
			si := q.Sessions[j]
			if si.DeviceID != d.id || si.Connected != (d.sess != nil) || !si.LoginAt.Equal(r.at(d.loginAt)) || !si.LastSeen.Equal(r.at(d.lastSeen)) {
				r.fail("%s: engine device %+v, model %s connected %v login t=%d seen t=%d", u.id, si, d.id, d.sess != nil, d.loginAt, d.lastSeen)
			}
		}
		v := q.Version
		switch {
		case u.changed && v == 0 && u.status != Unlogined:
			r.fail("%s changed to %v but reads version 0", u.id, u.status)
		case u.changed && v != 0 && v <= u.maxVer:
			r.fail("%s changed but its version went from %d to %d", u.id, u.maxVer, v)
		case !u.changed && u.status != Unlogined && v != u.lastRead:
			r.fail("%s did not change but its version went from %d to %d", u.id, u.lastRead, v)
		case !u.changed && v != 0 && v < u.maxVer:
			r.fail("%s: version went back from %d to %d", u.id, u.maxVer, v)
		}
		if len(u.events) > 0 && v != 0 {
			last := u.events[len(u.events)-1]
			last.ver, last.verKnown = v, true
		}
		u.maxVer, u.lastRead = max(u.maxVer, v), v
		subs := r.e.Subscriptions(u.id)
		if !slices.Equal(subs, u.subs) || (len(u.subs) == 0 && subs != nil) {
			r.fail("Subscriptions(%s) = %q, want %q", u.id, subs, u.subs)
		}
	}
}

func (r *fzRun) checkSessions() {
	for _, s := range r.sessions {
		r.checkEnded(s)
		s.s.mu.Lock()
		n := s.s.box.len()
		s.s.mu.Unlock()
		if n > r.cfg.FeedSize {
			r.fail("%s: %d events pending, FeedSize %d", s.name, n, r.cfg.FeedSize)
		}
		if s.fuzzy {
			if n < min(r.cfg.FeedSize, len(s.definite)) {
				r.fail("%s: %d events pending, but %d users' events were surely pushed", s.name, n, len(s.definite))
			}
			continue
		}
		if n != len(s.box) || s.s.Lost() != s.lost {
			r.fail("%s: %d events pending and %d lost, model %s and %d lost", s.name, n, s.s.Lost(), fzFmtBox(s.box), s.lost)
		}
	}
}

func (r *fzRun) checkEnded(s *fzSession) {
	var done bool
	select {
	case <-s.s.Done():
		done = true
	default:
	}
	if done == s.live || s.s.EndReason() != s.end {
		r.fail("%s: Done closed %v, EndReason %v; model live %v, ended by %v", s.name, done, s.s.EndReason(), s.live, s.end)
	}
}

func (r *fzRun) checkStats() {
	var want Stats
	for _, u := range r.users {
		if u.status != Unlogined {
			want.Users++
		}
		if u.status == Online {
			want.Online++
		}
		want.Sessions += len(u.liveSessions())
		want.Subscriptions += len(u.subs)
		want.Friendships += len(u.friends)
	}
	var lost uint64
	for _, s := range r.sessions {
		lost += s.s.Lost()
	}
	want.Lost = lost
	if r.countersExact {
		want.Delivered, want.Coalesced = r.delivered, r.coalesced
	}
	got := r.e.Stats()
	if !r.countersExact {
		got.Delivered, got.Coalesced = 0, 0
	}
	if got != want {
		r.fail("Stats = %+v, want %+v", got, want)
	}
}

func (r *fzRun) checkFeed() {
	ch := r.e.Changes()
	if ch == nil {
		if r.cfg.ChangeFeedSize != 0 {
			r.fail("Changes() is nil with ChangeFeedSize %d", r.cfg.ChangeFeedSize)
		}
		return
	}
	got := map[string][]Change{}
	for more := true; more; {
		select {
		case c := <-ch:
			got[c.UserID] = append(got[c.UserID], c)
		default:
			more = false
		}
	}
	for _, u := range r.users {
		g, w := got[u.id], u.records
		delete(got, u.id)
		ok := len(g) == len(w)
		for i := 0; ok && i < len(g); i++ {
			ok = g[i].Time.Equal(w[i].Time) && g[i].UserID == w[i].UserID && g[i].DeviceID == w[i].DeviceID &&
				g[i].Reason == w[i].Reason && g[i].Status == w[i].Status && g[i].Custom == w[i].Custom && slices.Equal(g[i].Kicked, w[i].Kicked)
		}
		if !ok {
			r.fail("change feed of %s: %+v, want %+v", u.id, g, w)
		}
	}
	if len(got) > 0 {
		r.fail("change feed records of unknown users: %+v", got)
	}
}

func (r *fzRun) checkClosed() {
	for _, s := range r.sessions {
		r.checkEnded(s)
	}
	if qs := r.e.QueryOnlineStatus(fzUsers); qs != nil {
		r.fail("QueryOnlineStatus after Close = %+v", qs)
	}
	for _, id := range fzUsers {
		if subs := r.e.Subscriptions(id); subs != nil {
			r.fail("Subscriptions(%s) after Close = %q", id, subs)
		}
	}
}
