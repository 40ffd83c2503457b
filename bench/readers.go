package main

import (
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/presencekit/presence"
)

// simSession is a Session the simulation opened, as its reader sees it.
type simSession struct {
	s      *presence.Session
	user   string
	device string
	silent bool // the device stops heartbeating when the load starts: it is meant to time out

	// Owned by the reader: latest version read per user, by user index (a
	// map without pointers, which the garbage collector need not scan).
	seen map[int32]uint64
}

// reader drains the mailboxes of its share of the sessions, round-robin, the
// way a host with a few event-loop goroutines would. A slow reader pauses
// longer between passes during the load, so its sessions' mailboxes fill up,
// coalesce and overflow.
//
// A pass visits every session, so polling costs in proportion to sessions
// times passes per second: with a hundred thousand sessions, passes every
// millisecond would take more CPU than the engine. Hence -read-every.
type reader struct {
	sim  *sim
	slow bool

	mu       sync.Mutex
	incoming []*simSession // handed over by workers, picked up every pass

	list   []watched // owned by the reader goroutine
	buf    []presence.Event
	stats  readerStats
	events atomic.Uint64 // for the progress line and sim.settle
}

// watched is a session in a reader's list. Its channels are copied here so
// that a pass that finds nothing pending reads the list and the two channels
// only: with this many sessions, each pointer followed is a cache miss.
type watched struct {
	ready, done <-chan struct{}
	ss          *simSession
}

func newReader(s *sim, slow bool, capacity int) *reader {
	// Room for the setup's sessions up front, so that the lists do not grow
	// while the heap is being measured.
	return &reader{
		sim:      s,
		slow:     slow,
		incoming: make([]*simSession, 0, capacity),
		list:     make([]watched, 0, capacity),
		stats:    readerStats{Ended: make(map[presence.Reason]int)},
	}
}

func (r *reader) add(ss *simSession) {
	r.mu.Lock()
	r.incoming = append(r.incoming, ss)
	r.mu.Unlock()
}

// run polls the sessions until stop closes, then makes one last pass so that
// whatever is pending is read.
func (r *reader) run(stop <-chan struct{}) {
	idle := time.NewTimer(time.Hour)
	defer idle.Stop()
	for {
		r.pass()
		// A pass is a batch: pause between them rather than spin.
		wait := r.sim.cfg.ReadEvery
		if r.slow && r.sim.loading.Load() {
			wait = r.sim.cfg.SlowWait
		}
		idle.Reset(wait)
		select {
		case <-stop:
			r.pass()
			return
		case <-idle.C:
		}
	}
}

// pass visits every session once, drains what is pending and lets go of
// the sessions that have ended.
func (r *reader) pass() {
	start := time.Now()
	r.mu.Lock()
	for _, ss := range r.incoming {
		r.list = append(r.list, watched{ready: ss.s.Ready(), done: ss.s.Done(), ss: ss})
	}
	clear(r.incoming)
	r.incoming = r.incoming[:0]
	r.mu.Unlock()

	track := r.sim.loading.Load()
	for i := 0; i < len(r.list); {
		wt := &r.list[i]
		// Two single-case selects, not one with two cases: on a channel with
		// nothing to receive they return without taking its lock.
		select {
		case <-wt.ready:
			r.drain(wt.ss, track)
		default:
		}
		select {
		case <-wt.done:
			// Events pending at the end can still be drained.
			r.drain(wt.ss, track)
			r.stats.Sessions++
			r.stats.Ended[wt.ss.s.EndReason()]++
			last := len(r.list) - 1
			r.list[i], r.list[last] = r.list[last], watched{}
			r.list = r.list[:last]
			continue
		default:
		}
		i++
	}
	r.stats.Passes++
	r.stats.Polling += time.Since(start)
}

// drain reads the pending events of ss and checks them; with track it also
// checks that versions never go back.
func (r *reader) drain(ss *simSession, track bool) {
	r.buf = ss.s.Drain(r.buf[:0])
	if len(r.buf) == 0 {
		return
	}
	r.stats.Drains++
	r.stats.Events += uint64(len(r.buf))
	r.events.Add(uint64(len(r.buf)))
	for i := range r.buf {
		r.check(ss, &r.buf[i], track)
	}
	clear(r.buf)
}

// check applies what every event must satisfy, whatever the interleaving.
// Versions are tracked from the start of the load only (track): a map per
// session filled during the setup would be counted as the engine's memory.
func (r *reader) check(ss *simSession, ev *presence.Event, track bool) {
	v := &r.sim.viol
	who := ss.user + "/" + ss.device
	if ev.Reason < presence.ReasonLogin || ev.Reason > presence.ReasonSubscribed {
		v.add("session %s: event about %s has reason %v", who, ev.UserID, ev.Reason)
	} else {
		r.stats.ByReason[ev.Reason]++
	}
	if ev.Status < presence.Online || ev.Status > presence.Unlogined {
		v.add("session %s: event about %s has status %v", who, ev.UserID, ev.Status)
	}
	if ev.Custom != "" && ev.Status != presence.Online {
		v.add("session %s: event about %s is %v with custom status %q", who, ev.UserID, ev.Status, ev.Custom)
	}
	idx, known := r.sim.userIndex(ev.UserID)
	if !known {
		v.add("session %s: event about %q, a user nobody watches", who, ev.UserID)
		return
	}
	if !track {
		return
	}
	if ss.seen == nil {
		ss.seen = make(map[int32]uint64)
	}
	last, ok := ss.seen[idx]
	switch {
	case !ok:
	case ev.Reason == presence.ReasonSubscribed && ev.Version < last:
		v.add("session %s: %v event about %s went back from version %d to %d", who, ev.Reason, ev.UserID, last, ev.Version)
	case ev.Reason != presence.ReasonSubscribed && ev.Version <= last:
		// A change carries a new version; only a re-subscription may repeat one.
		v.add("session %s: %v event about %s has version %d after version %d", who, ev.Reason, ev.UserID, ev.Version, last)
	}
	if ev.Version > last || !ok {
		ss.seen[idx] = ev.Version
	}
}

// feedCounter consumes the change feed until the engine closes it.
type feedCounter struct {
	byReason [9]uint64 // read after done is closed
	total    atomic.Uint64
	done     chan struct{}
}

func (f *feedCounter) run(ch <-chan presence.Change, v *violations) {
	defer close(f.done)
	for c := range ch {
		f.total.Add(1)
		if c.Reason < presence.ReasonLogin || c.Reason > presence.ReasonExpired {
			v.add("change feed: record for %s has reason %v", c.UserID, c.Reason)
			continue
		}
		f.byReason[c.Reason]++
		if c.Status < presence.Online || c.Status > presence.Unlogined {
			v.add("change feed: %v record for %s has status %v", c.Reason, c.UserID, c.Status)
		}
		if c.Custom != "" && c.Status != presence.Online {
			v.add("change feed: %v record for %s is %v with custom status %q", c.Reason, c.UserID, c.Status, c.Custom)
		}
		if !strings.HasPrefix(c.UserID, userPrefix) {
			v.add("change feed: record for %q, a user that never logged in", c.UserID)
		}
		if c.Time.IsZero() {
			v.add("change feed: %v record for %s has no time", c.Reason, c.UserID)
		}
		byDevice := c.DeviceID != ""
		switch c.Reason {
		case presence.ReasonLogin:
			if c.Status != presence.Online || !byDevice {
				v.add("change feed: Login record for %s/%q is %v", c.UserID, c.DeviceID, c.Status)
			}
			if len(c.Kicked) > 0 {
				v.add("change feed: Login of %s/%s kicked %v with MaxDevices off", c.UserID, c.DeviceID, c.Kicked)
			}
		case presence.ReasonCustomStatus:
			if c.Status != presence.Online || byDevice {
				v.add("change feed: CustomStatus record for %s/%q is %v", c.UserID, c.DeviceID, c.Status)
			}
		case presence.ReasonKicked:
			// Only Kick kicks here (MaxDevices is off): every device goes.
			if c.Status != presence.Unlogined || byDevice || len(c.Kicked) == 0 {
				v.add("change feed: Kicked record for %s/%q is %v, kicked %v", c.UserID, c.DeviceID, c.Status, c.Kicked)
			}
		case presence.ReasonExpired:
			v.add("change feed: Expired record for %s/%s, but SessionExpiry is 7 days", c.UserID, c.DeviceID)
		default: // Logout, LinkClose, Timeout
			if !byDevice {
				v.add("change feed: %v record for %s without a device", c.Reason, c.UserID)
			}
			if c.Reason != presence.ReasonLogout && c.Status == presence.Unlogined {
				v.add("change feed: %v record for %s/%s leaves it Unlogined", c.Reason, c.UserID, c.DeviceID)
			}
		}
	}
}
