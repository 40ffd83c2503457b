package persist_test

import (
	"context"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/presencekit/presence"
	"github.com/presencekit/presence/persist"
)

var (
	benchUsers = flag.Int("snapshot.users", 1_000_000, "users in the snapshot benchmarks")
	benchSubs  = flag.Int("snapshot.subs", 20, "subscriptions per user in the snapshot benchmarks")
	benchFile  = flag.String("snapshot.file", "", "run only BenchmarkSnapshot/Load, on this file; a file that does not exist is made first (populated and saved)")
)

// populate builds the benchmark's population: every user online on one
// device with a custom text, subscribed to benchSubs random others.
func populate(b *testing.B, e *presence.Engine) []string {
	b.Helper()
	ids := make([]string, *benchUsers)
	for i := range ids {
		ids[i] = fmt.Sprintf("user-%07d", i)
	}
	var wg sync.WaitGroup
	workers := runtime.GOMAXPROCS(0)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(w), 3))
			targets := make([]string, *benchSubs)
			for i := w; i < len(ids); i += workers {
				if _, err := e.Login(ids[i], "phone"); err != nil {
					panic(err)
				}
				if err := e.SetSelfStatus(ids[i], "working"); err != nil {
					panic(err)
				}
				for j := range targets {
					for targets[j] = ids[r.IntN(len(ids))]; targets[j] == ids[i]; targets[j] = ids[r.IntN(len(ids))] {
					}
				}
				if _, err := e.SubscribeUserStatus(ids[i], targets); err != nil {
					panic(err)
				}
			}
		}()
	}
	wg.Wait()
	return ids
}

func benchConfig(store *persist.Store) presence.Config {
	return presence.Config{
		StatusQuery:      true,
		Store:            store,
		SnapshotInterval: time.Hour, // only the benchmark's own snapshots
		SubscribeQuota:   presence.Quota{Calls: -1},
	}
}

// BenchmarkSnapshot measures a save and a load of the whole population
// (default 1 M users, 20 M subscription edges) on a real bbolt file, and
// the p99 latency of SetSelfStatus from concurrent writers while a save
// runs, beside the same writers' p99 with no save as the floor.
//
//	go test ./persist -run '^$' -bench Snapshot -benchtime 1x
//
// With -snapshot.file=path only the Load benchmark runs, on that file: the
// population is built and saved only if the file does not exist yet, so
// changes to the restore can be measured without rebuilding it each time.
func BenchmarkSnapshot(b *testing.B) {
	path := filepath.Join(b.TempDir(), "presence.db")
	if *benchFile != "" {
		path = *benchFile
		if _, err := os.Stat(path); err == nil {
			benchLoad(b, path, presence.Stats{})
			return
		}
	}
	store, err := persist.Open(path, nil)
	if err != nil {
		b.Fatal(err)
	}
	defer store.Close()
	e, err := presence.New(benchConfig(store))
	if err != nil {
		b.Fatal(err)
	}
	start := time.Now()
	ids := populate(b, e)
	st := e.Stats()
	b.Logf("population: %d users, %d subscription edges, built in %v", st.Users, st.Subscriptions, time.Since(start).Round(time.Millisecond))
	if *benchFile != "" {
		err := e.Close() // its final save makes the file
		store.Close()
		if err != nil {
			b.Fatal(err)
		}
		benchLoad(b, path, st)
		return
	}

	b.Run("Save", func(b *testing.B) {
		for b.Loop() {
			if err := e.Snapshot(context.Background()); err != nil {
				b.Fatal(err)
			}
		}
		if info, err := os.Stat(path); err == nil {
			b.ReportMetric(float64(info.Size())/float64(len(ids)), "file-B/user")
		}
	})

	b.Run("WritersDuringSave", func(b *testing.B) {
		for b.Loop() {
			idle := writersP99(e, ids, func() { time.Sleep(2 * time.Second) })
			saving := writersP99(e, ids, func() {
				if err := e.Snapshot(context.Background()); err != nil {
					b.Fatal(err)
				}
			})
			b.ReportMetric(float64(idle.Microseconds()), "p99-idle-µs")
			b.ReportMetric(float64(saving.Microseconds()), "p99-saving-µs")
		}
	})

	// Close without its final save being timed, then time a restore.
	if err := e.Close(); err != nil {
		b.Fatal(err)
	}
	store.Close()
	benchLoad(b, path, st)
}

// benchLoad runs the Read sub-benchmark, the Store's own part of a load:
// Store.Load with an add that only counts the records, and the Load
// sub-benchmark: New restoring the file at path. The restored engine must
// hold want's edges and online users; with want zero (a file made by an
// earlier run) it must hold some.
func benchLoad(b *testing.B, path string, want presence.Stats) {
	store, err := persist.Open(path, nil)
	if err != nil {
		b.Fatal(err)
	}
	defer store.Close()
	b.Run("Read", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			users := 0
			err := store.Load(context.Background(), func(batch []presence.Record) error {
				users += len(batch)
				return nil
			})
			if err != nil {
				b.Fatal(err)
			}
			if want.Users != 0 && users != want.Users || users == 0 {
				b.Fatalf("read %d records, want %d", users, want.Users)
			}
		}
	})
	b.Run("Load", func(b *testing.B) {
		for b.Loop() {
			e, err := presence.New(benchConfig(store))
			if err != nil {
				b.Fatal(err)
			}
			b.StopTimer()
			got := e.Stats()
			switch {
			case want.Users == 0 && (got.Subscriptions == 0 || got.Online == 0):
				b.Fatalf("restored %d edges and %d online from %s, want some", got.Subscriptions, got.Online, path)
			case want.Users != 0 && (got.Subscriptions != want.Subscriptions || got.Online != want.Online):
				b.Fatalf("restored %d edges and %d online, want %d and %d", got.Subscriptions, got.Online, want.Subscriptions, want.Online)
			}
			e.Close() // its final save writes back the state just restored

			b.StartTimer()
		}
	})
}

// writersP99 runs one SetSelfStatus writer per CPU on random users while
// during runs, and returns the writers' 99th percentile latency.
func writersP99(e *presence.Engine, ids []string, during func()) time.Duration {
	var stop atomic.Bool
	var wg sync.WaitGroup
	lat := make([][]time.Duration, runtime.GOMAXPROCS(0))
	for w := range lat {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(w), 9))
			texts := [2]string{"in a call", "free"}
			for i := 0; !stop.Load(); i++ {
				id := ids[r.IntN(len(ids))]
				t0 := time.Now()
				_ = e.SetSelfStatus(id, texts[i&1])
				lat[w] = append(lat[w], time.Since(t0))
				if i%64 == 0 {
					time.Sleep(50 * time.Microsecond) // writers, not a busy loop: leave the saver a core
				}
			}
		}()
	}
	during()
	stop.Store(true)
	wg.Wait()
	all := slices.Concat(lat...)
	slices.Sort(all)
	if len(all) == 0 {
		return 0
	}
	return all[len(all)*99/100]
}
