package presence

import (
	"fmt"
	"hash/maphash"
	"strings"
	"sync"
	"time"

	"golang.org/x/time/rate"
)

// Quota is a rate limit per caller: Calls calls per Per. The zero value means
// the reference default, 20 calls per 5 seconds; Calls < 0 means unlimited.
type Quota struct {
	Calls int
	Per   time.Duration
}

// withDefaults fills in the reference default.
func (q Quota) withDefaults() Quota {
	if q.Calls == 0 {
		q.Calls = 20
	}
	if q.Per == 0 {
		q.Per = 5 * time.Second
	}
	return q
}

func (q Quota) validate(field string) error {
	if q.Per < 0 {
		return fmt.Errorf("presence: Config.%s.Per is negative (%v)", field, q.Per)
	}
	return nil
}

// quota meters one operation (query, subscribe or unsubscribe) for every
// caller: a token bucket per caller, created on first use. A bucket that has
// refilled completely holds nothing a fresh one would not, so it is deleted
// then; memory follows the callers active in the last Per, not every caller
// ever seen.
type quota struct {
	limit  rate.Limit
	burst  int
	seed   maphash.Seed
	wheel  *wheel
	shards []quotaShard
}

type quotaShard struct {
	mu      sync.Mutex         // protects buckets and every bucket in it
	buckets map[string]*bucket // caller ID -> its bucket
	_       [40]byte           // keep neighbouring shards' locks off one cache line
}

type bucket struct {
	q       *quota
	sh      *quotaShard
	caller  string
	lim     *rate.Limiter
	timerAt int64 // wheel slot of this bucket's pending reclaim check, 0 if none
}

// newQuota returns nil for an unlimited quota: callers check for nil.
func newQuota(q Quota, nshards int, w *wheel) *quota {
	if q.Calls < 0 {
		return nil
	}
	qt := &quota{
		limit:  rate.Limit(float64(q.Calls) / q.Per.Seconds()),
		burst:  q.Calls,
		seed:   maphash.MakeSeed(),
		wheel:  w,
		shards: make([]quotaShard, nshards),
	}
	for i := range qt.shards {
		qt.shards[i].buckets = make(map[string]*bucket)
	}
	return qt
}

// allow spends one call of caller's quota at now and reports whether there
// was one to spend. A nil quota is unlimited.
func (q *quota) allow(caller string, now time.Time) bool {
	if q == nil {
		return true
	}
	sh := &q.shards[maphash.String(q.seed, caller)&uint64(len(q.shards)-1)]
	sh.mu.Lock()
	defer sh.mu.Unlock()
	b := sh.buckets[caller]
	if b == nil {
		// Clone: the caller's string may be a slice of a larger buffer.
		b = &bucket{q: q, sh: sh, caller: strings.Clone(caller), lim: rate.NewLimiter(q.limit, q.burst)}
		sh.buckets[b.caller] = b
	}
	ok := b.lim.AllowN(now, 1)
	// Spending only moves the moment of refill later, so the entry already
	// on the wheel (if any) fires first and reschedules itself from there.
	if b.timerAt == 0 {
		b.timerAt = q.wheel.schedule(q.wheel.slotFor(q.refilledAt(b, now)), b)
	}
	return ok
}

// refilledAt returns when b's bucket will be full again.
func (q *quota) refilledAt(b *bucket, now time.Time) time.Time {
	missing := float64(q.burst) - b.lim.TokensAt(now)
	if missing <= 0 {
		return now
	}
	return now.Add(time.Duration(missing / float64(q.limit) * float64(time.Second)))
}

// expire deletes the bucket once it is full: a new bucket would behave the same.
func (b *bucket) expire(_ *Engine, now time.Time) {
	sh := b.sh
	sh.mu.Lock()
	defer sh.mu.Unlock()
	b.timerAt = 0
	if sh.buckets[b.caller] != b {
		return
	}
	at := b.q.refilledAt(b, now)
	if !at.After(now) {
		delete(sh.buckets, b.caller)
		return
	}
	b.timerAt = b.q.wheel.schedule(b.q.wheel.slotFor(at), b)
}

// size returns the number of live buckets (for tests and Stats).
func (q *quota) size() int {
	if q == nil {
		return 0
	}
	n := 0
	for i := range q.shards {
		sh := &q.shards[i]
		sh.mu.Lock()
		n += len(sh.buckets)
		sh.mu.Unlock()
	}
	return n
}
