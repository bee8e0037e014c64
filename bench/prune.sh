#!/usr/bin/env bash
# Benchmark (not a test): `haul-pbs forget --keep-last 3` + `haul-pbs prune` against
# `restic forget --keep-last 3 --prune`, on the same data and the same ten snapshots,
# in one run.
#
# usage: bench/prune.sh [--mib N] [--snapshots N] [--work DIR]
#        (defaults: 1024, 10, /tmp/haul-bench-prune)
# env:   HAUL_BIN=dir     directory holding haul-pbs and haul-agent (default: the
#                         workspace's target/release, built if missing)
#
# The dataset is made by gen_dataset.py; between snapshots it is changed with
# gen_dataset.py --mutate. Each tool backs up each version (not measured), then keeps
# the last three and reclaims the space (measured; page caches dropped first). haul runs
# twice: on a repository with a passphrase (`init`, Argon2id 32 MiB per opening, as
# restic's scrypt), and on the repository the pbs manages itself (created by the first
# pull, its key a generated 256-bit secret, derived lightly). Printed: wall, CPU, peak
# RSS, bytes freed and repository size after, and the ratios.
set -euo pipefail

mib=1024 snapshots=10 work=/tmp/haul-bench-prune
. "$(dirname "$(readlink -f "$0")")/lib.sh"
while (($#)); do
  case $1 in
    --mib) mib=${2:?--mib needs a value}; shift 2 ;;
    --snapshots) snapshots=${2:?--snapshots needs a value}; shift 2 ;;
    --work) work=${2:?--work needs a value}; shift 2 ;;
    -h|--help) bench_help ;;
    *) bench_unknown "$1" ;;
  esac
done
bench_count --mib "$mib"
bench_count --snapshots "$snapshots" 4

gen="$root/bench/gen_dataset.py"
bench_needs

bench_haul_binaries

mkdir -p "$work"
work=$(cd "$work" && pwd -P)
data="$work/data" logs="$work/logs"
rm -rf "$data" "$logs" "$work"/{restic,haul}-{repo,cache} "$work"/state{,-managed}
mkdir -p "$logs"
exec > >(tee "$work/results.txt")
bench_passwords "$work"

restic_=(restic -r "$work/restic-repo" --cache-dir "$work/restic-cache")
haul_=("$haul" --repo "$work/haul-repo" --password-file "$work/password" --cache-dir "$work/haul-cache")
managed=(env -u HAUL_REPO "$haul" --state-dir "$work/state-managed" --config /dev/null --cache-dir "$work/haul-cache")
"${restic_[@]}" -q init --repository-version 2 >"$logs/restic.init.log" 2>&1
"${haul_[@]}" init >"$logs/haul.init.log" 2>&1

echo "generating ${mib} MiB dataset and $snapshots snapshots of it ..." >&2
python3 "$gen" "$data" --mib "$mib" >"$logs/gen.log" 2>&1
for ((i = 1; i <= snapshots; i++)); do
  ((i == 1)) || python3 "$gen" "$data" --mutate >>"$logs/gen.log" 2>&1
  "${restic_[@]}" backup -q "$data" >>"$logs/restic.backups.log" 2>&1
  "${haul_[@]}" --json pull --local "$data" --state-dir "$work/state" >>"$logs/haul.backups.log" 2>&1
  "${managed[@]}" --json pull --local "$data" >>"$logs/managed.backups.log" 2>&1
done

size() { du -sb "$1" | cut -f1; }
declare -A wall cpu rss
measure() { # name cmd...
  local name=$1 t="$logs/$1.time"; shift
  sync; { echo 3 >/proc/sys/vm/drop_caches; } 2>/dev/null || true
  if ! /usr/bin/time -f '%e %U %S %M' -o "$t" "$@" >"$logs/$name.log" 2>&1; then
    echo "$name FAILED:"; tail -5 "$logs/$name.log" | sed 's/^/  | /'; exit 1
  fi
  local w u s m
  read -r w u s m <"$t"
  wall[$name]=$w cpu[$name]=$(awk -v u="$u" -v s="$s" 'BEGIN { print u + s }') rss[$name]=$((m / 1024))
}

r0=$(size "$work/restic-repo") h0=$(size "$work/haul-repo") m0=$(size "$work/state-managed/repo")
measure restic "${restic_[@]}" forget --keep-last 3 --prune
r1=$(size "$work/restic-repo")
measure haul-forget "${haul_[@]}" forget --keep-last 3
measure haul-prune "${haul_[@]}" --json prune
h1=$(size "$work/haul-repo")
measure managed-forget "${managed[@]}" forget --keep-last 3
measure managed-prune "${managed[@]}" --json prune
m1=$(size "$work/state-managed/repo")
"${restic_[@]}" check >"$logs/restic.check.log" 2>&1 || { echo "restic check FAILED (see $logs/restic.check.log)"; exit 1; }
"${haul_[@]}" check >"$logs/haul.check.log" 2>&1 || { echo "haul check FAILED (see $logs/haul.check.log)"; exit 1; }
"${managed[@]}" check >"$logs/managed.check.log" 2>&1 || { echo "haul check FAILED (see $logs/managed.check.log)"; exit 1; }

mibs() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
printf '%-34s %8s %8s %8s %11s %10s %10s\n' tool wall_s cpu_s rss_mib before_mib freed_mib after_mib
printf '%-34s %8s %8s %8d %11s %10s %10s\n' "restic forget --prune" "${wall[restic]}" "${cpu[restic]}" "${rss[restic]}" \
  "$(mibs "$r0")" "$(mibs $((r0 - r1)))" "$(mibs "$r1")"
declare -A tw tm
row() { # name label before after
  local n=$1 w c m
  w=$(awk -v a="${wall[$n-forget]}" -v b="${wall[$n-prune]}" 'BEGIN { print a + b }')
  c=$(awk -v a="${cpu[$n-forget]}" -v b="${cpu[$n-prune]}" 'BEGIN { print a + b }')
  m=$((rss[$n-forget] > rss[$n-prune] ? rss[$n-forget] : rss[$n-prune]))
  tw[$n]=$w tm[$n]=$m
  printf '%-34s %8s %8s %8d %11s %10s %10s\n' "$2" "$w" "$c" "$m" "$(mibs "$3")" "$(mibs $(($3 - $4)))" "$(mibs "$4")"
  printf '%-34s %8s %8s %8d\n' "  of which prune" "${wall[$n-prune]}" "${cpu[$n-prune]}" "${rss[$n-prune]}"
}
row haul "haul forget + prune (passphrase)" "$h0" "$h1"
row managed "haul forget + prune (pbs-managed)" "$m0" "$m1"
echo
echo "haul/restic (below 1 = haul better):"
for n in haul managed; do
  after=$h1; [[ $n == managed ]] && after=$m1
  awk -v n="$n" -v hw="${tw[$n]}" -v rw="${wall[restic]}" -v hm="${tm[$n]}" -v rm="${rss[restic]}" -v h1="$after" -v r1="$r1" \
    'BEGIN { printf "%-8s wall %.2fx   peak rss %.2fx   size after %.3fx\n", n, hw / rw, hm / rm, h1 / r1 }'
done
echo "logs: $logs" >&2
