package persist_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"hash/crc32"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/presencekit/presence"
	"github.com/presencekit/presence/persist"
	bolt "go.etcd.io/bbolt"
)

// savedFile writes a small valid snapshot file and returns its path.
func savedFile(t testing.TB) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "presence.db")
	store := open(t, path)
	e, err := presence.New(presence.Config{Store: store})
	if err != nil {
		t.Fatal(err)
	}
	for _, u := range []string{"alice", "bob", "carol"} {
		if _, err := e.Login(u, "phone"); err != nil {
			t.Fatal(err)
		}
		if err := e.SetSelfStatus(u, "here"); err != nil {
			t.Fatal(err)
		}
	}
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	if err := store.Close(); err != nil {
		t.Fatal(err)
	}
	return path
}

// openEngine opens path and builds an engine from it, returning the first error.
func openEngine(path string) error {
	store, err := persist.Open(path, &persist.Options{LockTimeout: 200 * time.Millisecond})
	if err != nil {
		return err
	}
	defer store.Close()
	e, err := presence.New(presence.Config{Store: store})
	if err != nil {
		return err
	}
	return e.Close()
}

// Every damaged or unexpected file gives an error that names the file and
// says what is wrong; none panics, and the file is left as it was.
func TestUnreadableFiles(t *testing.T) {
	bboltFile := func(t *testing.T, fill func(tx *bolt.Tx) error) string {
		path := filepath.Join(t.TempDir(), "x.db")
		db, err := bolt.Open(path, 0o600, nil)
		if err != nil {
			t.Fatal(err)
		}
		if err := db.Update(fill); err != nil {
			t.Fatal(err)
		}
		db.Close()
		return path
	}
	cases := []struct {
		name string
		file func(t *testing.T) string
		want string // a phrase the error must contain, beside the path
	}{
		{"garbage", func(t *testing.T) string {
			path := filepath.Join(t.TempDir(), "x.db")
			os.WriteFile(path, []byte(strings.Repeat("not a database ", 2000)), 0o600)
			return path
		}, "open"},
		{"truncated", func(t *testing.T) string {
			path := savedFile(t)
			b, _ := os.ReadFile(path)
			// Cut into the pages in use (bbolt's meta page records their
			// count at offset 56 and the page size at 24), not just the
			// free space after them.
			used := int(binary.LittleEndian.Uint64(b[56:])) * int(binary.LittleEndian.Uint32(b[24:]))
			os.WriteFile(path, b[:used/2], 0o600)
			return path
		}, "truncated"},
		{"corrupt pages", func(t *testing.T) string {
			path := savedFile(t)
			b, _ := os.ReadFile(path)
			for i := 2 * 4096; i < len(b); i += 7 { // every page but the two meta pages
				b[i] ^= 0x5a
			}
			os.WriteFile(path, b, 0o600)
			return path
		}, ""},
		{"foreign bbolt file", func(t *testing.T) string {
			return bboltFile(t, func(tx *bolt.Tx) error {
				b, err := tx.CreateBucket([]byte("invoices"))
				if err != nil {
					return err
				}
				return b.Put([]byte("1"), []byte("paid"))
			})
		}, "not a presence snapshot"},
		{"future format", func(t *testing.T) string {
			return bboltFile(t, func(tx *bolt.Tx) error {
				b, err := tx.CreateBucket([]byte("presence"))
				if err != nil {
					return err
				}
				return b.Put([]byte("format"), binary.AppendUvarint(nil, 99))
			})
		}, "format 99"},
		{"bad record", func(t *testing.T) string {
			path := filepath.Join(t.TempDir(), "x.db")
			rec := []byte{5, 'a', 'l', 'i', 'c', 'e', 0, 1, 0, 0xff, 0xff, 0xff} // cut off in the devices
			if err := writeChunkFile(path, rec); err != nil {
				t.Fatal(err)
			}
			return path
		}, "record truncated"},
		{"flipped bit in a record", func(t *testing.T) string {
			path := savedFile(t)
			b, _ := os.ReadFile(path)
			i := bytes.Index(b, []byte("carol"))
			if i < 0 {
				t.Fatal("record not found in the file")
			}
			b[i] ^= 0x02 // "carol" -> "aarol": still a valid ID
			os.WriteFile(path, b, 0o600)
			return path
		}, "checksum mismatch"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			path := c.file(t)
			before, _ := os.ReadFile(path)
			err := openEngine(path)
			if err == nil {
				t.Fatal("no error")
			}
			if !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), c.want) {
				t.Errorf("error %q should name %s and say %q", err, path, c.want)
			}
			if after, _ := os.ReadFile(path); string(after) != string(before) {
				t.Error("the unreadable file was changed")
			}
		})
	}
}

// A second opener gives up after the lock timeout with an error saying the
// file is in use, instead of waiting forever.
func TestLockedFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "presence.db")
	holder := open(t, path)
	defer holder.Close()
	start := time.Now()
	_, err := persist.Open(path, &persist.Options{LockTimeout: 100 * time.Millisecond})
	if err == nil || !strings.Contains(err.Error(), "locked by another process") || !strings.Contains(err.Error(), path) {
		t.Fatalf("second Open: %v", err)
	}
	if time.Since(start) > time.Minute {
		t.Error("Open waited far past its lock timeout")
	}
}

// A failed snapshot is reported in Stats, and the engine keeps serving.
func TestFailedSnapshotIsReported(t *testing.T) {
	path := filepath.Join(t.TempDir(), "presence.db")
	store := open(t, path)
	e, err := presence.New(presence.Config{Store: store})
	if err != nil {
		t.Fatal(err)
	}
	store.Close() // pull the file from under the engine
	if err := e.Snapshot(context.Background()); err == nil {
		t.Fatal("snapshot to a closed store succeeded")
	}
	if st := e.Stats(); st.LastSnapshotErr == nil || !st.LastSnapshot.IsZero() {
		t.Errorf("Stats after a failed snapshot: LastSnapshot %v, LastSnapshotErr %v", st.LastSnapshot, st.LastSnapshotErr)
	}
	if _, err := e.Login("alice", "phone"); err != nil {
		t.Errorf("engine stopped serving after a failed snapshot: %v", err)
	}
	if err := e.Close(); err == nil {
		t.Error("Close reported no error for its failed final snapshot")
	}
}

// Lowering a limit between restarts must not keep the engine from starting:
// what was saved under the old limits comes back, and the new limits apply
// to what is set from then on.
func TestRestoreAfterLoweringLimits(t *testing.T) {
	path := filepath.Join(t.TempDir(), "presence.db")
	store := open(t, path)
	defer store.Close()
	long := strings.Repeat("x", 60)
	e, err := presence.New(presence.Config{Store: store})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.Login(long, "phone"); err != nil {
		t.Fatal(err)
	}
	if err := e.SetSelfStatus(long, strings.Repeat("busy ", 12)); err != nil {
		t.Fatal(err)
	}
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}

	e, err = presence.New(presence.Config{Store: store, MaxIDBytes: 16, MaxCustomStatusBytes: 20})
	if err != nil {
		t.Fatalf("restart with lower limits: %v", err)
	}
	defer e.Close()
	st := e.QueryOnlineStatus([]string{long})
	if st[0].Status != presence.Unknown { // the ID is over today's limit, so queries refuse it...
		t.Errorf("query of an ID over the new limit: %+v", st[0])
	}
	if got := e.Stats(); got.Users != 1 || got.Online != 1 { // ...but the user came back
		t.Errorf("after the restart: %+v, want the saved user back", got)
	}
}

// writeChunkFile writes a snapshot file in the current format whose one
// snapshot is a single chunk holding value, with a correct checksum.
func writeChunkFile(path string, value []byte) error {
	db, err := bolt.Open(path, 0o600, nil)
	if err != nil {
		return err
	}
	defer db.Close()
	return db.Update(func(tx *bolt.Tx) error {
		meta, err := tx.CreateBucket([]byte("presence"))
		if err != nil {
			return err
		}
		meta.Put([]byte("format"), binary.AppendUvarint(nil, 1))
		meta.Put([]byte("current"), []byte("snapshot-1"))
		snap, err := tx.CreateBucket([]byte("snapshot-1"))
		if err != nil {
			return err
		}
		chunk := binary.BigEndian.AppendUint32(nil, crc32.Checksum(value, crc32.MakeTable(crc32.Castagnoli)))
		return snap.Put([]byte("00000001"), append(chunk, value...))
	})
}
