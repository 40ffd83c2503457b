package presence

import (
	"errors"
	"strconv"
)

// Error is the error type returned by the engine. Code carries the reference
// service's numeric code (0 for conditions the reference has no code for, such
// as ErrSessionEnded and ErrClosed), so a host can hand it to clients unchanged.
//
// Compare with errors.Is against the sentinels below: an *Error matches the
// sentinel of the same kind whatever its message.
type Error struct {
	Code int    // reference error code: 72001, 7008, 6017, 6014, or 0 for local conditions
	Op   string // the engine operation that failed, e.g. "SubscribeUserStatus"
	Msg  string // what was wrong, naming the offending value

	kind *Error // the sentinel this error is an instance of
}

// Error formats the error as "presence: Op: Msg (code N)".
func (e *Error) Error() string {
	s := "presence: "
	if e.Op != "" {
		s += e.Op + ": "
	}
	s += e.Msg
	if e.Code != 0 {
		s += " (code " + strconv.Itoa(e.Code) + ")"
	}
	return s
}

// Is reports whether target is the sentinel this error was made from.
func (e *Error) Is(target error) bool {
	t, ok := target.(*Error)
	if !ok {
		return false
	}
	return e == t || (e.kind != nil && e.kind == t)
}

// Sentinel errors. Every error returned by a call about users, devices,
// sessions or subscriptions matches exactly one of these under errors.Is.
// The rest are plain errors: New's for an impossible Config or a failed
// restore, the Store's from Snapshot and Close, and ctx.Err() from Next.
var (
	// ErrFeatureDisabled (72001): Config.StatusQuery is off and the call needs it.
	ErrFeatureDisabled = &Error{Code: 72001, Msg: "status query feature not enabled"}
	// ErrRateLimited (7008): the caller's quota for the operation is spent.
	ErrRateLimited = &Error{Code: 7008, Msg: "called too frequently"}
	// ErrInvalidParam (6017): a bad ID, too many or too few IDs, a
	// self-subscription, a custom status too long or not UTF-8, a friend list
	// over Config.MaxFriends.
	ErrInvalidParam = &Error{Code: 6017, Msg: "invalid parameter"}
	// ErrNotLoggedIn (6014): the user (or device) has no login the call needs.
	ErrNotLoggedIn = &Error{Code: 6014, Msg: "not logged in"}
	// ErrSessionEnded: a Session method was called after that session ended.
	ErrSessionEnded = &Error{Msg: "session ended"}
	// ErrClosed: the engine has been closed.
	ErrClosed = &Error{Msg: "engine closed"}
)

// errorf builds an instance of kind for operation op.
func newError(kind *Error, op, msg string) *Error {
	return &Error{Code: kind.Code, Op: op, Msg: msg, kind: kind}
}

// errClosed is returned by every method after Close; it needs no detail.
func closedError(op string) error { return newError(ErrClosed, op, "engine closed") }

var errNoStore = errors.New("presence: no Store configured")
