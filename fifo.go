package presence

import "slices"

// fifo is an insertion-ordered set of keys, each with a value, that keeps its
// order from oldest to newest. Putting a key that is already present moves it
// to the newest end. It has no bound of its own: the owner trims it with
// popOldest, which keeps the eviction policy (oldest first) in one place for
// both of its uses, subscription lists and session mailboxes.
//
// Nodes live in one slice linked by index and are recycled through a free
// list, so a fifo that has reached its working size allocates nothing more.
// The zero value is an empty fifo ready to use. A fifo is not safe for
// concurrent use; its owner's lock protects it.
type fifo[K comparable, V any] struct {
	index map[K]int32
	nodes []fifoNode[K, V]
	head  int32 // oldest node, valid only when len() > 0
	tail  int32 // newest node, valid only when len() > 0
	free  int32 // first recycled node, -1 (or 0 with no nodes) when none
}

type fifoNode[K comparable, V any] struct {
	key        K
	val        V
	prev, next int32 // -1 at either end; next links the free list too
}

const none int32 = -1

func (f *fifo[K, V]) len() int { return len(f.index) }

// get returns the value stored for k.
func (f *fifo[K, V]) get(k K) (V, bool) {
	i, ok := f.index[k]
	if !ok {
		var zero V
		return zero, false
	}
	return f.nodes[i].val, true
}

// has reports whether k is present.
func (f *fifo[K, V]) has(k K) bool {
	_, ok := f.index[k]
	return ok
}

// put stores v for k as the newest entry, moving k there if it was present.
// It reports whether k was present before.
func (f *fifo[K, V]) put(k K, v V) (replaced bool) {
	if i, ok := f.index[k]; ok {
		f.nodes[i].val = v
		if i != f.tail {
			f.unlink(i)
			f.linkNewest(i)
		}
		return true
	}
	if f.index == nil {
		f.index = make(map[K]int32)
		f.free = none
	}
	var i int32
	if f.free != none {
		i = f.free
		f.free = f.nodes[i].next
	} else {
		f.nodes = append(f.nodes, fifoNode[K, V]{})
		i = int32(len(f.nodes) - 1)
	}
	f.nodes[i].key, f.nodes[i].val = k, v
	f.index[k] = i
	f.linkNewest(i)
	return false
}

// grow makes room for n more entries ahead of time.
func (f *fifo[K, V]) grow(n int) {
	if f.index == nil {
		f.index = make(map[K]int32, n)
		f.free = none
	}
	f.nodes = slices.Grow(f.nodes, n)
}

// popOldest removes and returns the oldest entry.
func (f *fifo[K, V]) popOldest() (K, V, bool) {
	if f.len() == 0 {
		var k K
		var v V
		return k, v, false
	}
	n := f.nodes[f.head]
	f.remove(n.key)
	return n.key, n.val, true
}

// remove deletes k and reports whether it was present.
func (f *fifo[K, V]) remove(k K) bool {
	i, ok := f.index[k]
	if !ok {
		return false
	}
	delete(f.index, k)
	f.unlink(i)
	f.nodes[i] = fifoNode[K, V]{next: f.free}
	f.free = i
	return true
}

// each calls fn for every entry from oldest to newest until fn returns false.
// fn must not change the fifo.
func (f *fifo[K, V]) each(fn func(K, V) bool) {
	if f.len() == 0 {
		return
	}
	for i := f.head; i != none; i = f.nodes[i].next {
		if !fn(f.nodes[i].key, f.nodes[i].val) {
			return
		}
	}
}

// reset empties the fifo but keeps its memory for reuse.
func (f *fifo[K, V]) reset() {
	clear(f.index)
	clear(f.nodes)
	f.nodes = f.nodes[:0]
	f.free = none
}

func (f *fifo[K, V]) unlink(i int32) {
	n := &f.nodes[i]
	if n.prev != none {
		f.nodes[n.prev].next = n.next
	} else {
		f.head = n.next
	}
	if n.next != none {
		f.nodes[n.next].prev = n.prev
	} else {
		f.tail = n.prev
	}
}

// linkNewest appends node i at the newest end. The fifo's length already
// counts i, so a length of one means i is the only node.
func (f *fifo[K, V]) linkNewest(i int32) {
	n := &f.nodes[i]
	n.next = none
	if len(f.index) == 1 {
		n.prev = none
		f.head, f.tail = i, i
		return
	}
	n.prev = f.tail
	f.nodes[f.tail].next = i
	f.tail = i
}
