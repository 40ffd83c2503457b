package presence

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// TestLongListsAnswerAsOneIDAtATime checks that a list long enough to be read
// a shard at a time answers, entry for entry, what asking for each of its IDs
// alone answers, and what the users did: in the caller's order, duplicates
// answered each time, unknown users as Unlogined, devices in the caller's own
// entry only. With one shard and four hash values, every list runs past the
// IDs one lock hold reads, and most IDs share their hash with another user's
// record.
func TestLongListsAnswerAsOneIDAtATime(t *testing.T) {
	for _, tc := range []struct {
		name    string
		shards  int
		keyMask uint64
	}{
		{"256 shards", 256, ^uint64(0)},
		{"one shard, four hash values", 1, 3},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e, err := New(Config{StatusQuery: true, QueryQuota: Quota{Calls: -1}, Shards: tc.shards})
			if err != nil {
				t.Fatal(err)
			}
			e.keyMask = tc.keyMask
			defer e.Close()

			// Users in every state: i%5 == 0 online with a custom text, 1
			// online, 2 offline, 3 logged out again, 4 never logged in.
			type state struct {
				status    Status
				custom    string
				loggedOut bool // whose version is 0 if the record has been dropped
			}
			want := map[string]state{}
			var users []string
			for i := range 150 {
				id := fmt.Sprintf("u%03d", i)
				users = append(users, id)
				want[id] = state{status: Unlogined}
				if i%5 == 4 {
					continue
				}
				s, err := e.Login(id, "phone")
				if err != nil {
					t.Fatal(err)
				}
				want[id] = state{status: Online}
				switch i % 5 {
				case 0:
					custom := "text " + id
					if err := e.SetSelfStatus(id, custom); err != nil {
						t.Fatal(err)
					}
					want[id] = state{status: Online, custom: custom}
				case 2:
					if err := s.Disconnect(); err != nil {
						t.Fatal(err)
					}
					want[id] = state{status: Offline}
				case 3:
					if err := e.Logout(id, "phone"); err != nil {
						t.Fatal(err)
					}
					want[id] = state{status: Unlogined, loggedOut: true}
				}
			}
			const caller = "u001"

			r := rand.New(rand.NewPCG(1, 2))
			for _, n := range []int{batchIDs - 1, batchIDs, 2 * holdIDs, 500} {
				list := make([]string, n)
				for i := range list {
					list[i] = users[r.IntN(len(users))] // duplicates from the 151st ID on at the latest
				}
				list[n/2] = caller

				got, err := e.GetUserStatus(caller, list)
				if err != nil {
					t.Fatal(err)
				}
				if len(got) != n {
					t.Fatalf("%d IDs: %d entries", n, len(got))
				}
				appended, err := e.AppendUserStatus(make([]UserStatus, 0, n), caller, list)
				if err != nil {
					t.Fatal(err)
				}
				if diff := cmp.Diff(got, appended); diff != "" {
					t.Errorf("%d IDs: AppendUserStatus differs from GetUserStatus (-get +append):\n%s", n, diff)
				}
				admin := e.QueryOnlineStatus(list)
				for i, id := range list {
					alone, err := e.GetUserStatus(caller, []string{id})
					if err != nil {
						t.Fatal(err)
					}
					if diff := cmp.Diff(alone[0], got[i]); diff != "" {
						t.Fatalf("%d IDs: entry %d (%s) differs from the answer for it alone (-alone +in list):\n%s", n, i, id, diff)
					}
					if diff := cmp.Diff(e.QueryOnlineStatus([]string{id})[0], admin[i]); diff != "" {
						t.Fatalf("%d IDs: QueryOnlineStatus entry %d (%s) differs from the answer for it alone (-alone +in list):\n%s", n, i, id, diff)
					}
					w := want[id]
					var devices []string
					if id == caller {
						devices = []string{"phone"}
					}
					g := got[i]
					if g.UserID != id || g.Status != w.status || g.Custom != w.custom || !slices.Equal(g.Devices, devices) {
						t.Fatalf("%d IDs: entry %d = %+v, want %s %v %q devices %q", n, i, g, id, w.status, w.custom, devices)
					}
					if (g.Version != 0) != (w.status != Unlogined) && !w.loggedOut {
						t.Fatalf("%d IDs: entry %d = %+v: want version 0 for a user never logged in, another for one logged in", n, i, g)
					}
				}
			}
		})
	}
}
