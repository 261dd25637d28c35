#!/usr/bin/env bash
# Initial-sync benchmark: walbridge against the runbook, pg_dump/pg_restore
# and pgcopydb, all in one run on this machine so the ratios compare like
# with like (absolute seconds on a noisy 2-core box mean little).
#
#   bash bench/initial-sync.sh            # SCALE=50 WIDE_MB=200
#   SCALE=5 WIDE_MB=20 bash bench/initial-sync.sh   # a quick smoke run
#
# Needs: PostgreSQL server binaries (pg_config --bindir or WALBRIDGE_PG_BIN),
# pgbench, pgcopydb (apt-get install pgcopydb), python3, cargo.
# See bench/README.md for what each variant is and what was measured.
set -euo pipefail

SCALE=${SCALE:-50}
WIDE_MB=${WIDE_MB:-200}
source "$(dirname "$0")/lib.sh"

build_release
start_clusters

load_pgbench "$SCALE"
echo "== and ~${WIDE_MB} MB of wide rows"
# Wide rows (~2 kB): text, jsonb and bytea, like application data that is
# neither all-random nor all-repeat.
wide_rows=$((WIDE_MB * 1024 * 1024 / 2200))
on_source "CREATE TABLE wide (id bigint PRIMARY KEY, note text, doc jsonb, blob bytea);
  INSERT INTO wide
  SELECT i,
         repeat(md5(i::text) || ' ', 8),
         jsonb_build_object('id', i, 'tags', ARRAY[md5((i*3)::text), md5((i*5)::text)],
                            'meta', jsonb_build_object('k', i % 97, 'v', md5((i*7)::text))),
         decode(string_agg(md5((i*j)::text), ''), 'hex')
  FROM generate_series(1, $wide_rows) i, generate_series(1, 40) j
  GROUP BY i"
on_source "VACUUM ANALYZE"
source_size=$(on_source "SELECT pg_database_size('bench')")
echo "source database: $((source_size / 1024 / 1024)) MB"

results=()
record() { results+=("$1|$2"); echo "   $1: $2 s"; }

check_target() {
  local db=$1 want got
  for table in pgbench_accounts wide; do
    want=$(on_source "SELECT count(*) FROM $table")
    got=$(on_target "$db" "SELECT count(*) FROM $table")
    [ "$want" = "$got" ] || { echo "!! $db: $table has $got rows, the source $want" >&2; exit 1; }
  done
  got=$(on_target "$db" "SELECT count(*) FROM pg_indexes WHERE schemaname = 'public'")
  want=$(on_source "SELECT count(*) FROM pg_indexes WHERE schemaname = 'public'")
  [ "$want" = "$got" ] || { echo "!! $db: $got indexes, the source has $want" >&2; exit 1; }
  on_target postgres "DROP DATABASE \"$db\""
}

echo "== (a) runbook: pg_dump --schema-only | psql; pg_dump --data-only | psql"
fresh_target runbook
t0=$(now)
"$pg_bin/pg_dump" --schema-only --no-owner --no-privileges "$source_url" |
  "$pg_bin/psql" -X -q -v ON_ERROR_STOP=1 "$(target_url runbook)" >/dev/null
"$pg_bin/pg_dump" --data-only --no-owner --no-privileges "$source_url" |
  "$pg_bin/psql" -X -q -v ON_ERROR_STOP=1 "$(target_url runbook)" >/dev/null
record runbook "$(elapsed "$t0" "$(now)")"
check_target runbook

echo "== (b) pg_dump -Fd -j2 + pg_restore -j2"
fresh_target restore
t0=$(now)
"$pg_bin/pg_dump" -Fd -j2 --no-owner --no-privileges -f "$work/dump" "$source_url"
"$pg_bin/pg_restore" -j2 --no-owner --no-privileges -d "$(target_url restore)" "$work/dump"
record pg_restore "$(elapsed "$t0" "$(now)")"
rm -rf "$work/dump"
check_target restore

echo "== (c) pgcopydb clone --table-jobs 2 --index-jobs 2"
fresh_target pgcopydb
t0=$(now)
PGCOPYDB_LOG_LEVEL=warn pgcopydb clone --source "$source_url" --target "$(target_url pgcopydb)" \
  --table-jobs 2 --index-jobs 2 --no-owner --no-acl --dir "$work/pgcopydb" >"$work/pgcopydb.log" 2>&1 ||
  { tail -20 "$work/pgcopydb.log"; exit 1; }
record pgcopydb "$(elapsed "$t0" "$(now)")"
check_target pgcopydb

# Runs one walbridge migration into a fresh database; $2... are extra
# `start` flags. Leaves status JSON, the controller's log and both
# daemons' peak memory in $work/<label>.*
run_walbridge() {
  local label=$1
  shift
  fresh_target "$label"
  start_walbridge "$label"
  t0=$(now)
  "$bin/walbridge" --api "$api" start --agent bench --json --copy-only "$@" >"$work/$label.status.json" ||
    { cat "$work/$label.status.json" "$work/$label.controller.log" >&2; exit 1; }
  record "$label" "$(elapsed "$t0" "$(now)")"
  grep VmHWM "/proc/$controller/status" | awk '{print $2}' >"$work/$label.controller.hwm"
  grep VmHWM "/proc/$agent/status" | awk '{print $2}' >"$work/$label.agent.hwm"
  stop_walbridge
  check_target "$label"
}

echo "== (d) walbridge start --no-verify"
run_walbridge walbridge --no-verify
echo "== (e) walbridge start (verifying every table under the snapshot)"
run_walbridge walbridge_verify

echo
python3 - "$work" "$source_size" "${results[@]}" <<'EOF'
import json, sys
work, source_size, runs = sys.argv[1], int(sys.argv[2]), dict(r.split("|") for r in sys.argv[3:])
runs = {k: float(v) for k, v in runs.items()}
status = json.load(open(f"{work}/walbridge.status.json"))
raw = sum(t["bytes"] for t in status["tables"])
wire = sum(t["wire_bytes"] for t in status["tables"])
mb = raw / 1e6
print(f"source database {source_size / 1e6:.0f} MB; table data as COPY text {mb:.0f} MB "
      f"(MB/s below is that figure over each variant's wall time)")
print(f"{'variant':<18}{'seconds':>9}{'MB/s':>8}   walbridge (d) is")
for name, seconds in runs.items():
    ratio = seconds / runs["walbridge"]
    print(f"{name:<18}{seconds:>9.1f}{mb / seconds:>8.1f}   {ratio:.2f}x faster than this")
print(f"\nlink: {raw / 1e6:.0f} MB of COPY data sent as {wire / 1e6:.0f} MB (zstd, {raw / max(wire, 1):.2f}:1)")
for label in ("walbridge", "walbridge_verify"):
    phases = []
    for line in open(f"{work}/{label}.controller.log"):
        try:
            event = json.loads(line)
        except ValueError:
            continue
        fields = event.get("fields", {})
        if fields.get("message") == "step done":
            phases.append(f"{fields['phase']} {fields['seconds']:.1f}s")
    hwm = {who: int(open(f"{work}/{label}.{who}.hwm").read()) // 1024 for who in ("agent", "controller")}
    print(f"{label}: phases: {', '.join(phases)}; peak RSS agent {hwm['agent']} MB, controller {hwm['controller']} MB")
EOF
