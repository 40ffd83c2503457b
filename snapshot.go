package presence

import (
	"context"
	"errors"
	"fmt"
	"iter"
	"runtime"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"
)

// Store saves and loads the engine's state: package persist provides one on
// a bbolt file. Both directions stream, so neither the engine nor the Store
// needs a second full copy of the state in memory.
//
// The engine calls Save and Load from one goroutine at a time and never
// while holding a lock that guards its state (only the one that keeps two
// snapshots from overlapping). Each call's ctx ends after
// Config.SnapshotTimeout; both must return soon after it does, since a
// stalled Save holds up the next snapshot and Close.
type Store interface {
	// Save replaces the stored state with the records that records yields,
	// in batches. The replacement must be atomic: after a crash at any
	// moment, Load returns either the previous complete state or this one.
	// A batch is valid only until the iteration continues; the Store must
	// copy what it keeps. If the stream yields a non-nil error (ctx ended
	// while it ran), the state is incomplete: Save must return that error
	// without replacing anything.
	Save(ctx context.Context, records iter.Seq2[[]Record, error]) error

	// Load calls add with every record of the latest complete state, in
	// batches, and returns the first error add returns. A Store with
	// nothing saved yet calls add zero times and returns nil. A batch is
	// valid only until add returns.
	Load(ctx context.Context, add func([]Record) error) error
}

// Record is one user's state as a Store keeps it. Quota buckets and
// mailboxes are not part of it: they describe the running process.
type Record struct {
	UserID        string
	Custom        string
	Version       uint64
	IdleSince     time.Time // when the user last left Online (drives Config.SubscriptionTTL)
	Devices       []DeviceRecord
	Subscriptions []string // oldest first
	Friends       []string
}

// DeviceRecord is one logged-in device in a Record.
type DeviceRecord struct {
	DeviceID  string
	Connected bool // online when saved; restored as offline-pending
	LoginAt   time.Time
	LastSeen  time.Time
}

// batchUsers is how many records the engine copies under one shard lock
// while saving: small enough that a writer on that shard waits only
// microseconds.
const batchUsers = 256

// records streams every user with state of its own, a batch at a time. Each
// shard is visited twice under its lock: once to list its records, then in
// batches to copy them, so no lock is held while the Store writes. The copy
// runs one batch ahead in a goroutine of its own: copying is bound by memory
// latency, the Store's encoding and writing by the file, so the two overlap.
// Two batches exist at a time, never more.
func (e *Engine) records(ctx context.Context) iter.Seq2[[]Record, error] {
	return func(yield func([]Record, error) bool) {
		full := make(chan []Record)     // copied batches, to the consumer
		empty := make(chan []Record, 2) // batches the consumer is done with
		empty <- make([]Record, 0, batchUsers)
		empty <- make([]Record, 0, batchUsers)
		stop := make(chan struct{})
		done := make(chan struct{})
		go func() {
			defer close(done)
			defer close(full)
			e.copyRecords(ctx, empty, full, stop)
		}()
		defer func() { close(stop); <-done }()
		for batch := range full {
			if !yield(batch, nil) {
				return
			}
			empty <- batch
		}
		if err := ctx.Err(); err != nil {
			yield(nil, err)
		}
	}
}

// copyRecords fills batches taken from empty and sends them on full, until
// every shard is copied, ctx ends or stop closes.
func (e *Engine) copyRecords(ctx context.Context, empty <-chan []Record, full chan<- []Record, stop <-chan struct{}) {
	var users []*user
	for i := range e.shards {
		sh := &e.shards[i]
		users = users[:0]
		sh.mu.Lock()
		for u := range sh.all {
			if u.hasOwnState() {
				users = append(users, u)
			}
		}
		sh.mu.Unlock()
		for len(users) > 0 {
			if ctx.Err() != nil {
				return
			}
			var batch []Record
			select {
			case batch = <-empty:
			case <-stop:
				return
			}
			n := min(batchUsers, len(users))
			batch = batch[:0]
			sh.mu.Lock()
			for _, u := range users[:n] {
				if sh.holdsLocked(u) && u.hasOwnState() {
					batch = batch[:len(batch)+1]
					u.recordLocked(&batch[len(batch)-1])
				}
			}
			sh.mu.Unlock()
			users = users[n:]
			select {
			case full <- batch:
			case <-stop:
				return
			}
		}
	}
}

// hasOwnState reports whether the record holds anything a Store must keep.
// A record that only anchors other users' edges is rebuilt from their lists.
func (u *user) hasOwnState() bool {
	if len(u.devices) > 0 || u.custom != "" {
		return true
	}
	ed := u.edges.Load()
	return ed != nil && (ed.subs.len() > 0 || ed.friends.len() > 0)
}

// recordLocked copies u into r, reusing r's slices: a batch's records are
// refilled for every batch. The strings are shared, not copied: a record's
// strings never change.
func (u *user) recordLocked(r *Record) {
	*r = Record{
		UserID: u.id, Custom: u.custom, Version: u.version,
		Devices: r.Devices[:0], Subscriptions: r.Subscriptions[:0], Friends: r.Friends[:0],
	}
	if u.idleSince != 0 {
		r.IdleSince = time.Unix(0, u.idleSince)
	}
	for _, d := range u.devices {
		r.Devices = append(r.Devices, DeviceRecord{DeviceID: d.id, Connected: d.online(), LoginAt: time.Unix(0, d.loginAt), LastSeen: time.Unix(0, d.lastSeen)})
	}
	ed := u.edges.Load()
	if ed == nil {
		return
	}
	ed.subs.each(func(t *user, _ struct{}) bool {
		r.Subscriptions = append(r.Subscriptions, t.id)
		return true
	})
	for f := range ed.friends.all() {
		r.Friends = append(r.Friends, f.id)
	}
}

// Snapshot saves the engine's state to Config.Store now and waits for it.
// Only one snapshot runs at a time; a call made during another waits for it,
// or until ctx ends. Config.SnapshotTimeout bounds the whole call, and Close
// ends it early.
// A writer is held up at most while its shard's records are listed, or 256
// of them copied.
// Without a Store it returns an error.
func (e *Engine) Snapshot(ctx context.Context) error {
	if e.closed.Load() {
		return closedError("Snapshot")
	}
	return e.save(ctx, false)
}

// save writes a snapshot; final marks Close's own, the only one allowed
// once the engine is closed: a Snapshot call that was waiting for its turn
// must not overwrite it with the state Close leaves behind. Every other save
// also ends when Close begins, so Close waits for at most its own.
func (e *Engine) save(ctx context.Context, final bool) error {
	if e.cfg.Store == nil {
		return errNoStore
	}
	ctx, cancel := context.WithTimeout(ctx, e.cfg.SnapshotTimeout)
	defer cancel()
	if !final {
		defer context.AfterFunc(e.closing, cancel)()
	}
	// The turn is a channel slot rather than a mutex so that a caller
	// waiting behind a stalled save gives up when its ctx ends.
	select {
	case e.snapTurn <- struct{}{}:
		defer func() { <-e.snapTurn }()
	case <-ctx.Done():
		if !final && e.closed.Load() {
			return closedError("Snapshot")
		}
		return e.recordSave(fmt.Errorf("presence: snapshot: waiting for the snapshot before it: %w", ctx.Err()))
	}
	if !final && e.closed.Load() {
		return closedError("Snapshot")
	}
	err := ctx.Err()
	if err == nil {
		err = e.cfg.Store.Save(ctx, e.records(ctx))
	}
	switch {
	case err != nil && !final && e.closed.Load():
		err = closedError("Snapshot") // Close ended it
	case err != nil:
		err = fmt.Errorf("presence: snapshot: %w", err)
	}
	return e.recordSave(err)
}

// recordSave reports a save's outcome in Stats and returns err.
func (e *Engine) recordSave(err error) error {
	e.snapStat.Lock()
	if err == nil {
		e.lastSnapshot = e.now()
	} else {
		e.snapFailures++
	}
	e.lastSnapshotErr = err
	e.snapStat.Unlock()
	return err
}

// snapshotLoop saves every Config.SnapshotInterval until Close. A failure is
// reported in Stats and the engine keeps serving; the next tick tries again.
func (e *Engine) snapshotLoop() {
	defer e.wg.Done()
	ctx := e.closing
	t := time.NewTicker(e.cfg.SnapshotInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			_ = e.save(ctx, false)
		}
	}
}

// restore loads the Store's state into the empty engine before New returns.
// Devices that were online come back offline-pending: they keep their user's
// status and custom text until Config.HeartbeatTimeout passes without a new
// login, so a quick restart is invisible to watchers. Each batch is spread
// over one goroutine per CPU; they have all returned before the next batch.
func (e *Engine) restore(ctx context.Context) error {
	now := e.now()
	var top atomic.Uint64
	workers := runtime.GOMAXPROCS(0)
	errs := make([]error, workers)
	err := e.cfg.Store.Load(ctx, func(batch []Record) error {
		var wg sync.WaitGroup
		for w := range workers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				var high uint64
				for i := w; i < len(batch) && errs[w] == nil; i += workers {
					errs[w] = e.restoreRecord(&batch[i], now)
					high = max(high, batch[i].Version)
				}
				for old := top.Load(); high > old && !top.CompareAndSwap(old, high); old = top.Load() {
				}
			}()
		}
		wg.Wait()
		return errors.Join(errs...)
	})
	if err == nil {
		// A Store that dropped add's error must not leave a half-restored
		// engine behind.
		err = errors.Join(errs...)
	}
	if err != nil {
		return err
	}
	for i := range e.shards {
		sh := &e.shards[i]
		sh.mu.Lock()
		sh.version = max(sh.version, top.Load()) // records re-made later stay ahead of every saved version
		for u := range sh.all {
			e.scheduleLocked(u)
		}
		sh.mu.Unlock()
	}
	return nil
}

var errRecord = errors.New("invalid record")

// maxStoredID bounds the IDs a restore accepts, whatever Config.MaxIDBytes
// is now: anything longer is damage, not a limit that was lowered.
const maxStoredID = 1 << 16

// restoreRecord validates one record and adds it. The engine is not shared
// yet, but the locks are taken as usual so the helpers' rules hold.
func (e *Engine) restoreRecord(r *Record, now time.Time) error {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w for user %q: %s", errRecord, r.UserID, fmt.Sprintf(format, args...))
	}
	// Structure is checked, not today's Config limits: a host that lowers
	// MaxIDBytes or MaxCustomStatusBytes must still be able to start. The
	// limits apply to what is set from now on.
	if problem := idProblem(r.UserID, maxStoredID); problem != "" {
		return bad("user ID %s", problem)
	}
	if !utf8.ValidString(r.Custom) {
		return bad("custom status is not valid UTF-8")
	}
	seen := make(map[string]bool, len(r.Devices)+len(r.Subscriptions)+len(r.Friends))
	for _, d := range r.Devices {
		if problem := idProblem(d.DeviceID, maxStoredID); problem != "" || seen[d.DeviceID] {
			return bad("device ID %q invalid or repeated", d.DeviceID)
		}
		seen[d.DeviceID] = true
	}
	for _, list := range [][]string{r.Subscriptions, r.Friends} {
		clear(seen)
		for _, id := range list {
			if problem := idProblem(id, maxStoredID); problem != "" || id == r.UserID || seen[id] {
				return bad("edge to %q invalid, repeated or to itself", id)
			}
			seen[id] = true
		}
	}

	sh, k := e.locate(r.UserID)
	sh.mu.Lock()
	u := sh.getOrCreateLocked(k)
	if u.hasOwnState() || u.pins != 0 { // pinned: another worker is restoring the same user
		sh.mu.Unlock()
		return bad("user saved twice")
	}
	c := beginChange(u)
	devices := r.Devices
	if max := e.cfg.MaxDevices; max > 0 && len(devices) > max {
		devices = devices[len(devices)-max:] // the newest logins, as Login would keep
	}
	for _, dr := range devices {
		d := &device{id: dr.DeviceID, loginAt: dr.LoginAt.UnixNano(), lastSeen: dr.LastSeen.UnixNano()}
		if dr.Connected {
			d.graceUntil, d.held = now.Add(e.cfg.HeartbeatTimeout).UnixNano(), ReasonTimeout
		}
		u.devices = append(u.devices, d)
	}
	u.custom = r.Custom
	u.status = u.deriveStatus()
	if u.status != Online {
		u.custom = ""
	}
	sh.countStatus(c.prevStatus, u.status)
	u.version = r.Version
	if !r.IdleSince.IsZero() {
		u.idleSince = r.IdleSince.UnixNano()
	}
	u.pins++ // keep the record while its edges are linked
	sh.mu.Unlock()

	subs := r.Subscriptions
	if len(subs) > e.cfg.MaxSubscriptions {
		subs = subs[len(subs)-e.cfg.MaxSubscriptions:] // the newest, as eviction would keep
	}
	friends := r.Friends[:min(len(r.Friends), e.cfg.MaxFriends)]
	targets := make([]*user, 0, max(len(subs), len(friends)))
	for _, id := range subs {
		targets = append(targets, e.linkRestored(id, u, false))
	}
	sh.mu.Lock()
	if len(targets) > 0 {
		list := &u.edgesLocked().subs
		list.grow(len(targets))
		for _, t := range targets {
			list.putNew(t, struct{}{}) // the record's list was checked for repeats
		}
		sh.subscriptions += len(targets)
	}
	sh.mu.Unlock()

	targets = targets[:0]
	for _, id := range friends {
		targets = append(targets, e.linkRestored(id, u, true))
	}
	sh.mu.Lock()
	if len(targets) > 0 {
		ed := u.edgesLocked()
		for _, f := range targets {
			ed.friends.addNew(f)
		}
		sh.friendships += len(targets)
	}
	u.pins--
	sh.dropIfEmptyLocked(u)
	sh.mu.Unlock()
	return nil
}

// linkRestored adds u to the reverse index (subscribers or friendOf) of id.
func (e *Engine) linkRestored(id string, u *user, friend bool) *user {
	tsh, tk := e.locate(id)
	tsh.mu.Lock()
	defer tsh.mu.Unlock()
	t := tsh.getOrCreateLocked(tk)
	// No delivery can run before New returns, so the shard lock alone
	// guards the index here.
	// Each record's lists were checked for repeats, and each record comes
	// once, so every edge here is new.
	if friend {
		t.edgesLocked().friendOf.addNew(u)
	} else {
		t.edgesLocked().subscribers.addNew(u)
	}
	return t
}
