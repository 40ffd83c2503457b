module github.com/presencekit/presence

go 1.25.0

require (
	github.com/google/go-cmp v0.7.0
	go.etcd.io/bbolt v1.4.3
	go.uber.org/goleak v1.3.0
	golang.org/x/time v0.15.0
)

require golang.org/x/sys v0.29.0 // indirect
