package presence_test

import (
	"context"
	"fmt"
	"time"

	"github.com/presencekit/presence"
)

// A chat server creates one engine at start-up and closes it on shutdown.
func ExampleNew() {
	e, err := presence.New(presence.Config{
		StatusQuery:   true, // allow queries of others and subscriptions
		NotifyFriends: true, // friends hear of each other without subscribing
	})
	if err != nil {
		panic(err)
	}
	defer e.Close()

	if _, err := e.Login("alice", "phone"); err != nil {
		panic(err)
	}
	if err := e.SetSelfStatus("alice", "Listening to music"); err != nil {
		panic(err)
	}
	st, err := e.GetUserStatus("bob", []string{"alice", "carol"})
	if err != nil {
		panic(err)
	}
	for _, s := range st {
		fmt.Printf("%s: %v %q\n", s.UserID, s.Status, s.Custom)
	}
	// Output:
	// alice: Online "Listening to music"
	// carol: Unlogined ""
}

// Each connection of the host reads its session's events in a loop of its
// own and writes them to the client. A session hears of its own user's
// changes too, starting with its login.
func ExampleSession() {
	e, _ := presence.New(presence.Config{StatusQuery: true})
	defer e.Close()

	bob, _ := e.Login("bob", "laptop")
	if _, err := e.SubscribeUserStatus("bob", []string{"alice"}); err != nil {
		panic(err)
	}
	alice, _ := e.Login("alice", "phone")
	_ = e.SetSelfStatus("alice", "In a meeting")
	_ = alice.Disconnect()

	// The event loop of bob's connection. A real server runs it until Done
	// closes; here it stops once it has seen alice go offline.
	var batch []presence.Event
	for {
		select {
		case <-bob.Ready():
			batch = bob.Drain(batch[:0])
			for _, ev := range batch {
				fmt.Printf("%s is %v %q (%v)\n", ev.UserID, ev.Status, ev.Custom, ev.Reason)
			}
			if n := len(batch); n > 0 && batch[n-1].Status == presence.Offline {
				return
			}
		case <-bob.Done():
			return
		}
	}
	// Output:
	// bob is Online "" (Login)
	// alice is Offline "" (LinkClose)
}

// Subscribing delivers the target's current state at once, then every change.
func ExampleEngine_SubscribeUserStatus() {
	e, _ := presence.New(presence.Config{StatusQuery: true})
	defer e.Close()

	_, _ = e.Login("alice", "phone")
	bob, _ := e.Login("bob", "laptop")

	evicted, err := e.SubscribeUserStatus("bob", []string{"alice", "carol"})
	fmt.Println("evicted:", evicted, "err:", err)

	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	for range 3 { // bob's own login, then one event per target
		ev, err := bob.Next(ctx)
		if err != nil {
			panic(err)
		}
		fmt.Printf("%s is %v (%v)\n", ev.UserID, ev.Status, ev.Reason)
	}
	fmt.Println("subscriptions:", e.Subscriptions("bob"))
	// Output:
	// evicted: [] err: <nil>
	// bob is Online (Login)
	// alice is Online (Subscribed)
	// carol is Unlogined (Subscribed)
	// subscriptions: [alice carol]
}
