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
root=$(cd "$(dirname "$0")/.." && pwd)
pg_bin=${WALBRIDGE_PG_BIN:-$(pg_config --bindir)}
work=$(mktemp -d /tmp/walbridge-bench-XXXXXX)
chmod 755 "$work"
[ "$(id -u)" != 0 ] || chown postgres "$work"
pids=()

cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for cluster in source target; do
    [ -d "$work/$cluster" ] && as_postgres "$pg_bin/pg_ctl" -D "$work/$cluster" -m immediate stop >/dev/null 2>&1 || true
  done
  if [ -z "${KEEP:-}" ]; then rm -rf "$work"; else echo "kept $work"; fi
}
trap cleanup EXIT

# PostgreSQL refuses to run as root; the clusters belong to 'postgres'.
as_postgres() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

free_port() {
  local port
  while :; do
    port=$((20000 + RANDOM % 20000))
    (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null || { echo "$port"; return; }
  done
}

now() { date +%s.%N; }
elapsed() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$2"; }

# Both clusters get the same, modestly tuned settings so no variant is
# favoured; only the source needs logical decoding.
start_cluster() {
  local name=$1 port=$2
  shift 2
  as_postgres "$pg_bin/initdb" -D "$work/$name" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >/dev/null
  as_postgres "$pg_bin/pg_ctl" -D "$work/$name" -l "$work/$name.log" -w -o "-p $port -k $work \
    -c listen_addresses=127.0.0.1 -c shared_buffers=512MB -c maintenance_work_mem=256MB \
    -c max_wal_size=8GB -c checkpoint_timeout=30min $*" start >/dev/null
}

sp=$(free_port)
tp=$(free_port)
source_url="postgres://postgres@127.0.0.1:$sp/bench"
target_url() { echo "postgres://postgres@127.0.0.1:$tp/$1"; }
on_source() { "$pg_bin/psql" -X -q -At -v ON_ERROR_STOP=1 "$source_url" -c "$1"; }
on_target() { "$pg_bin/psql" -X -q -At -v ON_ERROR_STOP=1 "$(target_url "$1")" -c "$2"; }

echo "== building release binaries"
(cd "$root" && cargo build --release --locked -q -p walbridge-agent -p walbridge-controller -p walbridge-cli)
bin=$root/target/release

echo "== clusters: source :$sp, target :$tp ($("$pg_bin/postgres" --version))"
start_cluster source "$sp" -c wal_level=logical -c max_replication_slots=10 -c max_wal_senders=10
start_cluster target "$tp"
on_target postgres "SELECT 1" >/dev/null
"$pg_bin/psql" -X -q "postgres://postgres@127.0.0.1:$sp/postgres" -c "CREATE DATABASE bench"

echo "== loading the source: pgbench -i -s $SCALE, and ~${WIDE_MB} MB of wide rows"
"$pg_bin/pgbench" -i -q -s "$SCALE" "$source_url" 2>&1 | tail -1
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
# pgbench_history has no key; preflight (rightly) refuses to publish it
# without a replica identity. The other variants do not care.
on_source "ALTER TABLE pgbench_history REPLICA IDENTITY FULL"
source_size=$(on_source "SELECT pg_database_size('bench')")
echo "source database: $((source_size / 1024 / 1024)) MB"

results=()
record() { results+=("$1|$2"); echo "   $1: $2 s"; }

fresh_target() {
  on_target postgres "DROP DATABASE IF EXISTS \"$1\"" 2>/dev/null
  on_target postgres "CREATE DATABASE \"$1\""
  on_target postgres "CHECKPOINT"
  on_source "CHECKPOINT"
}

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

echo "== walbridge certificates"
"$bin/walbridge" certs init --dir "$work/certs" --controller-host localhost --agent bench >/dev/null

# Runs one walbridge migration into a fresh database; $2... are extra
# `start` flags. Leaves status JSON, the controller's log and both
# daemons' peak memory in $work/<label>.*
run_walbridge() {
  local label=$1
  shift
  local port
  port=$(free_port)
  fresh_target "$label"
  local tls=(--tls-ca-cert "$work/certs/ca.pem")
  "$bin/walbridge-controller" --data-dir "$work/$label-controller" --listen-agents "127.0.0.1:$port" \
    "${tls[@]}" --tls-cert "$work/certs/controller.pem" --tls-key "$work/certs/controller-key.pem" \
    --target-url "$(target_url "$label")" --log-format json >"$work/$label.controller.log" 2>&1 &
  local controller=$!
  pids+=("$controller")
  "$bin/walbridge-agent" --data-dir "$work/$label-agent" --source-url "$source_url" \
    --controller-endpoint "localhost:$port" \
    "${tls[@]}" --tls-cert "$work/certs/bench.pem" --tls-key "$work/certs/bench-key.pem" \
    --log-format json >"$work/$label.agent.log" 2>&1 &
  local agent=$!
  pids+=("$agent")
  local api="unix://$work/$label-controller/api.sock"
  local deadline=$((SECONDS + 60))
  until "$bin/walbridge" --api "$api" agents --json 2>/dev/null | grep -q '"bench"'; do
    [ $SECONDS -lt $deadline ] || { echo "!! the agent did not connect" >&2; cat "$work/$label".*.log >&2; exit 1; }
    sleep 0.2
  done
  t0=$(now)
  "$bin/walbridge" --api "$api" start --agent bench --json "$@" >"$work/$label.status.json" ||
    { cat "$work/$label.status.json" "$work/$label.controller.log" >&2; exit 1; }
  record "$label" "$(elapsed "$t0" "$(now)")"
  grep VmHWM "/proc/$controller/status" | awk '{print $2}' >"$work/$label.controller.hwm"
  grep VmHWM "/proc/$agent/status" | awk '{print $2}' >"$work/$label.agent.hwm"
  kill "$controller" "$agent"
  wait "$controller" "$agent" 2>/dev/null || true
  # The copy leaves the slot and publication for streaming (a later
  # phase); a benchmark has no use for them.
  on_source "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name LIKE 'walbridge%'" >/dev/null
  for publication in $(on_source "SELECT pubname FROM pg_publication WHERE pubname LIKE 'walbridge%'"); do
    on_source "DROP PUBLICATION \"$publication\""
  done
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
