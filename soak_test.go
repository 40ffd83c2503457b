package presence

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"iter"
	"math/rand/v2"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// The default is short so that every `go test ./...`, CI's included, runs a
// soak; `go test -run Soak -soak=60s .` runs a long one.
var soakFor = flag.Duration("soak", 2*time.Second, "how long TestSoak runs its random workload (wall-clock time)")

// TestSoak runs a random concurrent workload on a real engine, on the real
// clock, for -soak: workers call every method over a few hundred overlapping
// users (some calls break a rule on purpose), readers drain the sessions,
// some of them slowly, and a reader follows the change feed. The deadlines
// are short, and some users quiet, so that timeouts, grace periods, expiries
// and subscription TTLs fire all along; periodic snapshots run beside the
// traffic.
//
// Once a second the workers pause and the engine's indexes must agree with
// its records (checkInvariants). Throughout, every answer must keep the
// documented rules: a session never sees a user's version go backwards, the
// change feed's records of one user follow each other as the applied changes
// did, errors are the documented ones. At the end Close must end every
// session and close the feed, and a new engine restored from the final
// snapshot must show every user as the old one left it.
func TestSoak(t *testing.T) {
	store := &soakStore{}
	e, err := New(soakConfig(store))
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close() // for an early exit; the soak's own Close comes first
	s := newSoak(t, e, store)
	t.Logf("soaking for %v with %d workers, %d readers, %d users", *soakFor, len(s.workers), len(s.readers), len(s.users))

	var readers, workers sync.WaitGroup
	for _, r := range s.readers {
		readers.Go(r.run)
	}
	feedDone := make(chan struct{})
	go func() {
		defer close(feedDone)
		s.feed.run()
	}()
	checkerDone := make(chan struct{})
	go func() {
		defer close(checkerDone)
		s.checkEverySecond()
	}()
	start := time.Now()
	for _, w := range s.workers {
		workers.Go(w.run)
	}

	select {
	case <-time.After(*soakFor):
	case <-s.failed: // no point going on: the first failures are the useful ones
	}
	close(s.stop)
	workers.Wait()
	s.ran = time.Since(start)
	<-checkerDone
	if err := s.checkPaused(); err != nil {
		s.fail("after the workers stopped: %v", err)
	}

	st := e.Stats()
	beforeClose := e.QueryOnlineStatus(s.users)
	s.closing.Store(true)
	if err := e.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
	close(s.stopReaders)
	readers.Wait() // each reader checks that its sessions have all ended
	<-feedDone     // the feed reader returns only once Close has closed the feed

	s.checkRestore(beforeClose)
	s.logSummary(st)
	s.checkCoverage(st)
}

// soakConfig has deadlines of a few seconds (the wheel's tick is one), so
// that every kind of deadline fires many times in a soak of a minute; small
// limits, so that evictions, kicks, lost events and dropped records happen;
// and a Store, so that snapshots run beside the traffic.
func soakConfig(store Store) Config {
	return Config{
		StatusQuery:      true,
		NotifyFriends:    true,
		HeartbeatTimeout: 2 * time.Second,
		DisconnectGrace:  time.Second,
		SessionExpiry:    4 * time.Second,
		SubscriptionTTL:  3 * time.Second,
		MaxSubscriptions: 6,
		MaxSubscribeIDs:  4,
		MaxFriends:       8,
		MaxDevices:       2,
		FeedSize:         8,
		ChangeFeedSize:   64,
		Shards:           16,
		QueryQuota:       Quota{Calls: 5, Per: time.Second},
		SubscribeQuota:   Quota{Calls: 5, Per: time.Second},
		UnsubscribeQuota: Quota{Calls: 5, Per: time.Second},
		Store:            store,
		SnapshotInterval: time.Second,
	}
}

// soak is one run's shared state.
type soak struct {
	t     *testing.T
	e     *Engine
	store *soakStore
	users []string

	// pause is held for reading by every operation and for writing by the
	// invariant check, which so sees the engine with no call in progress.
	pause sync.RWMutex

	workers []*soakWorker
	readers []*soakReader
	feed    *soakFeed

	stop        chan struct{} // closed when the workers and the checker are to stop
	closing     atomic.Bool   // set before Close: from then on sessions may end with EndReason 0
	stopReaders chan struct{} // closed after Close

	ran             time.Duration // how long the workers ran
	checks, retries atomic.Uint64 // invariant checks passed; attempts that had to be repeated
	failures        atomic.Uint64
	failOnce        sync.Once
	failed          chan struct{} // closed at the first failure
}

var (
	soakDevices = []string{"phone", "laptop", "tablet"}
	soakBadIDs  = []string{"", strings.Repeat("x", 129), "bad\xff", "tab\tid"}
	soakTexts   = []string{"", "busy", "away", "🎮 in a match", strings.Repeat("m", 100)}
	soakBadText = []string{strings.Repeat("m", 101), "bad\xffutf8"}
)

func newSoak(t *testing.T, e *Engine, store *soakStore) *soak {
	s := &soak{t: t, e: e, store: store, stop: make(chan struct{}), stopReaders: make(chan struct{}), failed: make(chan struct{})}
	for i := range 300 {
		id := fmt.Sprintf("user-%03d", i)
		if i%10 == 0 {
			id = fmt.Sprintf("usér-%03d", i) // some IDs are not ASCII
		}
		s.users = append(s.users, id)
	}
	seed := rand.Uint64()
	t.Logf("seed %d (the interleaving is not reproducible; the seed only picks the operations)", seed)
	// Most users are busy: workers calling as fast as they can act as them,
	// so their deadlines hardly ever come. The last sixth are quiet: one
	// worker acts as them about twenty times a second in all, so each goes
	// seconds without a call and its timeouts, grace periods, expiries and
	// subscription TTL fire. Every worker names any user as a target.
	busy, quiet := s.users[:250], s.users[250:]
	shared := newSoakPool(128)
	newWorker := func(actors []string, pool *soakPool, pace time.Duration) {
		s.workers = append(s.workers, &soakWorker{
			s: s, r: rand.New(rand.NewPCG(seed, uint64(len(s.workers)))),
			actors: actors, pool: pool, pace: pace, counts: make([]uint64, len(soakOps)),
		})
	}
	for range 2 * runtime.GOMAXPROCS(0) {
		newWorker(busy, shared, 0)
	}
	newWorker(quiet, newSoakPool(64), 50*time.Millisecond)
	for i := range 4 {
		s.readers = append(s.readers, &soakReader{s: s, slow: i%2 == 1})
	}
	s.feed = &soakFeed{s: s, last: map[string]soakLastRecord{}}
	return s
}

// fail reports a broken rule. It may be called from any goroutine; only the
// first few reports are printed, and the soak stops early.
func (s *soak) fail(format string, args ...any) {
	if s.failures.Add(1) <= 20 {
		s.t.Errorf(format, args...)
	}
	s.failOnce.Do(func() { close(s.failed) })
}

// allow fails unless err is nil or one of the allowed errors.
func (s *soak) allow(op string, err error, allowed ...error) {
	if err == nil {
		return
	}
	for _, a := range allowed {
		if errors.Is(err, a) {
			return
		}
	}
	s.fail("%s: unexpected error %v", op, err)
}

// reject fails unless err is want: the call broke a rule on purpose.
func (s *soak) reject(op string, err error, want error) {
	if !errors.Is(err, want) {
		s.fail("%s broke a rule: got error %v, want %v", op, err, want)
	}
}

func (s *soak) stopped() bool {
	select {
	case <-s.stop:
		return true
	default:
		return false
	}
}

// checkEverySecond pauses the workers once a second and checks the engine's
// invariants. The checks fall half-way between the wheel's ticks, when the
// wheel is least likely to be at work (see checkPaused); the wheel started
// with the engine, a moment ago.
func (s *soak) checkEverySecond() {
	next := time.Now().Add(tick / 2)
	for {
		select {
		case <-time.After(time.Until(next)):
		case <-s.stop:
			return
		case <-s.failed:
			return
		}
		s.pause.Lock()
		err := s.checkPaused()
		s.pause.Unlock()
		if err != nil {
			s.fail("invariants: %v", err)
			return
		}
		for !next.After(time.Now()) { // a check that had to wait long skips the ticks it missed
			next = next.Add(tick)
		}
	}
}

// checkPaused runs checkInvariants while no operation is in progress.
//
// The wheel's goroutine is not paused: the engine has no way to hold it. It
// applies its changes under the same locks as any call, but some of them
// take several steps, between which checkInvariants would see a state that
// is not yet settled: a subscription TTL has cleared the subscriber's list
// but not yet the targets' reverse edges, or a record's entry has been taken
// off the wheel and the record not yet visited to reschedule or drop it.
// Such a state lasts only while the wheel works through one tick's due
// entries, and nothing else runs to repair a real fault, so a failure counts
// only if it persists through two ticks' worth of attempts.
func (s *soak) checkPaused() error {
	deadline := time.Now().Add(2 * tick)
	for {
		err := s.e.checkInvariants()
		if err == nil {
			s.checks.Add(1)
			return nil
		}
		if time.Now().After(deadline) {
			return err
		}
		s.retries.Add(1)
		time.Sleep(10 * time.Millisecond) // polling: the wheel signals nothing when it is done
	}
}

// soakPool holds the sessions that workers heartbeat, disconnect and log
// out. A new session takes a random slot: the one it replaces is left to
// time out, unless a login of its device replaces it first.
type soakPool struct {
	mu       sync.Mutex // protects sessions
	sessions []*Session
}

func newSoakPool(size int) *soakPool { return &soakPool{sessions: make([]*Session, size)} }

func (p *soakPool) put(sess *Session, r *rand.Rand) {
	p.mu.Lock()
	p.sessions[r.IntN(len(p.sessions))] = sess
	p.mu.Unlock()
}

// any returns the session in a random slot, or nil if the slot is empty.
func (p *soakPool) any(r *rand.Rand) *Session {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.sessions[r.IntN(len(p.sessions))]
}

// adopt puts a new session in the worker's pool and gives it to one reader,
// its only drainer, so the order of what it receives can be checked.
func (w *soakWorker) adopt(sess *Session) {
	w.pool.put(sess, w.r)
	rd := w.s.readers[w.r.IntN(len(w.s.readers))]
	rd.mu.Lock()
	rd.fresh = append(rd.fresh, sess)
	rd.mu.Unlock()
}

// soakWorker calls random operations until the soak stops, acting as one
// of its actors each time (the user who logs in, subscribes, sets a status)
// and naming any user as a target.
type soakWorker struct {
	s      *soak
	r      *rand.Rand
	actors []string
	pool   *soakPool
	pace   time.Duration // between calls; 0 for none
	counts []uint64      // calls made, by index in soakOps
}

// soakOps are the operations with their relative weights: the cheap, common
// calls of a real host (heartbeats, logins) most often, snapshots rarely.
var soakOps = [...]struct {
	name   string
	weight int
	run    func(*soakWorker)
}{
	{"Login", 120, (*soakWorker).login},
	{"Heartbeat", 150, (*soakWorker).heartbeat},
	{"Disconnect", 50, (*soakWorker).disconnect},
	{"Session.Logout", 20, (*soakWorker).sessionLogout},
	{"Logout", 30, (*soakWorker).logout},
	{"Kick", 10, (*soakWorker).kick},
	{"SetSelfStatus", 80, (*soakWorker).setSelfStatus},
	{"GetUserStatus", 60, (*soakWorker).getUserStatus},
	{"SubscribeUserStatus", 60, (*soakWorker).subscribe},
	{"UnsubscribeUserStatus", 25, (*soakWorker).unsubscribe},
	{"Subscriptions", 20, (*soakWorker).subscriptions},
	{"AddFriends", 40, (*soakWorker).addFriends},
	{"RemoveFriends", 25, (*soakWorker).removeFriends},
	{"QueryOnlineStatus", 40, (*soakWorker).query},
	{"Snapshot", 1, (*soakWorker).snapshot},
}

// soakDeck holds each operation's index as many times as its weight.
var soakDeck = func() []int {
	var deck []int
	for i, op := range soakOps {
		for range op.weight {
			deck = append(deck, i)
		}
	}
	return deck
}()

func (w *soakWorker) run() {
	var paced <-chan time.Time
	if w.pace > 0 {
		t := time.NewTicker(w.pace)
		defer t.Stop()
		paced = t.C
	}
	for !w.s.stopped() {
		if paced != nil {
			select {
			case <-paced:
			case <-w.s.stop:
				return
			}
		}
		op := soakDeck[w.r.IntN(len(soakDeck))]
		w.s.pause.RLock()
		soakOps[op].run(w)
		w.s.pause.RUnlock()
		w.counts[op]++
	}
}

func (w *soakWorker) actor() string  { return w.actors[w.r.IntN(len(w.actors))] }
func (w *soakWorker) target() string { return w.s.users[w.r.IntN(len(w.s.users))] }
func (w *soakWorker) device() string { return soakDevices[w.r.IntN(len(soakDevices))] }
func (w *soakWorker) badID() string  { return soakBadIDs[w.r.IntN(len(soakBadIDs))] }

// breaksRule decides that this call breaks a rule on purpose: one in twenty.
func (w *soakWorker) breaksRule() bool { return w.r.IntN(20) == 0 }

// others returns 1 to n user IDs, none of them caller, duplicates allowed.
func (w *soakWorker) others(caller string, n int) []string {
	ids := make([]string, 1+w.r.IntN(n))
	for i := range ids {
		ids[i] = w.target()
		for ids[i] == caller {
			ids[i] = w.target()
		}
	}
	return ids
}

// spoilList breaks a list of IDs: empty, too long, or holding a bad ID.
func (w *soakWorker) spoilList(ids []string, limit int) []string {
	switch w.r.IntN(3) {
	case 0:
		return nil
	case 1:
		for len(ids) <= limit {
			ids = append(ids, w.target())
		}
		return ids
	default:
		return append(ids, w.badID())
	}
}

func (w *soakWorker) login() {
	e := w.s.e
	if w.breaksRule() {
		user, dev := w.actor(), w.badID()
		if w.r.IntN(2) == 0 {
			user, dev = w.badID(), w.device()
		}
		sess, err := e.Login(user, dev)
		w.s.reject("Login", err, ErrInvalidParam)
		if sess != nil {
			w.s.fail("Login(%q, %q) returned a session with its error", user, dev)
		}
		return
	}
	sess, err := e.Login(w.actor(), w.device())
	if err != nil {
		w.s.fail("Login: %v", err)
		return
	}
	w.adopt(sess)
}

func (w *soakWorker) heartbeat() {
	if sess := w.pool.any(w.r); sess != nil {
		w.s.allow("Heartbeat", sess.Heartbeat(), ErrSessionEnded)
	}
}

func (w *soakWorker) disconnect() {
	if sess := w.pool.any(w.r); sess != nil {
		w.s.allow("Disconnect", sess.Disconnect(), ErrSessionEnded)
	}
}

func (w *soakWorker) sessionLogout() {
	if sess := w.pool.any(w.r); sess != nil {
		w.s.allow("Session.Logout", sess.Logout(), ErrSessionEnded)
	}
}

func (w *soakWorker) logout() {
	if w.breaksRule() {
		w.s.reject("Logout", w.s.e.Logout(w.badID(), w.device()), ErrInvalidParam)
		return
	}
	w.s.allow("Logout", w.s.e.Logout(w.actor(), w.device()), ErrNotLoggedIn)
}

func (w *soakWorker) kick() {
	if w.breaksRule() {
		w.s.reject("Kick", w.s.e.Kick(w.badID()), ErrInvalidParam)
		return
	}
	w.s.allow("Kick", w.s.e.Kick(w.actor()), ErrNotLoggedIn)
}

func (w *soakWorker) setSelfStatus() {
	if w.breaksRule() {
		text := soakBadText[w.r.IntN(len(soakBadText))]
		w.s.reject("SetSelfStatus", w.s.e.SetSelfStatus(w.actor(), text), ErrInvalidParam)
		return
	}
	text := soakTexts[w.r.IntN(len(soakTexts))]
	w.s.allow("SetSelfStatus", w.s.e.SetSelfStatus(w.actor(), text), ErrNotLoggedIn)
}

func (w *soakWorker) getUserStatus() {
	caller := w.actor()
	ids := w.others(caller, 5)
	if w.r.IntN(4) == 0 {
		ids = append(ids, caller)
	}
	if w.breaksRule() {
		_, err := w.s.e.GetUserStatus(caller, w.spoilList(ids, w.s.e.cfg.MaxQueryIDs))
		w.s.reject("GetUserStatus", err, ErrInvalidParam)
		return
	}
	got, err := w.s.e.GetUserStatus(caller, ids)
	w.s.allow("GetUserStatus", err, ErrRateLimited)
	if err != nil {
		return
	}
	if len(got) != len(ids) {
		w.s.fail("GetUserStatus of %d IDs returned %d entries", len(ids), len(got))
		return
	}
	for i, st := range got {
		if st.UserID != ids[i] {
			w.s.fail("GetUserStatus entry %d is about %q, asked for %q", i, st.UserID, ids[i])
		}
		if p := soakStatusProblem(st); p != "" {
			w.s.fail("GetUserStatus: %s", p)
		}
	}
}

func (w *soakWorker) subscribe() {
	caller := w.actor()
	ids := w.others(caller, w.s.e.cfg.MaxSubscribeIDs)
	if w.breaksRule() {
		if w.r.IntN(2) == 0 {
			ids = append(ids[:len(ids)-1], caller)
		} else {
			ids = w.spoilList(ids, w.s.e.cfg.MaxSubscribeIDs)
		}
		_, err := w.s.e.SubscribeUserStatus(caller, ids)
		w.s.reject("SubscribeUserStatus", err, ErrInvalidParam)
		return
	}
	_, err := w.s.e.SubscribeUserStatus(caller, ids)
	w.s.allow("SubscribeUserStatus", err, ErrRateLimited)
}

func (w *soakWorker) unsubscribe() {
	caller := w.actor()
	var ids []string // nil: all of them
	if w.r.IntN(4) > 0 {
		ids = w.others(caller, w.s.e.cfg.MaxSubscribeIDs)
	}
	if w.breaksRule() {
		ids = append(w.others(caller, 1), w.badID())
		w.s.reject("UnsubscribeUserStatus", w.s.e.UnsubscribeUserStatus(caller, ids), ErrInvalidParam)
		return
	}
	w.s.allow("UnsubscribeUserStatus", w.s.e.UnsubscribeUserStatus(caller, ids), ErrRateLimited)
}

func (w *soakWorker) subscriptions() {
	caller := w.actor()
	subs := w.s.e.Subscriptions(caller)
	if len(subs) > w.s.e.cfg.MaxSubscriptions || slices.Contains(subs, caller) || len(slices.Compact(slices.Sorted(slices.Values(subs)))) != len(subs) {
		w.s.fail("Subscriptions(%q) = %q: over the limit, repeated or self", caller, subs)
	}
}

func (w *soakWorker) addFriends() {
	user := w.actor()
	ids := w.others(user, 3)
	if w.breaksRule() {
		if w.r.IntN(2) == 0 {
			ids = append(ids, user)
		} else {
			ids = append(ids, w.badID())
		}
		w.s.reject("AddFriends", w.s.e.AddFriends(user, ids...), ErrInvalidParam)
		return
	}
	w.s.allow("AddFriends", w.s.e.AddFriends(user, ids...), ErrInvalidParam) // over MaxFriends
}

func (w *soakWorker) removeFriends() {
	user := w.actor()
	if w.breaksRule() {
		w.s.reject("RemoveFriends", w.s.e.RemoveFriends(user), ErrInvalidParam)
		return
	}
	w.s.allow("RemoveFriends", w.s.e.RemoveFriends(user, w.others(user, 3)...))
}

func (w *soakWorker) query() {
	ids := w.others("", 5)
	if w.breaksRule() {
		ids = append(ids, w.badID())
	}
	got := w.s.e.QueryOnlineStatus(ids)
	if len(got) != len(ids) {
		w.s.fail("QueryOnlineStatus of %d IDs returned %d entries", len(ids), len(got))
		return
	}
	for i, st := range got {
		if st.UserID != ids[i] {
			w.s.fail("QueryOnlineStatus entry %d is about %q, asked for %q", i, st.UserID, ids[i])
		}
		if idProblem(ids[i], w.s.e.cfg.MaxIDBytes) != "" {
			if st.Status != Unknown {
				w.s.fail("QueryOnlineStatus of invalid ID %q: status %v, want Unknown", ids[i], st.Status)
			}
			continue
		}
		if p := soakOnlineProblem(st, w.s.e.cfg.MaxDevices); p != "" {
			w.s.fail("QueryOnlineStatus: %s", p)
		}
	}
}

func (w *soakWorker) snapshot() {
	w.s.allow("Snapshot", w.s.e.Snapshot(context.Background()))
}

// soakStatusProblem says what rule a user's state breaks, or returns "".
func soakStatusProblem(st UserStatus) string {
	switch {
	case st.Status != Online && st.Status != Offline && st.Status != Unlogined:
		return fmt.Sprintf("%s has status %v", st.UserID, st.Status)
	case st.Status != Online && st.Custom != "":
		return fmt.Sprintf("%s has custom status %q while %v", st.UserID, st.Custom, st.Status)
	}
	return ""
}

// soakOnlineProblem checks an administrator's view: the status agrees
// with the devices, every connected device is among the online ones, and
// MaxDevices holds. Each entry is read under one lock, so it must agree with
// itself even under concurrent changes.
func soakOnlineProblem(st OnlineStatus, maxDevices int) string {
	if p := soakStatusProblem(st.UserStatus); p != "" {
		return p
	}
	switch {
	case (st.Status == Online) != (len(st.Devices) > 0):
		return fmt.Sprintf("%s is %v with online devices %q", st.UserID, st.Status, st.Devices)
	case (st.Status == Unlogined) != (len(st.Sessions) == 0):
		return fmt.Sprintf("%s is %v with %d devices logged in", st.UserID, st.Status, len(st.Sessions))
	case len(st.Sessions) > maxDevices:
		return fmt.Sprintf("%s has %d devices logged in, over MaxDevices %d", st.UserID, len(st.Sessions), maxDevices)
	}
	for _, d := range st.Sessions {
		if d.Connected && !slices.Contains(st.Devices, d.DeviceID) {
			return fmt.Sprintf("%s: device %q is connected but not online (%q)", st.UserID, d.DeviceID, st.Devices)
		}
	}
	return ""
}

// soakReader drains the sessions given to it, each on its own, so that it
// sees everything each of them receives, in order. A slow reader lets
// mailboxes fill, so events coalesce and are lost.
type soakReader struct {
	s    *soak
	slow bool

	mu    sync.Mutex // protects fresh
	fresh []*Session // handed over by the workers, not yet watched

	watched []*soakWatched // the reader goroutine's own
	events  uint64
}

type soakWatched struct {
	sess   *Session
	last   map[string]Event // the latest event seen about each user
	ending bool             // Done was closed before the latest drain
}

func (rd *soakReader) run() {
	pace := 5 * time.Millisecond
	if rd.slow {
		pace = 100 * time.Millisecond
	}
	t := time.NewTicker(pace)
	defer t.Stop()
	var buf []Event
	for {
		select {
		case <-t.C:
		case <-rd.s.stopReaders:
			rd.finish(buf)
			return
		}
		rd.adoptFresh()
		rd.watched = slices.DeleteFunc(rd.watched, func(ws *soakWatched) bool {
			buf = rd.read(ws, buf[:0])
			return ws.ending && len(buf) == 0 // ended, and the drain after that found nothing more
		})
	}
}

func (rd *soakReader) adoptFresh() {
	rd.mu.Lock()
	fresh := rd.fresh
	rd.fresh = nil
	rd.mu.Unlock()
	for _, sess := range fresh {
		rd.watched = append(rd.watched, &soakWatched{sess: sess, last: map[string]Event{}})
	}
}

// read drains one session into buf and checks what it got. Once the session
// has ended and been drained, nothing more may arrive: the engine stops
// delivering to a session before it closes Done.
func (rd *soakReader) read(ws *soakWatched, buf []Event) []Event {
	wasEnding := ws.ending
	if !ws.ending && soakEnded(ws.sess) { // looked at before draining, so that the drain comes after the end
		ws.ending = true
		if why := ws.sess.EndReason(); !rd.s.closing.Load() && !slices.Contains([]Reason{ReasonLinkClose, ReasonTimeout, ReasonLogout, ReasonKicked, ReasonLogin}, why) {
			rd.s.fail("session %s/%s ended with reason %v", ws.sess.UserID(), ws.sess.DeviceID(), why)
		}
	}
	buf = ws.sess.Drain(buf)
	if wasEnding && len(buf) > 0 {
		rd.s.fail("session %s/%s received %d events after it ended and was drained", ws.sess.UserID(), ws.sess.DeviceID(), len(buf))
	}
	rd.events += uint64(len(buf))
	for _, ev := range buf {
		if p := soakEventProblem(ws.last, ev); p != "" {
			rd.s.fail("session %s/%s: %s", ws.sess.UserID(), ws.sess.DeviceID(), p)
		}
		ws.last[ev.UserID] = ev
	}
	return buf
}

// finish runs after Close: every session must have ended, and what was left
// in its mailbox must still be in order.
func (rd *soakReader) finish(buf []Event) {
	rd.adoptFresh()
	for _, ws := range rd.watched {
		if !soakEnded(ws.sess) {
			rd.s.fail("session %s/%s still live after Close", ws.sess.UserID(), ws.sess.DeviceID())
			continue
		}
		for range 2 {
			buf = rd.read(ws, buf[:0])
		}
	}
}

// soakEventProblem checks ev against the latest event about the same user that
// the session saw before it: versions never go backwards, and one version
// is one state.
func soakEventProblem(last map[string]Event, ev Event) string {
	if p := soakStatusProblem(ev.UserStatus); p != "" {
		return p
	}
	if ev.Reason < ReasonLogin || ev.Reason > ReasonSubscribed {
		return fmt.Sprintf("event about %s has reason %v", ev.UserID, ev.Reason)
	}
	prev, ok := last[ev.UserID]
	switch {
	case !ok:
	case ev.Version < prev.Version:
		return fmt.Sprintf("%s went from version %d back to %d", ev.UserID, prev.Version, ev.Version)
	case ev.Version == prev.Version && (ev.Status != prev.Status || ev.Custom != prev.Custom):
		return fmt.Sprintf("%s version %d is both %v %q and %v %q", ev.UserID, ev.Version, prev.Status, prev.Custom, ev.Status, ev.Custom)
	}
	return ""
}

// soakEnded reports whether the session's Done channel is closed.
func soakEnded(sess *Session) bool {
	select {
	case <-sess.Done():
		return true
	default:
		return false
	}
}

// soakFeed reads the change feed until Close closes it. Each record must
// be well formed, and a record that directly follows another of the same
// user (no record dropped in between) must be a change that could happen
// from the state the first one left: records of one user arrive in the order
// the changes were applied, and there is one for every change.
type soakFeed struct {
	s       *soak
	last    map[string]soakLastRecord
	records uint64
	pairs   uint64 // records checked against the one directly before them
	reasons [ReasonSubscribed + 1]uint64
}

type soakLastRecord struct {
	Change
	dropsBefore uint64 // records the feed had dropped before this one was received
}

func (f *soakFeed) run() {
	drops := f.dropsSoFar()
	for c := range f.s.e.Changes() {
		now := f.dropsSoFar()
		f.records++
		if int(c.Reason) < len(f.reasons) {
			f.reasons[c.Reason]++
		}
		if p := soakRecordProblem(c); p != "" {
			f.s.fail("change feed: %s: %+v", p, c)
		}
		if prev, ok := f.last[c.UserID]; ok && c.Time.Before(prev.Time) {
			f.s.fail("change feed: %s's record at %v follows one at %v", c.UserID, c.Time, prev.Time)
		}
		// prev directly precedes c among the user's records unless one
		// published between them was dropped. That one was behind prev in
		// the feed, which drops its oldest, so it went after prev was
		// received and before c was: the count would have moved.
		if prev, ok := f.last[c.UserID]; ok && prev.dropsBefore == now {
			f.pairs++
			if p := soakTransitionProblem(prev.Change, c); p != "" {
				f.s.fail("change feed: %s:\n\t%+v\n\tthen %+v", p, prev.Change, c)
			}
		}
		f.last[c.UserID] = soakLastRecord{Change: c, dropsBefore: drops}
		drops = now
	}
}

// dropsSoFar counts the records the feed has dropped. It is read under the
// feed's lock: a publisher takes a record off the feed and counts it in one
// critical section, so every record that is gone by now is counted.
func (f *soakFeed) dropsSoFar() uint64 {
	f.s.e.feedMu.Lock()
	defer f.s.e.feedMu.Unlock()
	return f.s.e.changesDropped.Load()
}

// soakRecordProblem checks one record against the rules of its reason.
func soakRecordProblem(c Change) string {
	if p := soakStatusProblem(UserStatus{UserID: c.UserID, Status: c.Status, Custom: c.Custom}); p != "" {
		return p
	}
	byDevice := c.Reason != ReasonCustomStatus && c.Reason != ReasonKicked
	switch {
	case c.Time.IsZero():
		return "no time"
	case c.Reason < ReasonLogin || c.Reason > ReasonExpired:
		return fmt.Sprintf("reason %v", c.Reason)
	case byDevice != (c.DeviceID != ""):
		return fmt.Sprintf("%v with device %q", c.Reason, c.DeviceID)
	case (c.Reason == ReasonLogin || c.Reason == ReasonCustomStatus) && c.Status != Online:
		return fmt.Sprintf("%v leaves the user %v", c.Reason, c.Status)
	case c.Reason == ReasonKicked && (c.Status != Unlogined || len(c.Kicked) == 0):
		return "Kick must log out at least one device and leave the user Unlogined"
	case c.Reason != ReasonKicked && c.Reason != ReasonLogin && len(c.Kicked) > 0:
		return fmt.Sprintf("%v kicked devices", c.Reason)
	case slices.Contains(c.Kicked, c.DeviceID) && c.Reason == ReasonLogin:
		return "a login kicked its own device"
	}
	return ""
}

// soakTransitionProblem checks that next can directly follow prev for one user.
// Unlogined, a user has no device, so only a login can change it; Offline,
// no device is connected or held in grace, so nothing can time out,
// disconnect or set a custom status. The custom text changes only by
// SetSelfStatus, which always changes it, and by leaving Online.
func soakTransitionProblem(prev, next Change) string {
	switch prev.Status {
	case Unlogined:
		if next.Reason != ReasonLogin {
			return fmt.Sprintf("%v directly after Unlogined", next.Reason)
		}
	case Offline:
		if !slices.Contains([]Reason{ReasonLogin, ReasonLogout, ReasonKicked, ReasonExpired}, next.Reason) {
			return fmt.Sprintf("%v directly after Offline", next.Reason)
		}
	}
	custom := "" // what the user showed before next
	if prev.Status == Online {
		custom = prev.Custom
	}
	switch {
	case next.Reason == ReasonCustomStatus && next.Custom == custom:
		return "a custom status change that changed nothing"
	case next.Reason != ReasonCustomStatus && next.Status == Online && next.Custom != custom:
		return fmt.Sprintf("custom status changed by %v", next.Reason)
	}
	return ""
}

// checkRestore starts a new engine from the snapshot Close saved. Every
// user saved must come back with its version, its custom text, its
// subscriptions, and Online if a device was connected (offline-pending),
// Offline if devices were logged in but none was; every user not saved must
// read as Unlogined. Users whose version did not move between the last
// query before Close and the save (all but those the wheel changed in that
// moment) must look exactly as they did then: a restart goes unnoticed. The
// new engine has the default, long deadlines, so nothing it restored can
// expire while it is compared.
func (s *soak) checkRestore(beforeClose []OnlineStatus) {
	t := s.t
	cfg := soakConfig(s.store)
	cfg.HeartbeatTimeout, cfg.DisconnectGrace, cfg.SessionExpiry, cfg.SubscriptionTTL = 0, 0, 0, 0
	cfg.SnapshotInterval = time.Hour
	e2, err := New(cfg)
	if err != nil {
		t.Fatalf("restoring the final snapshot: %v", err)
	}
	defer e2.Close()
	if err := e2.checkInvariants(); err != nil {
		t.Errorf("invariants after restore: %v", err)
	}
	saved := s.store.byUser()
	if len(saved) == 0 {
		t.Error("the final snapshot saved no user")
	}
	restored := e2.QueryOnlineStatus(s.users)
	var problems []string
	moved := 0
	for i, id := range s.users {
		got, before := restored[i].UserStatus, beforeClose[i].UserStatus
		if p := soakRestoredProblem(got, saved[id], e2.Subscriptions(id)); p != "" {
			problems = append(problems, p)
			continue
		}
		if _, ok := saved[id]; !ok {
			continue // its version was not saved: a record made again takes a new one
		}
		switch {
		case got.Version < before.Version:
			problems = append(problems, fmt.Sprintf("%s went from version %d before Close back to %d after restore", id, before.Version, got.Version))
		case got.Version > before.Version:
			moved++
		case got.Status != before.Status || got.Custom != before.Custom:
			problems = append(problems, fmt.Sprintf("%s version %d was %v %q before Close, %v %q after restore", id, got.Version, before.Status, before.Custom, got.Status, got.Custom))
		}
	}
	for _, p := range problems[:min(len(problems), 10)] {
		t.Error("restore: " + p)
	}
	t.Logf("restore: %d users saved, %d problems, %d changed by the wheel between the last query and Close", len(saved), len(problems), moved)
}

// soakRestoredProblem compares a restored user with its saved record (the
// zero Record if it was not saved) and says what differs, or returns "".
func soakRestoredProblem(got UserStatus, r Record, subs []string) string {
	want := Unlogined
	for _, d := range r.Devices {
		if d.Connected {
			want = Online
			break
		}
		want = Offline
	}
	switch {
	case r.UserID == "" && (got.Status != Unlogined || got.Custom != ""):
		return fmt.Sprintf("%s was not saved but restored as %v %q", got.UserID, got.Status, got.Custom)
	case r.UserID == "":
	case got.Status != want || got.Version != r.Version:
		return fmt.Sprintf("%s restored as %v version %d from %v version %d (%+v)", got.UserID, got.Status, got.Version, want, r.Version, r.Devices)
	case want == Online && got.Custom != r.Custom:
		return fmt.Sprintf("%s restored with custom %q, saved %q", got.UserID, got.Custom, r.Custom)
	case !slices.Equal(subs, r.Subscriptions):
		return fmt.Sprintf("%s restored with subscriptions %q, saved %q", got.UserID, subs, r.Subscriptions)
	}
	return ""
}

func (s *soak) logSummary(st Stats) {
	var counts [len(soakOps)]uint64
	var ops uint64
	for _, w := range s.workers {
		for i, n := range w.counts {
			counts[i] += n
			ops += n
		}
	}
	var events uint64
	for _, rd := range s.readers {
		events += rd.events
	}
	var b strings.Builder
	for i, op := range soakOps {
		fmt.Fprintf(&b, " %s=%d", op.name, counts[i])
	}
	s.t.Logf("ops %d (%.0f/s):%s", ops, float64(ops)/s.ran.Seconds(), b.String())
	s.t.Logf("events: delivered %d, coalesced %d, lost %d, read by the readers %d", st.Delivered, st.Coalesced, st.Lost, events)
	var reasons strings.Builder
	for why, n := range s.feed.reasons {
		if n > 0 {
			fmt.Fprintf(&reasons, " %v=%d", Reason(why), n)
		}
	}
	s.t.Logf("change feed: %d records read, %d dropped, %d checked against their predecessor; by reason:%s", s.feed.records, st.ChangesDropped, s.feed.pairs, reasons.String())
	s.t.Logf("invariant checks passed %d (attempts repeated while the wheel was at work: %d); snapshots saved %d, failed %d", s.checks.Load(), s.retries.Load(), s.store.saveCount(), st.SnapshotFailures)
}

// checkCoverage fails a soak that exercised too little to prove anything.
// The quiet users' deadlines need seconds to come, and most feed records are
// dropped, so the kinds of change are required only of a longer soak.
func (s *soak) checkCoverage(st Stats) {
	if s.failures.Load() > 0 {
		return
	}
	if s.checks.Load() < 2 || s.feed.records == 0 || st.Delivered == 0 || s.store.saveCount() < 2 {
		s.t.Errorf("too little happened: %d invariant checks, %d feed records, %d deliveries, %d snapshots",
			s.checks.Load(), s.feed.records, st.Delivered, s.store.saveCount())
	}
	if *soakFor < 20*time.Second {
		return
	}
	for _, why := range []Reason{ReasonLogin, ReasonLogout, ReasonLinkClose, ReasonTimeout, ReasonCustomStatus, ReasonKicked, ReasonExpired} {
		if s.feed.reasons[why] == 0 {
			s.t.Errorf("in %v no change had reason %v", *soakFor, why)
		}
	}
	if st.Lost == 0 || s.feed.pairs == 0 {
		s.t.Errorf("in %v no event was lost (%d) or no feed record could be checked against its predecessor (%d)", *soakFor, st.Lost, s.feed.pairs)
	}
}

// soakStore is a Store that keeps its snapshot in memory. It copies what it
// is given, as a real Store must (the engine reuses its batches), so a
// restore reads only what went through Save.
type soakStore struct {
	mu      sync.Mutex // protects records and saves
	records []Record
	saves   int
}

func (m *soakStore) Save(ctx context.Context, records iter.Seq2[[]Record, error]) error {
	var all []Record
	for batch, err := range records {
		if err != nil {
			return err // incomplete: keep the previous snapshot
		}
		for _, r := range batch {
			r.Devices = slices.Clone(r.Devices)
			r.Subscriptions = slices.Clone(r.Subscriptions)
			r.Friends = slices.Clone(r.Friends)
			all = append(all, r)
		}
	}
	m.mu.Lock()
	m.records, m.saves = all, m.saves+1
	m.mu.Unlock()
	return nil
}

func (m *soakStore) Load(ctx context.Context, add func([]Record) error) error {
	m.mu.Lock()
	all := m.records
	m.mu.Unlock()
	for batch := range slices.Chunk(all, 100) {
		if err := add(batch); err != nil {
			return err
		}
	}
	return nil
}

func (m *soakStore) byUser() map[string]Record {
	m.mu.Lock()
	defer m.mu.Unlock()
	byID := make(map[string]Record, len(m.records))
	for _, r := range m.records {
		byID[r.UserID] = r
	}
	return byID
}

func (m *soakStore) saveCount() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.saves
}
