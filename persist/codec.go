package persist

import (
	"encoding/binary"
	"errors"
	"fmt"
	"time"

	"github.com/presencekit/presence"
)

// A snapshot is stored as a sequence of chunks; a chunk is a CRC-32C
// (Castagnoli, big-endian) of what follows, then records back to back, each
// encoded as:
//
//	userID, custom: string  (uvarint length, bytes)
//	version:        uvarint
//	idleSince:      varint (unix ns, 0 for none)
//	devices:        uvarint count, then per device:
//	                deviceID string, connected byte (0 or 1), loginAt varint, lastSeen varint
//	subscriptions:  uvarint count, then that many strings, oldest first
//	friends:        uvarint count, then that many strings
//
// The layout belongs to format version 1 (see formatVersion).

func appendString(b []byte, s string) []byte {
	b = binary.AppendUvarint(b, uint64(len(s)))
	return append(b, s...)
}

func appendTime(b []byte, t time.Time) []byte {
	if t.IsZero() {
		return binary.AppendVarint(b, 0)
	}
	return binary.AppendVarint(b, t.UnixNano())
}

// appendRecord encodes r at the end of b.
func appendRecord(b []byte, r *presence.Record) []byte {
	b = appendString(b, r.UserID)
	b = appendString(b, r.Custom)
	b = binary.AppendUvarint(b, r.Version)
	b = appendTime(b, r.IdleSince)
	b = binary.AppendUvarint(b, uint64(len(r.Devices)))
	for _, d := range r.Devices {
		b = appendString(b, d.DeviceID)
		if d.Connected {
			b = append(b, 1)
		} else {
			b = append(b, 0)
		}
		b = appendTime(b, d.LoginAt)
		b = appendTime(b, d.LastSeen)
	}
	for _, list := range [][]string{r.Subscriptions, r.Friends} {
		b = binary.AppendUvarint(b, uint64(len(list)))
		for _, id := range list {
			b = appendString(b, id)
		}
	}
	return b
}

var errTruncated = errors.New("record truncated")

// decoder reads records from one chunk. The chunk is one string, and every
// string a record holds is a slice of it: decoding allocates nothing per ID.
// Every length and count is checked against the bytes that remain before
// anything is allocated, so a corrupt chunk yields an error, never a panic
// or a huge allocation.
type decoder struct {
	s   string // what is left of the chunk
	err error
}

// uvarint and varint hand encoding/binary the bytes a varint can take as a
// []byte made from the string, which allocates nothing: it does not escape.
func (d *decoder) uvarint() uint64 {
	if d.err != nil {
		return 0
	}
	v, n := binary.Uvarint([]byte(d.s[:min(len(d.s), binary.MaxVarintLen64)]))
	if n <= 0 {
		d.err = errTruncated
		return 0
	}
	d.s = d.s[n:]
	return v
}

func (d *decoder) varint() int64 {
	if d.err != nil {
		return 0
	}
	v, n := binary.Varint([]byte(d.s[:min(len(d.s), binary.MaxVarintLen64)]))
	if n <= 0 {
		d.err = errTruncated
		return 0
	}
	d.s = d.s[n:]
	return v
}

func (d *decoder) time() time.Time {
	ns := d.varint()
	if ns == 0 {
		return time.Time{}
	}
	return time.Unix(0, ns)
}

// count reads a count of items that each take at least one byte.
func (d *decoder) count() int {
	n := d.uvarint()
	if d.err == nil && n > uint64(len(d.s)) {
		d.err = fmt.Errorf("count %d exceeds the %d bytes left", n, len(d.s))
		return 0
	}
	return int(n)
}

func (d *decoder) string() string {
	n := d.count()
	if d.err != nil {
		return ""
	}
	s := d.s[:n]
	d.s = d.s[n:]
	return s
}

func (d *decoder) byte() byte {
	if d.err != nil {
		return 0
	}
	if len(d.s) == 0 {
		d.err = errTruncated
		return 0
	}
	c := d.s[0]
	d.s = d.s[1:]
	return c
}

// record decodes the next record into r, reusing r's slices.
func (d *decoder) record(r *presence.Record) error {
	r.UserID = d.string()
	r.Custom = d.string()
	r.Version = d.uvarint()
	r.IdleSince = d.time()
	r.Devices = r.Devices[:0]
	for n := d.count(); n > 0 && d.err == nil; n-- {
		var dr presence.DeviceRecord
		dr.DeviceID = d.string()
		switch d.byte() {
		case 0:
		case 1:
			dr.Connected = true
		default:
			if d.err == nil {
				d.err = errors.New("bad device flag")
			}
		}
		dr.LoginAt = d.time()
		dr.LastSeen = d.time()
		r.Devices = append(r.Devices, dr)
	}
	r.Subscriptions = d.strings(r.Subscriptions[:0])
	r.Friends = d.strings(r.Friends[:0])
	return d.err
}

func (d *decoder) strings(dst []string) []string {
	for n := d.count(); n > 0 && d.err == nil; n-- {
		dst = append(dst, d.string())
	}
	return dst
}
