// Package persist is a presence.Store on a bbolt file: the engine's state
// saved as snapshots that survive crashes, so a restart of the host is
// invisible to the users watching each other.
//
// Each snapshot is written into a bucket of its own, a batch of chunks per
// transaction, and becomes current only in the last transaction, which also
// deletes the previous one. A crash at any moment therefore leaves the
// previous snapshot current and intact; the half-written bucket is removed by
// the next Save.
//
// Load hands out records whose strings share a buffer that it refills with
// the next batch: a caller of Load other than the engine must copy any
// string it keeps past its add function's return.
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
	"unsafe"

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
	// bounds the memory a Save uses, about twice this (one transaction
	// committing while the next fills). 0 means 32 MiB.
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
//
// Encoding and writing overlap: a second goroutine encodes the records into
// chunks (see encode), while this one puts them into the file and
// commits, which mostly waits for the disk.
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
	enc := s.encode(records)
	defer enc.stop() // runs first: the encoder is gone before anything else is undone
	var (
		seq     uint64
		txBytes int
		inTx    [][]byte // chunks that bbolt needs until the transaction commits
	)
	put := func(chunk []byte) error {
		b := tx.Bucket(name)
		b.FillPercent = 1 // keys only ever grow: pack pages full
		seq++
		binary.BigEndian.PutUint32(chunk, crc32.Checksum(chunk[crcBytes:], castagnoli))
		if err := b.Put(binary.BigEndian.AppendUint64(nil, seq), chunk); err != nil {
			return err
		}
		txBytes += len(chunk)
		inTx = append(inTx, chunk)
		if txBytes < s.tx {
			return nil
		}
		if err := tx.Commit(); err != nil {
			tx = nil
			return err
		}
		txBytes = 0
		for _, c := range inTx {
			enc.free <- c
		}
		inTx = inTx[:0]
		tx, err = s.db.Begin(true)
		return err
	}
	for chunk := range enc.chunks {
		if err := put(chunk); err != nil {
			return fmt.Errorf("persist: save to %s: %w", s.path, err)
		}
	}
	if enc.panicked != nil {
		panic(enc.panicked)
	}
	if enc.err != nil {
		return enc.err
	}
	if err := ctx.Err(); err != nil {
		return err
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

// chunkEncoder is the goroutine that encodes a Save's records into chunks.
type chunkEncoder struct {
	chunks chan []byte // encoded chunks in order, the checksum's room left at the front; closed at the end
	free   chan []byte // chunks whose transaction has committed, to be refilled
	quit   chan struct{}
	done   chan struct{} // closed once the goroutine has returned

	// Valid once chunks is closed.
	err      error // the records' error: the state is incomplete
	panicked any   // re-raised by Save, so that recoverInto reports it as before
}

// encode starts the goroutine that encodes records into chunks for Save.
//
// Chunks are recycled once their transaction has committed (bbolt needs a
// value only until then): a large save then makes little garbage, and the
// collector leaves the engine's heap alone. At most two transactions' worth
// of chunks exist, so the encoder can fill the next transaction while the
// last one is committed.
func (s *Store) encode(records iter.Seq2[[]presence.Record, error]) *chunkEncoder {
	limit := 2 * (s.tx/s.chunk + 1)
	enc := &chunkEncoder{
		chunks: make(chan []byte, limit),
		free:   make(chan []byte, limit),
		quit:   make(chan struct{}),
		done:   make(chan struct{}),
	}
	go func() {
		defer close(enc.done)
		defer close(enc.chunks)
		defer func() { enc.panicked = recover() }()
		made := 0
		var chunk []byte
		var warm stringWarmer
		for batch, err := range records {
			if err != nil {
				enc.err = err
				return
			}
			select {
			case <-enc.quit: // Save failed: stop the engine's copying too
				return
			default:
			}
			for i := range batch {
				if i%warmRecords == 0 {
					warm.warm(batch[i:min(i+warmRecords, len(batch))])
				}
				if chunk == nil {
					switch {
					case len(enc.free) > 0 || made == limit:
						select {
						case chunk = <-enc.free:
						case <-enc.quit:
							return
						}
					default:
						chunk = make([]byte, 0, s.chunk+s.chunk/4)
						made++
					}
					chunk = chunk[:crcBytes] // room for the checksum, filled in by Save
				}
				chunk = appendRecord(chunk, &batch[i])
				if len(chunk) >= s.chunk {
					select {
					case enc.chunks <- chunk:
						chunk = nil
					case <-enc.quit:
						return
					}
				}
			}
		}
		if chunk != nil {
			select {
			case enc.chunks <- chunk:
			case <-enc.quit:
			}
		}
	}()
	return enc
}

// warmRecords is how many records stringWarmer reads ahead of the encoding:
// their strings fit in the CPU's first-level cache.
const warmRecords = 32

// stringWarmer reads the first byte of every string in some records before
// they are encoded. The engine's strings lie all over its heap, so encoding
// record by record would wait for one cache miss after another; read in a
// tight loop that does not wait for them, the misses overlap, and the
// encoding finds the strings cached.
type stringWarmer struct {
	sum int // what is read, so that the reads are not optimized away
}

func (w *stringWarmer) warm(records []presence.Record) {
	sum := 0
	first := func(s string) int {
		if len(s) == 0 {
			return 0
		}
		return int(s[0])
	}
	for i := range records {
		r := &records[i]
		sum += first(r.UserID) + first(r.Custom)
		for _, d := range r.Devices {
			sum += first(d.DeviceID)
		}
		for _, id := range r.Subscriptions {
			sum += first(id)
		}
		for _, id := range r.Friends {
			sum += first(id)
		}
	}
	w.sum += sum
}

// stop ends the encoder, if it still runs, and waits for it.
func (enc *chunkEncoder) stop() {
	close(enc.quit)
	<-enc.done
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

// Load streams the current snapshot to add, the records of a few chunks at
// a time (see loadRecords). See presence.Store.
//
// The records' strings are not copies of their own: they point into a
// buffer that holds the batch's chunks (see readChunk), which Load refills
// with later chunks once add has returned. add must copy every string it
// keeps; one kept anyway would change under it.
//
// Reading and decoding chunks overlap with adding the batch before: this
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
		free := make(chan loadedBatch, 2) // batches add is done with, to be refilled
		free <- loadedBatch{}
		free <- loadedBatch{}
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
				if len(batch.records) > 0 {
					if err := add(batch.records); err != nil {
						loadErr = fmt.Errorf("persist: %s: %w", s.path, err)
						return
					}
				}
				if loadErr = batch.err; loadErr != nil {
					return
				}
				free <- batch
			}
		}()
		// Even a fault in the mapping must not return while add may still
		// be running.
		defer func() { <-added }()
		func() {
			defer close(decoded)
			c := b.Cursor()
			k, v := c.First()
			for k != nil {
				var batch loadedBatch
				select {
				case batch = <-free:
				case <-added: // adding stopped: add failed, or ctx ended
					return
				}
				batch.records, batch.text = batch.records[:0], batch.text[:0]
				for ; k != nil && len(batch.records) < loadRecords && batch.err == nil; k, v = c.Next() {
					whole := len(batch.records) // records of the chunks before this one
					if batch.err = ctx.Err(); batch.err == nil {
						batch.err = s.readChunk(&batch, k, v)
					}
					if batch.err != nil {
						batch.records = batch.records[:whole] // a chunk's records are added whole or not at all
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

// loadedBatch is the records of a run of chunks, then possibly the error
// that ends the loading, passed in order to the goroutine that adds them.
type loadedBatch struct {
	records []presence.Record
	text    []byte // the chunks' bytes, which the records' strings point into
	err     error
}

// readChunk copies chunk v, under key k, to the end of batch's text, checks
// it and decodes its records into batch.
//
// The copy goes into a buffer that the batch keeps from load to load, so a
// load makes next to no garbage: copied into a string of its own, each
// chunk would be garbage once restored, a third of a gigabyte for a million
// users, made while the engine builds its largest heap. The bytes are
// checked once copied: what is decoded is what was checked, and only this
// goroutine, guarded against faults, reads the file's mapping.
func (s *Store) readChunk(batch *loadedBatch, k, v []byte) error {
	// A text that grows moves to a new array; the records decoded before
	// keep the old one alive until add is done with them.
	start := len(batch.text)
	if len(v) >= crcBytes {
		batch.text = append(batch.text, v[crcBytes:]...)
	}
	chunk := batch.text[start:]
	if len(v) < crcBytes || binary.BigEndian.Uint32(v) != crc32.Checksum(chunk, castagnoli) {
		return fmt.Errorf("persist: %s: chunk %x of the snapshot is corrupt (checksum mismatch)", s.path, k)
	}
	var err error
	batch.records, err = decodeChunk(chunk, batch.records)
	if err != nil {
		return fmt.Errorf("persist: %s: chunk %x of the snapshot: %w", s.path, k, err)
	}
	return nil
}

// loadRecords is about how many records Load hands to add at a time: a
// batch takes whole chunks until it holds that many. The engine restores a
// batch in passes grouped by shard, which find more work to overlap in a
// bigger batch.
const loadRecords = 8192

// decodeChunk decodes a chunk's records and appends them to batch, reusing
// the slices of records decoded before into batch's spare room. The records'
// strings point into chunk, which must not change while they are in use.
func decodeChunk(chunk []byte, batch []presence.Record) ([]presence.Record, error) {
	d := decoder{s: unsafe.String(unsafe.SliceData(chunk), len(chunk))}
	n := len(batch)
	batch = batch[:cap(batch)] // every record decoded before, with its slices
	for ; len(d.s) > 0; n++ {
		if n == len(batch) {
			batch = append(batch, presence.Record{})
		}
		if err := d.record(&batch[n]); err != nil {
			return batch[:n], err
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
