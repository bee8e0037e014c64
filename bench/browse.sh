#!/usr/bin/env bash
# Benchmark (not a test): browsing the history, haul against restic on the same data
# in one run. Both repositories get the same 20 snapshots (the gen_dataset.py tree,
# then 19 rounds of --mutate); then, caches dropped before each:
#
#   ls-R      `ls -R` of the newest snapshot through each one's FUSE mount
#   ls-lR     `ls -lR` of it (a stat and the xattr calls of `ls -l` per entry)
#   cat-all   every file of the newest snapshot read through the mount (cat)
#   restore   the newest snapshot restored (what cat-all is held against)
#   find      one name searched in all 20 snapshots (`find` of each tool)
#   diff      the first snapshot against the last (`diff` of each tool)
#
# Each mount is started for ls-R and cat-all and measured whole: its peak RSS is the
# mount's. Targets: haul's cat-all at least half its restore's speed; each of the
# four at most 1/3 of restic's wall time; haul's mount peak RSS at most restic's.
#
# usage: bench/browse.sh [--mib N] [--snapshots N] [--work DIR] [--reuse]
#        (defaults: 1024, 20, /tmp/haul-bench-browse; --reuse: keep the dataset and
#        both repositories of the last run in DIR, and measure again)
# env:   HAUL_BIN=dir   directory holding haul-pbs and haul-agent (default: the
#                       workspace's target/release, built if missing)
# needs: restic, fuse3 (fusermount3, /dev/fuse), python3, jq, /usr/bin/time; root (to
#        drop the page cache; without it the caches stay warm)
set -euo pipefail

mib=1024 snapshots=20 work=/tmp/haul-bench-browse reuse=false
. "$(dirname "$(readlink -f "$0")")/lib.sh"
while (($#)); do
  case $1 in
    --mib) mib=${2:?--mib needs a value}; shift 2 ;;
    --snapshots) snapshots=${2:?--snapshots needs a value}; shift 2 ;;
    --work) work=${2:?--work needs a value}; shift 2 ;;
    --reuse) reuse=true; shift ;;
    -h|--help) bench_help ;;
    *) bench_unknown "$1" ;;
  esac
done
bench_count --mib "$mib"
bench_count --snapshots "$snapshots" 2
bench_needs restic python3 jq fusermount3
[[ -e /dev/fuse ]] || { echo "$me: /dev/fuse is missing (modprobe fuse)" >&2; exit 2; }
bench_haul_binaries

gen="$root/bench/gen_dataset.py"
mkdir -p "$work"
work=$(cd "$work" && pwd -P)
data="$work/data" logs="$work/logs" mnt="$work/mnt"
for m in "$mnt"/*; do mountpoint -q "$m" 2>/dev/null && fusermount3 -u -z "$m"; done
if $reuse; then
  rm -rf "$logs" "$mnt" "$work"/restore-*
else
  rm -rf "$data" "$logs" "$mnt" "$work"/{restic,haul}-{repo,cache} "$work"/restore-*
fi
mkdir -p "$logs" "$mnt/restic" "$mnt/haul"
exec > >(tee "$work/results.txt")
bench_passwords "$work"
restic_=(restic -r "$work/restic-repo" --cache-dir "$work/restic-cache")
haul_=("$haul" --repo "$work/haul-repo" --password-file "$work/password" --cache-dir "$work/haul-cache")

if ! $reuse; then
  echo "generating ${mib} MiB dataset and $snapshots snapshots of it in each repository ..." >&2
  python3 "$gen" "$data" --mib "$mib" >"$logs/gen.log" 2>&1
  "${restic_[@]}" -q init --repository-version 2 >"$logs/restic.init.log" 2>&1
  "${haul_[@]}" init >"$logs/haul.init.log" 2>&1
  for ((i = 1; i <= snapshots; i++)); do
    ((i == 1)) || python3 "$gen" "$data" --mutate --seed "$i" >>"$logs/gen.log" 2>&1
    "${restic_[@]}" backup -q "$data" >>"$logs/restic.backup.log" 2>&1
    "${haul_[@]}" backup-local "$data" >>"$logs/haul.backup.log" 2>&1
  done
fi
rid=($("${restic_[@]}" snapshots --json | jq -r 'sort_by(.time) | .[].id'))
hid=($("${haul_[@]}" --json snapshots | jq -r 'select(.type == "snapshot") | .id'))
((${#rid[@]} == snapshots && ${#hid[@]} == snapshots)) || {
  echo "$me: expected $snapshots snapshots, restic has ${#rid[@]}, haul ${#hid[@]}" >&2; exit 1; }

drop() { sync; { echo 3 >/proc/sys/vm/drop_caches; } 2>/dev/null || true; }
declare -A wall rss
measure() { # tool phase cmd...
  local tool=$1 phase=$2 t="$logs/$1.$2.time"; shift 2
  drop
  if ! /usr/bin/time -f '%e %M' -o "$t" "$@" >"$logs/$tool.$phase.log" 2>&1; then
    printf '%-7s %-8s FAILED\n' "$tool" "$phase"; tail -3 "$logs/$tool.$phase.log" | sed 's/^/        | /'
    return 0
  fi
  local w m
  read -r w m <"$t"
  wall[$tool.$phase]=$w rss[$tool.$phase]=$((m / 1024))
  printf '%-7s %-8s %8s s %8d MiB\n' "$tool" "$phase" "$w" $((m / 1024))
}

# Starts TOOL's mount (under /usr/bin/time, for its peak RSS) and waits until its
# newest snapshot is there.
mount_start() {
  local tool=$1 at="$mnt/$1"
  drop
  case $tool in
    restic) /usr/bin/time -f '%M' -o "$logs/restic.mount.time" "${restic_[@]}" mount "$at" >"$logs/restic.mount.log" 2>&1 & ;;
    haul) /usr/bin/time -f '%M' -o "$logs/haul.mount.time" "${haul_[@]}" mount "$at" >"$logs/haul.mount.log" 2>&1 & ;;
  esac
  mount_pid=$!
  for ((n = 0; n < 600; n++)); do
    [[ -e $at/snapshots/latest/ ]] && return 0
    sleep 0.1
  done
  echo "$me: the $tool mount did not come up (see $logs/$tool.mount.log)" >&2
  exit 1
}

# Stops the mount (SIGINT to the tool, which unmounts) and records its peak RSS.
mount_stop() {
  local tool=$1 child
  child=$(pgrep -P "$mount_pid" | head -1)
  kill -INT "$child"
  wait "$mount_pid" || true
  mountpoint -q "$mnt/$tool" && fusermount3 -u -z "$mnt/$tool"
  rss[$tool.mount]=$(($(tail -1 "$logs/$tool.mount.time") / 1024))
  printf '%-7s %-8s %10s %8d MiB\n' "$tool" mount "(peak)" "${rss[$tool.mount]}"
}

latest_in() { # the newest snapshot's copy of the data, through TOOL's mount
  echo "$mnt/$1/snapshots/latest$data"
}

printf '%-7s %-8s %10s %12s\n' tool phase wall rss
for tool in restic haul; do
  mount_start "$tool"
  measure "$tool" ls-R ls -R "$(latest_in "$tool")"
  measure "$tool" ls-lR ls -lR "$(latest_in "$tool")"
  measure "$tool" cat-all sh -c 'find "$1" -type f -print0 | xargs -0 cat | wc -c' sh "$(latest_in "$tool")"
  mount_stop "$tool"
done
measure restic restore "${restic_[@]}" restore latest --target "$work/restore-restic"
measure haul restore "${haul_[@]}" restore latest --target "$work/restore-haul"
measure restic find "${restic_[@]}" find m0007.bin
measure haul find "${haul_[@]}" find m0007.bin
measure restic diff "${restic_[@]}" diff "${rid[0]}" "${rid[-1]}"
measure haul diff "${haul_[@]}" diff "${hid[0]}" "${hid[-1]}"

# What the mounts gave is what was backed up.
for t in restic haul; do
  bytes=$(tail -1 "$logs/$t.cat-all.log")
  want=$(find "$data" -type f -printf '%s\n' | awk '{ s += $1 } END { print s }')
  printf '%-7s cat-all read %s bytes (its files hold %s)\n' "$t" "$bytes" "$want"
done
for t in restic haul; do
  bench_verify "$t" "$data" "$work/restore-$t$data" "$logs/$t.verify.log"
done

echo
echo "haul/restic (below 1 = haul better):"
for phase in ls-R ls-lR cat-all find diff restore; do
  hw=${wall[haul.$phase]:-} rw=${wall[restic.$phase]:-}
  [[ -n $hw && -n $rw ]] || { printf '%-8s n/a\n' "$phase"; continue; }
  awk -v p="$phase" -v hw="$hw" -v rw="$rw" 'BEGIN { printf "%-8s wall %.2fx  (%s s vs %s s)\n", p, hw / rw, hw, rw }'
done
awk -v h="${rss[haul.mount]}" -v r="${rss[restic.mount]}" \
  'BEGIN { printf "mount    peak rss %.2fx  (%d MiB vs %d MiB)\n", h / r, h, r }'
awk -v c="${wall[haul.cat-all]}" -v r="${wall[haul.restore]}" \
  'BEGIN { printf "haul cat-all through the mount / haul restore: speed %.2f of the restore'"'"'s\n", r / c }'
echo "logs: $logs" >&2
