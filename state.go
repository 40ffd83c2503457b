package presence

import (
	"sync"
	"sync/atomic"
	"time"
)

// shard holds the user records whose IDs hash to it.
type shard struct {
	mu      sync.Mutex       // protects users, clash, version, the counters and deviceIDs below, and every record in them
	users   map[uint64]*user // hash of the user ID -> record
	clash   map[string]*user // records whose hash another record already holds in users; nil while there are none
	version uint64           // last version handed out here; records take theirs from it

	// Counters for Stats, kept as records change so Stats never scans.
	loggedIn, online, sessions, subscriptions, friendships int

	deviceIDs [8]string // copies of device IDs used lately, shared by the devices that bear them: see deviceIDLocked

	e       *Engine // to hash a record's ID again, and to tell whether it has a wheel entry pending
	records bool    // changes produce Change records (the change feed is on)

	// ownDelivered counts, under mu, the events of changes that only the
	// user's own sessions hear of, as each change is applied: one per
	// session it is about to reach (see Engine.finish). It spares the most
	// common change an atomic operation; the rare event that does not land
	// after all is taken off delivered below. Stats adds the two.
	ownDelivered uint64

	// Delivery counters for Stats, bumped after the lock is released by the
	// deliveries of this shard's users. One set per shard, on a cache line
	// of its own, so that cores delivering for different users do not fight
	// over one counter.
	_                          [64]byte
	delivered, coalesced, lost atomic.Uint64
	_                          [40]byte

	// edgeMu serializes changes to the outgoing edges (subscription lists and
	// friend lists) of this shard's users. Such a change touches records in
	// other shards one lock at a time; holding edgeMu throughout keeps two of
	// them on the same user from interleaving. It is taken before mu and
	// never while any shard's mu is held.
	edgeMu sync.Mutex

	_ [64]byte // keep neighbouring shards' locks off one cache line
}

// user is everything the engine knows of one user ID. The record is dropped
// once it holds nothing (see dropIfEmptyLocked); versions come from the
// shard's counter, so a record made again later still moves forward.
type user struct {
	id      string
	custom  string
	version uint64
	devices *device // first of the logged-in devices, oldest login first; each links the next
	timerAt int32   // wheel tick of this record's earliest pending entry, 0 if none (ticks of a second: 68 years of uptime)
	pins    int16   // edge changes in progress that hold a pointer to this record: one at a time, under the shard's edgeMu (see Engine.pin)
	status  Status

	// sessions lists the connected sessions. It is replaced, never changed in
	// place, so a delivery reads it without the shard lock.
	sessions atomic.Pointer[sessionList]

	// edges holds the user's subscriptions and friendships, both directions;
	// nil until the user has any, so a user without them costs nothing more.
	// It is set once, under the shard lock, and read by deliveries through
	// the atomic pointer.
	edges atomic.Pointer[edges]

	// fanMu is taken under the shard lock when a change of this user that
	// watchers or the change feed hear of is applied (or the change is
	// queued on fanQ for the holder), and released once that change has
	// been delivered, after the shard lock: such deliveries happen one at a
	// time in version order while the shard stays free. (A change only the
	// user's own sessions hear of goes without it: see Engine.finish.) It also guards the reverse
	// indexes (edges.subscribers, edges.friendOf) for the delivery, which
	// reads them without the shard lock; they are written with both held.
	//
	// Whoever holds fanMu with the shard lock released must let go of it
	// through releaseFan, and holds it only while fanQ (if any) is empty or
	// being drained: so whenever fanMu is free, nothing is queued.
	fanMu sync.Mutex
}

// fanQueue is a user's hand-off queue of changes waiting for delivery.
type fanQueue struct {
	mu    sync.Mutex // protects items; taken after the shard lock and after fanMu
	items []change
}

// edges are one user's subscription and friend edges. The forward lists
// (subs, friends) are guarded by the owner's shard lock; the reverse indexes
// also by the owner's fanMu (see user).
type edges struct {
	subs        fifo[*user, struct{}] // users this user subscribes to, oldest first
	friends     userSet               // users this user is notified about as friends
	subscribers userSet               // users subscribed to this user
	friendOf    userSet               // users that list this user as a friend

	// idleSince (unix ns) is when the user last left Online, or last
	// subscribed while not Online: the subscription TTL counts from it. It
	// matters only while the user has subscriptions, so it lives here
	// rather than in the record.
	idleSince int64

	// fanQ takes changes applied while an earlier change of this user is
	// still being delivered, so that the shard lock is not held waiting for
	// fanMu; the goroutine delivering drains it, in order, before letting
	// go. It is made (under the shard lock and fanMu) when a change of a
	// user with watchers is delivered: without watchers a delivery is short.
	// It is never removed, and lives here rather than in the record, which
	// every user pays for.
	fanQ *fanQueue
}

// edgesLocked returns u's edges, making them if needed. Call with the shard
// lock held.
func (u *user) edgesLocked() *edges {
	ed := u.edges.Load()
	if ed == nil {
		ed = &edges{}
		u.edges.Store(ed)
	}
	return ed
}

// subCount returns the number of u's subscriptions. Call with the shard lock held.
func (u *user) subCount() int {
	if ed := u.edges.Load(); ed != nil {
		return ed.subs.len()
	}
	return 0
}

// device is one logged-in device of a user.
type device struct {
	id         string
	session    *Session // nil while disconnected
	loginAt    int64    // unix ns of the latest login
	lastSeen   int64    // unix ns of the latest login, heartbeat or disconnect
	graceUntil int64    // unix ns: while nonzero, the device counts as online though it has no session
	held       Reason   // what happens when graceUntil passes: ReasonLinkClose (DisconnectGrace) or ReasonTimeout (restored from a Store)
	next       *device  // the user's next newer login; a list keeps the record smaller than a slice would, and users have few devices
}

// eachDevice yields the user's devices, oldest login first. Call it with
// the shard lock held; a loop that changes the list must stop right there.
func (u *user) eachDevice(yield func(*device) bool) {
	for d := u.devices; d != nil; d = d.next {
		if !yield(d) {
			return
		}
	}
}

// appendDevice adds d as the newest login.
func (u *user) appendDevice(d *device) {
	at := &u.devices
	for *at != nil {
		at = &(*at).next
	}
	*at = d
}

// unlinkDevice takes d off the list, keeping the others' order.
func (u *user) unlinkDevice(d *device) {
	for at := &u.devices; *at != nil; at = &(*at).next {
		if *at == d {
			*at = d.next
			d.next = nil
			return
		}
	}
}

// deviceCount returns the number of logged-in devices.
func (u *user) deviceCount() int {
	n := 0
	for d := u.devices; d != nil; d = d.next {
		n++
	}
	return n
}

// deviceIDLocked returns the shard's copy of id for a new device. Most devices
// bear one of a few IDs ("phone", "web"), so a device shares a recent
// copy when there is one, instead of holding the same bytes again: a
// million users' devices then keep a handful of copies, and a login
// allocates nothing for its device ID. The table is direct-mapped and
// never grows; an ID that is not there takes its slot, so IDs seen once
// (per-install IDs, hostile ones) only churn it. It keeps at most eight
// IDs a shard alive after their devices are gone: a few hundred bytes
// normally, at worst 8 × 64 KiB for IDs restored from a damaged Store.
// Call with the lock held.
func (sh *shard) deviceIDLocked(id string) string {
	if id == "" {
		return ""
	}
	slot := &sh.deviceIDs[(len(id)+int(id[0])+int(id[len(id)-1]))%len(sh.deviceIDs)]
	if *slot != id {
		*slot = cloneString(id)
	}
	return *slot
}

// online reports whether the device keeps its user Online.
func (d *device) online() bool { return d.session != nil || d.graceUntil != 0 }

// deriveStatus computes the general status from the devices.
func (u *user) deriveStatus() Status {
	if u.devices == nil {
		return Unlogined
	}
	for d := range u.eachDevice {
		if d.online() {
			return Online
		}
	}
	return Offline
}

// connected reports whether any device has a live session.
func (u *user) connected() bool {
	for d := range u.eachDevice {
		if d.session != nil {
			return true
		}
	}
	return false
}

func (u *user) device(id string) *device {
	for d := range u.eachDevice {
		if d.id == id {
			return d
		}
	}
	return nil
}

// emptyLocked reports whether the record holds nothing worth keeping.
func (u *user) emptyLocked() bool {
	if u.devices != nil || u.custom != "" || u.pins != 0 {
		return false
	}
	ed := u.edges.Load()
	return ed == nil || ed.subs.len() == 0 && ed.friends.len() == 0 && ed.subscribers.len() == 0 && ed.friendOf.len() == 0
}

// viewInto sets *st to the user's state as a reader sees it, without
// device detail. It writes field by field rather than copying a UserStatus
// value: the compiler builds such a value in a temporary with narrow stores
// and copies it on with wide loads, which stall store forwarding (that was a
// sixth of SetSelfStatus's time).
func (u *user) viewInto(st *UserStatus) {
	*st = UserStatus{}
	st.UserID, st.Status, st.Custom, st.Version = u.id, u.status, u.custom, u.version
}

// onlineDevices lists the IDs of the devices keeping the user Online.
func (u *user) onlineDevices() []string {
	var ids []string
	for d := range u.eachDevice {
		if d.online() {
			ids = append(ids, d.id)
		}
	}
	return ids
}

// publishSessionsLocked replaces the list of connected sessions after a
// device gained or lost its session.
func (u *user) publishSessionsLocked() {
	n := 0
	for d := range u.eachDevice {
		if d.session != nil {
			n++
		}
	}
	if n == 0 {
		u.sessions.Store(nil)
		return
	}
	if n == 1 {
		// The usual single session: its own list, made with it, is never
		// changed, so publishing it allocates nothing.
		for d := range u.eachDevice {
			if d.session != nil {
				u.sessions.Store(&d.session.solo)
				return
			}
		}
	}
	l := &sessionList{all: make([]*Session, 0, n)}
	for d := range u.eachDevice {
		if d.session != nil {
			l.all = append(l.all, d.session)
		}
	}
	u.sessions.Store(l)
}

// sessionList is a published, never modified list of a user's connected
// sessions.
type sessionList struct {
	all []*Session
}

// key names a user ID and its hash, computed once per call by
// Engine.locate. The shard's index is keyed by the hash alone: hashing an
// 8-byte key and comparing it is cheaper than hashing and comparing the
// string, and the slot is smaller. Two IDs with one 64-bit hash are
// possible, if unlikely (odds of about 1 in 3*10^7 at a million users), so
// such a second ID goes to shard.clash, keyed by the ID itself.
type key struct {
	hash uint64
	id   string
}

func (sh *shard) getLocked(k key) *user {
	if u := sh.users[k.hash]; u != nil && u.id == k.id {
		return u
	}
	if sh.clash != nil {
		return sh.clash[k.id]
	}
	return nil
}

// holdsLocked reports whether u is the live record for its ID.
func (sh *shard) holdsLocked(u *user) bool {
	return sh.users[sh.e.hash(u.id)] == u || (sh.clash != nil && sh.clash[u.id] == u)
}

// getOrCreateLocked returns the record for k, making an empty one if needed.
// The caller must leave it non-empty or call dropIfEmptyLocked.
func (sh *shard) getOrCreateLocked(k key) *user {
	if u := sh.getLocked(k); u != nil {
		return u
	}
	return sh.createLocked(k, new(user))
}

// createLocked makes u, a zero record, the record for k, which the shard
// does not hold, and returns it. (A restore passes records carved from
// blocks of them.)
func (sh *shard) createLocked(k key, u *user) *user {
	// Clone: the caller's string may be a slice of a larger buffer, and the
	// record's copy is the one every index points at.
	u.id, u.status, u.version = cloneString(k.id), Unlogined, sh.version
	if sh.users[k.hash] == nil {
		sh.users[k.hash] = u
	} else {
		if sh.clash == nil {
			sh.clash = make(map[string]*user)
		}
		sh.clash[u.id] = u
	}
	return u
}

// deleteLocked removes u, which the shard holds, from the index. If u held
// a hash slot that a clashing record shares, that record takes the slot.
func (sh *shard) deleteLocked(u *user) {
	if h := sh.e.hash(u.id); sh.users[h] != u {
		delete(sh.clash, u.id)
	} else {
		delete(sh.users, h)
		for id, c := range sh.clash {
			if sh.e.hash(id) == h {
				sh.users[h] = c
				delete(sh.clash, id)
				break
			}
		}
	}
	if len(sh.clash) == 0 {
		sh.clash = nil
	}
}

// all yields every record the shard holds. Call with the lock held.
func (sh *shard) all(yield func(*user) bool) {
	for _, u := range sh.users {
		if !yield(u) {
			return
		}
	}
	for _, u := range sh.clash {
		if !yield(u) {
			return
		}
	}
}

// dropIfEmptyLocked deletes u's record if it holds nothing. A delivery of u's
// last change to watchers or the feed may still be under way: fanMu is then
// held, and the record stays until that delivery's own check. Every fanMu
// holder took it under this shard's lock, so TryLock succeeding here means
// none is in flight. (A delivery to u's own sessions alone may be: an empty
// record has no session left to take it in, so nothing hangs on the record.)
//
// A record with an entry still on the wheel stays too, until that entry
// fires: the wheel cannot cancel it, and dropping the record would leave the
// entry holding a dead record while a new one scheduled entries of its own,
// so a user logging in and out in a loop would grow the wheel without
// bound. Kept, the record is reused, entry and all.
func (sh *shard) dropIfEmptyLocked(u *user) {
	if !u.emptyLocked() || (u.timerAt != 0 && !sh.e.wheel.fired(int64(u.timerAt))) || !sh.holdsLocked(u) {
		return
	}
	if u.fanMu.TryLock() {
		sh.deleteLocked(u)
		// The record may live on, dead, in a restore's block (see block):
		// let its emptied edge sets go, whose memory never shrinks. Nothing
		// reads them after this: the record is out of the index, has no
		// edges, and no delivery to watchers is in flight (fanMu is held).
		u.edges.Store(nil)
		u.fanMu.Unlock()
	}
}

// countStatus moves the per-shard status counters from one status to another.
func (sh *shard) countStatus(from, to Status) {
	if from == to {
		return
	}
	if from == Online {
		sh.online--
	}
	if to == Online {
		sh.online++
	}
	if from == Unlogined {
		sh.loggedIn++
	}
	if to == Unlogined {
		sh.loggedIn--
	}
}

// change is one applied state change on its way out: built under the shard
// lock, delivered by Engine.finish after it. Every state change of a user's
// status, custom text or devices passes through it; the change feed (and the
// store and replication later) attach at finish.
type change struct {
	u          *user
	prevStatus Status
	prevCustom string

	record Change   // the feed record; Reason 0 means nothing to record
	kicked []string // devices this change pushed out, for the record
	notify bool     // status or custom text changed: deliver event
	event  Event

	// Sessions whose Done is closed once the locks are released: the first
	// two inline, any more in extra. (A slice over an inline array would
	// point into the change itself and send every change to the heap.)
	ended   [2]*Session
	nEnded  int
	extra   []*Session
	mayDrop bool // the record may be empty once this change is delivered
}

// begin starts a change of u; call it before changing anything.
func beginChange(u *user) change {
	return change{u: u, prevStatus: u.status, prevCustom: u.custom}
}

// endSession takes the device's session away and marks it ended at once,
// so that everything the session reports (EndReason, Heartbeat's error)
// agrees from this moment; its Done channel is closed by finish, after the
// locks, because closing it wakes readers.
func (c *change) endSession(sh *shard, d *device, why Reason) {
	if d.session == nil {
		return
	}
	d.session.markEnded(why)
	if c.nEnded < len(c.ended) {
		c.ended[c.nEnded] = d.session
		c.nEnded++
	} else {
		c.extra = append(c.extra, d.session)
	}
	d.session = nil
	sh.sessions--
}

// settleLocked derives the user's status after the change, clears the custom
// text when the user is no longer Online (in the same step), bumps the
// version when anything visible moved, and fills in the feed record. now
// may be zero only for a change that cannot move the status (SetSelfStatus
// with the change feed off): it would otherwise become the user's idleSince.
func (sh *shard) settleLocked(c *change, now time.Time, why Reason, deviceID string) {
	u := c.u
	st := u.deriveStatus()
	if st != Online {
		u.custom = ""
	}
	if st != c.prevStatus {
		sh.countStatus(c.prevStatus, st)
		u.status = st
		if ed := u.edges.Load(); ed != nil && c.prevStatus == Online {
			ed.idleSince = now.UnixNano()
		}
	}
	c.notify = st != c.prevStatus || u.custom != c.prevCustom
	if c.notify {
		sh.version++
		u.version = sh.version
		u.viewInto(&c.event.UserStatus)
		c.event.Reason = why
	}
	if sh.records { // with no change feed, nobody would read it
		c.record = Change{Time: now, UserID: u.id, DeviceID: deviceID, Reason: why, Status: st, Custom: u.custom, Kicked: c.kicked}
	}
	// Only a change that leaves no device can leave an empty record; any
	// other record that empties meanwhile is caught by this change's check
	// or by the check of whoever emptied it.
	c.mayDrop = u.devices == nil
}

// finish completes a change begun under sh.mu, which it releases, and
// delivers it after the shard lock is let go.
//
// A change that only u's own sessions hear of (nobody watches u, and the
// change feed is off) is delivered without the user's delivery lock: the
// common case, a user nobody watches, is spared that lock's two atomic
// operations. Two such changes of u made at once may then reach u's
// sessions in either order; a session keeps the newer one (see
// Session.push), which is what it would hold had it not read between them.
//
// Any other change takes the user's delivery lock first, under the shard
// lock, so u's changes reach watchers and the change feed one at a time in
// the order they were applied, while the shard stays free for its other
// users. If an earlier change of u is still being delivered (to thousands
// of watchers, say), the change is handed to the goroutine delivering it,
// and finish returns at once.
func (e *Engine) finish(sh *shard, c *change) {
	u := c.u
	if c.nEnded != 0 {
		e.ending.Add(1) // under the shard lock, so before Close's sweep of it
	}
	watched := e.watchedLocked(u)
	if e.feed == nil && !watched {
		// No delivery of u to its watchers can be under way: the last
		// watcher went under u's delivery lock, so after every delivery
		// to it had ended.
		var l *sessionList
		if c.notify {
			if l = u.sessions.Load(); l != nil {
				sh.ownDelivered += uint64(len(l.all))
			}
		}
		sh.mu.Unlock()
		if l != nil {
			var t tally
			for _, s := range l.all {
				s.push(&c.event, &t)
			}
			if missed := uint64(len(l.all)) - t.delivered; missed != 0 {
				sh.delivered.Add(-missed) // ended, or already holding a newer event
			}
			t.delivered = 0
			sh.addTally(t)
		}
		e.closeEnded(c)
		if c.mayDrop {
			sh.mu.Lock()
			sh.dropIfEmptyLocked(u)
			sh.mu.Unlock()
		}
		return
	}
	if q := u.fanQueue(); q != nil {
		// Whenever fanMu is free the queue is empty (see releaseFan), so a
		// TryLock that succeeds needs no look at the queue. Only when it
		// fails is the queue's lock taken, to hand the change over or to
		// find that the delivery ended meanwhile.
		if !u.fanMu.TryLock() {
			q.mu.Lock()
			if !u.fanMu.TryLock() {
				q.items = append(q.items, *c)
				q.mu.Unlock()
				sh.mu.Unlock()
				return
			}
			q.mu.Unlock()
		}
	} else {
		// No queue: any delivery under way is short (an edge change's, or
		// one that reaches only u's own sessions).
		u.fanMu.Lock()
		if watched { // the watchers cannot change while the shard lock is held
			u.edges.Load().fanQ = &fanQueue{}
		}
	}
	sh.mu.Unlock()
	sh.addTally(e.deliver(c))
	e.releaseFan(sh, u, c.mayDrop)
}

// fanQueue returns u's hand-off queue, nil if it has none. Call it holding
// the shard lock or fanMu.
func (u *user) fanQueue() *fanQueue {
	if ed := u.edges.Load(); ed != nil {
		return ed.fanQ
	}
	return nil
}

// watchedLocked reports whether a change of u reaches sessions other than
// u's own. Call it with u's shard lock held: the reverse indexes change only
// under it.
func (e *Engine) watchedLocked(u *user) bool {
	ed := u.edges.Load()
	return ed != nil && (ed.subscribers.len() > 0 || (e.cfg.NotifyFriends && ed.friendOf.len() > 0))
}

// deliver fans c's event out, publishes its record and closes the Done
// channels of the sessions it ended, and returns what the fan-out did for
// the counters. The caller holds u.fanMu and no shard lock.
func (e *Engine) deliver(c *change) (t tally) {
	if c.notify {
		t = e.fanOut(c.u, &c.event)
	}
	if c.record.Reason != 0 {
		e.publish(&c.record)
	}
	e.closeEnded(c)
	return t
}

// closeEnded closes the Done channels of the sessions c ended.
func (e *Engine) closeEnded(c *change) {
	if c.nEnded == 0 {
		return
	}
	for _, s := range c.ended[:c.nEnded] {
		s.closeDone()
	}
	for _, s := range c.extra {
		s.closeDone()
	}
	e.ending.Done()
}

// releaseFan delivers whatever was queued for u meanwhile, then lets go of
// u.fanMu, with the queue's lock held so that no change is queued after the
// last look. With drop set, or if a queued change asks for it, it then drops
// u's record if it has become empty. The caller holds u.fanMu and no shard
// lock.
func (e *Engine) releaseFan(sh *shard, u *user, drop bool) {
	if q := u.fanQueue(); q != nil {
		q.mu.Lock()
		for len(q.items) > 0 {
			batch := q.items
			q.items = nil
			q.mu.Unlock()
			for i := range batch {
				sh.addTally(e.deliver(&batch[i]))
				drop = drop || batch[i].mayDrop
			}
			q.mu.Lock()
		}
		u.fanMu.Unlock()
		q.mu.Unlock()
	} else {
		u.fanMu.Unlock()
	}
	if drop {
		sh.mu.Lock()
		sh.dropIfEmptyLocked(u)
		sh.mu.Unlock()
	}
}

// fanOut delivers ev, a change of u, to every connected session of u, of its
// subscribers and, with NotifyFriends, of users that list u as a friend; each
// session once, and returns what happened for the counters. The caller holds
// u.fanMu and no shard lock.
func (e *Engine) fanOut(u *user, ev *Event) tally {
	var t tally
	t.toUser(u, ev)
	// The sets are walked by hand rather than with userSet.all: an iterator's
	// closures would make this path allocate.
	if ed := u.edges.Load(); ed != nil {
		subs := &ed.subscribers
		for _, w := range subs.list {
			t.toUser(w, ev)
		}
		for w := range subs.m {
			t.toUser(w, ev)
		}
		if e.cfg.NotifyFriends {
			for _, w := range ed.friendOf.list {
				if !subs.has(w) {
					t.toUser(w, ev)
				}
			}
			for w := range ed.friendOf.m {
				if !subs.has(w) {
					t.toUser(w, ev)
				}
			}
		}
	}
	return t
}

// tally counts one delivery's outcomes so the engine-wide counters are
// touched once per change rather than once per session.
type tally struct{ delivered, coalesced, lost uint64 }

func (t *tally) toUser(w *user, ev *Event) {
	l := w.sessions.Load()
	if l == nil {
		return
	}
	for _, s := range l.all {
		s.push(ev, t)
	}
}

func (sh *shard) addTally(t tally) {
	if t.delivered != 0 {
		sh.delivered.Add(t.delivered)
	}
	if t.coalesced != 0 {
		sh.coalesced.Add(t.coalesced)
	}
	if t.lost != 0 {
		sh.lost.Add(t.lost)
	}
}

// horizon is how far ahead the wheel takes a user's entry; see scheduleLocked.
const horizon = time.Hour

// scheduleLocked makes sure the wheel will visit u by its next deadline.
func (e *Engine) scheduleLocked(u *user) {
	at := e.nextDeadline(u)
	if at == 0 {
		return
	}
	slot := e.wheel.slotFor(time.Unix(0, at))
	// Entries are never cancelled, so a far deadline that later moves
	// (a device offline for days that logs in again) would leave a stale
	// entry for days. Parking far deadlines at most one horizon ahead bounds
	// how long a stale entry lives, for one visit per horizon to what waits.
	if limit := e.wheel.done.Load() + int64(horizon/e.wheel.tick); slot > limit {
		slot = limit
	}
	if u.timerAt != 0 && !e.wheel.fired(int64(u.timerAt)) && int64(u.timerAt) <= slot {
		return // the entry already there fires first and reschedules
	}
	u.timerAt = int32(e.wheel.schedule(slot, u))
}

// nextDeadline returns the earliest moment (unix ns) something about u is
// due to happen by itself, or 0 if nothing is.
func (e *Engine) nextDeadline(u *user) int64 {
	var at int64
	earliest := func(t int64) {
		if at == 0 || t < at {
			at = t
		}
	}
	for d := range u.eachDevice {
		switch {
		case d.session != nil:
			earliest(d.lastSeen + int64(e.cfg.HeartbeatTimeout))
		case d.graceUntil != 0:
			earliest(d.graceUntil)
		default:
			earliest(d.lastSeen + int64(e.cfg.SessionExpiry))
		}
	}
	if ttl, ok := e.subscriptionsEnd(u); ok {
		earliest(ttl)
	}
	return at
}

// subscriptionsEnd returns when u's subscription list runs out
// (Config.SubscriptionTTL after its idleSince), and whether it is running
// out at all: u has subscriptions and is not Online. Call with the shard
// lock held.
func (e *Engine) subscriptionsEnd(u *user) (int64, bool) {
	if u.subCount() == 0 || u.status == Online {
		return 0, false
	}
	return u.edges.Load().idleSince + int64(e.cfg.SubscriptionTTL), true
}

// expire is called by the wheel: it applies, one change at a time, whatever
// is due for u, then clears u's subscriptions if they have outlived the TTL.
func (u *user) expire(e *Engine, _ time.Time) {
	sh := e.shardOf(u)
	for {
		sh.mu.Lock()
		if !sh.holdsLocked(u) || e.closed.Load() {
			sh.mu.Unlock()
			return
		}
		now := e.now() // read under the lock, as in Login: a later change never carries an earlier time
		c, ok := e.expireOneLocked(sh, u, now)
		if !ok {
			end, running := e.subscriptionsEnd(u)
			ttl := running && now.UnixNano() >= end
			e.scheduleLocked(u)
			sh.dropIfEmptyLocked(u) // kept only for its wheel entry, which this was
			sh.mu.Unlock()
			if ttl {
				e.clearIdleSubscriptions(u, now)
			}
			return
		}
		e.scheduleLocked(u)
		e.finish(sh, &c)
	}
}

// expireOneLocked applies the first due device deadline of u, if any.
func (e *Engine) expireOneLocked(sh *shard, u *user, now time.Time) (change, bool) {
	t := now.UnixNano()
	for d := range u.eachDevice {
		switch {
		case d.session != nil && t >= d.lastSeen+int64(e.cfg.HeartbeatTimeout):
			c := beginChange(u)
			c.endSession(sh, d, ReasonTimeout)
			u.publishSessionsLocked()
			sh.settleLocked(&c, now, ReasonTimeout, d.id)
			return c, true
		case d.session == nil && d.graceUntil != 0 && t >= d.graceUntil:
			c := beginChange(u)
			d.graceUntil = 0
			sh.settleLocked(&c, now, d.held, d.id)
			return c, true
		case d.session == nil && d.graceUntil == 0 && t >= d.lastSeen+int64(e.cfg.SessionExpiry):
			c := beginChange(u)
			u.unlinkDevice(d)
			sh.settleLocked(&c, now, ReasonExpired, d.id)
			return c, true
		}
	}
	return change{}, false
}
