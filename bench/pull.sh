#!/usr/bin/env bash
# Benchmark (not a test): `haul-pbs pull --local` (pbs + agent over the ingest protocol
# on a Unix socket) and `restore --via-agent` against restic backup/restore, on the
# same data in one run.
#
# usage: bench/pull.sh [--mib N] [--work DIR]      (defaults: 1024, /tmp/haul-bench-pull)
# env:   HAUL_BIN=dir     directory holding haul-pbs and haul-agent (default: the
#                         workspace's target/release, built if missing)
#
# Phases: full, unchanged, changed (after gen_dataset.py --mutate), restore. Page
# caches are dropped before every phase. Printed per phase: wall, user+sys CPU of the
# whole command (haul: pbs and agent together), and peak RSS; for haul the agent's
# and the pbs's peak RSS separately (VmHWM each process reports in the run record).
set -euo pipefail

mib=1024 work=/tmp/haul-bench-pull
. "$(dirname "$(readlink -f "$0")")/lib.sh"
bench_mib_work_args "$@"

gen="$root/bench/gen_dataset.py"
[[ -f $gen ]] || { echo "pull.sh: $gen not found" >&2; exit 2; }
bench_needs

bench_haul_binaries

mkdir -p "$work"
work=$(cd "$work" && pwd -P)
data="$work/data" logs="$work/logs"
rm -rf "$data" "$logs" "$work"/{restic,haul}-{repo,cache} "$work"/restore-* "$work/state"
mkdir -p "$logs"
exec > >(tee "$work/results.txt")
bench_passwords "$work"

echo "generating ${mib} MiB dataset in $data ..." >&2
python3 "$gen" "$data" --mib "$mib" >"$logs/gen.log" 2>&1

restic_=(restic -r "$work/restic-repo" --cache-dir "$work/restic-cache")
haul_=("$haul" --repo "$work/haul-repo" --password-file "$work/password" --cache-dir "$work/haul-cache")
"${restic_[@]}" -q init --repository-version 2 >"$logs/restic.init.log" 2>&1
"${haul_[@]}" init >"$logs/haul.init.log" 2>&1

declare -A wall rss agent pbs
measure() { # tool phase cmd...
  local tool=$1 phase=$2 t="$logs/$1.$2.time"; shift 2
  sync; { echo 3 >/proc/sys/vm/drop_caches; } 2>/dev/null || true
  if ! /usr/bin/time -f '%e %U %S %M' -o "$t" "$@" >"$logs/$tool.$phase.log" 2>&1; then
    printf '%-7s %-10s FAILED\n' "$tool" "$phase"; tail -3 "$logs/$tool.$phase.log" | sed 's/^/        | /'
    return 0
  fi
  local w u s m a="" p=""
  read -r w u s m <"$t"
  if [[ $tool == haul ]]; then
    if [[ $phase == restore ]]; then
      a=$(jq -r 'select(.type=="agent" and .event.type=="summary") | .event.peak_rss_kib' "$logs/$tool.$phase.log")
      p=$(jq -r 'select(.type=="summary") | .pbs_peak_rss_kib' "$logs/$tool.$phase.log")
    else
      a=$(jq -r 'select(.type=="run") | .run.agent_peak_rss_kib' "$logs/$tool.$phase.log")
      p=$(jq -r 'select(.type=="run") | .run.pbs_peak_rss_kib' "$logs/$tool.$phase.log")
    fi
    a=$((a / 1024)) p=$((p / 1024))
  fi
  wall[$tool.$phase]=$w rss[$tool.$phase]=$((m / 1024)) agent[$tool.$phase]=$a pbs[$tool.$phase]=$p
  printf '%-7s %-10s %8s %8.2f %10d %10s %8s %8s\n' "$tool" "$phase" "$w" \
    "$(awk -v u="$u" -v s="$s" 'BEGIN { print u + s }')" $((m / 1024)) "${a:--}" "${p:--}" \
    "$(du -sm "$work/$tool-repo" | cut -f1)"
}

printf '%-7s %-10s %8s %8s %10s %10s %8s %8s\n' tool phase wall_s cpu_s rss_mib agent_mib pbs_mib repo_mib
for phase in full unchanged; do
  measure restic "$phase" "${restic_[@]}" backup -q "$data"
  measure haul "$phase" "${haul_[@]}" --json pull --local "$data" --state-dir "$work/state"
done
python3 "$gen" "$data" --mutate >>"$logs/gen.log" 2>&1
measure restic changed "${restic_[@]}" backup -q "$data"
measure haul changed "${haul_[@]}" --json pull --local "$data" --state-dir "$work/state"
measure restic restore "${restic_[@]}" restore latest --target "$work/restore-restic"
measure haul restore "${haul_[@]}" --json restore latest --via-agent --target "$work/restore-haul"

for t in restic haul; do
  bench_verify "$t" "$data" "$work/restore-$t$data" "$logs/$t.verify.log"
done
echo
echo "haul/restic (below 1 = haul better):"
for phase in full unchanged changed restore; do
  hw=${wall[haul.$phase]:-} rw=${wall[restic.$phase]:-}
  [[ -n $hw && -n $rw ]] || { printf '%-10s n/a\n' "$phase"; continue; }
  awk -v p="$phase" -v hw="$hw" -v rw="$rw" -v a="${agent[haul.$phase]}" -v rm="${rss[restic.$phase]}" \
    'BEGIN { printf "%-10s wall %.2fx   agent rss / restic rss %.2fx\n", p, hw / rw, a / rm }'
done
echo "logs: $logs" >&2
