package presence

import (
	"fmt"
	"testing"
	"unsafe"
)

// Devices keep their IDs' bytes apart from the caller's: a host may pass a
// device ID that is a view of a buffer it reuses. Devices of one shard
// bearing the same ID share one copy of it, so that a million "phone"
// devices do not hold a million copies.
func TestDevicesKeepOwnSharedIDs(t *testing.T) {
	e, err := New(Config{Shards: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	buf := []byte("phone")
	borrowed := unsafe.String(&buf[0], len(buf)) // changes when buf does
	var data []*byte
	for i := range 3 {
		s, err := e.Login(fmt.Sprintf("user-%d", i), borrowed)
		if err != nil {
			t.Fatal(err)
		}
		data = append(data, unsafe.StringData(s.dev.id))
	}
	copy(buf, "xxxxx")
	for i := range 3 {
		st := e.QueryOnlineStatus([]string{fmt.Sprintf("user-%d", i)})[0]
		if len(st.Sessions) != 1 || st.Sessions[0].DeviceID != "phone" {
			t.Fatalf("user-%d: devices %+v after the caller's buffer changed, want one named phone", i, st.Sessions)
		}
		if data[i] == &buf[0] {
			t.Fatalf("user-%d: the device keeps the caller's buffer", i)
		}
		if data[i] != data[0] {
			t.Errorf("user-%d: its device ID is a copy of its own, not the one user-0's device holds", i)
		}
	}
	// An ID that takes another's place in the table does not change the
	// devices that bear the older one.
	for i := range 20 {
		if _, err := e.Login("other", fmt.Sprintf("install-%d", i)); err != nil {
			t.Fatal(err)
		}
	}
	if got := e.QueryOnlineStatus([]string{"user-0"})[0].Sessions[0].DeviceID; got != "phone" {
		t.Fatalf("user-0's device is now %q, want phone", got)
	}
}

// A subscription list takes the nodes the calls that filled it need: one
// call of 20 on an empty list takes 20 (growing one append at a time would
// have taken 32); the same 20 again, or repeats within a call, take none;
// and fresh targets that evict old ones past MaxSubscriptions reuse the
// evicted nodes.
func TestSubscriptionListTakesTheNodesItNeeds(t *testing.T) {
	e, err := New(Config{Shards: 1, StatusQuery: true, MaxSubscriptions: 30, SubscribeQuota: Quota{Calls: -1}})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	targets := func(from, n int) []string {
		var ids []string
		for i := range n {
			ids = append(ids, fmt.Sprintf("target-%d", from+i))
		}
		return ids
	}
	subscribe := func(ids []string) (entries, nodes int) {
		t.Helper()
		if _, err := e.SubscribeUserStatus("caller", ids); err != nil {
			t.Fatal(err)
		}
		sh, k := e.locate("caller")
		sh.mu.Lock()
		defer sh.mu.Unlock()
		list := &sh.getLocked(k).edges.Load().subs
		return list.len(), cap(list.nodes)
	}
	if n, c := subscribe(targets(0, 20)); n != 20 || c != 20 {
		t.Fatalf("one call of 20 on an empty list: %d entries in %d nodes, want 20 in 20", n, c)
	}
	for _, ids := range [][]string{targets(0, 20), append(targets(10, 5), targets(10, 5)...)} {
		if n, c := subscribe(ids); n != 20 || c != 20 {
			t.Fatalf("after %v, all subscribed already: %d entries in %d nodes, want 20 in 20", ids, n, c)
		}
	}
	_, grown := subscribe(targets(20, 10)) // up to the limit: the list grows as append would
	for _, ids := range [][]string{targets(30, 10), append(targets(0, 3), targets(40, 3)...)} {
		if n, c := subscribe(ids); n != 30 || c != grown {
			t.Fatalf("after %v, evicting as many: %d entries in %d nodes, want 30 in %d", ids, n, c, grown)
		}
	}
}
