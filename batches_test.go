package presence

import (
	"context"
	"fmt"
	"iter"
	"math/rand/v2"
	"runtime"
	"testing"
	"testing/synctest"
	"time"

	"github.com/google/go-cmp/cmp"
)

// inBatches is a Store that hands its records to add size at a time.
type inBatches struct {
	records []Record
	size    int
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
	for i := 0; i < len(b.records); i += b.size {
		if err := add(b.records[i:min(i+b.size, len(b.records))]); err != nil {
			return err
		}
	}
	return nil
}

// A restore ends in the same state however the Store cuts the records into
// batches: one at a time (restored without goroutines, visiting only the
// shards each batch touches), a few at a time, or all at once (shared out
// between goroutines).
func TestRestoreIsTheSameInAnyBatches(t *testing.T) {
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(4))
	synctest.Test(t, func(t *testing.T) {
		records := batchedRecords(rand.New(rand.NewPCG(7, 7)), 400)
		cfg := Config{StatusQuery: true, NotifyFriends: true, Shards: 16}
		var want dumpedEngine
		for _, size := range []int{len(records), 1, 3, 63, 64, 100} {
			cfg.Store = inBatches{records, size}
			e, err := New(cfg)
			if err != nil {
				t.Fatalf("batches of %d: %v", size, err)
			}
			got := dumpEngine(e, nil)
			if err := e.checkInvariants(); err != nil {
				t.Errorf("batches of %d: %v", size, err)
			}
			if err := e.Close(); err != nil {
				t.Fatal(err)
			}
			if size == len(records) {
				want = got
				if len(want.Users) < len(records)/2 {
					t.Fatalf("only %d users restored from %d records", len(want.Users), len(records))
				}
				continue
			}
			if diff := cmp.Diff(want, got); diff != "" {
				t.Errorf("batches of %d differ from one batch (-one +batches):\n%s", size, diff)
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
				e, err := New(Config{StatusQuery: true, Store: inBatches{records, size}})
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
