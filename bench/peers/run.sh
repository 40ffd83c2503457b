#!/usr/bin/env bash
# Runs the side-by-side comparison (main.go) with a real redis-server:
# installs redis-server if it is missing, starts it on a free loopback port
# with persistence off, runs `go run . -redis 127.0.0.1:PORT "$@"`, and stops
# it on exit. Works from any directory. Extra arguments go to the program,
# e.g. `bash bench/peers/run.sh -users 20000 -duration 3s`.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"

if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
	echo "run.sh: installing redis-server (apt-get)" >&2
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq redis-server >/dev/null
	# The package may start a system service on 6379; this run uses its own
	# server on a free port and leaves that one alone.
fi

free_port() {
	if command -v python3 >/dev/null 2>&1; then
		python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
		return
	fi
	local p
	for p in $(seq 16379 16479); do
		if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
			echo "$p"
			return
		fi
	done
	echo "run.sh: no free port in 16379-16479" >&2
	return 1
}

port=$(free_port)
workdir=$(mktemp -d)
redis_pid=""
cleanup() {
	if [[ -n "$redis_pid" ]] && kill -0 "$redis_pid" 2>/dev/null; then
		redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || kill "$redis_pid" 2>/dev/null || true
		wait "$redis_pid" 2>/dev/null || true
	fi
	rm -rf "$workdir"
}
trap cleanup EXIT INT TERM

redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no \
	--daemonize no --dir "$workdir" --logfile "$workdir/redis.log" &
redis_pid=$!

for _ in $(seq 1 100); do
	if redis-cli -p "$port" ping 2>/dev/null | grep -q PONG; then
		break
	fi
	if ! kill -0 "$redis_pid" 2>/dev/null; then
		echo "run.sh: redis-server exited; its log:" >&2
		cat "$workdir/redis.log" >&2 || true
		exit 1
	fi
	sleep 0.1
done
if ! redis-cli -p "$port" ping 2>/dev/null | grep -q PONG; then
	echo "run.sh: redis-server on 127.0.0.1:$port did not answer" >&2
	exit 1
fi
echo "run.sh: redis-server $(redis-server --version | grep -o 'v=[^ ]*') on 127.0.0.1:$port (pid $redis_pid)" >&2

go run . -redis "127.0.0.1:$port" "$@"
