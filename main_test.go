package presence

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the run if any goroutine outlives the suite: every engine
// a test creates must stop its background goroutine on Close.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
