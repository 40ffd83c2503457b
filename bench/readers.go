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
	silent bool // the device never heartbeats: it is meant to time out

	seen map[string]uint64 // owned by the reader: latest version read per user
}

// reader drains the mailboxes of its share of the sessions, round-robin, the
// way a host with a few event-loop goroutines would. A slow reader pauses
// between passes, so its sessions' mailboxes fill up, coalesce and overflow.
type reader struct {
	sim  *sim
	slow bool

	mu       sync.Mutex
	incoming []*simSession // handed over by workers, picked up every pass

	list   []*simSession // owned by the reader goroutine
	buf    []presence.Event
	stats  readerStats
	events atomic.Uint64 // for the progress line
}

func (r *reader) add(ss *simSession) {
	r.mu.Lock()
	r.incoming = append(r.incoming, ss)
	r.mu.Unlock()
}

// fastWait is the pause of a reader that is not slow between passes.
const fastWait = time.Millisecond

// run polls the sessions until stop closes, then makes one last pass so that
// whatever is pending is read.
func (r *reader) run(stop <-chan struct{}) {
	r.stats.Ended = make(map[presence.Reason]int)
	idle := time.NewTimer(time.Hour)
	defer idle.Stop()
	for {
		r.pass()
		select {
		case <-stop:
			r.pass()
			return
		default:
		}
		// A pass is a batch: pause a little between them rather than spin,
		// and a slow reader pauses a lot.
		wait := fastWait
		if r.slow {
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
	r.mu.Lock()
	r.list = append(r.list, r.incoming...)
	clear(r.incoming)
	r.incoming = r.incoming[:0]
	r.mu.Unlock()

	for i := 0; i < len(r.list); {
		ss := r.list[i]
		select {
		case <-ss.s.Ready():
			r.drain(ss)
		default:
		}
		select {
		case <-ss.s.Done():
			// Events pending at the end can still be drained.
			r.drain(ss)
			r.stats.Sessions++
			r.stats.Ended[ss.s.EndReason()]++
			last := len(r.list) - 1
			r.list[i], r.list[last] = r.list[last], nil
			r.list = r.list[:last]
			continue
		default:
		}
		i++
	}
}

func (r *reader) drain(ss *simSession) {
	r.buf = ss.s.Drain(r.buf[:0])
	if len(r.buf) == 0 {
		return
	}
	r.stats.Drains++
	r.stats.Events += uint64(len(r.buf))
	r.events.Add(uint64(len(r.buf)))
	for i := range r.buf {
		r.check(ss, &r.buf[i])
	}
	clear(r.buf)
}

// check applies what every event must satisfy, whatever the interleaving.
func (r *reader) check(ss *simSession, ev *presence.Event) {
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
	if !strings.HasPrefix(ev.UserID, userPrefix) {
		v.add("session %s: event about %q, a user nobody watches", who, ev.UserID)
	}
	if ss.seen == nil {
		ss.seen = make(map[string]uint64)
	}
	last, ok := ss.seen[ev.UserID]
	switch {
	case !ok:
	case ev.Reason == presence.ReasonSubscribed && ev.Version < last:
		v.add("session %s: %v event about %s went back from version %d to %d", who, ev.Reason, ev.UserID, last, ev.Version)
	case ev.Reason != presence.ReasonSubscribed && ev.Version <= last:
		// A change carries a new version; only a re-subscription may repeat one.
		v.add("session %s: %v event about %s has version %d after version %d", who, ev.Reason, ev.UserID, ev.Version, last)
	}
	if ev.Version > last || !ok {
		ss.seen[ev.UserID] = ev.Version
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
