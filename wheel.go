package presence

import (
	"sync"
	"sync/atomic"
	"time"
)

// expirer is something with a deadline on the wheel: a user record (heartbeat
// timeouts, disconnect grace, device expiry, subscription TTL) or a quota
// bucket (reclaimed once idle). expire is called without any lock held, at or
// after the deadline it was scheduled for; it re-checks its own state, because
// the deadline may have moved since, and schedules itself again if need be.
type expirer interface {
	expire(e *Engine, now time.Time)
}

// wheel holds every pending deadline of the engine in one structure: slots of
// one tick each, keyed by tick number since the engine started, in a map so
// that only the ticks that have work take memory. Scheduling and firing cost
// O(1) per entry, so the work grows with what expires, not with what exists
// (but for far deadlines, which wait in steps of an hour: see scheduleLocked).
//
// Entries are never cancelled: an owner whose deadline moves later leaves its
// entry in place and re-checks when it fires. That keeps Heartbeat, the most
// frequent call, away from the wheel altogether.
type wheel struct {
	base time.Time     // tick 0
	tick time.Duration // slot width; every entry fires within one tick after its deadline

	mu    sync.Mutex           // protects slots
	slots map[int64]*wheelSlot // tick number -> entries due by then
	done  atomic.Int64         // last tick whose slot has been taken; written under mu
}

// wheelSlot holds the entries of one tick. User records, nearly all of the
// entries, are kept as plain pointers: half the size of an interface value,
// which matters with an entry per idle user.
type wheelSlot struct {
	users  []*user
	others []expirer
}

func (s *wheelSlot) appendTo(buf []expirer) []expirer {
	for _, u := range s.users {
		buf = append(buf, u)
	}
	return append(buf, s.others...)
}

// newWheel starts a wheel at base. It works on wall-clock time throughout,
// like the deadlines it holds (unix times, so they survive a snapshot): mixing
// in the monotonic clock would make a step of the wall clock look like a
// deadline that is due but never reached.
func newWheel(base time.Time, tick time.Duration) *wheel {
	return &wheel{base: base.Round(0), tick: tick, slots: make(map[int64]*wheelSlot)}
}

// slotFor returns the first tick at or after t.
func (w *wheel) slotFor(t time.Time) int64 {
	d := t.Round(0).Sub(w.base)
	n := int64(d / w.tick)
	if d%w.tick > 0 {
		n++
	}
	return n
}

// schedule puts x on the wheel to fire at tick slot (see slotFor). It returns
// the slot actually used, which is later than asked when that tick has
// already been processed.
func (w *wheel) schedule(slot int64, x expirer) int64 {
	w.mu.Lock()
	if done := w.done.Load(); slot <= done {
		slot = done + 1
	}
	s := w.slots[slot]
	if s == nil {
		s = &wheelSlot{}
		w.slots[slot] = s
	}
	if u, ok := x.(*user); ok {
		s.users = append(s.users, u)
	} else {
		s.others = append(s.others, x)
	}
	w.mu.Unlock()
	return slot
}

// due removes and returns every entry whose tick has been reached at now,
// appending to buf.
func (w *wheel) due(now time.Time, buf []expirer) []expirer {
	upto := int64(now.Round(0).Sub(w.base) / w.tick)
	w.mu.Lock()
	defer w.mu.Unlock()
	done := w.done.Load()
	if upto-done > int64(len(w.slots)) {
		// A long gap (a suspended process, say): visiting the occupied slots
		// is cheaper than visiting every tick in between.
		for k, s := range w.slots {
			if k <= upto {
				buf = s.appendTo(buf)
				delete(w.slots, k)
			}
		}
	} else {
		for k := done + 1; k <= upto; k++ {
			if s, ok := w.slots[k]; ok {
				buf = s.appendTo(buf)
				delete(w.slots, k)
			}
		}
	}
	if upto > done {
		w.done.Store(upto)
	}
	return buf
}

// fired reports whether the entry scheduled at slot has been taken off the
// wheel already, so that its owner must schedule a new one.
func (w *wheel) fired(slot int64) bool { return slot <= w.done.Load() }

// pending returns the number of entries on the wheel (for tests and stats).
func (w *wheel) pending() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	n := 0
	for _, s := range w.slots {
		n += len(s.users) + len(s.others)
	}
	return n
}
