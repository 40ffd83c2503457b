package presence

import (
	"context"
	"sync"
	"sync/atomic"
)

// Session is one connected device of a user: what Login returns. The host
// keeps it beside the connection, calls Heartbeat as the client's heartbeats
// arrive and Disconnect when the link drops, and reads the events meant for
// that connection from its mailbox with Ready and Drain (or Next).
//
// The mailbox holds at most one pending event per user it is about: a newer
// event replaces an older one (presence is state; the latest wins). It holds
// at most Config.FeedSize users; past that the oldest pending entry is
// dropped and counted in Lost. The engine never waits for a reader.
//
// A Session ends when its device disconnects, times out, logs out, is kicked,
// logs in again elsewhere (a new Session replaces it) or the engine closes:
// Done is then closed and Heartbeat, Disconnect and Logout return
// ErrSessionEnded (ErrClosed once the engine is closed). Events still
// pending when it ends can be drained.
//
// All methods are safe for concurrent use.
type Session struct {
	e   *Engine
	u   *user
	dev *device // the device this session belongs to; dev.session == this while live

	ready  chan struct{}                 // one token when the mailbox goes from empty to pending
	done   atomic.Pointer[chan struct{}] // Done's channel, made on first use
	ended  atomic.Bool
	reason atomic.Uint32 // Reason the session ended, set before Done is closed
	lost   atomic.Uint64

	mu     sync.Mutex            // protects box, closed, own, and the making of done
	box    fifo[string, pending] // pending events keyed by the user they are about, oldest first
	closed bool                  // Done's channel is closed, or is to start closed when made
	shard  uint32                // index of the user's shard, which the record does not keep (see Engine.hash)
	own    uint64                // version of the latest event about the session's own user taken in

	// solo is the list of its user's sessions published while this is the
	// only one (see publishSessionsLocked): made with the session and
	// never changed, so that most logins need no list of their own.
	solo    sessionList
	soloArr [1]*Session
}

func newSession(e *Engine, shard uint32, u *user, d *device) *Session {
	s := &Session{e: e, shard: shard, u: u, dev: d, ready: make(chan struct{}, 1)}
	s.soloArr[0] = s
	s.solo.all = s.soloArr[:]
	return s
}

// UserID returns the user the session belongs to.
func (s *Session) UserID() string { return s.u.id }

// DeviceID returns the device the session belongs to.
func (s *Session) DeviceID() string { return s.dev.id }

// Ready returns a channel that receives a value when events become pending.
// A receive may find the mailbox already drained (a spurious wake-up is
// harmless); after a receive, Drain until it returns nothing new. Ready
// never blocks the engine.
func (s *Session) Ready() <-chan struct{} { return s.ready }

// Done returns a channel that is closed when the session has ended.
func (s *Session) Done() <-chan struct{} {
	if d := s.done.Load(); d != nil {
		return *d
	}
	// Made on first use: a million sessions whose hosts never ask cost a
	// channel less each.
	s.mu.Lock()
	defer s.mu.Unlock()
	if d := s.done.Load(); d != nil {
		return *d
	}
	c := make(chan struct{})
	if s.closed {
		close(c)
	}
	s.done.Store(&c)
	return c
}

// closeDone closes Done's channel, or records that a channel made later
// must start closed. Call it once, after markEnded, with no shard lock held:
// it wakes readers.
func (s *Session) closeDone() {
	s.mu.Lock()
	s.closed = true
	d := s.done.Load()
	s.mu.Unlock()
	if d != nil {
		close(*d)
	}
}

// EndReason returns why the session ended: ReasonLinkClose, ReasonTimeout,
// ReasonLogout, ReasonKicked, ReasonLogin (replaced by a new login of the
// same device), or 0 while it is live and when the engine closed it.
func (s *Session) EndReason() Reason { return Reason(s.reason.Load()) }

// Lost returns how many pending events this session's mailbox has dropped
// because it was full.
func (s *Session) Lost() uint64 { return s.lost.Load() }

// Drain appends every pending event to dst, oldest first, empties the
// mailbox and returns the extended slice. It never blocks.
func (s *Session) Drain(dst []Event) []Event {
	s.mu.Lock()
	s.box.each(func(id string, p pending) bool {
		dst = append(dst, p.event(id))
		return true
	})
	s.box.reset()
	s.shrinkLocked()
	s.mu.Unlock()
	return dst
}

// keptMailbox is how many entries' worth of memory an empty mailbox keeps
// for reuse: enough for the usual trickle of events without allocating,
// little enough that a million idle sessions stay small.
const keptMailbox = 16

// shrinkLocked gives an emptied mailbox's memory back after a burst.
func (s *Session) shrinkLocked() {
	if s.box.len() == 0 && cap(s.box.nodes) > keptMailbox {
		s.box = fifo[string, pending]{}
	}
}

// Next returns the oldest pending event, waiting for one if none is pending.
// It returns ErrSessionEnded once the session has ended and nothing is left
// to read, and ctx.Err() if ctx ends first.
func (s *Session) Next(ctx context.Context) (Event, error) {
	for {
		if ev, ok := s.pop(); ok {
			return ev, nil
		}
		select {
		case <-s.ready:
		case <-s.Done():
			if ev, ok := s.pop(); ok {
				return ev, nil
			}
			return Event{}, newError(ErrSessionEnded, "Session.Next", "session of "+s.u.id+"/"+s.dev.id+" has ended")
		case <-ctx.Done():
			return Event{}, ctx.Err()
		}
	}
}

func (s *Session) pop() (Event, bool) {
	s.mu.Lock()
	id, p, ok := s.box.popOldest()
	s.shrinkLocked()
	s.mu.Unlock()
	if !ok {
		return Event{}, false
	}
	return p.event(id), true
}

// pending is an event as the mailbox keeps it: without the user ID, which
// is the entry's key, and without Devices, which no event carries. That
// makes a mailbox node 56 bytes rather than 104: a session that has read
// its events keeps one node's worth of memory, and a push copies half as
// much.
type pending struct {
	custom  string
	version uint64
	status  Status
	reason  Reason
}

func pendingOf(ev *Event) pending {
	return pending{custom: ev.Custom, version: ev.Version, status: ev.Status, reason: ev.Reason}
}

// event rebuilds the Event that p was made from; id is its key.
func (p pending) event(id string) Event {
	var ev Event
	ev.UserID, ev.Status, ev.Custom, ev.Version, ev.Reason = id, p.status, p.custom, p.version, p.reason
	return ev
}

// push puts ev in the mailbox, replacing a pending event about the same user,
// evicting the oldest entry past FeedSize, and wakes the reader if the
// mailbox was empty.
func (s *Session) push(ev *Event, t *tally) {
	s.mu.Lock()
	if s.ended.Load() { // checked under mu: nothing lands after the reader's last drain
		s.mu.Unlock()
		return
	}
	if ev.UserID == s.u.id {
		// A change of this session's own user that nobody watches is
		// delivered without the user's delivery lock (see Engine.finish),
		// so an older one can arrive after a newer one was taken in, and
		// perhaps read already. It is dropped: the session holds or has
		// had the newer state.
		if ev.Version <= s.own {
			s.mu.Unlock()
			return
		}
		s.own = ev.Version
	}
	wasEmpty := s.box.len() == 0
	if i := s.box.find(ev.UserID); i != none {
		if s.box.nodes[i].val.version > ev.Version {
			s.mu.Unlock() // never let a reader see a user's version go backwards
			return
		}
		s.box.replace(i, pendingOf(ev))
		t.coalesced++
	} else {
		// Make room first: adding before evicting would take the mailbox to
		// FeedSize+1 entries and double its storage for that one moment.
		if s.box.len() >= s.e.cfg.FeedSize {
			s.box.popOldest()
			s.lost.Add(1)
			t.lost++
		}
		s.box.putNew(ev.UserID, pendingOf(ev))
	}
	s.mu.Unlock()
	t.delivered++
	if wasEmpty {
		select {
		case s.ready <- struct{}{}:
		default:
		}
	}
}

// markEnded records that the session has ended and why. The caller took the
// session away from its device under the shard lock, which makes this
// happen once; Done is closed afterwards, outside the lock.
func (s *Session) markEnded(why Reason) {
	s.reason.Store(uint32(why))
	s.mu.Lock()
	s.ended.Store(true)
	s.mu.Unlock()
}

// Heartbeat records that the device is alive, pushing its heartbeat timeout
// Config.HeartbeatTimeout into the future. It returns ErrSessionEnded once
// the session has ended: the host then logs the device in again.
func (s *Session) Heartbeat() error {
	sh, err := s.lockLive("Session.Heartbeat")
	if err != nil {
		return err
	}
	s.dev.lastSeen = s.e.now().UnixNano() // under the lock: a device's times never go back
	sh.mu.Unlock()
	return nil
}

// Disconnect reports that the connection was lost without a logout. The
// session ends; the device stays logged in, offline, until it logs in again,
// logs out, is kicked or expires. If this leaves the user with no device
// online, the user becomes Offline (ReasonLinkClose), after
// Config.DisconnectGrace if one is set.
func (s *Session) Disconnect() error {
	sh, err := s.lockLive("Session.Disconnect")
	if err != nil {
		return err
	}
	e, u, d := s.e, s.u, s.dev
	now := e.now() // under the lock: a device's times and its user's changes never go back
	c := beginChange(u)
	c.endSession(sh, d, ReasonLinkClose)
	d.lastSeen = now.UnixNano()
	u.publishSessionsLocked()
	if e.cfg.DisconnectGrace > 0 && u.status == Online && !u.connected() {
		// Hold the change back: a login of this device within the grace
		// cancels it and nobody hears of the disconnect. Other devices
		// still held do not count: each reconnect within its own grace
		// must go unnoticed.
		d.graceUntil, d.held = now.Add(e.cfg.DisconnectGrace).UnixNano(), ReasonLinkClose
	} else {
		sh.settleLocked(&c, now, ReasonLinkClose, d.id)
	}
	e.scheduleLocked(u)
	e.finish(sh, &c)
	return nil
}

// Logout logs the session's device out (ReasonLogout) and ends the session.
func (s *Session) Logout() error {
	sh, err := s.lockLive("Session.Logout")
	if err != nil {
		return err
	}
	s.e.logoutLocked(sh, s.u, s.dev, s.e.now())
	return nil
}

// lockLive takes the lock of the session's shard for op and returns the
// shard, still locked, if the session is live; otherwise it returns op's
// error (ErrClosed, or ErrSessionEnded) with no lock held.
func (s *Session) lockLive(op string) (*shard, error) {
	if s.e.closed.Load() {
		return nil, closedError(op)
	}
	sh := &s.e.shards[s.shard]
	sh.mu.Lock()
	if s.dev.session != s {
		sh.mu.Unlock()
		return nil, s.endedError(op)
	}
	return sh, nil
}

func (s *Session) endedError(op string) error {
	return newError(ErrSessionEnded, op, "session of "+s.u.id+"/"+s.dev.id+" has ended")
}
