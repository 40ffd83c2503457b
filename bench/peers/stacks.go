package main

import "time"

// stack is what every compared presence implementation offers for the
// operations they share. w is the calling worker's index (0..workers-1), so
// an implementation can keep per-worker scratch space without locking, as a
// server would keep per-connection state.
type stack interface {
	Name() string
	// Add marks user online on one device (a connection that logged in).
	Add(w int, user, device string) error
	// Remove takes that device offline again (logout / disconnect).
	Remove(w int, user, device string) error
	// ReadBatch reads the status of every user in users on behalf of caller
	// and returns how many of them are online.
	ReadBatch(w int, caller string, users []string) (online int, err error)
	Close() error
}

// fanouter is implemented by the stacks that can push a status change to
// the users watching it.
type fanouter interface {
	// SetupFanout brings every user in users online on device "d0", makes
	// each watch its targets (watches[user]), and starts one receiver per
	// watching connection that counts what it receives.
	SetupFanout(users []string, watches map[string][]string) error
	// Change sets user's custom status text; the stack delivers it to the
	// user's watchers.
	Change(w int, user, text string) error
	// Delivered is how many status events the receivers have counted.
	Delivered() uint64
	// StopFanout stops the receivers.
	StopFanout()
}

// readVariant lets a stack offer a second way to read, measured as its own
// row (centrifuge: PresenceStats beside Presence).
type readVariant interface {
	ReadBatchAlt(w int, caller string, users []string) (online int, err error)
	AltName() string
}

// settle waits until the delivered count has not moved for quiet, at most
// max, and returns the final count.
func settle(f fanouter, quiet, max time.Duration) uint64 {
	deadline := time.Now().Add(max)
	last := f.Delivered()
	still := time.Now()
	for time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
		n := f.Delivered()
		if n != last {
			last, still = n, time.Now()
			continue
		}
		if time.Since(still) >= quiet {
			break
		}
	}
	return last
}
