package presence

import "fmt"

// AddFriends records that userID is to be notified about each of friendIDs
// (directed edges: the friends are not notified about userID). With
// Config.NotifyFriends on, changes of a friend reach userID's sessions
// without a subscription; with it off the edges are kept but unused. Friends
// need no switch and use no quota. The list must hold at least one valid
// ID, not userID itself, and userID's friends must stay within
// Config.MaxFriends (else ErrInvalidParam, and nothing changes). Friends
// already listed are ignored.
func (e *Engine) AddFriends(userID string, friendIDs ...string) error {
	const op = "AddFriends"
	if err := e.checkFriendCall(op, userID, friendIDs); err != nil {
		return err
	}
	if e.closed.Load() {
		return closedError(op)
	}
	sh, k := e.locate(userID)
	sh.edgeMu.Lock()
	defer sh.edgeMu.Unlock()
	a := e.pin(sh, k)

	// Count the new edges before changing anything: over the limit, the
	// call fails whole.
	fresh := make([]string, 0, len(friendIDs))
	seen := make(map[string]bool, len(friendIDs))
	for _, id := range friendIDs {
		if seen[id] {
			continue
		}
		seen[id] = true
		fsh, fk := e.locate(id)
		fsh.mu.Lock()
		already := fsh.getLocked(fk).friendOf(a)
		fsh.mu.Unlock()
		if !already {
			fresh = append(fresh, id)
		}
	}
	sh.mu.Lock()
	if n := a.edgesLocked().friends.len() + len(fresh); n > e.cfg.MaxFriends {
		a.pins--
		sh.dropIfEmptyLocked(a)
		sh.mu.Unlock()
		return newError(ErrInvalidParam, op, fmt.Sprintf("user %q would have %d friends, over the limit of %d", userID, n, e.cfg.MaxFriends))
	}
	sh.mu.Unlock()

	added := make([]*user, 0, len(fresh))
	for _, id := range fresh {
		fsh, fk := e.locate(id)
		fsh.mu.Lock()
		f := fsh.getOrCreateLocked(fk)
		f.fanMu.Lock()
		f.edgesLocked().friendOf.add(a)
		f.fanMu.Unlock()
		fsh.mu.Unlock()
		added = append(added, f)
	}
	sh.mu.Lock()
	ed := a.edgesLocked()
	for _, f := range added {
		ed.friends.add(f)
	}
	sh.friendships += len(added)
	a.pins--
	sh.dropIfEmptyLocked(a)
	sh.mu.Unlock()
	return nil
}

// RemoveFriends removes friendIDs from userID's friends; IDs that are not
// friends are ignored. The list must hold at least one valid ID, and not
// userID itself (else ErrInvalidParam).
func (e *Engine) RemoveFriends(userID string, friendIDs ...string) error {
	const op = "RemoveFriends"
	if err := e.checkFriendCall(op, userID, friendIDs); err != nil {
		return err
	}
	if e.closed.Load() {
		return closedError(op)
	}
	sh, k := e.locate(userID)
	sh.edgeMu.Lock()
	defer sh.edgeMu.Unlock()
	sh.mu.Lock()
	a := sh.getLocked(k)
	sh.mu.Unlock()
	if a == nil {
		return nil
	}
	for _, id := range friendIDs {
		fsh, fk := e.locate(id)
		fsh.mu.Lock()
		f := fsh.getLocked(fk)
		linked := f.friendOf(a)
		if linked {
			f.fanMu.Lock()
			f.edges.Load().friendOf.remove(a)
			f.fanMu.Unlock()
			fsh.dropIfEmptyLocked(f)
		}
		fsh.mu.Unlock()
		if linked {
			sh.mu.Lock()
			a.edges.Load().friends.remove(f)
			sh.friendships--
			sh.dropIfEmptyLocked(a)
			sh.mu.Unlock()
		}
	}
	return nil
}

// friendOf reports whether a lists u as a friend; u may be nil. Call with
// u's shard lock held.
func (u *user) friendOf(a *user) bool {
	if u == nil {
		return false
	}
	ed := u.edges.Load()
	return ed != nil && ed.friendOf.has(a)
}

func (e *Engine) checkFriendCall(op, userID string, friendIDs []string) error {
	if err := e.checkID(op, "user ID", userID); err != nil {
		return err
	}
	if len(friendIDs) == 0 {
		return newError(ErrInvalidParam, op, "no friend IDs given")
	}
	for _, id := range friendIDs {
		if err := e.checkID(op, "friend ID", id); err != nil {
			return err
		}
		if id == userID {
			return newError(ErrInvalidParam, op, fmt.Sprintf("user %q cannot be its own friend", userID))
		}
	}
	return nil
}
