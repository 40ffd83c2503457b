package presence

import (
	"fmt"
	"slices"
	"time"
)

// checkInvariants verifies, on a quiescent engine, that the indexes and
// counters agree with the records they summarize: reverse edges match
// forward lists, cached statuses match their devices, shard counters match
// a recount, limits hold, and every pending deadline is on the wheel. It
// returns the first disagreement found.
func (e *Engine) checkInvariants() error {
	live := func(u *user) bool {
		sh := e.shardOf(u)
		sh.mu.Lock()
		defer sh.mu.Unlock()
		return sh.holdsLocked(u)
	}
	for i := range e.shards {
		sh := &e.shards[i]
		sh.mu.Lock()
		var loggedIn, online, sessions, subs, friends int
		var err error
		var others []*user // records to check in other shards once this lock is released
		for u := range sh.all {
			if err = e.checkRecordLocked(sh, u); err != nil {
				break
			}
			if u.status != Unlogined {
				loggedIn++
			}
			if u.status == Online {
				online++
			}
			for d := range u.eachDevice {
				if d.session != nil {
					sessions++
				}
			}
			ed := u.edges.Load()
			if ed == nil {
				continue
			}
			subs += ed.subs.len()
			ed.subs.each(func(t *user, _ struct{}) bool {
				if ted := t.edges.Load(); ted == nil || !ted.subscribers.has(u) {
					err = fmt.Errorf("%s subscribes to %s but is not in its subscribers", u.id, t.id)
				}
				others = append(others, t)
				return err == nil
			})
			friends += ed.friends.len()
			for f := range ed.friends.all() {
				if fed := f.edges.Load(); fed == nil || !fed.friendOf.has(u) {
					err = fmt.Errorf("%s lists friend %s but is not in its friendOf", u.id, f.id)
				}
				others = append(others, f)
			}
			for w := range ed.subscribers.all() {
				if wed := w.edges.Load(); wed == nil || !wed.subs.has(u) {
					err = fmt.Errorf("%s has subscriber %s whose list lacks it", u.id, w.id)
				}
				others = append(others, w)
			}
			for w := range ed.friendOf.all() {
				if wed := w.edges.Load(); wed == nil || !wed.friends.has(u) {
					err = fmt.Errorf("%s is friend of %s whose list lacks it", u.id, w.id)
				}
				others = append(others, w)
			}
			if err != nil {
				break
			}
		}
		if err == nil {
			counts := [5]int{sh.loggedIn, sh.online, sh.sessions, sh.subscriptions, sh.friendships}
			recount := [5]int{loggedIn, online, sessions, subs, friends}
			if counts != recount {
				err = fmt.Errorf("shard %d counters (users, online, sessions, subs, friends) = %v, recount %v", i, counts, recount)
			}
		}
		sh.mu.Unlock()
		if err != nil {
			return err
		}
		for _, o := range others {
			if !live(o) {
				return fmt.Errorf("an index points at a dropped record of %s", o.id)
			}
		}
	}
	return nil
}

// checkRecordLocked checks one record against itself and the limits.
func (e *Engine) checkRecordLocked(sh *shard, u *user) error {
	id := u.id
	lsh, k := e.locate(id)
	switch {
	case lsh != sh || sh.getLocked(k) != u:
		return fmt.Errorf("record %q in the wrong shard, or not found by its ID", id)
	case sh.users[k.hash] != u && sh.clash[id] != u:
		return fmt.Errorf("record %q not indexed under its hash nor as a clash", id)
	case sh.users[k.hash] != u && sh.users[k.hash] == nil:
		return fmt.Errorf("record %q is a clash with a free hash slot", id)
	case u.pins != 0:
		return fmt.Errorf("%s: %d pins left", id, u.pins)
	case u.emptyLocked() && (u.timerAt == 0 || e.wheel.fired(int64(u.timerAt))):
		return fmt.Errorf("%s: empty record with no wheel entry not dropped", id)
	case u.status != u.deriveStatus():
		return fmt.Errorf("%s: status %v, devices say %v", id, u.status, u.deriveStatus())
	case u.status != Online && u.custom != "":
		return fmt.Errorf("%s: custom %q while %v", id, u.custom, u.status)
	case u.version > sh.version:
		return fmt.Errorf("%s: version %d ahead of its shard's %d", id, u.version, sh.version)
	case u.subCount() > e.cfg.MaxSubscriptions:
		return fmt.Errorf("%s: %d subscriptions", id, u.subCount())
	case u.edges.Load() != nil && u.edges.Load().friends.len() > e.cfg.MaxFriends:
		return fmt.Errorf("%s: %d friends", id, u.edges.Load().friends.len())
	case e.cfg.MaxDevices > 0 && u.deviceCount() > e.cfg.MaxDevices:
		return fmt.Errorf("%s: %d devices", id, u.deviceCount())
	}
	seen := map[string]bool{}
	for d := range u.eachDevice {
		if seen[d.id] {
			return fmt.Errorf("%s/%s: device listed twice", id, d.id)
		}
		seen[d.id] = true
	}
	var want []*Session
	for d := range u.eachDevice {
		if s := d.session; s != nil {
			if s.dev != d || s.u != u || s.ended.Load() {
				return fmt.Errorf("%s/%s: session does not belong to its device or has ended", id, d.id)
			}
			s.mu.Lock()
			n := s.box.len()
			s.mu.Unlock()
			if n > e.cfg.FeedSize {
				return fmt.Errorf("%s/%s: %d pending events, over FeedSize %d", id, d.id, n, e.cfg.FeedSize)
			}
			want = append(want, s)
		}
		if d.session != nil && d.graceUntil != 0 {
			return fmt.Errorf("%s/%s: connected and in grace at once", id, d.id)
		}
	}
	var got []*Session
	if l := u.sessions.Load(); l != nil {
		got = l.all
	}
	if !slices.Equal(got, want) {
		return fmt.Errorf("%s: published sessions %d, devices hold %d", id, len(got), len(want))
	}
	if at := e.nextDeadline(u); at != 0 {
		done := e.wheel.done.Load()
		slot := max(min(e.wheel.slotFor(time.Unix(0, at)), done+int64(horizon/e.wheel.tick)), done+1) // as scheduleLocked and schedule place it
		if u.timerAt == 0 || e.wheel.fired(int64(u.timerAt)) || int64(u.timerAt) > slot {
			return fmt.Errorf("%s: deadline at slot %d but wheel entry at %d", id, slot, u.timerAt)
		}
	}
	return nil
}
