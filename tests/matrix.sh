#!/usr/bin/env bash
# Runs the version matrix one pair at a time (each its own test process, so
# one failure does not hide the rest) and prints a table: pair, pass/fail,
# the copy's seconds (start to streaming), the replication lag when the
# cutover began (KiB), the cutover's seconds and its write downtime. Servers come from the harness's cache (PgInstall::fetch).
#
#   tests/matrix.sh                 every source 10-18 into every target 15-18 not older
#   tests/matrix.sh 10-17 12-18     just these pairs
#
# Logs of each pair: $MATRIX_LOGS (default target/matrix/).
set -uo pipefail
cd "$(dirname "$0")/.."

pairs=("$@")
if [ ${#pairs[@]} -eq 0 ]; then
  for source in 10 11 12 13 14 15 16 17 18; do
    for target in 15 16 17 18; do
      [ "$target" -ge "$source" ] && pairs+=("$source-$target")
    done
  done
fi
logs=${MATRIX_LOGS:-target/matrix}
mkdir -p "$logs"

# Build once, outside the timings.
cargo test -p walbridge-tests --test e2e --no-run >/dev/null 2>&1 \
  || { echo "the e2e tests do not build: cargo test -p walbridge-tests --test e2e --no-run" >&2; exit 2; }

results=()
failed=0
for pair in "${pairs[@]}"; do
  log="$logs/$pair.log"
  started=$(date +%s)
  WALBRIDGE_MATRIX=$pair cargo test -q -p walbridge-tests --test e2e versions::matrix -- --exact --include-ignored --nocapture >"$log" 2>&1
  code=$?
  took=$(( $(date +%s) - started ))
  line=$(grep -m1 "^MATRIX " "$log" 2>/dev/null || true)
  if [ $code -eq 0 ] && [ -n "$line" ]; then
    copy=$(sed -n 's/.*copy=\([0-9.]*\)s.*/\1/p' <<<"$line")
    cutover=$(sed -n 's/.*cutover=\([0-9.]*\)s.*/\1/p' <<<"$line")
    downtime=$(sed -n 's/.*downtime=\([0-9.]*\)s.*/\1/p' <<<"$line")
    lag=$(sed -n 's/.*lag=\([0-9]*\)KiB.*/\1/p' <<<"$line")
    results+=("$(printf '%-7s %-5s %8s %8s %9s %10s %7s' "$pair" pass "$copy" "$lag" "$cutover" "$downtime" "$took")")
  else
    failed=$((failed + 1))
    results+=("$(printf '%-7s %-5s %8s %8s %9s %10s %7s  see %s' "$pair" FAIL - - - - "$took" "$log")")
  fi
  echo "${results[-1]}" >&2
done

printf '%-7s %-5s %8s %8s %9s %10s %7s\n' pair result copy_s lag_kib cutover_s downtime_s total_s
printf '%s\n' "${results[@]}"
echo "$(( ${#pairs[@]} - failed )) of ${#pairs[@]} pairs passed"
[ $failed -eq 0 ]
