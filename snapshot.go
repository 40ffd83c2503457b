package presence

import (
	"context"
	"errors"
	"fmt"
	"iter"
	"math/bits"
	"runtime"
	"slices"
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
	// valid only until add returns, and so are the strings in its records:
	// they may point into a buffer the Store refills with the next batch.
	// The engine copies every string it keeps.
	Load(ctx context.Context, add func([]Record) error) error
}

// Record is one user's state as a Store keeps it. Quota buckets and
// mailboxes are not part of it: they describe the running process.
type Record struct {
	UserID        string
	Custom        string
	Version       uint64
	IdleSince     time.Time // when Config.SubscriptionTTL started counting: the user last left Online, or subscribed while not Online; zero without subscriptions
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
//
// Listing takes only the index's pointers: whether a record has state of
// its own is looked at when it is copied, together with the rest of it.
func (e *Engine) copyRecords(ctx context.Context, empty <-chan []Record, full chan<- []Record, stop <-chan struct{}) {
	var users []*user
	var w saveWarmer
	var batch []Record // being filled; nil until taken from empty
	for i := range e.shards {
		sh := &e.shards[i]
		users = users[:0]
		sh.mu.Lock()
		for u := range sh.all {
			users = append(users, u)
		}
		sh.mu.Unlock()
		for len(users) > 0 {
			if ctx.Err() != nil {
				return
			}
			if batch == nil {
				select {
				case batch = <-empty:
				case <-stop:
					return
				}
			}
			n := min(batchUsers, len(users))
			batch = batch[:0]
			sh.mu.Lock()
			for j, u := range users[:n] {
				if j%warmUsers == 0 {
					w.warmLocked(users[j:min(j+warmUsers, n)])
				}
				if u.hasOwnState() && sh.holdsLocked(u) {
					batch = batch[:len(batch)+1]
					u.recordLocked(&batch[len(batch)-1])
				}
			}
			sh.mu.Unlock()
			users = users[n:]
			if len(batch) == 0 {
				continue // nothing to save among these: fill the same batch again
			}
			select {
			case full <- batch:
				batch = nil
			case <-stop:
				return
			}
		}
	}
}

// warmUsers is how many records saveWarmer reads ahead of the copy: what
// they lead to fits in the CPU's first-level cache.
const warmUsers = 32

// saveWarmer reads what copying a batch will read, a step at a time for the
// whole batch: the records, then their devices and edges, then the records
// their edges lead to. Each step's loads do not wait for each other, so the
// CPU overlaps their cache misses, where copying record by record would
// wait for them one after another; the copy then finds them cached.
type saveWarmer struct {
	eds  [warmUsers]*edges
	devs [warmUsers]*device
	sum  int // what is read, so that the reads are not optimized away
}

func (w *saveWarmer) warmLocked(users []*user) {
	sum := 0
	for j, u := range users {
		w.eds[j], w.devs[j] = u.edges.Load(), u.devices
	}
	for j := range users {
		if d := w.devs[j]; d != nil {
			sum += int(d.lastSeen)
		}
		if ed := w.eds[j]; ed != nil {
			sum += len(ed.subs.nodes) + len(ed.friends.list)
		}
	}
	for j := range users {
		ed := w.eds[j]
		if ed == nil {
			continue
		}
		for k := range ed.subs.nodes {
			if t := ed.subs.nodes[k].key; t != nil {
				sum += len(t.id)
			}
		}
		for _, t := range ed.friends.list {
			sum += len(t.id)
		}
	}
	w.sum += sum
}

// hasOwnState reports whether the record holds anything a Store must keep.
// A record that only anchors other users' edges is rebuilt from their lists.
func (u *user) hasOwnState() bool {
	if u.devices != nil || u.custom != "" {
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
	for d := range u.eachDevice {
		r.Devices = append(r.Devices, DeviceRecord{DeviceID: d.id, Connected: d.online(), LoginAt: time.Unix(0, d.loginAt), LastSeen: time.Unix(0, d.lastSeen)})
	}
	ed := u.edges.Load()
	if ed == nil {
		return
	}
	if ed.subs.len() > 0 && ed.idleSince != 0 {
		r.IdleSince = time.Unix(0, ed.idleSince)
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
// login, so a quick restart is invisible to watchers.
func (e *Engine) restore(ctx context.Context) error {
	n := runtime.GOMAXPROCS(0)
	rs := &restoring{
		e:       e,
		now:     e.now(),
		index:   make([]restoreIndex, len(e.shards)), // dropped when the restore ends
		shares:  make([]share, n),
		workers: make([]restorer, n),
	}
	for w := range rs.workers {
		rs.workers[w].rs = rs
	}
	err := e.cfg.Store.Load(ctx, rs.add)
	if err == nil {
		err = rs.err // a Store that dropped add's error must not leave a half-restored engine behind
	}
	if err != nil {
		return err
	}
	var top uint64
	for w := range rs.workers {
		top = max(top, rs.workers[w].top)
	}
	for i := range e.shards {
		sh := &e.shards[i]
		sh.mu.Lock()
		sh.version = max(sh.version, top) // records re-made later stay ahead of every saved version
		sh.mu.Unlock()
	}
	return nil
}

// restoring is a restore under way, shared by its goroutines, one per CPU.
// The engine is not shared yet, but the locks are taken as usual so the
// helpers' rules hold.
//
// At a million users the records are far bigger than the caches, and
// finding a record is a chain of cache misses. Taken record by record, those
// chains run one after another. A batch is therefore restored in passes,
// each over many records grouped by shard: each shard is locked once per
// group (a lock is a fence, which would keep the CPU from overlapping one
// lookup's misses with the next's), records are found through the shard's
// restoreIndex rather than its map, and the steps of each chain are taken
// for the whole group at a time (see warmGroup), so that their misses
// overlap. The passes: check the records and queue their edges; make the
// records and restore what they hold themselves; link every edge into its
// target's reverse index; fill in the records' own lists, whose sizes are
// known by then. The buffers are kept from batch to batch.
//
// The first pass splits the batch into one share per goroutine. The others
// go shard by shard: each goroutine takes the next shard no one has taken
// and does the pass's work there for every share, one share after the
// other. So no goroutine waits for a shard another one holds, nor, at the
// end of a pass, for one held up by the Store's decoding or by the
// collector; and each user's records come in batch order, as restoring
// the records one by one would take them.
type restoring struct {
	e       *Engine
	now     time.Time
	index   []restoreIndex // one per shard: see restoreIndex
	shares  []share        // of the batch, one per goroutine
	workers []restorer     // one per goroutine
	next    atomic.Int32   // the next shard to take in a pass (see eachShard)
	err     error          // the first invalid record's: the restore has failed

	// A batch of fewer than smallBatch records (a Store may hand them over
	// one at a time) is restored by the calling goroutine alone, and each
	// pass visits only the shards it touches, listed in few (marked in
	// touched): goroutines and a visit to every shard would cost far more
	// than the records themselves.
	small   bool
	few     []int
	touched []bool

	// Records and edges seen so far: their ratio predicts how many
	// subscribers (friendOf) a target will have, so its set is made that
	// big at once rather than grown step by step.
	records, subs, friends int
}

// add restores a batch. If a record in it is invalid, it returns the error
// of the first, the one restoring the records one by one would have met,
// and so does every later call: New then discards the engine.
func (rs *restoring) add(batch []Record) error {
	if rs.err != nil {
		return rs.err
	}
	rs.small = len(batch) < smallBatch
	bits := indexRegionBits
	if rs.small {
		bits = 0 // ordering a few lookups by region gains nothing, and the grouping's cost grows with the groups
	}
	rs.parallel(func(w int) {
		n := len(rs.shares)
		rs.shares[w].queue(rs.e, batch, len(batch)*w/n, len(batch)*(w+1)/n, bits)
	})
	if rs.small {
		rs.listTouched()
	}
	failed := len(batch) // the first invalid record
	for w := range rs.shares {
		if s := &rs.shares[w]; s.err != nil && s.failed < failed {
			failed, rs.err = s.failed, s.err
		}
	}
	rs.eachShard(func(r *restorer, s int) { r.restoreOwners(batch, s) })
	for w := range rs.workers {
		if r := &rs.workers[w]; r.err != nil && r.failed < failed {
			failed, rs.err = r.failed, r.err
		}
	}
	if rs.err != nil {
		return rs.err
	}
	rs.records += len(batch)
	for w := range rs.shares {
		rs.subs += rs.shares[w].subs
		rs.friends += rs.shares[w].friends
	}
	rs.eachShard((*restorer).linkTargets)
	rs.eachShard((*restorer).linkOwners)
	return nil
}

// smallBatch is the size under which a batch is restored without goroutines
// (see restoring.small).
const smallBatch = 64

// listTouched lists in rs.few the shards that a small batch's records and
// their edges' targets fall in.
func (rs *restoring) listTouched() {
	if rs.touched == nil {
		rs.touched = make([]bool, len(rs.e.shards))
	}
	for _, s := range rs.few {
		rs.touched[s] = false
	}
	rs.few = rs.few[:0]
	note := func(hash uint64) {
		if s := int(hash & rs.e.mask); !rs.touched[s] {
			rs.touched[s] = true
			rs.few = append(rs.few, s)
		}
	}
	for w := range rs.shares {
		for _, o := range rs.shares[w].owners {
			note(o.key.hash)
		}
		for _, l := range rs.shares[w].links {
			note(l.target.hash)
		}
	}
}

// parallel calls fn(w) for every goroutine w of the restore, each in a
// goroutine of its own, and returns once all have returned; for a small
// batch it makes the calls itself, one after another.
func (rs *restoring) parallel(fn func(w int)) {
	if rs.small {
		for w := range rs.workers {
			fn(w)
		}
		return
	}
	var wg sync.WaitGroup
	for w := range rs.workers {
		wg.Go(func() { fn(w) })
	}
	wg.Wait()
}

// eachShard calls fn once for every shard s, with the shard locked, from
// whichever goroutine takes s first. For a small batch it calls fn itself,
// for the shards the batch touches only: the others have nothing to do.
func (rs *restoring) eachShard(fn func(r *restorer, s int)) {
	if rs.small {
		for _, s := range rs.few {
			sh := &rs.e.shards[s]
			sh.mu.Lock()
			fn(&rs.workers[0], s)
			sh.mu.Unlock()
		}
		return
	}
	rs.next.Store(0)
	rs.parallel(func(w int) {
		for {
			s := int(rs.next.Add(1) - 1)
			if s >= len(rs.e.shards) {
				return
			}
			sh := &rs.e.shards[s]
			sh.mu.Lock()
			fn(&rs.workers[w], s)
			sh.mu.Unlock()
		}
	})
}

// linkedBefore reports whether a record before o in the batch has an edge
// to o's user. o is share w's. Call with the user's shard locked.
func (rs *restoring) linkedBefore(w int, o *restoredOwner) bool {
	s := int(o.key.hash & rs.e.mask)
	for v := range rs.shares[:w+1] {
		sr := &rs.shares[v]
		for _, l := range sr.linkGroup(s) {
			if l.target == o.key && (v < w || int(l.at) < o.firstLink) {
				return true
			}
		}
	}
	return false
}

var errRecord = errors.New("invalid record")

// maxStoredID bounds the IDs a restore accepts, whatever Config.MaxIDBytes
// is now: anything longer is damage, not a limit that was lowered.
const maxStoredID = 1 << 16

// share is the part of a batch one goroutine checks and queues.
type share struct {
	owners  []restoredOwner // the share's valid records
	links   []restoredLink  // their edges, each record's subscriptions then friends
	targets []*user         // the record each link leads to, once linked
	keys    [2][]key        // from check: the keys of a record's subscriptions and friends
	hashes  hashSet         // scratch for check
	seen    map[string]bool // scratch for checkExactly

	subs, friends int // edges queued

	// Records grouped by shard: ownerOrder lists owners' indexes shard by
	// shard (see groupByShard); grouped holds the links in linkOrder.
	ownerOrder, ownerEnds []int32
	linkOrder, linkEnds   []int32
	grouped               []restoredLink
	regionBits            int // of the grouping: indexRegionBits, or 0 for a small batch (see restoring.add)

	// The share's first invalid record, if any: its index in the batch,
	// and what is wrong with it. The records after it are not queued.
	failed int
	err    error
}

// ownerGroup returns the indexes in s.owners of shard i's owners, in the
// order groupByShard gives: by region of the shard's restore index, and in
// batch order within a region, so one user's records keep their order.
func (s *share) ownerGroup(i int) []int32 {
	begin, end := groupBounds(s.ownerEnds, s.regionBits, i)
	return s.ownerOrder[begin:end]
}

// linkGroup returns the part of s.grouped that links to shard i's users.
func (s *share) linkGroup(i int) []restoredLink {
	begin, end := groupBounds(s.linkEnds, s.regionBits, i)
	return s.grouped[begin:end]
}

// queue checks and queues batch[from:to], up to the first invalid record,
// and groups what it queued by shard and, with regionBits above 0, by
// region of the shard's restore index.
func (s *share) queue(e *Engine, batch []Record, from, to, regionBits int) {
	s.regionBits = regionBits
	s.owners, s.links, s.subs, s.friends, s.err = s.owners[:0], s.links[:0], 0, 0, nil
	for i := from; i < to; i++ {
		if err := s.queueRecord(e, batch, i); err != nil {
			s.failed, s.err = i, err
			break
		}
	}
	s.ownerOrder, s.ownerEnds = groupByShard(e, s.regionBits, len(s.owners), func(i int) uint64 { return s.owners[i].key.hash }, s.ownerOrder, s.ownerEnds)
	s.linkOrder, s.linkEnds = groupByShard(e, s.regionBits, len(s.links), func(i int) uint64 { return s.links[i].target.hash }, s.linkOrder, s.linkEnds)
	// The links are copied in that order, so that linking reads them one
	// after another: taken through linkOrder, the links of a batch, far
	// bigger than the cache, would be one more miss each.
	s.grouped = slices.Grow(s.grouped[:0], len(s.links))[:len(s.links)]
	for at, i := range s.linkOrder {
		s.grouped[at] = s.links[i]
	}
	s.targets = slices.Grow(s.targets[:0], len(s.links))[:len(s.links)]
}

// queueRecord checks batch[i] and queues it, with its edges.
func (s *share) queueRecord(e *Engine, batch []Record, i int) error {
	rec := &batch[i]
	if err := s.check(e, rec); err != nil {
		return err
	}
	subs := s.keys[0]
	if len(subs) > e.cfg.MaxSubscriptions {
		subs = subs[len(subs)-e.cfg.MaxSubscriptions:] // the newest, as eviction would keep
	}
	friends := s.keys[1][:min(len(s.keys[1]), e.cfg.MaxFriends)]
	_, k := e.locate(rec.UserID)
	owner := int32(len(s.owners))
	s.owners = append(s.owners, restoredOwner{rec: i, key: k, firstLink: len(s.links), subs: len(subs), friends: len(friends)})
	for _, k := range subs {
		s.links = append(s.links, restoredLink{target: k, owner: owner, at: int32(len(s.links))})
	}
	for _, k := range friends {
		s.links = append(s.links, restoredLink{target: k, owner: owner, at: int32(len(s.links)), friend: true})
	}
	s.subs += len(subs)
	s.friends += len(friends)
	return nil
}

// restorer is one goroutine of a restore: what it makes, and its scratch.
type restorer struct {
	rs  *restoring
	top uint64 // highest version restored so far

	// The first record found saved twice, if any: its index in the batch
	// and the error.
	failed int
	err    error

	found   []foundRecord // scratch for find
	dropped bool          // restoreOwn dropped a record since find
	warm    int           // what the warming steps read, so that the reads are not optimized away

	// The records and devices the restore makes are carved from blocks of
	// them (see block).
	users   block[user]
	devices block[device]
}

// blockLen is how many values a block holds.
const blockLen = 1024

// block hands out zero values of T carved from arrays of blockLen of them.
// A restore makes millions of records and devices at once; in blocks it
// allocates them a thousand times less often, and the collector, which
// otherwise looks at the page of every record each of the edges' pointers
// leads to, finds most of them in a few large objects, whose marks it has
// at hand.
//
// The price: a block stays in memory as long as any value carved from it
// is reachable. A restored record the engine drops (its user logged out
// for good) keeps its place, and its ID's bytes, while another record of
// its block lives on; its edge sets, which can have grown since, are let
// go when it is dropped (see dropIfEmptyLocked). At worst, one record in
// every block outliving the rest, the restored records' and devices'
// blocks all stay: about 144 B a restored user (144 MB at 1 M users), kept
// until the last user of each block is gone. Records made after the
// restore (by Login, AddFriends, subscriptions) are allocated one by one.
type block[T any] []T

func (b *block[T]) next() *T {
	if len(*b) == 0 {
		*b = make([]T, blockLen)
	}
	v := &(*b)[0]
	*b = (*b)[1:]
	return v
}

// restoredOwner is a record being restored; while its edges are linked it
// is pinned, so a second record for the same user is noticed.
type restoredOwner struct {
	rec           int // index in the batch
	key           key
	u             *user
	firstLink     int // its links are links[firstLink:][:subs+friends]
	subs, friends int
}

// restoredLink is one edge of an owner.
type restoredLink struct {
	target key
	owner  int32 // index in share.owners
	at     int32 // index in share.links
	friend bool
}

// restoreOwners makes the records of shard s's owners, share by share, and
// restores what they hold themselves. Call with the shard locked.
func (r *restorer) restoreOwners(batch []Record, s int) {
	sh, idx := &r.rs.e.shards[s], &r.rs.index[s]
	for w := range r.rs.shares {
		sr := &r.rs.shares[w]
		group := sr.ownerGroup(s)
		found := r.find(sh, idx, len(group), func(j int) key { return sr.owners[group[j]].key })
		r.warmFound(found)
		r.dropped = false
		for j, i := range group {
			o, u := &sr.owners[i], found[j].u
			if r.dropped && !sh.holdsLocked(u) {
				// An empty record for the same user, earlier in the
				// group, was dropped since find.
				u = r.getOrCreateIndexed(sh, idx, o.key)
			}
			if err := r.restoreOwn(sh, w, o, u, &batch[o.rec]); err != nil && (r.err == nil || o.rec < r.failed) {
				r.failed, r.err = o.rec, err
			}
		}
	}
}

// restoreOwn restores what rec holds itself into u, the record of o, share
// w's owner, under sh's lock. A record with edges stays pinned until
// linkOwners.
func (r *restorer) restoreOwn(sh *shard, w int, o *restoredOwner, u *user, rec *Record) error {
	e := r.rs.e
	if u.hasOwnState() || u.pins != 0 { // pinned: restored from an earlier record of this batch
		return recordError(rec, "user saved twice")
	}
	c := beginChange(u)
	devices := rec.Devices
	if max := e.cfg.MaxDevices; max > 0 && len(devices) > max {
		devices = devices[len(devices)-max:] // the newest logins, as Login would keep
	}
	at := &u.devices // the record has no device yet: appended in order, oldest first
	for _, dr := range devices {
		// The Store's strings may be slices of a larger buffer: the record
		// keeps copies (deviceIDLocked hands out the shard's).
		d := r.devices.next()
		d.id, d.loginAt, d.lastSeen = sh.deviceIDLocked(dr.DeviceID), dr.LoginAt.UnixNano(), dr.LastSeen.UnixNano()
		if dr.Connected {
			d.graceUntil, d.held = r.rs.now.Add(e.cfg.HeartbeatTimeout).UnixNano(), ReasonTimeout
		}
		*at = d
		at = &d.next
	}
	u.status = u.deriveStatus()
	if u.status == Online {
		u.custom = cloneString(rec.Custom)
	}
	sh.countStatus(c.prevStatus, u.status)
	u.version = rec.Version
	r.top = max(r.top, rec.Version)
	// A record dropped below, as empty, may be made again by a later
	// record's edge: it must not start behind the version it was saved with.
	sh.version = max(sh.version, rec.Version)
	if o.subs > 0 && !rec.IdleSince.IsZero() {
		ed := u.edgesLocked()
		ed.idleSince = rec.IdleSince.UnixNano()
		r.rs.index[o.key.hash&e.mask].noteEdges(o.key.hash, u, ed)
	}
	if o.subs+o.friends == 0 {
		e.scheduleLocked(u)
		// Restored one record after another, an edge to this user from
		// an earlier record would have made the user's record already,
		// and kept it.
		if !u.emptyLocked() || !r.rs.linkedBefore(w, o) {
			sh.dropIfEmptyLocked(u)
			if !sh.holdsLocked(u) {
				r.rs.index[o.key.hash&e.mask].forget(o.key.hash, u)
				r.dropped = true
			}
		}
		return nil
	}
	u.pins++ // keep the record while its edges are linked
	o.u = u
	return nil
}

// check validates a record's structure, and leaves the keys of its edges
// in s.keys. Today's Config limits are not applied: a host that lowers
// MaxIDBytes or MaxCustomStatusBytes must still be able to start. The
// limits apply to what is set from now on.
//
// It looks for repeated IDs without a map: an edge's IDs are compared by
// their hashes (see hashSet), and a device's few with each other. Only a
// record that looks wrong goes to checkExactly, which names the first
// problem.
func (s *share) check(e *Engine, rec *Record) error {
	if problem := idProblem(rec.UserID, maxStoredID); problem != "" {
		return recordError(rec, "user ID %s", problem)
	}
	if !utf8.ValidString(rec.Custom) {
		return recordError(rec, "custom status is not valid UTF-8")
	}
	suspect := len(rec.Devices) > 8
	for i := 0; i < len(rec.Devices) && !suspect; i++ {
		id := rec.Devices[i].DeviceID
		suspect = idProblem(id, maxStoredID) != "" ||
			slices.ContainsFunc(rec.Devices[:i], func(d DeviceRecord) bool { return d.DeviceID == id })
	}
	for l, list := range [2][]string{rec.Subscriptions, rec.Friends} {
		s.keys[l] = s.keys[l][:0]
		for _, id := range list {
			suspect = suspect || idProblem(id, maxStoredID) != "" || id == rec.UserID
			_, k := e.locate(id)
			s.keys[l] = append(s.keys[l], k)
		}
		suspect = suspect || s.hashes.repeats(s.keys[l]) // a repeated ID, or two IDs with one hash
	}
	if suspect {
		return s.checkExactly(rec)
	}
	return nil
}

// hashSet finds repeated hashes among a record's edges. The usual list, of
// up to smallHashes, goes into a table of which only the bitmap of used
// slots is cleared: several times faster than sorting the hashes. A longer
// list is sorted.
type hashSet struct {
	table [2 * smallHashes]uint64
	used  [2 * smallHashes / 64]uint64
	long  []uint64 // a longer list's hashes, sorted
}

const smallHashes = 64

// repeats reports whether two of keys have one hash.
func (h *hashSet) repeats(keys []key) bool {
	if len(keys) > smallHashes {
		h.long = h.long[:0]
		for _, k := range keys {
			h.long = append(h.long, k.hash)
		}
		slices.Sort(h.long)
		for i := 1; i < len(h.long); i++ {
			if h.long[i] == h.long[i-1] {
				return true
			}
		}
		return false
	}
	clear(h.used[:])
	const mask = uint64(len(h.table) - 1)
	for _, k := range keys {
		for i := k.hash & mask; ; i = (i + 1) & mask {
			if h.used[i/64]&(1<<(i%64)) == 0 {
				h.used[i/64] |= 1 << (i % 64)
				h.table[i] = k.hash
				break
			}
			if h.table[i] == k.hash {
				return true
			}
		}
	}
	return false
}

// checkExactly checks a record's IDs one by one, in order, and reports the
// first that is invalid or repeated.
func (s *share) checkExactly(rec *Record) error {
	if s.seen == nil {
		s.seen = make(map[string]bool)
	}
	clear(s.seen)
	for _, d := range rec.Devices {
		if problem := idProblem(d.DeviceID, maxStoredID); problem != "" || s.seen[d.DeviceID] {
			return recordError(rec, "device ID %q invalid or repeated", d.DeviceID)
		}
		s.seen[d.DeviceID] = true
	}
	for _, list := range [2][]string{rec.Subscriptions, rec.Friends} {
		clear(s.seen)
		for _, id := range list {
			if problem := idProblem(id, maxStoredID); problem != "" || id == rec.UserID || s.seen[id] {
				return recordError(rec, "edge to %q invalid, repeated or to itself", id)
			}
			s.seen[id] = true
		}
	}
	s.seen = nil // it may have grown large for this one record
	return nil
}

func recordError(rec *Record, format string, args ...any) error {
	return fmt.Errorf("%w for user %q: %s", errRecord, rec.UserID, fmt.Sprintf(format, args...))
}

// groupByShard lists the indexes 0..n-1 in order, grouped by the shard of
// hash(i) (as Engine.locate picks it), and within a shard's group by the
// region of the shard's restore index where hash(i) is found (see
// restoreIndex.slot): taken in that order, lookups that are near each other
// in the index come one after another, and share its pages and cache lines.
// It reuses order and ends; ends[s<<bits|region] is where that part of the
// order ends, with regions told apart by the top bits of the hash
// (indexRegionBits of them, or none).
func groupByShard(e *Engine, bits, n int, hash func(int) uint64, order, ends []int32) ([]int32, []int32) {
	bucket := func(h uint64) uint64 { return (h&e.mask)<<bits | h>>(64-bits) }
	buckets := len(e.shards) << bits
	ends = slices.Grow(ends[:0], buckets)[:buckets]
	clear(ends)
	for i := range n {
		ends[bucket(hash(i))]++
	}
	start := int32(0)
	for b, count := range ends {
		ends[b] = start // for now, where the group starts; filling it moves it to its end
		start += count
	}
	order = slices.Grow(order[:0], n)[:n]
	for i := range n {
		b := bucket(hash(i))
		order[ends[b]] = int32(i)
		ends[b]++
	}
	return order, ends
}

// groupBounds returns where shard i's group begins and ends in an order
// groupByShard made along with ends, with the same bits.
func groupBounds(ends []int32, bits, i int) (begin, end int32) {
	if i > 0 {
		begin = ends[i<<bits-1]
	}
	return begin, ends[(i+1)<<bits-1]
}

// linkTargets finds or makes the record of every link to shard s's users,
// share by share, and adds the link's owner to the record's reverse index
// (subscribers or friendOf). Call with the shard locked.
func (r *restorer) linkTargets(s int) {
	rs := r.rs
	sh, idx := &rs.e.shards[s], &rs.index[s]
	for w := range rs.shares {
		sr := &rs.shares[w]
		links := sr.linkGroup(s)
		found := r.find(sh, idx, len(links), func(j int) key { return links[j].target })
		r.warmReverse(links, found)
		for j := range links {
			l, t := &links[j], found[j].u
			sr.targets[l.at] = t
			// No delivery can run before New returns, so the shard lock
			// alone guards the index here. Each record's lists were
			// checked for repeats, and each record comes once, so every
			// edge here is new.
			ed := found[j].ed
			if ed == nil {
				ed = t.edgesLocked()
				idx.noteEdges(l.target.hash, t, ed)
			}
			set, expect := &ed.subscribers, rs.subs
			if l.friend {
				set, expect = &ed.friendOf, rs.friends
			}
			if set.len() == 0 {
				set.grow(setCapacity(expect / max(1, rs.records)))
			}
			set.addNew(sr.owners[l.owner].u)
		}
	}
}

// At a million users the records are far bigger than the caches, and
// reaching a record's part (index slot, ID, edges, reverse index) is a chain
// of cache misses. Taken item by item, those chains run one after another.
// The steps below (find, warmReverse, warmOwners) therefore take a group's
// items a step of the chain at a time, warmGroup items per step: each step's
// loads do not wait for each other, so the CPU overlaps their misses, and
// the work that follows finds them cached. The hints are kept on the stack:
// a pointer stored there needs no write barrier, which while the collector
// marks would cost a miss of its own.
const warmGroup = 64

// foundRecord is a record find found or made, with its edges if the index
// knew them.
type foundRecord struct {
	u  *user
	ed *edges
}

// find returns the records for keyOf(0..n-1), making those that do not
// exist yet, in a slice valid until the next call. Call with sh locked; idx
// is its index.
func (r *restorer) find(sh *shard, idx *restoreIndex, n int, keyOf func(int) key) []foundRecord {
	r.found = slices.Grow(r.found[:0], n)[:n]
	for start := 0; start < n; start += warmGroup {
		found := r.found[start:min(start+warmGroup, n)]
		var keys [warmGroup]key
		var slots [warmGroup]int32
		sum := 0
		// The slot each probe starts at is read before probing: a probe
		// decides by what it reads whether to go on, and while that
		// waits for a miss the CPU cannot start the next one.
		for j := range found {
			keys[j] = keyOf(start + j)
			if len(idx.slots) > 0 {
				sum += int(idx.slots[keys[j].hash>>idx.shift].hash)
			}
		}
		for j := range found {
			slots[j] = idx.slot(keys[j].hash)
		}
		// Then both IDs each comparison reads: the record's, and the
		// key's, which lies in the batch, taken out of its order here.
		for j := range found {
			if i := slots[j]; i >= 0 {
				if id := idx.slots[i].id; len(id) > 0 && len(id) == len(keys[j].id) {
					sum += int(id[0]) + int(keys[j].id[0])
				}
			}
		}
		for j := range found {
			if i := slots[j]; i >= 0 && idx.slots[i].u != nil && idx.slots[i].u != forgotten && idx.slots[i].id == keys[j].id {
				found[j] = foundRecord{idx.slots[i].u, idx.slots[i].ed}
			} else {
				u := r.getOrCreateIndexed(sh, idx, keys[j])
				found[j] = foundRecord{u, u.edges.Load()}
			}
		}
		r.warm += sum
	}
	return r.found
}

// getOrCreateIndexed is sh.getOrCreateLocked, keeping idx, sh's index,
// up to date, with a new record taken from r's blocks.
func (r *restorer) getOrCreateIndexed(sh *shard, idx *restoreIndex, k key) *user {
	u := sh.getLocked(k)
	if u == nil {
		u = sh.createLocked(k, r.users.next())
	}
	if sh.users[k.hash] == u {
		idx.put(k.hash, u) // made now, or taking a forgotten record's slot
	}
	return u
}

// warmFound reads the records find found, and their edges: what restoreOwn
// looks at first.
func (r *restorer) warmFound(found []foundRecord) {
	sum := 0
	for _, f := range found {
		sum += int(f.u.pins)
		if f.u.devices != nil {
			sum++
		}
		if f.u.edges.Load() != nil {
			sum++
		}
		if f.ed != nil {
			sum += f.ed.subs.len()
		}
	}
	r.warm += sum
}

// warmReverse reads the reverse index each of links will be added to,
// for the records find found: the set, then its free room.
func (r *restorer) warmReverse(links []restoredLink, found []foundRecord) {
	sum := 0
	for j := range links {
		if ed := found[j].ed; ed != nil {
			set := &ed.subscribers
			if links[j].friend {
				set = &ed.friendOf
			}
			if l := set.list; len(l) < cap(l) && l[:len(l)+1][len(l)] != nil {
				sum++
			}
		}
	}
	r.warm += sum
}

// restoreIndex finds a shard's records while a restore runs, in front of the
// shard's map: an open-addressed table of hashes with each record's ID and
// edges, so that finding a record and its edges is one cache miss for the
// slot and one for the ID's bytes, where the map would take two that wait for
// each other, then two for the record and one for the ID. It holds the
// records that the map holds under their own hash (shard.users, never
// shard.clash); a hash it does not hold, or holds for another ID, is looked
// up in the map. Each is guarded by its shard's lock.
type restoreIndex struct {
	slots []indexSlot // a power of two long, at most half full
	shift uint8       // 64 - log2(len(slots))
	n     int         // slots in use
}

// indexRegionBits: groupByShard orders lookups by the top bits of their
// hashes, which pick the region of the index they land in.
const indexRegionBits = 4

type indexSlot struct {
	hash uint64
	u    *user  // nil: empty; forgotten: the record was dropped
	id   string // u.id
	ed   *edges // u's edges, nil until known: they are made once, never replaced
}

// forgotten marks the slot of a record that was dropped: the slot keeps its
// hash, so that the records after it stay reachable.
var forgotten = new(user)

// slot returns where hash is, or where it would go: the first slot holding
// it, or the first empty one.
func (x *restoreIndex) slot(hash uint64) int32 {
	if len(x.slots) == 0 {
		return -1
	}
	mask := uint64(len(x.slots) - 1)
	// The shard was picked by the hash's low bits, which all its records
	// share: the high ones spread them, and order them (see groupByShard).
	for i := hash >> x.shift; ; i = (i + 1) & mask {
		if s := &x.slots[i]; s.u == nil || s.hash == hash {
			return int32(i)
		}
	}
}

// put indexes u, which holds its hash's place in the shard's map.
func (x *restoreIndex) put(hash uint64, u *user) {
	if 2*(x.n+1) > len(x.slots) {
		old := x.slots
		x.slots, x.n = make([]indexSlot, max(64, 2*len(old))), 0
		x.shift = uint8(64 - bits.TrailingZeros(uint(len(x.slots))))
		for _, s := range old {
			if s.u != nil && s.u != forgotten {
				x.slots[x.slot(s.hash)] = s
				x.n++
			}
		}
	}
	i := x.slot(hash)
	if x.slots[i].u == nil {
		x.n++
	}
	x.slots[i] = indexSlot{hash: hash, u: u, id: u.id, ed: u.edges.Load()}
}

// noteEdges records that u, whose hash is hash and which may be indexed, now
// has edges ed.
func (x *restoreIndex) noteEdges(hash uint64, u *user, ed *edges) {
	if i := x.slot(hash); i >= 0 && x.slots[i].u == u {
		x.slots[i].ed = ed
	}
}

// forget marks u, which its shard no longer holds, as gone.
func (x *restoreIndex) forget(hash uint64, u *user) {
	if i := x.slot(hash); i >= 0 && x.slots[i].u == u {
		x.slots[i] = indexSlot{hash: hash, u: forgotten}
	}
}

// setCapacity is the room a restored reverse index starts with when the
// records restored so far have mean edges each: the capacity a set of that
// many members reaches by growing from empty. A set of about the average
// size takes no more memory than it would have anyway, and skips the copies
// on its way there.
func setCapacity(mean int) int {
	c := 4
	for c < mean && c < smallSet {
		c *= 2
	}
	return c
}

// linkOwners fills in the own lists of shard s's owners from their linked
// targets, share by share, and unpins them. Call with the shard locked.
func (r *restorer) linkOwners(s int) {
	sh := &r.rs.e.shards[s]
	for w := range r.rs.shares {
		sr := &r.rs.shares[w]
		group := sr.ownerGroup(s)
		r.warmOwners(sr, group)
		for _, i := range group {
			o := &sr.owners[i]
			if o.u == nil {
				continue // no edges: done already
			}
			targets := sr.targets[o.firstLink:][:o.subs+o.friends]
			ed := o.u.edgesLocked()
			if o.subs > 0 {
				ed.subs.grow(o.subs)
				for _, t := range targets[:o.subs] {
					ed.subs.putNew(t, struct{}{}) // the record's list was checked for repeats
				}
				sh.subscriptions += o.subs
			}
			if o.friends > 0 {
				ed.friends.grow(o.friends)
				for _, t := range targets[o.subs:] {
					ed.friends.addNew(t)
				}
				sh.friendships += o.friends
			}
			// Cleared now, while each pointer's marking is fresh in the
			// cache: left for the next batch to overwrite, it would cost
			// the collector a miss then.
			clear(targets)
			o.u.pins--
			r.rs.e.scheduleLocked(o.u)
		}
	}
}

// warmOwners reads the records and edges of group's owners, share sr's
// (see warmGroup).
func (r *restorer) warmOwners(sr *share, group []int32) {
	sum := 0
	for start := 0; start < len(group); start += warmGroup {
		items := group[start:min(start+warmGroup, len(group))]
		var eds [warmGroup]*edges
		for j, i := range items {
			if u := sr.owners[i].u; u != nil {
				eds[j] = u.edges.Load()
			}
		}
		for j := range items {
			if ed := eds[j]; ed != nil {
				sum += len(ed.subs.nodes) + len(ed.friends.list)
			}
		}
	}
	r.warm += sum
}
