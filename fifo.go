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
// A key is found by walking the list while the fifo is small, and through a
// map built once it passes smallFifo entries: a typical subscription list
// or mailbox is short, and for it the map would cost more than it saves.
//
// The zero value is an empty fifo ready to use. A fifo is not safe for
// concurrent use; its owner's lock protects it.
type fifo[K comparable, V any] struct {
	index map[K]int32 // key -> node; nil until the fifo first passes smallFifo entries
	nodes []fifoNode[K, V]
	n     int32 // entries
	head  int32 // oldest node, valid only when n > 0
	tail  int32 // newest node, valid only when n > 0
	free  int32 // first recycled node plus one; 0 when none
}

type fifoNode[K comparable, V any] struct {
	key        K
	val        V
	prev, next int32 // none at either end; next also links the free list
}

// none marks the end of a list of nodes.
const none int32 = -1

// smallFifo is the size past which a fifo indexes its keys in a map. Most
// subscription lists (20 or so) and mailboxes stay below it.
const smallFifo = 32

func (f *fifo[K, V]) len() int { return int(f.n) }

// find returns the node holding k, or none.
func (f *fifo[K, V]) find(k K) int32 {
	if f.index != nil {
		if i, ok := f.index[k]; ok {
			return i
		}
		return none
	}
	i := f.head
	for range f.n {
		if f.nodes[i].key == k {
			return i
		}
		i = f.nodes[i].next
	}
	return none
}

// has reports whether k is present.
func (f *fifo[K, V]) has(k K) bool { return f.find(k) != none }

// put stores v for k as the newest entry, moving k there if it was present.
// It reports whether k was present before.
func (f *fifo[K, V]) put(k K, v V) (replaced bool) {
	if i := f.find(k); i != none {
		f.replace(i, v)
		return true
	}
	f.putNew(k, v)
	return false
}

// replace stores v in node i (from find) and makes it the newest entry.
func (f *fifo[K, V]) replace(i int32, v V) {
	f.nodes[i].val = v
	if i != f.tail {
		f.unlink(i)
		f.linkNewest(i)
	}
}

// putNew stores v for k as the newest entry; the caller knows k is absent.
func (f *fifo[K, V]) putNew(k K, v V) {
	var i int32
	if f.free != 0 {
		i = f.free - 1
		f.free = f.nodes[i].next
	} else {
		f.nodes = append(f.nodes, fifoNode[K, V]{})
		i = int32(len(f.nodes) - 1)
	}
	f.nodes[i].key, f.nodes[i].val = k, v
	f.n++
	f.linkNewest(i)
	switch {
	case f.index != nil:
		f.index[k] = i
	case f.n > smallFifo:
		f.index = make(map[K]int32, 2*f.n)
		for j := f.head; j != none; j = f.nodes[j].next {
			f.index[f.nodes[j].key] = j
		}
	}
}

// grow makes room for n more entries ahead of time, counting recycled
// nodes: a list filled by one call then takes as many nodes as it has
// entries, where growing one append at a time would leave up to half of
// them spare.
func (f *fifo[K, V]) grow(n int) {
	if n -= len(f.nodes) - int(f.n); n > 0 {
		f.nodes = slices.Grow(f.nodes, n)
	}
}

// popOldest removes and returns the oldest entry.
func (f *fifo[K, V]) popOldest() (K, V, bool) {
	if f.n == 0 {
		var k K
		var v V
		return k, v, false
	}
	i := f.head
	k, v := f.nodes[i].key, f.nodes[i].val
	f.removeNode(i)
	return k, v, true
}

// remove deletes k and reports whether it was present.
func (f *fifo[K, V]) remove(k K) bool {
	i := f.find(k)
	if i == none {
		return false
	}
	f.removeNode(i)
	return true
}

func (f *fifo[K, V]) removeNode(i int32) {
	if f.index != nil {
		delete(f.index, f.nodes[i].key)
	}
	f.unlink(i)
	f.n--
	f.nodes[i] = fifoNode[K, V]{next: f.free}
	f.free = i + 1
}

// each calls fn for every entry from oldest to newest until fn returns false.
// fn must not change the fifo.
func (f *fifo[K, V]) each(fn func(K, V) bool) {
	i := f.head
	for range f.n {
		if !fn(f.nodes[i].key, f.nodes[i].val) {
			return
		}
		i = f.nodes[i].next
	}
}

// reset empties the fifo but keeps its memory for reuse.
func (f *fifo[K, V]) reset() {
	clear(f.index)
	clear(f.nodes)
	f.nodes = f.nodes[:0]
	f.n, f.free = 0, 0
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

// linkNewest appends node i at the newest end. The count already includes
// i, so a count of one means i is the only node.
func (f *fifo[K, V]) linkNewest(i int32) {
	n := &f.nodes[i]
	n.next = none
	if f.n == 1 {
		n.prev = none
		f.head, f.tail = i, i
		return
	}
	n.prev = f.tail
	f.nodes[f.tail].next = i
	f.tail = i
}
