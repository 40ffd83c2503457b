package main

import (
	"context"

	"github.com/centrifugal/centrifuge"
)

// centrifugeStack is centrifuge's in-process MemoryPresenceManager, called
// the way centrifuge's Node calls it: one presence channel per user
// ("presence:"+userID), one entry per connection keyed by client ID with a
// ClientInfo, AddPresence on connect, RemovePresence on disconnect, and
// Presence(channel) to read who is there (PresenceStats as a cheaper read,
// measured as its own row). It has no fan-out of its own: in centrifuge a
// status push goes through the Broker and client connections, which is not a
// presence-manager operation, so the change/fan-out row is n/a.
type centrifugeStack struct {
	node *centrifuge.Node
	pm   *centrifuge.MemoryPresenceManager
}

func newCentrifugeStack() (*centrifugeStack, error) {
	node, err := centrifuge.New(centrifuge.Config{})
	if err != nil {
		return nil, err
	}
	pm, err := centrifuge.NewMemoryPresenceManager(node, centrifuge.MemoryPresenceManagerConfig{})
	if err != nil {
		return nil, err
	}
	return &centrifugeStack{node: node, pm: pm}, nil
}

func (s *centrifugeStack) Name() string { return "centrifuge memory" }

func presenceChannel(user string) string { return "presence:" + user }

func clientID(user, device string) string { return user + "/" + device }

func (s *centrifugeStack) Add(_ int, user, device string) error {
	return s.pm.AddPresence(presenceChannel(user), clientID(user, device), &centrifuge.ClientInfo{
		ClientID: clientID(user, device),
		UserID:   user,
	})
}

func (s *centrifugeStack) Remove(_ int, user, device string) error {
	return s.pm.RemovePresence(presenceChannel(user), clientID(user, device), user)
}

func (s *centrifugeStack) ReadBatch(_ int, _ string, users []string) (int, error) {
	n := 0
	for _, u := range users {
		p, err := s.pm.Presence(presenceChannel(u))
		if err != nil {
			return 0, err
		}
		if len(p) > 0 {
			n++
		}
	}
	return n, nil
}

func (s *centrifugeStack) AltName() string { return "read-batch (PresenceStats)" }

func (s *centrifugeStack) ReadBatchAlt(_ int, _ string, users []string) (int, error) {
	n := 0
	for _, u := range users {
		st, err := s.pm.PresenceStats(presenceChannel(u))
		if err != nil {
			return 0, err
		}
		if st.NumClients > 0 {
			n++
		}
	}
	return n, nil
}

func (s *centrifugeStack) Close() error {
	// The node was never Run (no transport, no broker goroutines), so only
	// the presence manager needs closing.
	return s.pm.Close(context.Background())
}
