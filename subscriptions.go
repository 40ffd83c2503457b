package presence

import (
	"fmt"
	"time"
)

// SubscribeUserStatus subscribes callerID to changes of userIDs and returns
// the targets evicted to make room, oldest first.
//
// It needs Config.StatusQuery (else ErrFeatureDisabled) and spends one call
// of the caller's SubscribeQuota (ErrRateLimited when spent). The list must
// hold 1 to Config.MaxSubscribeIDs valid IDs, none the caller's own (else
// ErrInvalidParam, and nothing changes). Duplicates count once. A target
// already subscribed moves to the newest end. Past Config.MaxSubscriptions
// the oldest targets are evicted, never an error. The current state of every
// target in the call is delivered at once to the caller's connected sessions
// (ReasonSubscribed), after which every change follows: there is no gap
// between reading the state and listening. The caller needs no session.
func (e *Engine) SubscribeUserStatus(callerID string, userIDs []string) (evicted []string, err error) {
	const op = "SubscribeUserStatus"
	if err := e.checkEdgeCall(op, callerID, userIDs, false); err != nil {
		return nil, err
	}
	for _, id := range userIDs {
		if id == callerID {
			return nil, newError(ErrInvalidParam, op, fmt.Sprintf("user %q cannot subscribe to itself", callerID))
		}
	}
	if e.closed.Load() {
		return nil, closedError(op)
	}
	if err := e.meter(op, e.subscribe, callerID); err != nil {
		return nil, err
	}

	now := e.now()
	sh, k := e.locate(callerID)
	sh.edgeMu.Lock()
	defer sh.edgeMu.Unlock()
	a := e.pin(sh, k)

	// Reverse edges first, each with the target's state delivered under its
	// delivery lock, so the initial state and the changes after it reach the
	// caller in version order.
	targets := make([]*user, len(userIDs))
	seen := make(map[string]*user, len(userIDs))
	var t tally
	for i, id := range userIDs {
		if tu, dup := seen[id]; dup {
			targets[i] = tu
			continue
		}
		tsh, tk := e.locate(id)
		tsh.mu.Lock()
		tu := tsh.getOrCreateLocked(tk)
		// This waits, holding the shard lock, while a change of tu is being
		// delivered: edges change rarely, changes often, and only changes
		// are handed off (see finish).
		tu.fanMu.Lock()
		tu.edgesLocked().subscribers.add(a)
		var ev Event
		tu.viewInto(&ev.UserStatus)
		ev.Reason = ReasonSubscribed
		tsh.mu.Unlock()
		t.toUser(a, &ev)
		e.releaseFan(tsh, tu, false) // changes applied since the view follow it
		seen[id], targets[i] = tu, tu
	}
	sh.addTally(t)

	// Then the forward list, in call order, trimmed to the limit.
	var gone []*user
	sh.mu.Lock()
	ed := a.edgesLocked()
	list := &ed.subs
	before := list.len()
	fresh := 0
	for _, tu := range seen {
		if !list.has(tu) {
			fresh++
		}
	}
	list.grow(fresh)
	for _, tu := range targets {
		list.put(tu, struct{}{})
	}
	for list.len() > e.cfg.MaxSubscriptions {
		old, _, _ := list.popOldest()
		gone = append(gone, old)
	}
	sh.subscriptions += list.len() - before
	if a.status != Online {
		ed.idleSince = now.UnixNano() // the TTL counts from the latest subscribe
	}
	a.pins--
	e.scheduleLocked(a)
	sh.mu.Unlock()

	for _, old := range gone {
		evicted = append(evicted, old.id)
		e.unlinkSubscriber(old, a)
	}
	return evicted, nil
}

// UnsubscribeUserStatus removes userIDs from callerID's subscriptions; an
// empty or nil list removes all of them. Targets not subscribed are ignored.
// It needs Config.StatusQuery (else ErrFeatureDisabled), spends one call of
// the caller's UnsubscribeQuota (ErrRateLimited when spent), and takes at
// most Config.MaxSubscribeIDs valid IDs (else ErrInvalidParam).
func (e *Engine) UnsubscribeUserStatus(callerID string, userIDs []string) error {
	const op = "UnsubscribeUserStatus"
	if err := e.checkEdgeCall(op, callerID, userIDs, true); err != nil {
		return err
	}
	if e.closed.Load() {
		return closedError(op)
	}
	if err := e.meter(op, e.unsubscribe, callerID); err != nil {
		return err
	}
	sh, k := e.locate(callerID)
	sh.edgeMu.Lock()
	defer sh.edgeMu.Unlock()
	if len(userIDs) == 0 {
		e.unsubscribeAll(sh, k, nil)
		return nil
	}
	// Resolve the targets first: their records live in other shards.
	targets := make([]*user, 0, len(userIDs))
	for _, id := range userIDs {
		tsh, tk := e.locate(id)
		tsh.mu.Lock()
		if tu := tsh.getLocked(tk); tu != nil {
			targets = append(targets, tu)
		}
		tsh.mu.Unlock()
	}
	sh.mu.Lock()
	a := sh.getLocked(k)
	if a == nil || a.subCount() == 0 {
		sh.mu.Unlock()
		return nil
	}
	list := &a.edges.Load().subs
	removed := targets[:0]
	for _, tu := range targets {
		if list.remove(tu) {
			removed = append(removed, tu)
		}
	}
	sh.subscriptions -= len(removed)
	sh.dropIfEmptyLocked(a)
	sh.mu.Unlock()
	for _, tu := range removed {
		e.unlinkSubscriber(tu, a)
	}
	return nil
}

// unsubscribeAll clears the subscription list of k's user. With idle set, it does
// so only if the user is still idle past the TTL at that moment. The caller
// holds sh.edgeMu.
func (e *Engine) unsubscribeAll(sh *shard, k key, idle *time.Time) {
	sh.mu.Lock()
	a := sh.getLocked(k)
	if a == nil || a.subCount() == 0 {
		sh.mu.Unlock()
		return
	}
	if end, running := e.subscriptionsEnd(a); idle != nil && (!running || idle.UnixNano() < end) {
		sh.mu.Unlock()
		return
	}
	list := &a.edges.Load().subs
	targets := make([]*user, 0, list.len())
	list.each(func(tu *user, _ struct{}) bool {
		targets = append(targets, tu)
		return true
	})
	sh.subscriptions -= len(targets)
	*list = fifo[*user, struct{}]{} // let the memory go: a cleared list is often left so
	sh.dropIfEmptyLocked(a)
	sh.mu.Unlock()
	for _, tu := range targets {
		e.unlinkSubscriber(tu, a)
	}
}

// clearIdleSubscriptions is the subscription TTL: it runs from the wheel
// when u has not been Online for Config.SubscriptionTTL. u itself may have
// been dropped and made again since; the key finds the live record.
func (e *Engine) clearIdleSubscriptions(u *user, now time.Time) {
	sh, k := e.locate(u.id)
	sh.edgeMu.Lock()
	defer sh.edgeMu.Unlock()
	e.unsubscribeAll(sh, k, &now)
}

// Subscriptions returns userID's subscription targets, oldest first, or nil
// if there are none, the ID is not valid or the engine is closed.
func (e *Engine) Subscriptions(userID string) []string {
	if e.closed.Load() || e.checkID("", "", userID) != nil {
		return nil
	}
	sh, k := e.locate(userID)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	a := sh.getLocked(k)
	if a == nil || a.subCount() == 0 {
		return nil
	}
	list := &a.edges.Load().subs
	ids := make([]string, 0, list.len())
	list.each(func(tu *user, _ struct{}) bool {
		ids = append(ids, tu.id)
		return true
	})
	return ids
}

// checkEdgeCall validates the caller and the list of a subscription call.
func (e *Engine) checkEdgeCall(op, callerID string, userIDs []string, emptyOK bool) error {
	if err := e.checkID(op, "caller ID", callerID); err != nil {
		return err
	}
	if emptyOK && len(userIDs) == 0 {
		return nil
	}
	return e.checkIDs(op, userIDs, e.cfg.MaxSubscribeIDs)
}

// pin returns the record of k's user, made if needed, and keeps it from being
// dropped until the caller decrements pins under sh.mu. The caller holds
// sh.edgeMu.
func (e *Engine) pin(sh *shard, k key) *user {
	sh.mu.Lock()
	a := sh.getOrCreateLocked(k)
	a.pins++
	sh.mu.Unlock()
	return a
}

// unlinkSubscriber removes subscriber a from tu's reverse index.
func (e *Engine) unlinkSubscriber(tu, a *user) {
	tsh := e.shardOf(tu)
	tsh.mu.Lock()
	tu.fanMu.Lock()
	tu.edges.Load().subscribers.remove(a)
	tu.fanMu.Unlock()
	tsh.dropIfEmptyLocked(tu)
	tsh.mu.Unlock()
}
