# Shared by the benchmarks: a work folder, two clusters with identical
# settings (run as 'postgres' when we are root), the release binaries, and
# cleanup on exit. Source it; set KEEP=1 to keep the work folder.
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

# NO_BUILD=1 uses the release binaries already in target/release (to
# compare a build against the next one).
build_release() {
  if [ -z "${NO_BUILD:-}" ]; then
    echo "== building release binaries"
    (cd "$root" && cargo build --release --locked -q -p walbridge-agent -p walbridge-controller -p walbridge-cli)
  fi
  bin=$root/target/release
  "$bin/walbridge" certs init --dir "$work/certs" --controller-host localhost --agent bench >/dev/null
}

start_clusters() {
  echo "== clusters: source :$sp, target :$tp ($("$pg_bin/postgres" --version))"
  start_cluster source "$sp" -c wal_level=logical -c max_replication_slots=10 -c max_wal_senders=10
  start_cluster target "$tp"
  on_target postgres "SELECT 1" >/dev/null
  "$pg_bin/psql" -X -q "postgres://postgres@127.0.0.1:$sp/postgres" -c "CREATE DATABASE bench"
}

fresh_target() {
  on_target postgres "DROP DATABASE IF EXISTS \"$1\"" 2>/dev/null
  on_target postgres "CREATE DATABASE \"$1\""
  on_target postgres "CHECKPOINT"
  on_source "CHECKPOINT"
}

# Starts a controller (target database $1, its tunnel on a free port) and
# the agent, and waits until the agent is connected. Sets controller,
# agent (pids) and api.
start_walbridge() {
  local label=$1 port tunnel
  port=$(free_port)
  tunnel=$(free_port)
  local tls=(--tls-ca-cert "$work/certs/ca.pem")
  "$bin/walbridge-controller" --data-dir "$work/$label-controller" --listen-agents "127.0.0.1:$port" \
    --listen-tunnel "127.0.0.1:$tunnel" \
    "${tls[@]}" --tls-cert "$work/certs/controller.pem" --tls-key "$work/certs/controller-key.pem" \
    --target-url "$(target_url "$label")" --log-format json >"$work/$label.controller.log" 2>&1 &
  controller=$!
  pids+=("$controller")
  "$bin/walbridge-agent" --data-dir "$work/$label-agent" --source-url "$source_url" \
    --controller-endpoint "localhost:$port" \
    "${tls[@]}" --tls-cert "$work/certs/bench.pem" --tls-key "$work/certs/bench-key.pem" \
    --log-format json >"$work/$label.agent.log" 2>&1 &
  agent=$!
  pids+=("$agent")
  api="unix://$work/$label-controller/api.sock"
  local deadline=$((SECONDS + 60))
  until "$bin/walbridge" --api "$api" agents --json 2>/dev/null | grep -q '"bench"'; do
    [ $SECONDS -lt $deadline ] || { echo "!! the agent did not connect" >&2; cat "$work/$label".*.log >&2; exit 1; }
    sleep 0.2
  done
}

# pgbench -i -s $1 on the source; pgbench_history gets a replica
# identity (it has no key, and preflight rightly refuses to publish it).
load_pgbench() {
  echo "== loading the source: pgbench -i -s $1"
  "$pg_bin/pgbench" -i -q -s "$1" "$source_url" 2>&1 | tail -1
  on_source "ALTER TABLE pgbench_history REPLICA IDENTITY FULL"
}

stop_walbridge() {
  kill "$controller" "$agent"
  wait "$controller" "$agent" 2>/dev/null || true
}
