#!/usr/bin/env bash
# End to end on loopback: wrk against the bare router, the same router under
# a no-op layer (what any layer costs) and under no-op layers writing two
# and four X-RateLimit-* fields (what the fields cost any layer, written and
# sent: tower_governor writes two, tierlimit four), tower_governor and tierlimit
# with their headers and without (benches/wrk_server.rs), rounds interleaved,
# then each row's median requests/s and its ratio to the bare router's, and
# the two limiters paired round by round (tierlimit's requests/s over
# tower_governor's in the same round: the round's drift, which moves every
# row of a round alike, divides out).
#
#   bash benches/wrk.sh                 # 3 rounds of 10 s, 1 thread, 32 connections
#                                       # (too few for the paired interval: 6 or more)
#   ROUNDS=5 DURATION=5s bash benches/wrk.sh
#   ROWS="bare tower_governor_no_headers tierlimit_no_headers" ROUNDS=21 DURATION=3s bash benches/wrk.sh
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
RESULTS=$(mktemp)
trap 'kill $PID 2>/dev/null; rm -f "$OUT" "$RESULTS"' EXIT
for _ in $(seq 50); do [ -s "$OUT" ] && break; sleep 0.1; done
read -r -a ALL <"$OUT"
# ROWS: the rows to run, separated by spaces (default all; bare is always
# run, as the base). A name the server does not print is an error.
NAMES=" ${ALL[*]%%=*} "
WANT=" "
for w in ${ROWS:-}; do
  if [[ "$NAMES" != *" $w "* ]]; then
    echo "ROWS: no row named '$w' (the rows:$NAMES)" >&2
    exit 1
  fi
  WANT+="$w "
done
PORTS=()
for entry in "${ALL[@]}"; do
  name=${entry%%=*}
  if [ "$WANT" = " " ] || [ "$name" = bare ] || [[ "$WANT" == *" $name "* ]]; then
    PORTS+=("$entry")
  fi
done
KEY="key-00000000-abcdefghijklmnop"   # benches/support: keys(1)
for round in $(seq "$ROUNDS"); do
  # Each round starts one row further on than two rounds before, and
  # every other round runs backwards, the mirror of the round after it:
  # so each row follows each of its neighbours alike (what the row before
  # leaves behind, wrk's 32 closing connections say, falls on both), and
  # a steady drift across a mirrored pair of rounds cancels. (Where two
  # such pairs meet, one row runs twice in a row.)
  n=${#PORTS[@]}
  for k in $(seq 0 $((n - 1))); do
    if [ $((round % 2)) = 0 ]; then k=$((n - 1 - k)); fi
    entry=${PORTS[$(((k + round / 2) % n))]}
    name=${entry%%=*}; port=${entry##*=}
    rps=$("${WRK_CPU[@]}" wrk -t1 -c"$CONNS" -d"$DURATION" -H "X-API-Key: $KEY" "http://127.0.0.1:$port/v1/account" \
      | awk '/Requests\/sec/ {print $2}')
    if ! awk -v r="${rps:-0}" 'BEGIN {exit !(r + 0 > 0)}'; then
      echo "wrk: no requests/s from $name in round $round" >&2
      exit 1
    fi
    echo "round $round  $name  $rps req/s"
    echo "$name $rps $round" >>"$RESULTS"
  done
done
echo
echo "| row | median requests/s | vs bare |"
echo "|---|---:|---:|"
# The median of q[1..n], sorted: one definition for the rows and the pairs.
MEDIAN='function median(q, n) { return n % 2 ? q[(n + 1) / 2] : (q[n / 2] + q[n / 2 + 1]) / 2 }'
median() { grep "^$1 " "$RESULTS" | awk '{print $2}' | sort -n | awk "$MEDIAN"' {a[NR]=$1} END {print median(a, NR)}'; }
ran() { grep -q "^$1 " "$RESULTS"; }
BARE=$(median bare)
for entry in "${PORTS[@]}"; do
  name=${entry%%=*}
  m=$(median "$name")
  awk -v n="$name" -v m="$m" -v b="$BARE" 'BEGIN {printf "| %s | %.0f | %.1f%% |\n", n, m, 100 * m / b}'
done
# Paired: in each round, row A's requests/s over row B's (the same as the
# ratio of their shares of that round's bare router); with floors FA and
# FB, each row's share of its floor in that round instead: A over the no-op
# layer writing as many fields as A, against B over B's.
paired() {
  local fa=${3:-} fb=${4:-} label="$1 / $2" row
  if [ -n "$fa" ]; then
    label="($1 / $fa) / ($2 / $fb)"
  fi
  for row in "$1" "$2" $fa $fb; do
    if ! ran "$row"; then
      echo "| $label | not run ($row) | | | |"
      return 0
    fi
  done
  awk -v a="$1" -v b="$2" -v fa="$fa" -v fb="$fb" -v label="$label" "$MEDIAN"'
    $1 == a {x[$3] = $2} $1 == b {y[$3] = $2}
    fa != "" && $1 == fa {u[$3] = $2} fb != "" && $1 == fb {w[$3] = $2}
    END {
      n = 0; up = 0
      for (r in x) {
        if (!(r in y) || (fa != "" && !((r in u) && (r in w)))) continue
        n++; q[n] = fa != "" ? (x[r] / u[r]) / (y[r] / w[r]) : x[r] / y[r]
        if (q[n] >= 1) up++
      }
      if (n == 0) exit
      for (i = 2; i <= n; i++) { v = q[i]; j = i - 1; while (j > 0 && q[j] > v) { q[j + 1] = q[j]; j-- } q[j + 1] = v }
      # A 95% interval for the median ratio from the order statistics (the
      # sign test: it assumes nothing of the ratios'"'"' distribution), once
      # there are rounds enough (six or more; up to eight it is the whole
      # range).
      lo = int(n / 2 - 0.98 * sqrt(n) + 0.5); hi = int(n / 2 + 1 + 0.98 * sqrt(n) + 0.5)
      ci = (lo >= 1 && hi <= n) ? sprintf("%.3f – %.3f", q[lo], q[hi]) : "(too few rounds)"
      printf "| %s | %.3f | %s | %.3f – %.3f | %d of %d |\n", label, median(q, n), ci, q[1], q[n], up, n
    }' "$RESULTS"
}
echo
echo "| paired, same round | median ratio | 95% interval of the median | range | rounds at or above 1 |"
echo "|---|---:|---|---|---:|"
paired tower_governor_no_headers_again tower_governor_no_headers
paired tierlimit_no_headers tower_governor_no_headers
paired tierlimit_no_headers tower_governor_no_headers_again
paired tierlimit tower_governor
paired noop_4_fields noop_2_fields
paired tierlimit tower_governor noop_4_fields noop_2_fields
# At equal work: each limiter above the no-op layer writing as many fields
# as it does (tower_governor two, tierlimit four), per request.
if ran tower_governor && ran tierlimit && ran noop_2_fields && ran noop_4_fields; then
  per_req() { awk -v m="$1" 'BEGIN {printf "%.0f", 1e9 / m}'; }
  TG=$(per_req "$(median tower_governor)") TL=$(per_req "$(median tierlimit)")
  F2=$(per_req "$(median noop_2_fields)") F4=$(per_req "$(median noop_4_fields)")
  echo
  echo "above the floor writing as many fields, ns per request: tower_governor $((TG - F2)) (over 2 fields), tierlimit $((TL - F4)) (over 4 fields)"
fi
