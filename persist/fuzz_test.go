package persist_test

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/presencekit/presence"
	"github.com/presencekit/presence/persist"
)

// FuzzSnapshotFile writes arbitrary bytes as a snapshot file and opens it
// with an engine on top: the outcome may be an error or an engine, never a
// panic or a crash, and the file must be left as it was whenever opening or
// restoring fails. Seeds are a valid file and cut or flipped copies of it.
func FuzzSnapshotFile(f *testing.F) {
	valid, err := os.ReadFile(savedFile(f))
	if err != nil {
		f.Fatal(err)
	}
	f.Add(valid)
	f.Add(valid[:len(valid)/2])
	f.Add(valid[:8192])
	flipped := bytes.Clone(valid)
	for i := 2 * 4096; i < len(flipped); i += 509 {
		flipped[i] ^= 0x10
	}
	f.Add(flipped)
	f.Add([]byte("not a database"))
	f.Fuzz(func(t *testing.T, data []byte) {
		path := filepath.Join(t.TempDir(), "fuzz.db")
		if err := os.WriteFile(path, data, 0o600); err != nil {
			t.Fatal(err)
		}
		store, err := persist.Open(path, &persist.Options{LockTimeout: time.Second, MmapBytes: 1 << 20})
		if err != nil {
			unchanged(t, path, data)
			return
		}
		defer store.Close()
		e, err := presence.New(presence.Config{Store: store})
		if err != nil {
			unchanged(t, path, data)
			return
		}
		e.Close()
	})
}

// FuzzRecordChunk feeds arbitrary bytes to the record decoder as the value
// of a snapshot chunk with a valid checksum: every input is an error or a
// list of records, never a panic or a huge allocation.
func FuzzRecordChunk(f *testing.F) {
	f.Add([]byte{5, 'a', 'l', 'i', 'c', 'e', 0, 1, 0, 0, 0, 0})
	f.Add([]byte{5, 'a', 'l', 'i', 'c', 'e', 0, 1, 0, 1, 5, 'p', 'h', 'o', 'n', 'e', 1, 2, 2, 1, 3, 'b', 'o', 'b', 0})
	f.Add([]byte{0xff, 0xff, 0xff, 0xff, 0x0f})
	f.Fuzz(func(t *testing.T, value []byte) {
		path := filepath.Join(t.TempDir(), "chunk.db")
		if err := writeChunkFile(path, value); err != nil {
			t.Fatal(err)
		}
		store, err := persist.Open(path, nil)
		if err != nil {
			t.Fatalf("a well-formed file with any chunk must open: %v", err)
		}
		defer store.Close()
		_ = store.Load(context.Background(), func([]presence.Record) error { return nil })
		if e, err := presence.New(presence.Config{Store: store}); err == nil {
			e.Close()
		}
	})
}

func unchanged(t *testing.T, path string, want []byte) {
	t.Helper()
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Error("a file that could not be opened or restored was changed")
	}
}
