#!/usr/bin/env bash
# End to end on loopback: wrk against the bare router, the same router under
# a no-op layer (what any layer costs) and under no-op layers writing two
# and four X-RateLimit-* fields (what the fields cost any layer, written and
# sent: tower_governor writes two, tierlimit four), tower_governor and tierlimit
# (benches/wrk_server.rs), rounds interleaved, then each row's
# median requests/s and its ratio to the bare router's.
#
#   bash benches/wrk.sh                 # 3 rounds of 10 s, 1 thread, 32 connections
#   ROUNDS=5 DURATION=5s bash benches/wrk.sh
#
# With two or more cores and taskset (util-linux), the server runs on one
# core and wrk on another (PIN=0: unpinned), so that the two never take
# turns on one core: the rows then differ by the server's own work.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10s}
CONNS=${CONNS:-32}
if ! command -v wrk >/dev/null; then
  echo "wrk is not installed (Debian: apt-get install wrk); nothing measured" >&2
  exit 1
fi
cargo bench --quiet --bench wrk_server --no-run
BIN=$(ls -t "${CARGO_TARGET_DIR:-target}"/release/deps/wrk_server-* | grep -v '\.d$' | head -1)
OUT=$(mktemp)
# Unpinned, `env` runs each command as it is (an empty array here would be
# an unbound variable under `set -u` in bash before 4.4, macOS's 3.2). CPUs
# 0 and 1 must be ones this process may use (a container's cpuset may not
# hold them: taskset would fail and the server never start).
SERVER_CPU=(env) WRK_CPU=(env)
if [ "${PIN:-1}" != 0 ] && command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ] \
  && taskset -c 0 true 2>/dev/null && taskset -c 1 true 2>/dev/null; then
  SERVER_CPU=(taskset -c 1) WRK_CPU=(taskset -c 0)
  echo "server pinned to cpu 1, wrk to cpu 0"
fi
"${SERVER_CPU[@]}" "$BIN" serve >"$OUT" &
PID=$!
trap 'kill $PID 2>/dev/null; rm -f "$OUT"' EXIT
for _ in $(seq 50); do [ -s "$OUT" ] && break; sleep 0.1; done
read -r -a PORTS <"$OUT"
KEY="key-00000000-abcdefghijklmnop"   # benches/support: keys(1)
RESULTS=$(mktemp)
for round in $(seq "$ROUNDS"); do
  # Rotate the order each round so no row always runs first.
  n=${#PORTS[@]}
  for k in $(seq 0 $((n - 1))); do
    entry=${PORTS[$(((k + round) % n))]}
    name=${entry%%=*}; port=${entry##*=}
    rps=$("${WRK_CPU[@]}" wrk -t1 -c"$CONNS" -d"$DURATION" -H "X-API-Key: $KEY" "http://127.0.0.1:$port/v1/account" \
      | awk '/Requests\/sec/ {print $2}')
    echo "round $round  $name  $rps req/s"
    echo "$name $rps" >>"$RESULTS"
  done
done
echo
echo "| row | median requests/s | vs bare |"
echo "|---|---:|---:|"
median() { grep "^$1 " "$RESULTS" | awk '{print $2}' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
BARE=$(median bare)
for name in bare noop_layer noop_2_fields noop_4_fields tower_governor tierlimit; do
  m=$(median "$name")
  awk -v n="$name" -v m="$m" -v b="$BARE" 'BEGIN {printf "| %s | %.0f | %.1f%% |\n", n, m, 100 * m / b}'
done
# At equal work: each limiter above the no-op layer writing as many fields
# as it does (tower_governor two, tierlimit four), per request.
per_req() { awk -v m="$1" 'BEGIN {printf "%.0f", 1e9 / m}'; }
TG=$(per_req "$(median tower_governor)") TL=$(per_req "$(median tierlimit)")
F2=$(per_req "$(median noop_2_fields)") F4=$(per_req "$(median noop_4_fields)")
echo
echo "above the floor writing as many fields, ns per request: tower_governor $((TG - F2)) (over 2 fields), tierlimit $((TL - F4)) (over 4 fields)"
rm -f "$RESULTS"
