#!/usr/bin/env bash
# Cutover benchmark: under a steady pgbench write load on the source,
# migrate, stream and cut over, RUNS times through the tunnel and RUNS
# times with --direct, alternating (so both see the same machine), and
# report the write downtime — as walbridge measures it (fence to detach)
# and as the writer saw it (its last commit on the source to the cutover's
# end) — as p50 / p99 / max, the steps' medians, and the tunnel's overhead
# (steady-state lag and source TPS, tunnel vs direct).
#
#   bash bench/cutover.sh            # RUNS=10 SCALE=10 RATE=500 CLIENTS=4 STEADY_SECONDS=5 SEQUENCES=0
#
# Needs: PostgreSQL server binaries, pgbench, python3, cargo.
set -euo pipefail

RUNS=${RUNS:-10}
SCALE=${SCALE:-10}
RATE=${RATE:-500}
CLIENTS=${CLIENTS:-4}
STEADY_SECONDS=${STEADY_SECONDS:-5}
SEQUENCES=${SEQUENCES:-0}
source "$(dirname "$0")/lib.sh"

build_release
start_clusters
load_pgbench "$SCALE"
# Sequences the cutover copies while writes are fenced.
if [ "$SEQUENCES" -gt 0 ]; then
  on_source "DO \$\$ BEGIN FOR i IN 1..$SEQUENCES LOOP
    EXECUTE format('CREATE SEQUENCE bench_seq_%s', i); PERFORM nextval(format('bench_seq_%s', i));
  END LOOP; END \$\$"
fi

# One migration under load, cut over, cleaned up and the source's fence
# released for the next; $1 is the label, $2... extra `start` flags.
run() {
  local label=$1
  shift
  echo "== $label: pgbench -c $CLIENTS -R $RATE on the source, migrate, stream, cut over"
  fresh_target "$label"
  start_walbridge "$label"
  mkdir -p "$work/$label.pgbench"
  # -l logs every transaction with its end time: the last one that
  # committed on the source is the writer's last write.
  (cd "$work/$label.pgbench" && "$pg_bin/pgbench" -n -c "$CLIENTS" -j 2 -R "$RATE" -T 3600 -l \
    "$source_url" >"$work/$label.pgbench.out" 2>&1) &
  local writer=$!
  pids+=("$writer")
  "$bin/walbridge" --api "$api" start --agent bench --no-verify --json "$@" >"$work/$label.start.json" ||
    { cat "$work/$label.start.json" "$work/$label.controller.log" >&2; exit 1; }
  # Steady state: sample lag while the load runs.
  local until=$((SECONDS + STEADY_SECONDS)) first_tx last_tx
  first_tx=$(on_source "SELECT xact_commit FROM pg_stat_database WHERE datname = 'bench'")
  local started
  started=$(now)
  : >"$work/$label.lag"
  while [ $SECONDS -lt $until ]; do
    "$bin/walbridge" --api "$api" status --json |
      python3 -c 'import json, sys; print(json.dumps(json.load(sys.stdin)))' >>"$work/$label.lag"
    sleep 0.5
  done
  last_tx=$(on_source "SELECT xact_commit FROM pg_stat_database WHERE datname = 'bench'")
  echo "$first_tx $last_tx $started $(now)" >"$work/$label.tps"
  "$bin/walbridge" --api "$api" cutover --max-lag 1s --timeout 60s --json >"$work/$label.cutover.json" ||
    { cat "$work/$label.cutover.json" >&2; exit 1; }
  now >"$work/$label.cutover.end"
  # The fence stops the writer (its clients fail once it is sealed).
  wait "$writer" 2>/dev/null || true
  "$bin/walbridge" --api "$api" cleanup >/dev/null
  "$bin/walbridge" --api "$api" release-source >/dev/null
  stop_walbridge
}

for i in $(seq 1 "$RUNS"); do
  run "tunnel$i"
  run "direct$i" --direct
done

python3 - "$work" "$RATE" "$RUNS" <<'EOF'
import glob, json, math, statistics, sys
work, rate, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])

def figures(label):
    samples = [json.loads(line) for line in open(f"{work}/{label}.lag") if line.strip()]
    streaming = [s for s in samples if s["subscription"] == "streaming"]
    first, last, t0, t1 = open(f"{work}/{label}.tps").read().split()
    cutover = json.load(open(f"{work}/{label}.cutover.json"))
    end = float(open(f"{work}/{label}.cutover.end").read())
    last_commit = 0.0
    for path in glob.glob(f"{work}/{label}.pgbench/pgbench_log.*"):
        for line in open(path):
            parts = line.split()
            # client tx latency script epoch us (latency "skipped" or
            # "failed" lines are not commits)
            if len(parts) >= 6 and parts[2].isdigit():
                last_commit = max(last_commit, int(parts[4]) + int(parts[5]) / 1e6)
    return {
        "lag_s": statistics.fmean(s["lag_seconds"] for s in streaming) if streaming else math.nan,
        "tps": (int(last) - int(first)) / (float(t1) - float(t0)),
        "downtime": cutover["write_downtime_seconds"],
        "writer_downtime": end - last_commit if last_commit else math.nan,
        "steps": {s["name"]: s["seconds"] for s in cutover["steps"]},
    }

def percentile(values, p):
    # Nearest rank: with 10 runs, p99 is the worst one.
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]

route = {name: [figures(f"{name}{i}") for i in range(1, runs + 1)] for name in ("tunnel", "direct")}
print(f"\n{runs} cutovers each under pgbench -c 4 -R {rate}; write downtime in ms")
print(f"{'':28}{'p50':>8}{'p99':>8}{'max':>8}")
for name, runs_of in route.items():
    for key, what in (("writer_downtime", "as the writer saw it"), ("downtime", "fence to detach")):
        values = [r[key] * 1000 for r in runs_of]
        print(f"{name + ' ' + what:28}{percentile(values, 50):8.1f}{percentile(values, 99):8.1f}{max(values):8.1f}")
for name, runs_of in route.items():
    steps = {}
    for r in runs_of:
        for step, seconds in r["steps"].items():
            steps.setdefault(step, []).append(seconds * 1000)
    print(f"{name} steps (median ms): " + ", ".join(f"{s} {statistics.median(v):.1f}" for s, v in steps.items()))
t, d = route["tunnel"], route["direct"]
for key, what in (("lag_s", "steady lag (s)"), ("tps", "source TPS (all xacts)")):
    tv, dv = statistics.fmean(r[key] for r in t), statistics.fmean(r[key] for r in d)
    print(f"{what}: tunnel {tv:.3f}, direct {dv:.3f}, tunnel/direct {tv / dv if dv else math.nan:.2f}")
EOF
