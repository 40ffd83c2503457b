package presence_test

import (
	"context"
	"iter"
	"runtime"
	"slices"
	"testing"

	"github.com/presencekit/presence"
)

// oneBatch is a Store that hands its records to add in a single batch and
// saves nothing.
type oneBatch []presence.Record

func (oneBatch) Save(_ context.Context, records iter.Seq2[[]presence.Record, error]) error {
	for _, err := range records {
		if err != nil {
			return err
		}
	}
	return nil
}

func (b oneBatch) Load(_ context.Context, add func([]presence.Record) error) error {
	return add(slices.Clone(b))
}

// A restore ends as restoring the records one by one would, however its
// goroutines share a batch out. A record with nothing the engine keeps of
// its own (no device, no edge: only a version) is kept when an earlier
// record has an edge to its user. Here the edge to "kept" and "kept"
// itself fall in different goroutines' shares of the batch whenever there
// are two or more, which GOMAXPROCS 4 makes sure of even on one CPU.
// A record no earlier record links to is dropped at once; when a later
// record's edge makes it again, its version does not go back.
func TestRestoreKeepsRecordsAsIfOneByOne(t *testing.T) {
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(4))
	device := []presence.DeviceRecord{{DeviceID: "phone"}}
	store := oneBatch{
		{UserID: "a", Devices: device, Subscriptions: []string{"kept"}},
		{UserID: "other", Version: 88},
		{UserID: "kept", Version: 77},
		{UserID: "b", Devices: device, Subscriptions: []string{"other"}},
	}
	for range 20 { // the goroutines race afresh each time
		e := newEngine(t, presence.Config{Store: store})
		if v := state(t, e, "kept").Version; v != 77 {
			t.Fatalf("kept: restored with version %d, want its saved 77", v)
		}
		if v := state(t, e, "other").Version; v < 88 {
			t.Fatalf("other: made again with version %d, behind its saved 88", v)
		}
		noErr(t, "Close", e.Close())
	}
}
