#!/usr/bin/env bash
# Cutover benchmark: under a steady pgbench write load on the source,
# migrate, stream, and cut over — once through the tunnel, once with
# --direct, in the same run — and report the write downtime (as walbridge
# measures it, fence to detach, and as the writer sees it, last commit on
# the source to the cutover's end), the lag before cutover, and the
# tunnel's overhead (steady-state lag and source TPS, tunnel vs direct).
#
#   bash bench/cutover.sh                 # SCALE=10 RATE=400 CLIENTS=4 SEQUENCES=0
#
# Needs: PostgreSQL server binaries, pgbench, python3, cargo.
set -euo pipefail

SCALE=${SCALE:-10}
RATE=${RATE:-400}
CLIENTS=${CLIENTS:-4}
STEADY_SECONDS=${STEADY_SECONDS:-15}
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

# One migration under load; $1 is the label, $2... extra `start` flags.
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
  wait "$writer" 2>/dev/null || true
  "$bin/walbridge" --api "$api" cleanup >/dev/null
  stop_walbridge
}

run tunnel
run direct --direct

python3 - "$work" "$RATE" <<'EOF'
import glob, json, sys
work, rate = sys.argv[1], sys.argv[2]

def figures(label):
    samples = [json.loads(line) for line in open(f"{work}/{label}.lag") if line.strip()]
    streaming = [s for s in samples if s["subscription"] == "streaming"]
    lag_s = sum(s["lag_seconds"] for s in streaming) / max(len(streaming), 1)
    lag_b = sum(s["lag_bytes"] for s in streaming) / max(len(streaming), 1)
    first, last, t0, t1 = open(f"{work}/{label}.tps").read().split()
    tps = (int(last) - int(first)) / (float(t1) - float(t0))
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
        "lag_s": lag_s, "lag_b": lag_b, "tps": tps,
        "downtime": cutover["write_downtime_seconds"],
        "writer_downtime": end - last_commit if last_commit else float("nan"),
        "lag_before": next((s["detail"] for s in cutover["steps"] if s["name"] == "lag"), ""),
        "steps": ", ".join(f"{s['name']} {s['seconds']:.3f}s" for s in cutover["steps"]),
    }

t, d = figures("tunnel"), figures("direct")
print(f"\nsteady load: pgbench -R {rate}; figures averaged over the streaming samples")
print(f"{'':24}{'tunnel':>12}{'direct':>12}   tunnel/direct")
for key, name, fmt in [("lag_s", "lag (s)", "{:.3f}"), ("lag_b", "lag (bytes)", "{:.0f}"),
                       ("tps", "source TPS (all xacts)", "{:.0f}"),
                       ("downtime", "downtime fence->done", "{:.3f}"),
                       ("writer_downtime", "downtime as writer saw", "{:.3f}")]:
    ratio = t[key] / d[key] if d[key] else float("nan")
    print(f"{name:24}{fmt.format(t[key]):>12}{fmt.format(d[key]):>12}   {ratio:.2f}")
for label, f in (("tunnel", t), ("direct", d)):
    print(f"{label}: lag before cutover {f['lag_before']}; steps: {f['steps']}")
EOF
