package presence

import (
	"iter"
	"maps"
	"slices"
)

// userSet is a set of user records: a slice while small, a map once it
// passes smallSet members. Most users are watched by a handful of others;
// for them a slice is a quarter of a map's size and faster to walk, while a
// celebrity's thousands of watchers still add and leave in O(1).
//
// The zero value is an empty set. Iteration order is unspecified.
type userSet struct {
	list []*user
	m    map[*user]struct{}
}

const smallSet = 32

func (s *userSet) len() int {
	if s.m != nil {
		return len(s.m)
	}
	return len(s.list)
}

func (s *userSet) has(u *user) bool {
	if s.m != nil {
		_, ok := s.m[u]
		return ok
	}
	return slices.Contains(s.list, u)
}

// add inserts u and reports whether it was new.
func (s *userSet) add(u *user) bool {
	if s.has(u) {
		return false
	}
	s.addNew(u)
	return true
}

// addNew inserts u, which the caller knows is not a member.
func (s *userSet) addNew(u *user) {
	switch {
	case s.m != nil:
		s.m[u] = struct{}{}
	case s.list == nil:
		s.list = make([]*user, 1, 4) // skip append's first doublings
		s.list[0] = u
	case len(s.list) < smallSet:
		s.list = append(s.list, u)
	default:
		s.m = make(map[*user]struct{}, 2*smallSet)
		for _, x := range s.list {
			s.m[x] = struct{}{}
		}
		s.m[u] = struct{}{}
		s.list = nil
	}
}

// grow makes room for n more members ahead of time.
func (s *userSet) grow(n int) {
	switch {
	case s.m != nil:
		// A map cannot grow in place; it is rarely this big.
	case len(s.list)+n <= smallSet:
		s.list = slices.Grow(s.list, n)
	default:
		s.m = make(map[*user]struct{}, len(s.list)+n)
		for _, x := range s.list {
			s.m[x] = struct{}{}
		}
		s.list = nil
	}
}

// remove deletes u and reports whether it was there.
func (s *userSet) remove(u *user) bool {
	if s.m != nil {
		if _, ok := s.m[u]; !ok {
			return false
		}
		delete(s.m, u)
		return true
	}
	i := slices.Index(s.list, u)
	if i < 0 {
		return false
	}
	last := len(s.list) - 1
	s.list[i], s.list[last] = s.list[last], nil
	s.list = s.list[:last]
	if last == 0 {
		s.list = nil
	}
	return true
}

// all yields every member.
func (s *userSet) all() iter.Seq[*user] {
	if s.m != nil {
		return maps.Keys(s.m)
	}
	return slices.Values(s.list)
}
