package presence

import "sync"

// A lookup reads the records of a list of user IDs, such as a 500-ID
// GetUserStatus. With many users, most of that time is cache misses: an
// ID's slot in its shard's index, then its record, then the record's copy of
// the ID to compare, each found through the one before. Read one ID at a
// time, between a lock and an unlock whose atomic operations keep later reads
// from starting early, every ID waits out its misses in turn. A long list
// is sorted by shard instead, so that the IDs of one shard share one hold of
// its lock (500 IDs over 256 shards take about 220 holds, not 500), and the
// comparison of each record's ID with the one asked for is left until every
// lock is released, when the comparisons of all the IDs overlap.

// batchIDs is the list length from which a lookup sorts the IDs by shard.
// Below it, few IDs share a shard, and the sort's fixed cost (a count per
// bucket) would outweigh the holds it saves.
const batchIDs = 64

// holdIDs bounds the IDs read under one hold of a shard lock, so that a list
// whose IDs all fall in one shard does not keep that shard's writers waiting
// for all of them: the lock is released and taken again between runs of
// this many.
const holdIDs = 64

// lookupBuckets is the most buckets the IDs are sorted into, by the low
// bits of their shard's index: one bucket a shard up to this many shards,
// and a sort whose cost stays fixed with more. IDs of different shards that
// share a bucket are then read under holds of their own.
const lookupBuckets = 256

// maxPooledIDs bounds the scratch memory a lookup leaves in the pool: an
// administrator's query of a million IDs should not keep its 40 MB.
const maxPooledIDs = 1 << 14

// lookupEntry is one ID of the list: its hash and its position in the list.
type lookupEntry struct {
	hash uint64
	pos  int
}

// lookupScratch is the memory of one batched lookup, pooled so that a
// lookup does not allocate.
type lookupScratch struct {
	entries []lookupEntry // the list's IDs, in list order
	sorted  []lookupEntry // the same, sorted by bucket
	found   []*user       // the record in each sorted entry's index slot, nil if none
	counts  [lookupBuckets + 1]int
}

var lookupPool = sync.Pool{New: func() any { return new(lookupScratch) }}

// lookup calls visitLocked(i, u) for every ids[i], with u the record of
// ids[i] or nil if there is none, holding u's shard lock (ids[i]'s shard's
// when u is nil). The calls come in no particular order, and visitLocked
// must take no lock. For an ID that shares its hash with another user's
// record, visitLocked may first be called with that record and then again
// with the right one: each call must set the whole of i's answer.
func (e *Engine) lookup(ids []string, visitLocked func(i int, u *user)) {
	if len(ids) < batchIDs {
		for i := range ids {
			e.lookupOne(ids, i, visitLocked)
		}
		return
	}
	sc := lookupPool.Get().(*lookupScratch)
	entries := sc.sortByShard(e, ids)
	found := sc.found[:0]
	for start := 0; start < len(entries); {
		shard := entries[start].hash & e.mask
		end := start + 1
		for end < len(entries) && end-start < holdIDs && entries[end].hash&e.mask == shard {
			end++
		}
		sh := &e.shards[shard]
		sh.mu.Lock()
		// The record in an ID's slot is the ID's own unless another ID has
		// the same hash, which the check below finds. An empty slot means no
		// record has that hash: a record in shard.clash takes the slot when
		// its holder is deleted.
		for _, en := range entries[start:end] {
			u := sh.users[en.hash]
			found = append(found, u)
			visitLocked(en.pos, u)
		}
		sh.mu.Unlock()
		start = end
	}
	// A record's ID never changes, so it is compared without the lock.
	for j, en := range entries {
		if u := found[j]; u != nil && u.id != ids[en.pos] {
			e.lookupOne(ids, en.pos, visitLocked)
		}
	}
	clear(found) // the pool must not keep records alive
	sc.found = found
	if len(ids) <= maxPooledIDs {
		lookupPool.Put(sc)
	}
}

// lookupOne calls visitLocked(i, u) for ids[i] alone, as lookup does.
func (e *Engine) lookupOne(ids []string, i int, visitLocked func(i int, u *user)) {
	sh, k := e.locate(ids[i])
	sh.mu.Lock()
	visitLocked(i, sh.getLocked(k))
	sh.mu.Unlock()
}

// sortByShard hashes ids and returns their entries sorted by bucket (a
// counting sort), each bucket in list order.
func (sc *lookupScratch) sortByShard(e *Engine, ids []string) []lookupEntry {
	bucketMask := e.mask & (lookupBuckets - 1)
	counts := sc.counts[:bucketMask+2]
	clear(counts)
	entries := sc.entries[:0]
	for i, id := range ids {
		_, k := e.locate(id)
		entries = append(entries, lookupEntry{k.hash, i})
		counts[k.hash&bucketMask+1]++
	}
	for b := 1; b < len(counts); b++ {
		counts[b] += counts[b-1]
	}
	sorted := append(sc.sorted[:0], entries...) // for its length: every entry is overwritten below
	for _, en := range entries {
		b := en.hash & bucketMask
		sorted[counts[b]] = en
		counts[b]++
	}
	sc.entries, sc.sorted = entries, sorted
	return sorted
}
