// Package persist is a presence.Store on a bbolt file: the engine's state
// saved as snapshots that survive crashes, so a restart of the host is
// invisible to the users watching each other.
//
// Each snapshot is written into a bucket of its own, a batch of chunks per
// transaction, and becomes current only in the last transaction, which also
// deletes the previous one. A crash at any moment therefore leaves the
// previous snapshot current and intact; the half-written bucket is removed by
// the next Save.
package persist

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"iter"
	"os"
	"runtime/debug"
	"sync"
	"time"

	"github.com/presencekit/presence"
	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"
)

// formatVersion is the version of the layout this package writes and the
// newest it reads.
const formatVersion = 1

// Each chunk starts with the CRC-32C of the rest: bbolt checks its own
// meta pages but not the data pages, and a flipped bit in a record must be
// an error, not a different user.
const crcBytes = 4

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

var (
	metaBucket = []byte("presence")
	formatKey  = []byte("format")
	currentKey = []byte("current") // name of the bucket holding the current snapshot
	snapPrefix = "snapshot-"
)

// Options configures a Store. A nil *Options means the defaults.
type Options struct {
	// LockTimeout bounds the wait for the file lock that keeps a second
	// process from opening the same file. 0 means 1 s.
	LockTimeout time.Duration
	// ChunkBytes is the size of the chunks records are grouped into. 0 means 256 KiB.
	ChunkBytes int
	// TxBytes is how much a write transaction holds before it commits; it
	// bounds the memory a Save uses. 0 means 32 MiB.
	TxBytes int
	// MmapBytes is the address space mapped for the file up front. bbolt
	// copies every page a transaction has touched whenever it has to grow
	// its mapping, so a mapping that already fits the file saves that copy
	// on every commit of a large snapshot. It reserves address space, not
	// memory. 0 means 1 GiB.
	MmapBytes int
}

// Store is a presence.Store on a bbolt file. It is safe for concurrent use:
// saves run one at a time, and a load reads the snapshot that was current
// when it began.
type Store struct {
	saveMu sync.Mutex // one Save at a time: each deletes the buckets a crash left behind
	db     *bolt.DB
	path   string
	chunk  int
	tx     int
}

var _ presence.Store = (*Store)(nil)

// Open opens or creates the snapshot file at path (mode 0600). It waits at
// most Options.LockTimeout for the file lock and then fails saying another
// process holds it. It fails, naming the file and the cause, for a file that
// is corrupt or truncated, that is a bbolt file of something else, or that a
// newer version of this package wrote; such a file is left untouched.
func Open(path string, opts *Options) (s *Store, err error) {
	o := Options{}
	if opts != nil {
		o = *opts
	}
	if o.LockTimeout < 0 || o.ChunkBytes < 0 || o.TxBytes < 0 || o.MmapBytes < 0 {
		return nil, fmt.Errorf("persist: negative Options value in %+v", o)
	}
	if o.LockTimeout == 0 {
		o.LockTimeout = time.Second
	}
	if o.ChunkBytes == 0 {
		o.ChunkBytes = 256 << 10
	}
	if o.TxBytes == 0 {
		o.TxBytes = 32 << 20
	}
	if o.MmapBytes == 0 {
		o.MmapBytes = 1 << 30
	}
	defer guardFaults()()
	defer recoverInto(&err, "open "+path)
	if err := checkLength(path); err != nil {
		return nil, err
	}
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: o.LockTimeout, InitialMmapSize: o.MmapBytes})
	if errors.Is(err, berrors.ErrTimeout) {
		return nil, fmt.Errorf("persist: %s is locked by another process (waited %v)", path, o.LockTimeout)
	}
	if err != nil {
		return nil, fmt.Errorf("persist: open %s: %w", path, err)
	}
	defer func() {
		if r := recover(); r != nil {
			db.Close()
			s = nil
			panic(r) // on to recoverInto, deferred earlier
		}
		if err != nil {
			db.Close()
			s = nil
		}
	}()
	s = &Store{db: db, path: path, chunk: o.ChunkBytes, tx: o.TxBytes}
	if err := s.checkFormat(); err != nil {
		return nil, err
	}
	return s, nil
}

// checkFormat accepts an empty file or one this package wrote, in a format
// it reads.
func (s *Store) checkFormat() error {
	return s.db.View(func(tx *bolt.Tx) error {
		meta := tx.Bucket(metaBucket)
		if meta == nil {
			foreign := tx.ForEach(func([]byte, *bolt.Bucket) error { return errForeign })
			if foreign != nil {
				return fmt.Errorf("persist: %s is not a presence snapshot file (it holds other data)", s.path)
			}
			return nil
		}
		v := meta.Get(formatKey)
		n, size := binary.Uvarint(v)
		switch {
		case size <= 0:
			return fmt.Errorf("persist: %s: unreadable format version %q", s.path, v)
		case n > formatVersion:
			return fmt.Errorf("persist: %s was written in format %d; this version reads formats up to %d", s.path, n, formatVersion)
		case n == 0:
			return fmt.Errorf("persist: %s: invalid format version 0", s.path)
		}
		return nil
	})
}

var errForeign = errors.New("foreign bucket")

// Close closes the file. Close the engine first: its final snapshot needs
// the Store.
func (s *Store) Close() error { return s.db.Close() }

// Save writes a new snapshot from records and makes it current in its last
// transaction. See presence.Store.
func (s *Store) Save(ctx context.Context, records iter.Seq2[[]presence.Record, error]) (err error) {
	s.saveMu.Lock()
	defer s.saveMu.Unlock()
	defer guardFaults()()
	defer recoverInto(&err, "save to "+s.path)
	name, err := s.begin()
	if err != nil {
		return err
	}
	tx, err := s.db.Begin(true)
	if err != nil {
		return fmt.Errorf("persist: save to %s: %w", s.path, err)
	}
	defer func() {
		if tx != nil {
			tx.Rollback()
		}
	}()
	var (
		seq     uint64
		chunk   []byte
		txBytes int
		// Chunks are recycled once their transaction has committed (bbolt
		// needs a value only until then): a large save then makes little
		// garbage, and the collector leaves the engine's heap alone.
		inTx, spare [][]byte
	)
	flush := func() error {
		if len(chunk) == 0 {
			return nil
		}
		b := tx.Bucket(name)
		b.FillPercent = 1 // keys only ever grow: pack pages full
		seq++
		binary.BigEndian.PutUint32(chunk, crc32.Checksum(chunk[crcBytes:], castagnoli))
		if err := b.Put(binary.BigEndian.AppendUint64(nil, seq), chunk); err != nil {
			return err
		}
		txBytes += len(chunk)
		inTx = append(inTx, chunk)
		chunk = nil
		if txBytes < s.tx {
			return nil
		}
		if err := tx.Commit(); err != nil {
			tx = nil
			return err
		}
		txBytes = 0
		spare, inTx = append(spare, inTx...), inTx[:0]
		tx, err = s.db.Begin(true)
		return err
	}
	for batch, err := range records {
		if err != nil {
			return err
		}
		for i := range batch {
			if len(chunk) == 0 { // room for the checksum, filled in by flush
				if n := len(spare); n > 0 {
					chunk, spare = spare[n-1][:crcBytes], spare[:n-1]
				} else {
					chunk = make([]byte, crcBytes, s.chunk+s.chunk/4)
				}
			}
			chunk = appendRecord(chunk, &batch[i])
			if len(chunk) >= s.chunk {
				if err := flush(); err != nil {
					return fmt.Errorf("persist: save to %s: %w", s.path, err)
				}
			}
		}
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := flush(); err != nil {
		return fmt.Errorf("persist: save to %s: %w", s.path, err)
	}
	// The switch: the new snapshot becomes current, the old one goes.
	meta := tx.Bucket(metaBucket)
	if old := meta.Get(currentKey); old != nil {
		if err := tx.DeleteBucket(old); err != nil && !errors.Is(err, berrors.ErrBucketNotFound) {
			return fmt.Errorf("persist: save to %s: %w", s.path, err)
		}
	}
	if err := meta.Put(currentKey, name); err != nil {
		return fmt.Errorf("persist: save to %s: %w", s.path, err)
	}
	err = tx.Commit()
	tx = nil
	if err != nil {
		return fmt.Errorf("persist: save to %s: %w", s.path, err)
	}
	return nil
}

// begin writes the format version, removes snapshots a crash left half
// written, and creates the bucket for a new one, returning its name.
func (s *Store) begin() (name []byte, err error) {
	err = s.db.Update(func(tx *bolt.Tx) error {
		meta, err := tx.CreateBucketIfNotExists(metaBucket)
		if err != nil {
			return err
		}
		if err := meta.Put(formatKey, binary.AppendUvarint(nil, formatVersion)); err != nil {
			return err
		}
		current := string(meta.Get(currentKey))
		var stale [][]byte
		err = tx.ForEach(func(n []byte, _ *bolt.Bucket) error {
			if string(n) != string(metaBucket) && string(n) != current {
				stale = append(stale, append([]byte(nil), n...))
			}
			return nil
		})
		if err != nil {
			return err
		}
		for _, n := range stale {
			if err := tx.DeleteBucket(n); err != nil {
				return err
			}
		}
		seq, err := meta.NextSequence()
		if err != nil {
			return err
		}
		name = fmt.Appendf(nil, "%s%016x", snapPrefix, seq)
		_, err = tx.CreateBucket(name)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("persist: save to %s: %w", s.path, err)
	}
	return name, nil
}

// Load streams the current snapshot to add, a chunk's records at a time.
// The strings in a chunk's records are slices of one string holding the
// whole chunk: keeping any of them keeps the chunk in memory. See
// presence.Store.
//
// Reading and decoding a chunk overlap with adding the one before: this
// goroutine reads, checks and decodes the chunks, and a second one calls
// add, for one batch at a time and in order. Two batches take turns.
func (s *Store) Load(ctx context.Context, add func([]presence.Record) error) (err error) {
	defer guardFaults()()
	defer recoverInto(&err, "load "+s.path)
	return s.db.View(func(tx *bolt.Tx) error {
		meta := tx.Bucket(metaBucket)
		if meta == nil {
			return nil // nothing saved yet
		}
		name := meta.Get(currentKey)
		if name == nil {
			return nil
		}
		b := tx.Bucket(name)
		if b == nil {
			return fmt.Errorf("persist: %s: current snapshot %q is missing", s.path, name)
		}
		decoded := make(chan loadedBatch, 1)
		free := make(chan []presence.Record, 2) // batches add is done with
		free <- nil
		free <- nil
		added := make(chan struct{}) // closed once the adding goroutine has returned
		var loadErr error
		var addPanic any // re-raised here, so that recoverInto reports it as before
		go func() {
			defer close(added)
			defer func() { addPanic = recover() }()
			for batch := range decoded {
				// ctx is checked again here: the batch was read before add
				// returned, and may have been read before ctx ended.
				if loadErr = ctx.Err(); loadErr != nil {
					return
				}
				if loadErr = batch.err; loadErr != nil {
					return
				}
				if err := add(batch.records); err != nil {
					loadErr = fmt.Errorf("persist: %s: %w", s.path, err)
					return
				}
				free <- batch.records
			}
		}()
		// Even a fault in the mapping must not return while add may still
		// be running.
		defer func() { <-added }()
		func() {
			defer close(decoded)
			c := b.Cursor()
			for k, v := c.First(); k != nil; k, v = c.Next() {
				var batch loadedBatch
				select {
				case batch.records = <-free:
				case <-added: // adding stopped: add failed, or ctx ended
					return
				}
				switch {
				case ctx.Err() != nil:
					batch.err = ctx.Err()
				case len(v) < crcBytes || binary.BigEndian.Uint32(v) != crc32.Checksum(v[crcBytes:], castagnoli):
					batch.err = fmt.Errorf("persist: %s: chunk %x of the snapshot is corrupt (checksum mismatch)", s.path, k)
				default:
					batch.records, batch.err = decodeChunk(v[crcBytes:], batch.records)
					if batch.err != nil {
						batch.err = fmt.Errorf("persist: %s: chunk %x of the snapshot: %w", s.path, k, batch.err)
					}
				}
				select {
				case decoded <- batch:
				case <-added:
					return
				}
				if batch.err != nil {
					return
				}
			}
		}()
		<-added
		if addPanic != nil {
			panic(addPanic)
		}
		return loadErr
	})
}

// loadedBatch is a chunk's records, or the error that ends the loading,
// passed in order to the goroutine that adds them.
type loadedBatch struct {
	records []presence.Record
	err     error
}

// decodeChunk decodes a chunk's records into batch, reusing its records'
// slices. It copies the chunk out of the file's mapping, valid only as long
// as the transaction, into one string that the records' strings share.
func decodeChunk(chunk []byte, batch []presence.Record) ([]presence.Record, error) {
	d := decoder{s: string(chunk)}
	batch = batch[:cap(batch)] // every record decoded before, with its slices
	n := 0
	for ; len(d.s) > 0; n++ {
		if n == len(batch) {
			batch = append(batch, presence.Record{})
		}
		if err := d.record(&batch[n]); err != nil {
			return batch, err
		}
	}
	return batch[:n], nil
}

// recoverInto turns a panic inside bbolt (it trusts the file it maps) into
// an error naming the operation, so a damaged file never crashes the host.
// Use it as the first deferred call of a method that touches the mapping;
// it also makes a fault on the mapped memory a panic rather than a crash
// for as long as that method runs.
func recoverInto(err *error, what string) {
	if r := recover(); r != nil {
		*err = fmt.Errorf("persist: %s: file is damaged: %v", what, r)
	}
}

// guardFaults makes a memory fault in this goroutine (a page of a damaged
// file that cannot be read) a panic that recoverInto turns into an error,
// and returns the function that restores the previous setting.
func guardFaults() func() {
	old := debug.SetPanicOnFault(true)
	return func() { debug.SetPanicOnFault(old) }
}

// checkLength refuses a file shorter than its own meta pages say it is:
// bbolt would map past the end of it and the first read there would kill
// the process.
func checkLength(path string) error {
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("persist: open %s: %w", path, err)
	}
	defer f.Close()
	info, err := f.Stat()
	if err != nil {
		return fmt.Errorf("persist: open %s: %w", path, err)
	}
	// A meta page: a 16-byte page header, then magic, version and page size
	// (uint32 each), flags, the root bucket (16 bytes), the freelist page,
	// and at offset 56 the number of pages in use.
	const magic, pageSizeAt, pagesAt = 0xED0CDAED, 24, 56
	var meta [64]byte
	if _, err := f.ReadAt(meta[:], 0); err != nil || binary.LittleEndian.Uint32(meta[16:]) != magic {
		return nil // not a bbolt file, or too short to say: bbolt's own checks report it
	}
	pageSize := int64(binary.LittleEndian.Uint32(meta[pageSizeAt:]))
	for _, at := range []int64{0, pageSize} {
		if _, err := f.ReadAt(meta[:], at); err != nil || binary.LittleEndian.Uint32(meta[16:]) != magic {
			continue
		}
		if need := int64(binary.LittleEndian.Uint64(meta[pagesAt:])) * pageSize; need > info.Size() {
			return fmt.Errorf("persist: open %s: file is truncated: %d bytes, its header says %d", path, info.Size(), need)
		}
	}
	return nil
}
