package main

import (
	"sync"
	"sync/atomic"

	"github.com/presencekit/presence"
)

// engineStack is this module's engine, used as a host uses it: Login keeps
// the Session beside the "connection", Logout ends it, AppendUserStatus reads
// a batch into the worker's reused slice, SetSelfStatus changes the custom status and the engine pushes an
// event into each watcher's Session mailbox, which one goroutine per
// connection drains (Ready + Drain).
type engineStack struct {
	e         *presence.Engine
	sessions  []*presence.Session // fan-out phase only
	delivered atomic.Uint64
	reads     []readBuf // one per worker
	stop      chan struct{}
	wg        sync.WaitGroup
}

// readBuf is one worker's result slice, padded so that two workers' slice
// headers do not share a cache line.
type readBuf struct {
	st []presence.UserStatus
	_  [40]byte
}

func newEngineStack(workers int) (*engineStack, error) {
	e, err := presence.New(presence.Config{
		StatusQuery: true,
		// Quotas are per-caller rate limits for client-facing calls (20 per 5 s
		// by default); a throughput benchmark turns them off, as a host does for
		// trusted server-side callers. The peers have no such limit at all.
		QueryQuota:     presence.Quota{Calls: -1},
		SubscribeQuota: presence.Quota{Calls: -1},
	})
	if err != nil {
		return nil, err
	}
	return &engineStack{e: e, stop: make(chan struct{}), reads: make([]readBuf, workers)}, nil
}

func (s *engineStack) Name() string { return "presence (this)" }

func (s *engineStack) Add(_ int, user, device string) error {
	_, err := s.e.Login(user, device)
	return err
}

func (s *engineStack) Remove(_ int, user, device string) error {
	return s.e.Logout(user, device)
}

func (s *engineStack) ReadBatch(w int, caller string, users []string) (int, error) {
	st, err := s.e.AppendUserStatus(s.reads[w].st[:0], caller, users)
	if err != nil {
		return 0, err
	}
	s.reads[w].st = st
	n := 0
	for i := range st {
		if st[i].Status == presence.Online {
			n++
		}
	}
	return n, nil
}

func (s *engineStack) SetupFanout(users []string, watches map[string][]string) error {
	for _, u := range users {
		sess, err := s.e.Login(u, "d0")
		if err != nil {
			return err
		}
		s.sessions = append(s.sessions, sess)
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			var buf []presence.Event
			for {
				select {
				case <-sess.Ready():
					buf = sess.Drain(buf[:0])
					s.delivered.Add(uint64(len(buf)))
				case <-sess.Done():
					return
				case <-s.stop:
					return
				}
			}
		}()
	}
	for _, u := range users {
		if t := watches[u]; len(t) > 0 {
			if _, err := s.e.SubscribeUserStatus(u, t); err != nil {
				return err
			}
		}
	}
	return nil
}

func (s *engineStack) Change(_ int, user, text string) error {
	return s.e.SetSelfStatus(user, text)
}

func (s *engineStack) Delivered() uint64 { return s.delivered.Load() }

func (s *engineStack) StopFanout() {
	close(s.stop)
	s.wg.Wait()
}

func (s *engineStack) Close() error { return s.e.Close() }
