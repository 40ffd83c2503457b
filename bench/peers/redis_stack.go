package main

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
)

// redisStack is the Redis-backed presence that Go chat servers commonly
// write with go-redis: a status key per user with a TTL (SET ... EX on
// connect, refreshed by heartbeats in a real server), DEL on disconnect,
// MGET for a batch read, and on a status change the key is rewritten and the
// change PUBLISHed on the user's channel (both in one pipelined round trip).
// The receiving side is a server node's usual shape: a few PubSub
// connections subscribed to the channels of every user some local
// connection watches, dispatching each message to the watching connections'
// buffered channels (non-blocking, as in the naive baseline).
type redisStack struct {
	rdb *redis.Client
	ctx context.Context

	pubsubs   []*redis.PubSub
	watchers  map[string][]chan naiveEvent
	delivered atomic.Uint64
	stop      chan struct{}
	wg        sync.WaitGroup
}

const (
	redisTTL     = 120 * time.Second
	redisPubSubs = 4 // subscriber connections of the receiving node
)

func newRedisStack(addr string) (*redisStack, error) {
	rdb := redis.NewClient(&redis.Options{Addr: addr})
	ctx := context.Background()
	if err := rdb.Ping(ctx).Err(); err != nil {
		rdb.Close()
		return nil, fmt.Errorf("redis at %s: %w", addr, err)
	}
	if err := rdb.FlushDB(ctx).Err(); err != nil {
		rdb.Close()
		return nil, err
	}
	return &redisStack{rdb: rdb, ctx: ctx, stop: make(chan struct{})}, nil
}

func (s *redisStack) Name() string { return "redis (go-redis)" }

func statusKey(user string) string { return "presence:" + user }

func (s *redisStack) Add(_ int, user, _ string) error {
	return s.rdb.Set(s.ctx, statusKey(user), "online", redisTTL).Err()
}

func (s *redisStack) Remove(_ int, user, _ string) error {
	return s.rdb.Del(s.ctx, statusKey(user)).Err()
}

func (s *redisStack) ReadBatch(_ int, _ string, users []string) (int, error) {
	keys := make([]string, len(users))
	for i, u := range users {
		keys[i] = statusKey(u)
	}
	vals, err := s.rdb.MGet(s.ctx, keys...).Result()
	if err != nil {
		return 0, err
	}
	n := 0
	for _, v := range vals {
		if v != nil {
			n++
		}
	}
	return n, nil
}

func (s *redisStack) SetupFanout(users []string, watches map[string][]string) error {
	for i := 0; i < len(users); i += 1000 {
		end := min(i+1000, len(users))
		if _, err := s.rdb.Pipelined(s.ctx, func(p redis.Pipeliner) error {
			for _, u := range users[i:end] {
				p.Set(s.ctx, statusKey(u), "online", redisTTL)
			}
			return nil
		}); err != nil {
			return err
		}
	}
	s.watchers = watcherIndex(users, watches, s.stop, &s.wg, &s.delivered)
	chans := make([][]string, redisPubSubs)
	k := 0
	for t := range s.watchers {
		chans[k%redisPubSubs] = append(chans[k%redisPubSubs], "status:"+t)
		k++
	}
	for _, list := range chans {
		ps := s.rdb.Subscribe(s.ctx)
		for i := 0; i < len(list); i += 1000 {
			if err := ps.Subscribe(s.ctx, list[i:min(i+1000, len(list))]...); err != nil {
				return err
			}
		}
		s.pubsubs = append(s.pubsubs, ps)
		msgs := ps.Channel(redis.WithChannelSize(1024))
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			for {
				select {
				case m, ok := <-msgs:
					if !ok {
						return
					}
					user, rest, _ := strings.Cut(m.Payload, "|")
					ev := naiveEvent{user: user, custom: rest, online: true}
					for _, ch := range s.watchers[user] {
						select {
						case ch <- ev:
						default:
						}
					}
				case <-s.stop:
					return
				}
			}
		}()
	}
	return nil
}

func (s *redisStack) Change(_ int, user, text string) error {
	_, err := s.rdb.Pipelined(s.ctx, func(p redis.Pipeliner) error {
		p.Set(s.ctx, statusKey(user), "online|"+text, redisTTL)
		p.Publish(s.ctx, "status:"+user, user+"|"+text)
		return nil
	})
	return err
}

func (s *redisStack) Delivered() uint64 { return s.delivered.Load() }

func (s *redisStack) StopFanout() {
	close(s.stop)
	for _, ps := range s.pubsubs {
		ps.Close()
	}
	s.wg.Wait()
}

func (s *redisStack) Close() error { return s.rdb.Close() }
