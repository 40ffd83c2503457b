package presence

import (
	"context"
	"fmt"
	"iter"
	"math/rand/v2"
	"runtime"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"github.com/google/go-cmp/cmp"
)

// inBatches is a Store that hands its records to add in batches of the
// given sizes, taken in turn.
type inBatches struct {
	records []Record
	sizes   []int
}

func (inBatches) Save(_ context.Context, records iter.Seq2[[]Record, error]) error {
	for _, err := range records {
		if err != nil {
			return err
		}
	}
	return nil
}

func (b inBatches) Load(_ context.Context, add func([]Record) error) error {
	for i, turn := 0, 0; i < len(b.records); turn++ {
		end := min(i+b.sizes[turn%len(b.sizes)], len(b.records))
		if err := add(b.records[i:end]); err != nil {
			return err
		}
		i = end
	}
	return nil
}

// batchSizes are the ways TestRestoreIsTheSameInAnyBatches cuts the
// records: one at a time (restored without goroutines, visiting only the
// shards each batch touches), a few at a time, at the threshold, and
// mixing small batches with large ones (shared out between goroutines).
var batchSizes = [][]int{{1}, {3}, {63}, {64}, {100}, {100, 1, 3, 70}, {1, 63, 64, 2}}

// A restore ends in the same state however the Store cuts the records into
// batches; and with damaged records among them, it fails with the error of
// the first, as restoring them in one batch does.
func TestRestoreIsTheSameInAnyBatches(t *testing.T) {
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(4))
	synctest.Test(t, func(t *testing.T) {
		records := batchedRecords(rand.New(rand.NewPCG(7, 7)), 400)
		cfg := Config{StatusQuery: true, NotifyFriends: true, Shards: 16}
		restore := func(sizes []int) (dumpedEngine, error) {
			cfg.Store = inBatches{records, sizes}
			e, err := New(cfg)
			if err != nil {
				return dumpedEngine{}, err
			}
			defer e.Close()
			if err := e.checkInvariants(); err != nil {
				t.Errorf("batches of %v: %v", sizes, err)
			}
			return dumpEngine(e, nil), nil
		}
		want, err := restore([]int{len(records)})
		if err != nil {
			t.Fatal(err)
		}
		if len(want.Users) < len(records)/2 {
			t.Fatalf("only %d users restored from %d records", len(want.Users), len(records))
		}
		for _, sizes := range batchSizes {
			got, err := restore(sizes)
			if err != nil {
				t.Fatalf("batches of %v: %v", sizes, err)
			}
			if diff := cmp.Diff(want, got); diff != "" {
				t.Errorf("batches of %v differ from one batch (-one +batches):\n%s", sizes, diff)
			}
		}

		// Damage two records: a repeated device, then (later) an edge to
		// the user itself.
		records[150].Devices = append(records[150].Devices, records[150].Devices...)
		records[290].Subscriptions = append(records[290].Subscriptions, records[290].UserID)
		_, wantErr := restore([]int{len(records)})
		if wantErr == nil || !strings.Contains(wantErr.Error(), records[150].UserID) {
			t.Fatalf("one batch with damaged records: %v, want an error about %s", wantErr, records[150].UserID)
		}
		for _, sizes := range batchSizes {
			if _, err := restore(sizes); err == nil || err.Error() != wantErr.Error() {
				t.Errorf("batches of %v: %v, want %v", sizes, err, wantErr)
			}
		}
	})
}

// batchedRecords makes n saved users: most with devices (some connected),
// custom texts, subscriptions and friends among those users, and a few with
// nothing but a version. Edges only lead to users with devices, which keep
// their saved records whichever batch links to them first.
func batchedRecords(r *rand.Rand, n int) []Record {
	now := time.Now()
	id := func(i int) string { return fmt.Sprintf("u%03d", i) }
	withDevices := func(i int) bool { return i%7 != 3 }
	pick := func() string {
		for {
			if i := r.IntN(n); withDevices(i) {
				return id(i)
			}
		}
	}
	var records []Record
	for i := range n {
		rec := Record{UserID: id(i), Version: uint64(1 + r.IntN(1000))}
		if withDevices(i) {
			for d := range 1 + r.IntN(2) {
				at := now.Add(-time.Duration(r.IntN(3600)) * time.Second)
				rec.Devices = append(rec.Devices, DeviceRecord{
					DeviceID: fmt.Sprintf("dev%d", d), Connected: r.IntN(2) == 0, LoginAt: at, LastSeen: at,
				})
			}
			if rec.Devices[0].Connected {
				rec.Custom = fmt.Sprintf("busy %d", i)
			}
			seen := map[string]bool{rec.UserID: true}
			for range r.IntN(6) {
				if t := pick(); !seen[t] {
					seen[t] = true
					rec.Subscriptions = append(rec.Subscriptions, t)
				}
			}
			if len(rec.Subscriptions) > 0 {
				rec.IdleSince = now.Add(-time.Duration(r.IntN(3600)) * time.Second)
			}
			for range r.IntN(4) {
				if t := pick(); !seen[t] {
					seen[t] = true
					rec.Friends = append(rec.Friends, t)
				}
			}
		}
		records = append(records, rec)
	}
	r.Shuffle(len(records), func(i, j int) { records[i], records[j] = records[j], records[i] })
	return records
}

// BenchmarkRestoreBatches restores 20 000 users, each with a device and a
// subscription, from a Store that hands them over size records at a time.
// A Store of its own may well hand them over one by one.
//
//	go test -run '^$' -bench RestoreBatches -benchtime 3x .
func BenchmarkRestoreBatches(b *testing.B) {
	const n = 20000
	records := make([]Record, n)
	for i := range records {
		records[i] = Record{
			UserID: fmt.Sprintf("user-%d", i), Version: 1,
			Devices:       []DeviceRecord{{DeviceID: "phone"}},
			Subscriptions: []string{fmt.Sprintf("user-%d", (i+1)%n)},
		}
	}
	for _, size := range []int{1, 16, 8192} {
		b.Run(fmt.Sprint("batch=", size), func(b *testing.B) {
			for b.Loop() {
				e, err := New(Config{StatusQuery: true, Store: inBatches{records, []int{size}}})
				if err != nil {
					b.Fatal(err)
				}
				if err := e.Close(); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/n, "ns/record")
		})
	}
}
