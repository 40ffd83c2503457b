package main

import (
	"context"
	"fmt"
	"io"
	"iter"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/presencekit/presence"
	"github.com/presencekit/presence/persist"
)

// Engine limits the simulation stays within (the engine's defaults).
const (
	maxFriends       = 3000
	maxSubscriptions = 200
	maxSubscribeIDs  = 100
	maxQueryIDs      = 500
	maxCustomBytes   = 100
)

const userPrefix = "u" // simulated users are u00000, u00001, ...; IDs read but never used are "ghost-N"

var deviceIDs = [...]string{"phone", "laptop"}

// simUser is the simulation's model of one user. Each user belongs to one
// worker, which is the only goroutine that touches it, so the model is exact
// except for what the engine does by itself (heartbeat timeouts, the end of
// a disconnect grace).
type simUser struct {
	idx     int32
	id      string
	devs    [len(deviceIDs)]simDev
	subs    []int32 // subscription targets, oldest first
	friends []int32
}

// simDev is one device of a simUser.
type simDev struct {
	loggedIn bool
	sess     *simSession // the session the simulation has not ended itself; it may have timed out
}

func (u *simUser) anyLoggedIn() bool {
	for _, d := range u.devs {
		if d.loggedIn {
			return true
		}
	}
	return false
}

// putSub applies a subscription the way the engine does: a target already
// present moves to the newest end.
func (u *simUser) putSub(t int32) {
	if i := slices.Index(u.subs, t); i >= 0 {
		u.subs = slices.Delete(u.subs, i, i+1)
	}
	u.subs = append(u.subs, t)
}

func (u *simUser) removeSub(t int32) {
	if i := slices.Index(u.subs, t); i >= 0 {
		u.subs = slices.Delete(u.subs, i, i+1)
	}
}

// sim is one run: the engine, the population and its model.
type sim struct {
	cfg     config
	e       *presence.Engine
	store   *gatedStore
	out     io.Writer // progress lines
	users   []*simUser
	readers []*reader
	next    atomic.Uint32 // round-robin over readers
	stop    atomic.Bool   // workers stop when set
	hbEvery time.Duration // how often a worker heartbeats its devices
	viol    violations

	// loading is set when the load starts. From then on silent devices stop
	// heartbeating, slow readers slow down and readers check versions; the
	// setup keeps the population steady so its memory can be measured.
	loading atomic.Bool
}

func (s *sim) id(i int32) string { return s.users[i].id }

// open hands a new session to a reader.
func (s *sim) open(ss *simSession) {
	s.readers[int(s.next.Add(1))%len(s.readers)].add(ss)
}

func (s *sim) note(format string, args ...any) {
	fmt.Fprintf(s.out, format+"\n", args...)
}

// run builds the engine and the population, runs the workers for
// cfg.Duration, checks what the engine reports against the model, closes the
// engine and returns the report. Progress lines go to progress.
func run(cfg config, progress io.Writer) (*report, error) {
	var prof *os.File
	if cfg.CPUProfile != "" {
		f, err := os.Create(cfg.CPUProfile)
		if err != nil {
			return nil, err
		}
		defer f.Close()
		prof = f
	}
	baseline := runtime.NumGoroutine()
	bolt, path, cleanup, err := openStore(cfg.Store)
	if err != nil {
		return nil, err
	}
	defer cleanup()
	store := &gatedStore{Store: bolt}
	unlimited := presence.Quota{Calls: -1}
	ecfg := presence.Config{
		StatusQuery:      true,
		NotifyFriends:    true,
		HeartbeatTimeout: cfg.HeartbeatTimeout,
		DisconnectGrace:  cfg.Grace,
		QueryQuota:       unlimited,
		SubscribeQuota:   unlimited,
		UnsubscribeQuota: unlimited,
		FeedSize:         cfg.FeedSize,
		ChangeFeedSize:   cfg.ChangeFeed,
		Store:            store,
		SnapshotInterval: cfg.SnapshotEvery,
	}
	start := time.Now()
	e, err := presence.New(ecfg)
	if err != nil {
		return nil, err
	}
	rep := &report{Config: cfg}
	rep.Snap.Path = path
	rep.Snap.FirstLoad = time.Since(start)
	if st := e.Stats(); st.Subscriptions+st.Friendships+st.Users > 0 {
		store.Close()
		e.Close()
		return nil, fmt.Errorf("%s already holds a population (%d users, %d subscriptions): name a new -store file", path, st.Users, st.Subscriptions)
	}
	s := &sim{cfg: cfg, e: e, store: store, out: progress, hbEvery: cfg.HeartbeatTimeout / 4}

	feed := &feedCounter{done: make(chan struct{})}
	go feed.run(e.Changes(), &s.viol)

	stopReaders := make(chan struct{})
	var readersWG sync.WaitGroup
	perReader := cfg.Users*len(deviceIDs)/cfg.Readers + 1
	for i := range cfg.Readers {
		r := newReader(s, i < cfg.Slow, perReader)
		s.readers = append(s.readers, r)
		readersWG.Add(1)
		go func() {
			defer readersWG.Done()
			r.run(stopReaders)
		}()
	}

	// The model is allocated in full before the heap is first measured, so
	// that what the setup phases add is the engine's.
	s.users = make([]*simUser, cfg.Users)
	for i := range s.users {
		s.users[i] = &simUser{
			idx:     int32(i),
			id:      fmt.Sprintf("%s%05d", userPrefix, i),
			subs:    make([]int32, 0, cfg.Subs),
			friends: make([]int32, 0, cfg.Friends),
		}
	}
	workers := make([]*worker, cfg.Workers)
	for i := range workers {
		workers[i] = &worker{
			sim:  s,
			e:    e,
			rng:  rand.New(rand.NewPCG(uint64(cfg.Seed), uint64(i))),
			seen: make([]uint64, cfg.Users),
		}
	}
	for i, u := range s.users {
		w := workers[i%len(workers)]
		w.owned = append(w.owned, u)
	}
	for _, w := range workers {
		w.slab = make([]simSession, 0, len(w.owned)*len(deviceIDs))
	}

	start = time.Now()
	s.setup(workers, rep)
	rep.Setup = time.Since(start)
	st := e.Stats()
	rep.Population.Users, rep.Population.LoggedIn, rep.Population.Sessions = cfg.Users, st.Users, st.Sessions
	rep.Population.Friendships, rep.Population.Subscriptions = st.Friendships, st.Subscriptions
	s.hold(workers, func() {
		rep.Snap.AfterSetup = s.timedSnapshot()
		rep.Snap.SetupFileBytes = fileSize(path)
	})
	s.note("snapshot after setup: %v, file %.1f MB", rep.Snap.AfterSetup.Round(time.Millisecond), float64(rep.Snap.SetupFileBytes)/1e6)

	s.load(workers, rep, prof, feed)

	// What the engine says now must match the model.
	start = time.Now()
	s.checkFinal(workers)
	rep.Final = e.Stats()
	s.note("final checks: %v", time.Since(start).Round(time.Millisecond))
	rep.Snap.AfterLoad = s.timedSnapshot()
	rep.Snap.Background = rep.Final.LastSnapshot
	if rep.Final.LastSnapshotErr != nil {
		s.viol.add("background snapshot failed: %v", rep.Final.LastSnapshotErr)
	}

	start = time.Now()
	if err := e.Close(); err != nil {
		s.viol.add("Close: %v", err)
	}
	rep.Snap.Close = time.Since(start)
	s.note("snapshot after the load: %v; Close with its final save: %v", rep.Snap.AfterLoad.Round(time.Millisecond), rep.Snap.Close.Round(time.Millisecond))
	s.checkClosed(workers)
	select {
	case <-feed.done:
	case <-time.After(2 * time.Second):
		s.viol.add("change feed not closed 2s after Close")
	}
	// The readers ran until now so that events of the timeouts during the
	// checks are read too; their last pass finds every session ended.
	close(stopReaders)
	readersWG.Wait()
	after := e.Stats() // the event counters are final now
	rep.Final.Delivered, rep.Final.Coalesced, rep.Final.Lost, rep.Final.ChangesDropped =
		after.Delivered, after.Coalesced, after.Lost, after.ChangesDropped

	var setupLogins uint64
	for _, w := range workers {
		rep.Ops.merge(&w.stats)
		rep.HeartbeatMiss += w.hbMiss
		setupLogins += w.setupLogins
	}
	for _, r := range s.readers {
		rep.Readers.merge(&r.stats)
	}
	rep.Changes = make(map[presence.Reason]uint64)
	for why, n := range feed.byReason {
		if n > 0 {
			rep.Changes[presence.Reason(why)] = n
		}
	}
	rep.ChangeTotal = feed.total.Load()
	s.checkCounters(rep, setupLogins)

	s.checkRestore(ecfg, rep)
	s.note("restore into a fresh engine: %v", rep.Snap.Restore.Round(time.Millisecond))
	rep.Snap.FileBytes = fileSize(path)
	if err := store.Close(); err != nil {
		s.viol.add("closing the store: %v", err)
	}

	// Every goroutine of the run, and the engine's, must be gone.
	deadline := time.Now().Add(2 * time.Second)
	for runtime.NumGoroutine() > baseline && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	rep.GoroutinesLeft = runtime.NumGoroutine() - baseline
	if rep.GoroutinesLeft > 0 {
		s.viol.add("%d goroutines still running 2s after Close", rep.GoroutinesLeft)
	}
	rep.Violations = s.viol.list()
	return rep, nil
}

// setup builds the population in phases and measures the live heap after
// each, so that what a phase adds is what its kind of state costs: users
// logging in on a first device, then on a second one, then friend edges,
// then subscription edges. Logins come first so that the edge phases add
// edges only (a user record made to hold an edge would otherwise be counted
// as the edge's).
func (s *sim) setup(workers []*worker, rep *report) {
	heap := s.store.quiet(liveHeap)
	rep.Mem.Base = heap
	sessions := func(st presence.Stats) int { return st.Sessions }
	phases := []struct {
		name, includes string
		run            func(*worker)
		count          func(presence.Stats) int
	}{
		{"users, first session", "the user's record and index entry, a device, its session (channels, emptied mailbox), its heartbeat deadline",
			(*worker).loginFirst, sessions},
		{"second sessions", "a device, its session (channels, emptied mailbox), its heartbeat deadline", (*worker).loginSecond, sessions},
		{"friend edges", "the friend list entry and the reverse (notify) index entry", (*worker).addInitialFriends,
			func(st presence.Stats) int { return st.Friendships }},
		{"subscription edges", "the subscription list entry and the reverse (subscriber) index entry", (*worker).addInitialSubs,
			func(st presence.Stats) int { return st.Subscriptions }},
	}
	for _, ph := range phases {
		before := ph.count(s.e.Stats())
		start := time.Now()
		eachWorker(workers, ph.run)
		m := memPhase{Name: ph.name, Includes: ph.includes}
		s.hold(workers, func() {
			// Until the readers have drained what the phase delivered, the
			// pending events would be counted as its memory.
			s.settle()
			m.Took = time.Since(start)
			m.Items = ph.count(s.e.Stats()) - before
			now := s.store.quiet(liveHeap)
			m.Bytes = int64(now) - int64(heap)
			heap = now
		})
		rep.Mem.Phases = append(rep.Mem.Phases, m)
		s.note("setup: %-20s %9d in %6v, heap +%6.1f MB, %s each", m.Name, m.Items,
			m.Took.Round(time.Millisecond), float64(m.Bytes)/1e6, m.perItem())
	}
	rep.Mem.After = heap
	for _, w := range workers {
		w.endSetup()
	}
}

// liveHeap returns the bytes of live heap objects, after a collection.
func liveHeap() uint64 {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc
}

// hold runs f while every worker keeps its devices heartbeating, as clients
// would while the server is busy: a pause between steps of the run
// (measuring the heap, saving a snapshot) must not time sessions out.
func (s *sim) hold(workers []*worker, f func()) {
	done := make(chan struct{})
	var wg sync.WaitGroup
	for _, w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			w.keepAlive(done)
		}()
	}
	f()
	close(done)
	wg.Wait()
}

// settle waits until the readers have read every event delivered so far
// that was neither coalesced nor lost, for at most a few seconds: if the
// counters never agree, checkCounters reports it.
func (s *sim) settle() {
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		st := s.e.Stats()
		if s.eventsRead() >= st.Delivered-st.Coalesced-st.Lost {
			return
		}
		time.Sleep(s.cfg.ReadEvery / 4)
	}
}

func (s *sim) eventsRead() uint64 {
	var n uint64
	for _, r := range s.readers {
		n += r.events.Load()
	}
	return n
}

// load runs the workers for cfg.Duration with a progress line every second
// and records what the engine counted meanwhile.
func (s *sim) load(workers []*worker, rep *report, prof *os.File, feed *feedCounter) {
	stopProgress := make(chan struct{})
	progressDone := make(chan struct{})
	if prof != nil {
		if err := pprof.StartCPUProfile(prof); err != nil {
			s.note("bench: no CPU profile: %v", err)
			prof = nil
		}
	}
	s.loading.Store(true)
	rep.Load.Before = s.e.Stats()
	go s.progress(workers, feed, stopProgress, progressDone)
	start := time.Now()
	timer := time.AfterFunc(s.cfg.Duration, func() { s.stop.Store(true) })
	eachWorker(workers, (*worker).run)
	timer.Stop()
	rep.Elapsed = time.Since(start)
	rep.Load.After = s.e.Stats()
	if prof != nil {
		pprof.StopCPUProfile()
	}
	close(stopProgress)
	<-progressDone
}

// eachWorker runs f on every worker in its own goroutine and waits.
func eachWorker(workers []*worker, f func(*worker)) {
	var wg sync.WaitGroup
	for _, w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			f(w)
		}()
	}
	wg.Wait()
}

// progress prints one line a second until stop closes.
func (s *sim) progress(workers []*worker, feed *feedCounter, stop <-chan struct{}, done chan<- struct{}) {
	defer close(done)
	t := time.NewTicker(time.Second)
	defer t.Stop()
	start := time.Now()
	last, lastStats := start, s.e.Stats()
	var lastOps uint64
	for {
		select {
		case <-stop:
			return
		case now := <-t.C:
			var ops uint64
			for _, w := range workers {
				ops += w.ops.Load()
			}
			st := s.e.Stats()
			secs := now.Sub(last).Seconds()
			fmt.Fprintf(s.out, "[%4.1fs] %7.0f ops/s %8.0f events/s (coalesced %d, lost %d)  online %d sessions %d subs %d friends %d  read %d changes %d  violations %d\n",
				now.Sub(start).Seconds(), float64(ops-lastOps)/secs, float64(st.Delivered-lastStats.Delivered)/secs,
				st.Coalesced-lastStats.Coalesced, st.Lost-lastStats.Lost,
				st.Online, st.Sessions, st.Subscriptions, st.Friendships,
				s.eventsRead(), feed.total.Load(), s.viol.count())
			lastOps, last, lastStats = ops, now, st
		}
	}
}

// checkFinal compares the engine's state with the model once the workers
// have stopped. Only the engine's own timers still change anything then, and
// they only take sessions away (timeouts, ends of grace): counts of sessions
// and online users can only go down while this runs.
func (s *sim) checkFinal(workers []*worker) {
	v := &s.viol
	e := s.e
	var subs, friends, loggedIn int
	ids := make([]string, len(s.users))
	for i, u := range s.users {
		ids[i] = u.id
		subs += len(u.subs)
		friends += len(u.friends)
		if u.anyLoggedIn() {
			loggedIn++
		}
		got := e.Subscriptions(u.id)
		if !slices.Equal(got, s.names(u.subs)) {
			v.add("final: Subscriptions(%s) = %v, the simulation subscribed %v", u.id, got, s.names(u.subs))
		}
	}
	before := e.Stats()
	all := e.QueryOnlineStatus(ids)
	after := e.Stats()
	if len(all) != len(ids) {
		v.add("final: QueryOnlineStatus returned %d entries for %d IDs", len(all), len(ids))
		return
	}
	var sessions, online int
	for i, u := range s.users {
		os := &all[i]
		if os.UserID != u.id {
			v.add("final: QueryOnlineStatus entry %d is %q, want %q", i, os.UserID, u.id)
			continue
		}
		if os.Status == presence.Online {
			online++
		}
		var devs []string
		for _, si := range os.Sessions {
			devs = append(devs, si.DeviceID)
			if si.Connected {
				sessions++
			}
		}
		var want []string
		for d := range u.devs {
			if u.devs[d].loggedIn {
				want = append(want, deviceIDs[d])
			}
		}
		slices.Sort(devs)
		slices.Sort(want)
		if !slices.Equal(devs, want) {
			v.add("final: %s has devices %v logged in, the simulation left %v", u.id, devs, want)
			continue
		}
		if (os.Status == presence.Unlogined) != (len(want) == 0) {
			v.add("final: %s is %v with devices %v logged in", u.id, os.Status, want)
		}
		for _, si := range os.Sessions {
			d := slices.Index(deviceIDs[:], si.DeviceID)
			ss := u.devs[d].sess
			switch {
			case si.Connected && ss == nil:
				v.add("final: %s/%s is connected, but the simulation ended its session", u.id, si.DeviceID)
			case !si.Connected && ss != nil:
				// Only a timeout can have ended it.
				workers[int(u.idx)%len(workers)].ended(ss, "final: not connected", false, presence.ReasonTimeout)
				u.devs[d].sess = nil
			}
		}
	}
	if before.Users != loggedIn || after.Users != loggedIn {
		v.add("final: Stats.Users %d then %d, the simulation left %d users logged in", before.Users, after.Users, loggedIn)
	}
	if sessions < after.Sessions || sessions > before.Sessions {
		v.add("final: %d devices connected, but Stats.Sessions went from %d to %d around the count", sessions, before.Sessions, after.Sessions)
	}
	if online < after.Online || online > before.Online {
		v.add("final: %d users online, but Stats.Online went from %d to %d around the count", online, before.Online, after.Online)
	}
	if after.Subscriptions != subs {
		v.add("final: Stats.Subscriptions = %d, the simulation holds %d", after.Subscriptions, subs)
	}
	if after.Friendships != friends {
		v.add("final: Stats.Friendships = %d, the simulation holds %d", after.Friendships, friends)
	}
}

// checkClosed checks the engine after Close: sessions ended, calls refused.
func (s *sim) checkClosed(workers []*worker) {
	v := &s.viol
	e := s.e
	for _, u := range s.users {
		for d := range u.devs {
			ss := u.devs[d].sess
			if ss == nil {
				continue
			}
			select {
			case <-ss.s.Done():
				if why := ss.s.EndReason(); why != 0 && why != presence.ReasonTimeout {
					v.add("after Close: session %s/%s ended with %v", ss.user, ss.device, why)
				}
			default:
				v.add("after Close: session %s/%s has not ended", ss.user, ss.device)
			}
			if err := ss.s.Heartbeat(); classify(err) != errClosed {
				v.add("after Close: Heartbeat of %s/%s returned %v, want ErrClosed", ss.user, ss.device, err)
			}
		}
	}
	u := s.users[0].id
	other := s.users[1].id
	_, err := e.Login(u, "phone")
	closed := map[string]error{"Login": err}
	_, closed["GetUserStatus"] = e.GetUserStatus(u, []string{other})
	_, closed["SubscribeUserStatus"] = e.SubscribeUserStatus(u, []string{other})
	closed["UnsubscribeUserStatus"] = e.UnsubscribeUserStatus(u, nil)
	closed["SetSelfStatus"] = e.SetSelfStatus(u, "x")
	closed["Logout"] = e.Logout(u, "phone")
	closed["Kick"] = e.Kick(u)
	closed["AddFriends"] = e.AddFriends(u, other)
	closed["RemoveFriends"] = e.RemoveFriends(u, other)
	for op, err := range closed {
		if classify(err) != errClosed {
			v.add("after Close: %s returned %v, want ErrClosed", op, err)
		}
	}
	if got := e.Subscriptions(u); got != nil {
		v.add("after Close: Subscriptions = %v, want nil", got)
	}
	if got := e.QueryOnlineStatus([]string{u}); got != nil {
		v.add("after Close: QueryOnlineStatus = %v, want nil", got)
	}
	if err := e.Close(); err != nil {
		v.add("second Close: %v", err)
	}
}

// checkCounters checks that the counters add up once everything has stopped.
func (s *sim) checkCounters(rep *report, setupLogins uint64) {
	v := &s.viol
	f := rep.Final
	if readable := f.Delivered - f.Coalesced - f.Lost; rep.Readers.Events > readable || f.Coalesced+f.Lost > f.Delivered {
		v.add("events: readers read %d, but delivered %d - coalesced %d - lost %d leaves %d", rep.Readers.Events,
			f.Delivered, f.Coalesced, f.Lost, readable)
	}
	if f.ChangesDropped > 0 {
		return // the feed is incomplete; nothing more to compare
	}
	ok := func(op opKind) uint64 { return rep.Ops.errs[op][errNone] }
	c := rep.Changes
	if got, want := c[presence.ReasonLogin], ok(opLogin)+setupLogins; got != want {
		v.add("change feed: %d Login records for %d logins", got, want)
	}
	if got, want := c[presence.ReasonLogout], ok(opLogout); got != want {
		v.add("change feed: %d Logout records for %d logouts", got, want)
	}
	if got, want := c[presence.ReasonKicked], ok(opKick); got != want {
		v.add("change feed: %d Kicked records for %d kicks", got, want)
	}
	if got, max := c[presence.ReasonCustomStatus], ok(opSetStatus); got > max {
		v.add("change feed: %d CustomStatus records for %d successful SetSelfStatus calls", got, max)
	}
	if got, max := c[presence.ReasonLinkClose], ok(opDisconnect); got > max {
		v.add("change feed: %d LinkClose records for %d disconnects", got, max)
	}
}

func (s *sim) names(idx []int32) []string {
	if len(idx) == 0 {
		return nil
	}
	out := make([]string, len(idx))
	for i, t := range idx {
		out[i] = s.users[t].id
	}
	return out
}

// openStore opens the snapshot file named by -store, or a new temporary
// one. cleanup removes the temporary file.
func openStore(name string) (store *persist.Store, path string, cleanup func(), err error) {
	cleanup = func() {}
	path = name
	if path == "" {
		dir, err := os.MkdirTemp("", "presence-bench-")
		if err != nil {
			return nil, "", nil, err
		}
		cleanup = func() { os.RemoveAll(dir) }
		path = filepath.Join(dir, "presence.db")
	}
	store, err = persist.Open(path, nil)
	if err != nil {
		cleanup()
		return nil, "", nil, err
	}
	return store, path, cleanup, nil
}

// gatedStore is the bbolt Store with a gate that keeps saves out of the
// heap measurements: a save in flight holds a write transaction's worth of
// memory (tens of megabytes at 100 k users) that would be counted as what a
// setup phase added. The engine's background saves run on a fixed ticker,
// so they cannot be timed around; one due during a measurement waits.
type gatedStore struct {
	*persist.Store
	gate sync.RWMutex // held shared by each save, exclusively by quiet
}

func (g *gatedStore) Save(ctx context.Context, records iter.Seq2[[]presence.Record, error]) error {
	g.gate.RLock()
	defer g.gate.RUnlock()
	return g.Store.Save(ctx, records)
}

// quiet runs f once no save is in flight, holding new ones off meanwhile.
func (g *gatedStore) quiet(f func() uint64) uint64 {
	g.gate.Lock()
	defer g.gate.Unlock()
	return f()
}

// fileSize returns the size of the file at path, 0 if it cannot tell.
func fileSize(path string) int64 {
	info, err := os.Stat(path)
	if err != nil {
		return 0
	}
	return info.Size()
}

// timedSnapshot saves a snapshot now and returns how long it took.
func (s *sim) timedSnapshot() time.Duration {
	start := time.Now()
	if err := s.e.Snapshot(context.Background()); err != nil {
		s.viol.add("Snapshot: %v", err)
	}
	return time.Since(start)
}

// checkRestore restores the file Close saved into a fresh engine, as a
// restart would, and checks that the population came back whole.
func (s *sim) checkRestore(cfg presence.Config, rep *report) {
	start := time.Now()
	e2, err := presence.New(cfg)
	rep.Snap.Restore = time.Since(start)
	if err != nil {
		s.viol.add("restore: %v", err)
		return
	}
	got, want := e2.Stats(), rep.Final
	rep.Snap.Restored = got
	if got.Users != want.Users || got.Subscriptions != want.Subscriptions || got.Friendships != want.Friendships {
		s.viol.add("restore: %d users, %d subscriptions, %d friendships; saved %d, %d, %d",
			got.Users, got.Subscriptions, got.Friendships, want.Users, want.Subscriptions, want.Friendships)
	}
	if got.Sessions != 0 {
		s.viol.add("restore: %d sessions, want none until devices log in again", got.Sessions)
	}
	if err := e2.Close(); err != nil {
		s.viol.add("closing the restored engine: %v", err)
	}
}
