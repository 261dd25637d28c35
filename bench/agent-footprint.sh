#!/usr/bin/env bash
# The agent's footprint: resident memory and CPU while idle, while copying
# a large table, and while tunnelling the subscription under a write load.
#
#   bash bench/agent-footprint.sh         # SCALE=30 RATE=400 WINDOW=15
set -euo pipefail

SCALE=${SCALE:-30}
RATE=${RATE:-400}
WINDOW=${WINDOW:-15}
source "$(dirname "$0")/lib.sh"

build_release
start_clusters
load_pgbench "$SCALE"
fresh_target footprint
start_walbridge footprint

ticks=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
hwm_kb() { awk '/VmHWM/ {print $2}' "/proc/$1/status"; }
# Prints "label cpu% rss_MB" for the agent over a window that ran "$@".
measure() {
  local label=$1
  shift
  local c0 t0 c1 t1
  c0=$(cpu_ticks "$agent")
  t0=$(now)
  "$@"
  c1=$(cpu_ticks "$agent")
  t1=$(now)
  python3 -c "import sys; c0, c1, t0, t1, hz, rss = map(float, sys.argv[1:7]); \
print(f'{sys.argv[7]:<34} cpu {100 * (c1 - c0) / hz / (t1 - t0):5.1f}%   rss {rss / 1024:6.1f} MB   ({t1 - t0:.1f} s)')" \
    "$c0" "$c1" "$t0" "$t1" "$ticks" "$(rss_kb "$agent")" "$label"
}

echo
measure "idle, linked" sleep "$WINDOW"
copy() { "$bin/walbridge" --api "$api" start --agent bench --no-verify --json >"$work/start.json"; }
measure "copying (start, pgbench -s $SCALE)" copy
(cd "$work" && "$pg_bin/pgbench" -n -c 4 -j 2 -R "$RATE" -T "$WINDOW" "$source_url" >"$work/load.out" 2>&1) &
load=$!
measure "tunnelling, pgbench -R $RATE" sleep "$WINDOW"
wait "$load" || true
measure "idle again" sleep "$WINDOW"
echo "agent peak RSS over the run: $(( $(hwm_kb "$agent") / 1024 )) MB; binary $(( $(stat -c %s "$bin/walbridge-agent") / 1024 / 1024 )) MB"
"$bin/walbridge" --api "$api" abort >/dev/null
stop_walbridge
