// Package presence is an embeddable, in-process presence engine: it knows
// which users are online, what custom status each one shows, and pushes every
// change to exactly the connections that should see it.
//
// # Model
//
// A user has a general status derived from its devices (Online while any
// device is connected, Offline while devices are logged in but none is
// connected, Unlogined when none is logged in), a custom status text of at
// most Config.MaxCustomStatusBytes bytes that exists only while the user is
// Online, and a Version that grows with every change of either. A host tells
// the engine about connections with Login, Session.Heartbeat,
// Session.Disconnect and Logout; the engine applies the heartbeat timeout,
// the disconnect grace and the expiry of long-offline devices by itself.
//
// # Delivery
//
// A change to user U is delivered to every connected Session of U, of the
// users subscribed to U (SubscribeUserStatus) and, with Config.NotifyFriends,
// of the users that list U as a friend (AddFriends): each session once. Each
// Session has a mailbox that keeps the latest event per user, so a slow
// reader skips intermediate states but never sees a stale one last; past
// Config.FeedSize users the oldest entry is dropped and counted. With
// Config.ChangeFeedSize set, Changes carries every change as a Change record,
// dropping the oldest when full. The engine never waits for a reader.
//
// # Limits
//
// Queries of other users, subscriptions and unsubscriptions need
// Config.StatusQuery and are metered per caller by token buckets
// (Config.QueryQuota and friends). List sizes, ID lengths and the custom
// text are bounded by Config fields whose zero values are the reference
// service's defaults. A call that breaks a limit returns an *Error with the
// reference code and changes nothing.
//
// # Persistence
//
// With Config.Store set (package persist provides one on a bbolt file), New
// restores the saved state, a snapshot is saved every
// Config.SnapshotInterval and on Close, and Snapshot saves one on demand.
// Saving and loading stream: the state is never held twice in memory, and a
// writer waits at most while one shard's records are listed or 256 of them
// copied (a shard holds about 4000 users at a million). Devices
// that were online when saved come back offline-pending: the user keeps its
// status and custom text until Config.HeartbeatTimeout passes without the
// device logging in again, so a quick restart goes unnoticed by watchers.
//
// # Concurrency
//
// Every method is safe for concurrent use. State is split over shards by a
// hash of the user ID; a call holds at most one shard lock at a time and
// never delivers, sends on a channel or wakes a reader while holding one.
// There is no goroutine per user or session: one background goroutine runs
// every deadline from a single timer wheel, a second one saves the periodic
// snapshots when a Store is set, and Close stops both.
package presence

import (
	"context"
	"errors"
	"fmt"
	"hash/maphash"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode"
	"unicode/utf8"
)

// Status is a user's general status. The numeric values are fixed and match
// the reference service on every platform.
type Status uint8

// General status values.
const (
	Unknown   Status = 0 // never returned for a valid user ID
	Online    Status = 1 // at least one device is connected
	Offline   Status = 2 // logged in, no device connected
	Unlogined Status = 3 // never logged in, or logged out
)

// String returns the status name, e.g. "Online".
func (s Status) String() string {
	switch s {
	case Unknown:
		return "Unknown"
	case Online:
		return "Online"
	case Offline:
		return "Offline"
	case Unlogined:
		return "Unlogined"
	}
	return fmt.Sprintf("Status(%d)", uint8(s))
}

// Reason says why a status changed. The zero value is unused.
type Reason uint8

// Reasons for a change.
const (
	ReasonLogin        Reason = iota + 1 // a device logged in or reconnected
	ReasonLogout                         // a device logged out
	ReasonLinkClose                      // a connection was lost without logout (Session.Disconnect)
	ReasonTimeout                        // no heartbeat within Config.HeartbeatTimeout
	ReasonCustomStatus                   // SetSelfStatus
	ReasonKicked                         // Engine.Kick, or pushed out by Config.MaxDevices
	ReasonExpired                        // an offline device passed Config.SessionExpiry
	ReasonSubscribed                     // initial state sent to a new subscriber
)

var reasonNames = [...]string{"", "Login", "Logout", "LinkClose", "Timeout", "CustomStatus", "Kicked", "Expired", "Subscribed"}

// String returns the reason name, e.g. "Timeout".
func (r Reason) String() string {
	if int(r) < len(reasonNames) && r != 0 {
		return reasonNames[r]
	}
	return fmt.Sprintf("Reason(%d)", uint8(r))
}

// UserStatus is one user's state as a reader sees it.
type UserStatus struct {
	UserID  string
	Status  Status
	Custom  string   // custom status text, "" when none
	Devices []string // online device IDs; filled only for the user's own view and admin queries
	Version uint64   // strictly increasing with every change of Status or Custom; 0 for unknown users
}

// Event is what a Session receives: the new state of the user it is about
// and why it changed.
type Event struct {
	UserStatus
	Reason Reason
}

// Change is a record of the server-side change feed (the analogue of the
// reference service's state-change webhook): one per login, logout,
// disconnect, timeout, kick, expiry or custom status change.
type Change struct {
	Time     time.Time
	UserID   string
	DeviceID string   // "" for changes not caused by one device
	Reason   Reason   // ReasonLogin, ReasonLogout, ReasonLinkClose, ReasonTimeout, ReasonCustomStatus, ReasonKicked or ReasonExpired
	Status   Status   // general status after the change
	Custom   string   // custom status after the change
	Kicked   []string // devices pushed out by this login (or by Kick)
}

// OnlineStatus is one user's state with per-device detail (QueryOnlineStatus).
type OnlineStatus struct {
	UserStatus
	Sessions []SessionInfo // logged-in devices, oldest login first
}

// SessionInfo describes one logged-in device.
type SessionInfo struct {
	DeviceID  string
	Connected bool      // a live Session exists for the device
	LoginAt   time.Time // latest login
	LastSeen  time.Time // latest login, heartbeat or disconnect
}

// Stats is a snapshot of the engine's counters.
type Stats struct {
	Users         int // users with at least one device logged in (Online or Offline)
	Online        int // users Online
	Sessions      int // live sessions (connected devices)
	Subscriptions int // subscription edges
	Friendships   int // friend edges (directed)

	Delivered      uint64 // events placed in session mailboxes since New
	Coalesced      uint64 // of those, events that replaced a pending event about the same user
	Lost           uint64 // pending events dropped from full mailboxes
	ChangesDropped uint64 // Change records dropped from a full change feed

	LastSnapshot     time.Time // zero if none yet
	LastSnapshotErr  error     // nil if the last one succeeded
	SnapshotFailures uint64    // saves that failed since New (errors, Config.SnapshotTimeout, Close)
}

// Config configures an Engine. The zero value is the reference service's
// behaviour with both feature switches off; every zero field means its
// documented default.
type Config struct {
	StatusQuery   bool // switch: query others, subscribe, unsubscribe; off -> ErrFeatureDisabled
	NotifyFriends bool // switch: friends are notified without subscribing

	HeartbeatTimeout time.Duration // 0 -> 400s
	DisconnectGrace  time.Duration // 0 -> none; a device that reconnects within it causes no events
	SessionExpiry    time.Duration // 0 -> 7 days (offline device treated as logged out)
	SubscriptionTTL  time.Duration // 0 -> 24h: a user not Online this long loses its subscription list

	MaxCustomStatusBytes int // 0 -> 100
	MaxQueryIDs          int // 0 -> 500
	MaxSubscribeIDs      int // 0 -> 100, or MaxSubscriptions if smaller (also per Unsubscribe call)
	MaxSubscriptions     int // 0 -> 200
	MaxFriends           int // 0 -> 3000
	MaxDevices           int // 0 -> unlimited; beyond it the oldest device is kicked
	MaxIDBytes           int // 0 -> 128

	QueryQuota, SubscribeQuota, UnsubscribeQuota Quota // 0 -> 20 calls per 5 s each, per caller

	FeedSize       int // 0 -> 1024: pending events per session (distinct users)
	ChangeFeedSize int // 0 -> change feed off; >0 -> buffered Changes()
	Shards         int // 0 -> automatic; otherwise a power of two

	Store            Store         // nil -> memory only
	SnapshotInterval time.Duration // 0 -> 1 minute when Store is set
	SnapshotTimeout  time.Duration // 0 -> 1 minute: bounds every Save, and the Load in New
}

// withDefaults fills in zero fields and rejects impossible values, naming
// the field.
func (c Config) withDefaults() (Config, error) {
	durations := []struct {
		name string
		v    *time.Duration
		def  time.Duration
	}{
		{"HeartbeatTimeout", &c.HeartbeatTimeout, 400 * time.Second},
		{"DisconnectGrace", &c.DisconnectGrace, 0},
		{"SessionExpiry", &c.SessionExpiry, 7 * 24 * time.Hour},
		{"SubscriptionTTL", &c.SubscriptionTTL, 24 * time.Hour},
		{"SnapshotInterval", &c.SnapshotInterval, time.Minute},
		{"SnapshotTimeout", &c.SnapshotTimeout, time.Minute},
	}
	for _, d := range durations {
		if *d.v < 0 {
			return c, fmt.Errorf("presence: Config.%s is negative (%v)", d.name, *d.v)
		}
		if *d.v == 0 {
			*d.v = d.def
		}
	}
	if c.MaxSubscribeIDs == 0 && c.MaxSubscriptions > 0 && c.MaxSubscriptions < 100 {
		c.MaxSubscribeIDs = c.MaxSubscriptions // a small list caps the default call size too
	}
	ints := []struct {
		name string
		v    *int
		def  int
	}{
		{"MaxCustomStatusBytes", &c.MaxCustomStatusBytes, 100},
		{"MaxQueryIDs", &c.MaxQueryIDs, 500},
		{"MaxSubscribeIDs", &c.MaxSubscribeIDs, 100},
		{"MaxSubscriptions", &c.MaxSubscriptions, 200},
		{"MaxFriends", &c.MaxFriends, 3000},
		{"MaxDevices", &c.MaxDevices, 0},
		{"MaxIDBytes", &c.MaxIDBytes, 128},
		{"FeedSize", &c.FeedSize, 1024},
		{"ChangeFeedSize", &c.ChangeFeedSize, 0},
		{"Shards", &c.Shards, autoShards()},
	}
	for _, n := range ints {
		if *n.v < 0 {
			return c, fmt.Errorf("presence: Config.%s is negative (%d)", n.name, *n.v)
		}
		if *n.v == 0 {
			*n.v = n.def
		}
	}
	if c.Shards&(c.Shards-1) != 0 {
		return c, fmt.Errorf("presence: Config.Shards must be a power of two, not %d", c.Shards)
	}
	if c.MaxSubscribeIDs > c.MaxSubscriptions {
		return c, fmt.Errorf("presence: Config.MaxSubscribeIDs (%d) exceeds Config.MaxSubscriptions (%d)", c.MaxSubscribeIDs, c.MaxSubscriptions)
	}
	for _, q := range []struct {
		name string
		v    *Quota
	}{{"QueryQuota", &c.QueryQuota}, {"SubscribeQuota", &c.SubscribeQuota}, {"UnsubscribeQuota", &c.UnsubscribeQuota}} {
		if err := q.v.validate(q.name); err != nil {
			return c, err
		}
		*q.v = q.v.withDefaults()
	}
	return c, nil
}

// autoShards picks enough shards that lock contention stays rare and that
// a snapshot, which lists one shard's records under its lock, holds it only
// briefly (about 4000 users a shard at a million users): 256, or 16 per
// available CPU if that is more, rounded up to a power of two.
func autoShards() int {
	n := 256
	for n < 16*runtime.GOMAXPROCS(0) {
		n <<= 1
	}
	return n
}

// Engine is the presence engine. Create one with New and stop it with Close.
// All methods are safe for concurrent use; none blocks on a reader.
type Engine struct {
	cfg    Config
	seed   maphash.Seed
	shards []shard
	mask   uint64 // hash -> shard index
	// keyMask is all ones. Tests narrow it right after New so that IDs
	// clash often and shard.clash is exercised.
	keyMask uint64
	wheel   *wheel

	query, subscribe, unsubscribe *quota

	closed    atomic.Bool
	closeOnce sync.Once
	stop      chan struct{}
	wg        sync.WaitGroup
	ending    sync.WaitGroup // changes that ended sessions, until their Done channels are closed

	feed           chan Change
	feedMu         sync.Mutex // protects feedClosed and orders the drop-oldest sends on feed
	feedClosed     bool
	changesDropped atomic.Uint64

	closing         context.Context    // ends when Close begins: stops the snapshot loop and every save but Close's own
	stopSnapshots   context.CancelFunc // ends closing
	snapTurn        chan struct{}      // one slot, held by the snapshot running
	snapStat        sync.Mutex         // protects lastSnapshot, lastSnapshotErr and snapFailures
	lastSnapshot    time.Time
	lastSnapshotErr error
	snapFailures    uint64
}

// tick is the wheel's resolution: every deadline fires within one tick.
const tick = time.Second

// New returns a running engine configured by cfg, or an error naming the
// Config field that is impossible. With Config.Store set it first restores
// the saved state, and returns the Store's error if that fails (the engine
// is then discarded: nothing is half-restored). It starts one background
// goroutine for deadlines and, with a Store, one for periodic snapshots;
// Close stops them.
func New(cfg Config) (*Engine, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	e := &Engine{
		cfg:      cfg,
		seed:     maphash.MakeSeed(),
		shards:   make([]shard, cfg.Shards),
		mask:     uint64(cfg.Shards - 1),
		keyMask:  ^uint64(0),
		stop:     make(chan struct{}),
		snapTurn: make(chan struct{}, 1),
	}
	e.closing, e.stopSnapshots = context.WithCancel(context.Background())
	e.wheel = newWheel(e.now(), tick)
	for i := range e.shards {
		e.shards[i].users = make(map[uint64]*user)
		e.shards[i].e = e
		e.shards[i].records = cfg.ChangeFeedSize > 0
	}
	e.query = newQuota(cfg.QueryQuota, cfg.Shards, e.wheel)
	e.subscribe = newQuota(cfg.SubscribeQuota, cfg.Shards, e.wheel)
	e.unsubscribe = newQuota(cfg.UnsubscribeQuota, cfg.Shards, e.wheel)
	if cfg.ChangeFeedSize > 0 {
		e.feed = make(chan Change, cfg.ChangeFeedSize)
	}
	if cfg.Store != nil {
		ctx, cancel := context.WithTimeout(context.Background(), cfg.SnapshotTimeout)
		err := e.restore(ctx)
		cancel()
		if errors.Is(err, context.DeadlineExceeded) {
			err = fmt.Errorf("took longer than Config.SnapshotTimeout (%v): %w", cfg.SnapshotTimeout, err)
		}
		if err != nil {
			e.stopSnapshots()
			return nil, fmt.Errorf("presence: restoring from Config.Store: %w", err)
		}
	}
	e.wg.Add(1)
	go e.run()
	if cfg.Store != nil {
		e.wg.Add(1)
		go e.snapshotLoop()
	}
	return e, nil
}

// now is the one place the engine reads the clock.
func (e *Engine) now() time.Time { return time.Now() }

// locate hashes id once: the hash picks the shard and keys its index.
func (e *Engine) locate(id string) (*shard, key) {
	h := e.hash(id)
	return &e.shards[h&e.mask], key{h, id}
}

// hash is an ID's hash, which picks its shard and keys the shard's index.
// A record does not keep its own: that keeps it at 80 bytes, and the paths
// that need it for a record they hold (a wheel visit, a drop) are the rarer
// ones.
func (e *Engine) hash(id string) uint64 {
	return maphash.String(e.seed, id) & e.keyMask
}

// shardOf returns the shard holding u.
func (e *Engine) shardOf(u *user) *shard { return &e.shards[e.hash(u.id)&e.mask] }

// run fires the wheel's deadlines once a tick until Close.
func (e *Engine) run() {
	defer e.wg.Done()
	t := time.NewTicker(e.wheel.tick)
	defer t.Stop()
	var due []expirer
	for {
		select {
		case <-e.stop:
			return
		case <-t.C:
			now := e.now()
			due = e.wheel.due(now, due[:0])
			for _, x := range due {
				x.expire(e, now)
			}
			clear(due)
		}
	}
}

// Close stops the background goroutines, saves a final snapshot to
// Config.Store if one is set (devices still online are saved as such, so a
// quick restart is invisible), ends every session (Done closes, EndReason
// 0) and closes the change feed. It returns the final snapshot's error.
// Later calls return ErrClosed once their arguments pass the usual checks
// (invalid arguments still get ErrInvalidParam). A Close made while another
// is running waits for it to finish, then returns nil.
func (e *Engine) Close() error {
	err := errAlreadyClosed
	e.closeOnce.Do(func() { err = e.close() })
	if err == errAlreadyClosed {
		return nil
	}
	return err
}

// errAlreadyClosed tells Close's callers apart: only the first one reports
// the final snapshot's error; the others wait for it to finish and get nil.
var errAlreadyClosed = errors.New("already closed")

func (e *Engine) close() error {
	e.closed.Store(true)
	close(e.stop)
	e.stopSnapshots()
	e.wg.Wait()
	var err error
	if e.cfg.Store != nil {
		err = e.save(context.Background(), true)
	}
	var ended []*Session
	for i := range e.shards {
		sh := &e.shards[i]
		sh.mu.Lock()
		for u := range sh.all {
			for d := range u.eachDevice {
				if d.session != nil {
					d.session.markEnded(0)
					ended = append(ended, d.session)
					d.session = nil
				}
			}
			u.sessions.Store(nil)
		}
		sh.sessions = 0
		sh.mu.Unlock()
	}
	for _, s := range ended {
		s.closeDone()
	}
	// Sessions that changes ended before the sweep are closed by those
	// changes' deliveries, which may still be under way; none can start
	// now, since no session is left to end.
	e.ending.Wait()
	if e.feed != nil {
		e.feedMu.Lock()
		e.feedClosed = true
		close(e.feed)
		e.feedMu.Unlock()
	}
	return err
}

// publish puts a record on the change feed, dropping the oldest record if
// the feed is full. The caller holds the user's fanMu, which keeps each
// user's records in the order they were applied.
func (e *Engine) publish(c *Change) {
	if e.feed == nil {
		return
	}
	e.feedMu.Lock()
	defer e.feedMu.Unlock()
	if e.feedClosed {
		return
	}
	select {
	case e.feed <- *c:
		return
	default:
	}
	select {
	case <-e.feed:
		e.changesDropped.Add(1)
	default:
	}
	select {
	case e.feed <- *c:
	default:
		e.changesDropped.Add(1)
	}
}

// Changes returns the server-wide change feed, or nil when
// Config.ChangeFeedSize is 0. The engine never blocks on it: when it is full
// the oldest record is dropped and counted in Stats.ChangesDropped. Records
// of one user arrive in the order the changes were applied. Close closes it.
func (e *Engine) Changes() <-chan Change {
	if e.feed == nil {
		return nil
	}
	return e.feed
}

// checkID validates a user or device ID: non-empty, at most MaxIDBytes,
// valid UTF-8, no control characters.
func (e *Engine) checkID(op, what, id string) error {
	if problem := idProblem(id, e.cfg.MaxIDBytes); problem != "" {
		return newError(ErrInvalidParam, op, what+" "+problem)
	}
	return nil
}

// idProblem says what is wrong with id, or returns "" if nothing is.
func idProblem(id string, maxBytes int) string {
	if id != "" && len(id) <= maxBytes && printableASCII(id) {
		return "" // the usual case, without decoding runes
	}
	switch {
	case id == "":
		return "is empty"
	case len(id) > maxBytes:
		return fmt.Sprintf("%.32q... is %d bytes, over the limit of %d", id, len(id), maxBytes)
	case !utf8.ValidString(id):
		return fmt.Sprintf("%q is not valid UTF-8", id)
	case strings.IndexFunc(id, unicode.IsControl) >= 0:
		return fmt.Sprintf("%q contains a control character", id)
	}
	return ""
}

// checkIDs validates a list of IDs: at least one, at most max, each valid.
func (e *Engine) checkIDs(op string, ids []string, max int) error {
	if len(ids) == 0 {
		return newError(ErrInvalidParam, op, "no user IDs given")
	}
	if len(ids) > max {
		return newError(ErrInvalidParam, op, fmt.Sprintf("%d user IDs given, over the limit of %d", len(ids), max))
	}
	for _, id := range ids {
		if err := e.checkID(op, "user ID", id); err != nil {
			return err
		}
	}
	return nil
}

// Login records that deviceID of userID has connected and returns its
// Session. The user becomes Online (ReasonLogin) if it was not. A Session
// already open for the same device ends quietly (EndReason ReasonLogin) and
// a disconnect of this device still held back by DisconnectGrace is
// cancelled: nobody hears of it. With Config.MaxDevices set, a login beyond
// the limit kicks the oldest devices (listed in Change.Kicked).
func (e *Engine) Login(userID, deviceID string) (*Session, error) {
	const op = "Login"
	if err := e.checkID(op, "user ID", userID); err != nil {
		return nil, err
	}
	if err := e.checkID(op, "device ID", deviceID); err != nil {
		return nil, err
	}
	sh, k := e.locate(userID)
	sh.mu.Lock()
	if e.closed.Load() { // checked under the lock so Close's sweep sees every session
		sh.mu.Unlock()
		return nil, closedError(op)
	}
	now := e.now() // under the lock, so one user's changes carry times in the order they apply
	u := sh.getOrCreateLocked(k)
	c := beginChange(u)
	d := u.device(deviceID)
	if d != nil {
		c.endSession(sh, d, ReasonLogin)
		d.graceUntil = 0
		u.unlinkDevice(d)
	} else {
		d = &device{id: sh.deviceIDLocked(deviceID)}
	}
	u.appendDevice(d) // newest login last
	if max := e.cfg.MaxDevices; max > 0 {
		for n := u.deviceCount(); n > max; n-- { // the oldest logins go
			old := u.devices
			c.endSession(sh, old, ReasonKicked)
			c.kicked = append(c.kicked, old.id)
			u.unlinkDevice(old)
		}
	}
	s := newSession(e, uint32(k.hash&e.mask), u, d)
	d.session, d.loginAt, d.lastSeen = s, now.UnixNano(), now.UnixNano()
	sh.sessions++
	u.publishSessionsLocked()
	sh.settleLocked(&c, now, ReasonLogin, d.id)
	e.scheduleLocked(u)
	e.finish(sh, &c)
	return s, nil
}

// Logout logs deviceID of userID out (ReasonLogout), ending its Session if
// it has one. The user becomes Unlogined if no other device stays logged in.
// It returns ErrNotLoggedIn if the device is not logged in.
func (e *Engine) Logout(userID, deviceID string) error {
	const op = "Logout"
	if err := e.checkID(op, "user ID", userID); err != nil {
		return err
	}
	if err := e.checkID(op, "device ID", deviceID); err != nil {
		return err
	}
	if e.closed.Load() {
		return closedError(op)
	}
	sh, k := e.locate(userID)
	sh.mu.Lock()
	u := sh.getLocked(k)
	var d *device
	if u != nil {
		d = u.device(deviceID)
	}
	if d == nil {
		sh.mu.Unlock()
		return newError(ErrNotLoggedIn, op, fmt.Sprintf("device %q of user %q is not logged in", deviceID, userID))
	}
	e.logoutLocked(sh, u, d, e.now())
	return nil
}

// logoutLocked removes u's device d and finishes the change, releasing sh.mu.
func (e *Engine) logoutLocked(sh *shard, u *user, d *device, now time.Time) {
	c := beginChange(u)
	c.endSession(sh, d, ReasonLogout)
	u.unlinkDevice(d)
	u.publishSessionsLocked()
	sh.settleLocked(&c, now, ReasonLogout, d.id)
	e.scheduleLocked(u)
	e.finish(sh, &c)
}

// Kick logs out every device of userID (ReasonKicked), ending their
// sessions; Change.Kicked lists them. It returns ErrNotLoggedIn if the user
// has no device logged in.
func (e *Engine) Kick(userID string) error {
	const op = "Kick"
	if err := e.checkID(op, "user ID", userID); err != nil {
		return err
	}
	if e.closed.Load() {
		return closedError(op)
	}
	sh, k := e.locate(userID)
	sh.mu.Lock()
	now := e.now() // under the lock, as in Login
	u := sh.getLocked(k)
	if u == nil || u.devices == nil {
		sh.mu.Unlock()
		return newError(ErrNotLoggedIn, op, fmt.Sprintf("user %q has no device logged in", userID))
	}
	c := beginChange(u)
	c.kicked = make([]string, 0, u.deviceCount())
	for u.devices != nil {
		d := u.devices
		c.endSession(sh, d, ReasonKicked)
		c.kicked = append(c.kicked, d.id)
		u.unlinkDevice(d)
	}
	u.publishSessionsLocked()
	sh.settleLocked(&c, now, ReasonKicked, "")
	e.scheduleLocked(u)
	e.finish(sh, &c)
	return nil
}

// SetSelfStatus sets userID's custom status text; "" clears it. The user
// must be Online (else ErrNotLoggedIn); the text must be valid UTF-8 of at
// most Config.MaxCustomStatusBytes bytes (else ErrInvalidParam). Setting the
// text the user already shows changes nothing. It needs no switch and no
// quota.
func (e *Engine) SetSelfStatus(userID, custom string) error {
	const op = "SetSelfStatus"
	if err := e.checkID(op, "user ID", userID); err != nil {
		return err
	}
	if len(custom) > e.cfg.MaxCustomStatusBytes {
		return newError(ErrInvalidParam, op, fmt.Sprintf("custom status is %d bytes, over the limit of %d", len(custom), e.cfg.MaxCustomStatusBytes))
	}
	if !utf8.ValidString(custom) {
		return newError(ErrInvalidParam, op, "custom status is not valid UTF-8")
	}
	if e.closed.Load() {
		return closedError(op)
	}
	sh, k := e.locate(userID)
	sh.mu.Lock()
	u := sh.getLocked(k)
	if u == nil || u.status != Online {
		sh.mu.Unlock()
		return newError(ErrNotLoggedIn, op, "user "+userID+" is not online")
	}
	if u.custom == custom {
		sh.mu.Unlock()
		return nil
	}
	c := beginChange(u)
	u.custom = custom
	// The clock is read only for the change feed: a custom change leaves the
	// status alone, so nothing else of it needs the time. It is read here,
	// under the shard lock, so that the feed's times follow the apply order.
	var now time.Time
	if e.feed != nil {
		now = e.now()
	}
	sh.settleLocked(&c, now, ReasonCustomStatus, "")
	e.finish(sh, &c)
	return nil
}

// GetUserStatus returns the state of each of userIDs, in request order (one
// entry per ID, duplicates included). Unknown users read as Unlogined with
// Version 0; reading creates no state. The caller's own entry lists its
// online devices. A list holding only the caller's own ID is free; any other
// needs Config.StatusQuery (else ErrFeatureDisabled) and spends one call of
// the caller's QueryQuota (ErrRateLimited when spent). At most
// Config.MaxQueryIDs IDs (else ErrInvalidParam). The caller needs no session.
func (e *Engine) GetUserStatus(callerID string, userIDs []string) ([]UserStatus, error) {
	return e.getUserStatus("GetUserStatus", nil, callerID, userIDs)
}

// AppendUserStatus is GetUserStatus appending its entries to dst, for a
// host that answers many queries and reuses one slice between them: a
// result of 500 entries is 40 KB, which the collector otherwise has to
// allocate and clear for every call. On error it returns dst unchanged.
func (e *Engine) AppendUserStatus(dst []UserStatus, callerID string, userIDs []string) ([]UserStatus, error) {
	return e.getUserStatus("AppendUserStatus", dst, callerID, userIDs)
}

func (e *Engine) getUserStatus(op string, dst []UserStatus, callerID string, userIDs []string) ([]UserStatus, error) {
	if err := e.checkID(op, "caller ID", callerID); err != nil {
		return dst, err
	}
	if err := e.checkIDs(op, userIDs, e.cfg.MaxQueryIDs); err != nil {
		return dst, err
	}
	if e.closed.Load() {
		return dst, closedError(op)
	}
	selfOnly := true
	for _, id := range userIDs {
		if id != callerID {
			selfOnly = false
			break
		}
	}
	if !selfOnly {
		if err := e.meter(op, e.query, callerID); err != nil {
			return dst, err
		}
	}
	n := len(dst)
	dst = slices.Grow(dst, len(userIDs))[:n+len(userIDs)]
	out := dst[n:]
	e.lookup(userIDs, func(i int, u *user) {
		if u == nil {
			out[i] = UserStatus{UserID: userIDs[i], Status: Unlogined}
			return
		}
		u.viewInto(&out[i])
		if userIDs[i] == callerID {
			out[i].Devices = u.onlineDevices()
		}
	})
	return dst, nil
}

// meter checks the feature switch and spends one call of q for caller.
func (e *Engine) meter(op string, q *quota, caller string) error {
	if !e.cfg.StatusQuery {
		return newError(ErrFeatureDisabled, op, "Config.StatusQuery is off")
	}
	if !q.allow(caller, e.now()) {
		return newError(ErrRateLimited, op, "quota of "+caller+" is spent")
	}
	return nil
}

// QueryOnlineStatus is the administrator's query: no switch, no quota, no
// limit on the number of IDs. Each entry lists the user's online devices and
// every logged-in device with its detail. An ID that is not valid reads as
// Status Unknown. After Close it returns nil.
func (e *Engine) QueryOnlineStatus(userIDs []string) []OnlineStatus {
	if e.closed.Load() {
		return nil
	}
	out := make([]OnlineStatus, len(userIDs))
	e.lookup(userIDs, func(i int, u *user) {
		if u == nil {
			out[i] = OnlineStatus{UserStatus: UserStatus{UserID: userIDs[i], Status: Unlogined}}
			return
		}
		out[i] = OnlineStatus{}
		u.viewInto(&out[i].UserStatus)
		out[i].Devices = u.onlineDevices()
		for d := range u.eachDevice {
			out[i].Sessions = append(out[i].Sessions, SessionInfo{
				DeviceID:  d.id,
				Connected: d.session != nil,
				LoginAt:   time.Unix(0, d.loginAt),
				LastSeen:  time.Unix(0, d.lastSeen),
			})
		}
	})
	// An invalid ID reads as Unknown whatever the lookup found. It is
	// checked afterwards so that no message is formatted under a lock.
	for i, id := range userIDs {
		if e.checkID("", "", id) != nil {
			out[i] = OnlineStatus{UserStatus: UserStatus{UserID: id}} // Status Unknown
		}
	}
	return out
}

// Stats returns the engine's counters. It takes each shard lock in turn, so
// the counts are each exact but not one atomic picture under concurrent
// changes.
func (e *Engine) Stats() Stats {
	var st Stats
	for i := range e.shards {
		sh := &e.shards[i]
		sh.mu.Lock()
		st.Users += sh.loggedIn
		st.Online += sh.online
		st.Sessions += sh.sessions
		st.Subscriptions += sh.subscriptions
		st.Friendships += sh.friendships
		st.Delivered += sh.ownDelivered
		sh.mu.Unlock()
		st.Delivered += sh.delivered.Load()
		st.Coalesced += sh.coalesced.Load()
		st.Lost += sh.lost.Load()
	}
	st.ChangesDropped = e.changesDropped.Load()
	e.snapStat.Lock()
	st.LastSnapshot, st.LastSnapshotErr, st.SnapshotFailures = e.lastSnapshot, e.lastSnapshotErr, e.snapFailures
	e.snapStat.Unlock()
	return st
}

// printableASCII reports whether s is all ASCII without control characters.
// Every call checks its IDs with it, so it looks at eight bytes at a time,
// the last eight overlapping the word before when the length is not a
// multiple of eight: with the top bit of each byte clear, adding 0x60 sets
// that bit exactly for the bytes from 0x20 up, and adding 0x01 exactly for
// 0x7f (DEL), without a carry into the next byte either way.
func printableASCII(s string) bool {
	const (
		top   = 0x8080808080808080
		upTo  = 0x6060606060606060
		one   = 0x0101010101010101
		width = 8
	)
	n := len(s)
	if n < width {
		for i := range n {
			if c := s[i]; c < 0x20 || c >= 0x7f {
				return false
			}
		}
		return true
	}
	for i := 0; ; i += width {
		if i > n-width {
			i = n - width // the last word
		}
		w := uint64(s[i]) | uint64(s[i+1])<<8 | uint64(s[i+2])<<16 | uint64(s[i+3])<<24 |
			uint64(s[i+4])<<32 | uint64(s[i+5])<<40 | uint64(s[i+6])<<48 | uint64(s[i+7])<<56
		if w&top != 0 || (w+upTo)&top != top || (w+one)&top != 0 {
			return false
		}
		if i == n-width {
			return true
		}
	}
}

// cloneString copies s so a record never keeps a caller's larger buffer alive.
func cloneString(s string) string { return strings.Clone(s) }
