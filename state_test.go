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
