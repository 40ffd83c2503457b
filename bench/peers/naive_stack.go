package main

import (
	"sync"
	"sync/atomic"
)

// naiveStack is the baseline a Go server often starts with: one map of user
// status behind one sync.RWMutex, and one buffered channel per watching
// connection; a change is sent to each watcher with a non-blocking send
// (dropped when that connection's buffer is full), and one goroutine per
// connection receives.
type naiveStack struct {
	mu sync.RWMutex
	m  map[string]naiveStatus

	watchers  map[string][]chan naiveEvent // target -> watching connections; fixed after SetupFanout
	delivered atomic.Uint64
	dropped   atomic.Uint64
	stop      chan struct{}
	wg        sync.WaitGroup
}

type naiveStatus struct {
	online  bool
	custom  string
	version uint64
}

type naiveEvent struct {
	user, custom string
	online       bool
	version      uint64
}

const watcherBuffer = 64

func newNaiveStack() *naiveStack {
	return &naiveStack{m: make(map[string]naiveStatus), stop: make(chan struct{})}
}

func (s *naiveStack) Name() string { return "naive map+chan" }

func (s *naiveStack) Add(_ int, user, _ string) error {
	s.mu.Lock()
	st := s.m[user]
	st.online = true
	st.version++
	s.m[user] = st
	s.mu.Unlock()
	return nil
}

func (s *naiveStack) Remove(_ int, user, _ string) error {
	s.mu.Lock()
	delete(s.m, user)
	s.mu.Unlock()
	return nil
}

func (s *naiveStack) ReadBatch(_ int, _ string, users []string) (int, error) {
	n := 0
	s.mu.RLock()
	for _, u := range users {
		if s.m[u].online {
			n++
		}
	}
	s.mu.RUnlock()
	return n, nil
}

// newWatcher starts one receiving goroutine for a connection and returns its
// channel.
func newWatcher(stop <-chan struct{}, wg *sync.WaitGroup, delivered *atomic.Uint64) chan naiveEvent {
	ch := make(chan naiveEvent, watcherBuffer)
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-ch:
				delivered.Add(1)
			case <-stop:
				return
			}
		}
	}()
	return ch
}

// watcherIndex builds target -> channels of its watchers, one channel (and
// goroutine) per watching user.
func watcherIndex(users []string, watches map[string][]string, stop <-chan struct{}, wg *sync.WaitGroup, delivered *atomic.Uint64) map[string][]chan naiveEvent {
	idx := make(map[string][]chan naiveEvent)
	for _, u := range users {
		ch := newWatcher(stop, wg, delivered)
		for _, t := range watches[u] {
			idx[t] = append(idx[t], ch)
		}
	}
	return idx
}

func (s *naiveStack) SetupFanout(users []string, watches map[string][]string) error {
	for _, u := range users {
		_ = s.Add(0, u, "d0")
	}
	s.watchers = watcherIndex(users, watches, s.stop, &s.wg, &s.delivered)
	return nil
}

func (s *naiveStack) Change(_ int, user, text string) error {
	s.mu.Lock()
	st := s.m[user]
	st.custom = text
	st.version++
	s.m[user] = st
	s.mu.Unlock()
	ev := naiveEvent{user: user, custom: text, online: st.online, version: st.version}
	for _, ch := range s.watchers[user] {
		select {
		case ch <- ev:
		default:
			s.dropped.Add(1)
		}
	}
	return nil
}

func (s *naiveStack) Delivered() uint64 { return s.delivered.Load() }

func (s *naiveStack) StopFanout() {
	close(s.stop)
	s.wg.Wait()
}

func (s *naiveStack) Close() error { return nil }
