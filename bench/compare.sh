#!/usr/bin/env bash
# Benchmark (not a test): haul-pbs against restic on the same dataset, in one run.
#
# usage: bench/compare.sh [--mib N] [--work DIR]      (defaults: 1024, /tmp/haul-bench)
# env:   HAUL_PBS=path      use this haul-pbs (default: the workspace's release build,
#                           built with `cargo build --release -p haul-pbs` if missing)
#        MUTATE=0           skip the `changed` phase (mutate the data, back up again)
#
# Phases per tool: full, unchanged, [changed], restore (of the latest snapshot, then
# compared with the data by `diff -r`). Both tools see the same data at each phase;
# page caches are dropped before every measurement; each tool keeps its own on-disk
# cache between phases. Everything (data, repos, caches, restores, logs) stays in DIR.
set -euo pipefail

mib=1024 work=/tmp/haul-bench
. "$(dirname "$(readlink -f "$0")")/lib.sh"
bench_mib_work_args "$@"

gen="$root/bench/gen_dataset.py"
[[ -f $gen ]] || { echo "compare.sh: $gen not found" >&2; exit 2; }
bench_needs restic python3

haul=${HAUL_PBS:-${CARGO_TARGET_DIR:-$root/target}/release/haul-pbs}
if [[ -z ${HAUL_PBS:-} && ! -x $haul ]]; then
  echo "building $haul ..." >&2
  (cd "$root" && cargo build --release -p haul-pbs) >&2
fi
[[ -x $haul ]] || { echo "compare.sh: haul-pbs not found at $haul" >&2; exit 2; }

mkdir -p "$work"
work=$(cd "$work" && pwd -P)   # absolute and symlink-free: restores land at TARGET/$data
data="$work/data" logs="$work/logs"
rm -rf "$data" "$logs" "$work"/{restic,haul}-{repo,cache} "$work"/restore-*
mkdir -p "$logs"
exec > >(tee "$work/results.txt")
bench_passwords "$work"

echo "generating ${mib} MiB dataset in $data ..." >&2
python3 "$gen" "$data" --mib "$mib" >"$logs/gen.log" 2>&1

restic_=(restic -r "$work/restic-repo" --cache-dir "$work/restic-cache")
haul_=("$haul" --repo "$work/haul-repo" --password-file "$work/password" --cache-dir "$work/haul-cache")

declare -A wall rss
measure() { # tool phase cmd...
  local tool=$1 phase=$2 t="$logs/$1.$2.time"; shift 2
  sync; { echo 3 >/proc/sys/vm/drop_caches; } 2>/dev/null || true
  if ! /usr/bin/time -f '%e %U %S %M' -o "$t" "$@" >"$logs/$tool.$phase.log" 2>&1; then
    printf '%-7s %-10s FAILED (%s)\n' "$tool" "$phase" "$(sed -n 's/^Command //p' "$t")"
    tail -3 "$logs/$tool.$phase.log" | sed 's/^/        | /'
    return 0
  fi
  local w u s m repo
  read -r w u s m <"$t"
  repo=$(du -sm "$work/$tool-repo" | cut -f1)
  wall[$tool.$phase]=$w rss[$tool.$phase]=$m
  printf '%-7s %-10s %8s %8s %8s %8.2f %10d %8s\n' "$tool" "$phase" "$w" "$u" "$s" \
    "$(awk -v u="$u" -v s="$s" 'BEGIN { print u + s }')" $((m / 1024)) "$repo"
}
verify() { # tool target
  if diff -r --no-dereference "$data" "$2$data" >"$logs/$1.verify.log" 2>&1; then
    printf '%-7s restore-verify OK\n' "$1"
  else
    printf '%-7s restore-verify FAILED (%s differences, see %s)\n' "$1" \
      "$(wc -l <"$logs/$1.verify.log")" "$logs/$1.verify.log"
  fi
}

echo "haul-pbs: $haul ($("$haul" --version 2>/dev/null | head -1), built $(date -r "$haul" '+%F %T'));" \
  "$(restic version | cut -d' ' -f1-2)" >&2
"${restic_[@]}" -q init --repository-version 2 >"$logs/restic.init.log" 2>&1 ||
  { echo "restic init failed, see $logs/restic.init.log" >&2; exit 1; }
"${haul_[@]}" init >"$logs/haul.init.log" 2>&1 ||
  { echo "haul init failed, see $logs/haul.init.log" >&2; exit 1; }

phases=(full unchanged)
printf '%-7s %-10s %8s %8s %8s %8s %10s %8s\n' tool phase wall_s user_s sys_s cpu_s maxrss_mib repo_mib
for phase in full unchanged; do
  measure restic "$phase" "${restic_[@]}" backup -q "$data"
  measure haul "$phase" "${haul_[@]}" backup-local "$data"
done
if [[ ${MUTATE:-1} == 1 ]]; then
  python3 "$gen" "$data" --mutate >>"$logs/gen.log" 2>&1
  phases+=(changed)
  measure restic changed "${restic_[@]}" backup -q "$data"
  measure haul changed "${haul_[@]}" backup-local "$data"
fi
phases+=(restore)
mkdir -p "$work/restore-restic" "$work/restore-haul"
measure restic restore "${restic_[@]}" restore latest --target "$work/restore-restic"
measure haul restore "${haul_[@]}" restore latest --target "$work/restore-haul"

echo
verify restic "$work/restore-restic"
verify haul "$work/restore-haul"

echo
echo "haul/restic ratios (below 1 = haul better):"
for phase in "${phases[@]}"; do
  hw=${wall[haul.$phase]:-} rw=${wall[restic.$phase]:-}
  if [[ -z $hw || -z $rw ]]; then printf '%-10s n/a (a run failed)\n' "$phase"; continue; fi
  awk -v p="$phase" -v hw="$hw" -v rw="$rw" -v hm="${rss[haul.$phase]}" -v rm="${rss[restic.$phase]}" \
    'BEGIN { printf "%-10s wall %s  rss %.2fx\n", p, (rw > 0 ? sprintf("%.2fx", hw / rw) : "n/a"), hm / rm }'
done
echo "logs: $logs" >&2
