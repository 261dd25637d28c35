#!/usr/bin/env bash
# Initial-sync benchmark: walbridge against pg_dump/pg_restore and
# pgcopydb (and with RUNBOOK=1 the runbook's pg_dump | psql), on two
# datasets, all in one run on this machine so the ratios compare like with
# like (absolute seconds on a noisy 2-core box mean little).
#
#   bash bench/initial-sync.sh                        # SCALE=50 WIDE_MB=200, both datasets
#   DATASETS=random bash bench/initial-sync.sh        # one of them
#   SCALE=5 WIDE_MB=20 RANDOM_ROWS=14000 PLAIN_ROWS=60000 bash bench/initial-sync.sh   # smoke run
#
# The datasets, each on top of `pgbench -i -s $SCALE`:
#   compressible  ~$WIDE_MB MB of ~2 kB rows of repeated md5 text, jsonb and
#                 bytea (with pgbench's blank-padded filler, ~9:1 over zstd);
#   random        $RANDOM_ROWS rows of random-content text, jsonb and bytea
#                 (1 row in 20 TOASTed) and $PLAIN_ROWS rows of random text
#                 in a table without a primary key: data that compresses little.
#
# Needs: PostgreSQL server binaries (pg_config --bindir or WALBRIDGE_PG_BIN),
# pgbench, pgcopydb (apt-get install pgcopydb), python3, cargo.
# See bench/README.md for what each variant is and what was measured.
set -euo pipefail

SCALE=${SCALE:-50}
WIDE_MB=${WIDE_MB:-200}
RANDOM_ROWS=${RANDOM_ROWS:-140000}
PLAIN_ROWS=${PLAIN_ROWS:-600000}
DATASETS=${DATASETS:-compressible random}
source "$(dirname "$0")/lib.sh"

build_release
start_clusters

load_compressible() {
  echo "== and ~${WIDE_MB} MB of wide rows of repeated text"
  local wide_rows=$((WIDE_MB * 1024 * 1024 / 2200))
  on_source "CREATE TABLE wide (id bigint PRIMARY KEY, note text, doc jsonb, blob bytea);
    INSERT INTO wide
    SELECT i,
           repeat(md5(i::text) || ' ', 8),
           jsonb_build_object('id', i, 'tags', ARRAY[md5((i*3)::text), md5((i*5)::text)],
                              'meta', jsonb_build_object('k', i % 97, 'v', md5((i*7)::text))),
           decode(string_agg(md5((i*j)::text), ''), 'hex')
    FROM generate_series(1, $wide_rows) i, generate_series(1, 40) j
    GROUP BY i"
}

load_random() {
  echo "== and $RANDOM_ROWS rows of random text, jsonb and bytea, $PLAIN_ROWS rows without a key"
  # Random bytes shown as base64 (text) and hex (bytea, as COPY writes
  # it): as little for zstd to find as real application data that is
  # already compressed or encrypted. One row in 20 is 8 kB of blob, out
  # of line in TOAST.
  on_source "CREATE FUNCTION random_bytes(n int) RETURNS bytea LANGUAGE sql AS
      \$\$ SELECT decode(string_agg(md5(random()::text), ''), 'hex') FROM generate_series(1, (n + 15) / 16) \$\$;
    CREATE TABLE wide (id bigint PRIMARY KEY, note text, doc jsonb, blob bytea);
    INSERT INTO wide
    SELECT i,
           encode(random_bytes(600), 'base64'),
           jsonb_build_object('id', i, 'score', random(), 'code', encode(random_bytes(24), 'base64'),
                              'tags', jsonb_build_array(encode(random_bytes(12), 'hex'), random()::text)),
           random_bytes(CASE WHEN i % 20 = 0 THEN 8192 ELSE 512 END)
    FROM generate_series(1, $RANDOM_ROWS) i;
    CREATE TABLE readings (sensor int, at timestamptz, value float8, note text);
    ALTER TABLE readings REPLICA IDENTITY FULL;
    INSERT INTO readings
    SELECT (random() * 1000)::int, now() - random() * interval '365 days', random() * 100,
           encode(random_bytes(48), 'base64')
    FROM generate_series(1, $PLAIN_ROWS)"
}

results=()
record() { results+=("$1|$2"); echo "   $1: $2 s"; }

check_target() {
  local db=$1 want got table
  for table in $(on_source "SELECT string_agg(relname, ' ') FROM pg_stat_user_tables WHERE schemaname = 'public'"); do
    want=$(on_source "SELECT count(*) FROM $table")
    got=$(on_target "$db" "SELECT count(*) FROM $table")
    [ "$want" = "$got" ] || { echo "!! $db: $table has $got rows, the source $want" >&2; exit 1; }
  done
  got=$(on_target "$db" "SELECT count(*) FROM pg_indexes WHERE schemaname = 'public'")
  want=$(on_source "SELECT count(*) FROM pg_indexes WHERE schemaname = 'public'")
  [ "$want" = "$got" ] || { echo "!! $db: $got indexes, the source has $want" >&2; exit 1; }
  on_target postgres "DROP DATABASE \"$db\""
}

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

# Every variant on the source as it is now; labels are prefixed "$1_".
run_variants() {
  local set=$1
  if [ -n "${RUNBOOK:-}" ]; then
    echo "== $set (a) runbook: pg_dump --schema-only | psql; pg_dump --data-only | psql"
    fresh_target "${set}_runbook"
    t0=$(now)
    "$pg_bin/pg_dump" --schema-only --no-owner --no-privileges "$source_url" |
      "$pg_bin/psql" -X -q -v ON_ERROR_STOP=1 "$(target_url "${set}_runbook")" >/dev/null
    "$pg_bin/pg_dump" --data-only --no-owner --no-privileges "$source_url" |
      "$pg_bin/psql" -X -q -v ON_ERROR_STOP=1 "$(target_url "${set}_runbook")" >/dev/null
    record "${set}_runbook" "$(elapsed "$t0" "$(now)")"
    check_target "${set}_runbook"
  fi

  echo "== $set (b) pg_dump -Fd -j2 + pg_restore -j2"
  fresh_target "${set}_pg_restore"
  t0=$(now)
  "$pg_bin/pg_dump" -Fd -j2 --no-owner --no-privileges -f "$work/dump" "$source_url"
  "$pg_bin/pg_restore" -j2 --no-owner --no-privileges -d "$(target_url "${set}_pg_restore")" "$work/dump"
  record "${set}_pg_restore" "$(elapsed "$t0" "$(now)")"
  rm -rf "$work/dump"
  check_target "${set}_pg_restore"

  echo "== $set (c) pgcopydb clone --table-jobs 2 --index-jobs 2"
  fresh_target "${set}_pgcopydb"
  rm -rf "$work/pgcopydb"
  t0=$(now)
  PGCOPYDB_LOG_LEVEL=warn pgcopydb clone --source "$source_url" --target "$(target_url "${set}_pgcopydb")" \
    --table-jobs 2 --index-jobs 2 --no-owner --no-acl --dir "$work/pgcopydb" >"$work/${set}_pgcopydb.log" 2>&1 ||
    { tail -20 "$work/${set}_pgcopydb.log"; exit 1; }
  record "${set}_pgcopydb" "$(elapsed "$t0" "$(now)")"
  check_target "${set}_pgcopydb"

  echo "== $set (d) walbridge start --no-verify"
  run_walbridge "${set}_walbridge" --no-verify
  echo "== $set (e) walbridge start (every table verified)"
  run_walbridge "${set}_walbridge_verify"
}

sizes=()
for set in $DATASETS; do
  "$pg_bin/psql" -X -q "postgres://postgres@127.0.0.1:$sp/postgres" -c "DROP DATABASE IF EXISTS bench" \
    -c "CREATE DATABASE bench"
  load_pgbench "$SCALE"
  "load_$set"
  on_source "VACUUM ANALYZE"
  size=$(on_source "SELECT pg_database_size('bench')")
  sizes+=("$set|$size")
  echo "== $set: source database $((size / 1024 / 1024)) MB"
  run_variants "$set"
done

echo
python3 - "$work" "${sizes[*]}" "${results[@]}" <<'EOF'
import json, sys
work, sizes, runs = sys.argv[1], dict(s.split("|") for s in sys.argv[2].split()), sys.argv[3:]
runs = {k: float(v) for k, v in (r.split("|") for r in runs)}
for dataset, size in sizes.items():
    mine = {k[len(dataset) + 1:]: v for k, v in runs.items() if k.startswith(dataset + "_")}
    status = json.load(open(f"{work}/{dataset}_walbridge.status.json"))
    raw = sum(t["bytes"] for t in status["tables"])
    wire = sum(t["wire_bytes"] for t in status["tables"])
    print(f"== {dataset}: source database {int(size) / 1e6:.0f} MB; table data as COPY text {raw / 1e6:.0f} MB")
    print(f"{'variant':<18}{'seconds':>9}{'MB/s':>8}   walbridge --no-verify is")
    for name, seconds in mine.items():
        print(f"{name:<18}{seconds:>9.1f}{raw / 1e6 / seconds:>8.1f}   "
              f"{seconds / mine['walbridge']:.2f}x faster than this")
    print(f"verification costs {mine['walbridge_verify'] / mine['walbridge'] - 1:+.0%} of the copy without it")
    print(f"link: {raw / 1e6:.0f} MB of COPY data sent as {wire / 1e6:.0f} MB ({raw / max(wire, 1):.2f}:1)")
    for label in ("walbridge", "walbridge_verify"):
        phases = []
        for line in open(f"{work}/{dataset}_{label}.controller.log"):
            try:
                event = json.loads(line)
            except ValueError:
                continue
            fields = event.get("fields", {})
            if fields.get("message") == "step done":
                phases.append(f"{fields['phase']} {fields['seconds']:.1f}s")
        hwm = {who: int(open(f"{work}/{dataset}_{label}.{who}.hwm").read()) // 1024
               for who in ("agent", "controller")}
        print(f"{label}: phases: {', '.join(phases)}; "
              f"peak RSS agent {hwm['agent']} MB, controller {hwm['controller']} MB")
    print()
EOF
