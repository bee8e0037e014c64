#!/usr/bin/env bash
# Benchmark (not a test): many small files. For each tree size, haul and restic side by
# side on the same files in one run: a full pull (restic backup), an unchanged re-pull,
# `ls` of the whole snapshot, and a restore.
#
# usage: bench/many_files.sh [--files "100000 1000000"] [--flat N] [--work DIR] [--haul-only]
#                             [--loop GIB]
#        --files   tree sizes, in files (default "100000 1000000"); files of 64 to
#                  2,048 bytes, 1,000 per directory
#        --flat N  also a tree of N files in one single directory
#        --haul-only  without restic (haul's memory on a tree restic takes an hour on)
#        --loop GIB  put each tree with its repositories, and each restore, on a fresh
#                  ext4 image of GIB GiB (sparse, an inode per 4 KiB) mounted by loop
#                  under --work (needs root); five million files are then gone in
#                  seconds by unmounting, where `rm -rf` takes over twenty minutes
#                  (5,000,000 files: 40 is enough, and 80 GiB free for three images)
#        --work    where the trees, repositories and restores go
#                  (default /tmp/haul-bench-many; a million files take about 4 GiB, and
#                  a tree is there twice while its restore is checked)
# env:   HAUL_BIN=dir     directory holding haul-pbs and haul-agent (default: the
#                         workspace's target/release, built if missing)
#
# haul runs on the repository the pbs manages (`pull --local` with --state-dir). For
# haul pulls the pbs's and the agent's peak RSS come from the run record (VmHWM each
# process reports); for the other phases, and for restic, from /usr/bin/time.
set -euo pipefail

files="100000 1000000" flat="" work=/tmp/haul-bench-many tools="restic haul" loop=""
. "$(dirname "$(readlink -f "$0")")/lib.sh"
while (($#)); do
  case $1 in
    --files) files=${2:?--files needs a value}; shift 2 ;;
    --flat) flat=${2:?--flat needs a value}; shift 2 ;;
    --work) work=${2:?--work needs a value}; shift 2 ;;
    --haul-only) tools=haul; shift ;;
    --loop) loop=${2:?--loop needs a size in GiB}; bench_count --loop "$loop"; shift 2 ;;
    -h|--help) bench_help ;;
    *) bench_unknown "$1" ;;
  esac
done
for n in $files; do bench_count --files "$n"; done
[[ -z $flat ]] || bench_count --flat "$flat"

bench_needs
[[ -z $loop ]] || bench_needs mkfs.ext4 losetup
bench_haul_binaries

mkdir -p "$work"
work=$(cd "$work" && pwd -P)
logs="$work/logs"
rm -rf "$logs"
mkdir -p "$logs"
exec > >(tee "$work/results.txt")
unset RESTIC_REPOSITORY RESTIC_PASSWORD_FILE RESTIC_PASSWORD_COMMAND HAUL_PASSWORD HAUL_REPO
export RESTIC_PASSWORD=bench

# gen DIR N PER_DIR: N files of 64..2048 bytes, PER_DIR to a directory (deterministic).
gen() {
  python3 - "$1" "$2" "$3" <<'EOF'
import os, random, sys
root, n, per = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(n * 7919 + per)
pool = rng.randbytes(1 << 20)
for i in range(n):
    d = os.path.join(root, f"d{i // per:05d}")
    if i % per == 0:
        os.makedirs(d, exist_ok=True)
    size = rng.randint(64, 2048)
    start = rng.randint(0, len(pool) - size)
    with open(os.path.join(d, f"f{i:07d}"), "wb") as f:
        f.write(b"%d\n" % i + pool[start:start + size])
EOF
}

declare -A wall rss agent pbs
measure() { # key what cmd...
  local key=$1 what=$2 t="$logs/$1.time"; shift 2
  sync; { echo 3 >/proc/sys/vm/drop_caches; } 2>/dev/null || true
  if ! /usr/bin/time -f '%e %M' -o "$t" "$@" >"$logs/$key.log" 2>&1; then
    echo "$key FAILED:"; tail -5 "$logs/$key.log" | sed 's/^/  | /'; return 0
  fi
  local w m
  read -r w m <"$t"
  wall[$key]=$w rss[$key]=$((m / 1024)) agent[$key]=- pbs[$key]=-
  if [[ $what == pull ]]; then
    agent[$key]=$(($(jq -r 'select(.type=="run") | .run.agent_peak_rss_kib' "$logs/$key.log") / 1024))
    pbs[$key]=$(($(jq -r 'select(.type=="run") | .run.pbs_peak_rss_kib' "$logs/$key.log") / 1024))
  fi
}

# verify ORIGINAL RESTORED N: the restore is the original. Up to a million files by
# `diff -r`; past that (a diff of five million files takes over ten minutes) every
# entry's type, mode, owner, mtime, link target and (but a directory's) size, and the
# bytes of one file in a thousand.
verify() {
  if (($3 <= 1000000)); then diff -r --no-dereference "$1" "$2"; return; fi
  # A directory's size is not restored: it is what its blocks came to as it was filled.
  local list='%y %m %U %G %s %T@ %P -> %l\n' dirs='%y %m %U %G %T@ %P\n'
  diff <(cd "$1" && { find . ! -type d -printf "$list"; find . -type d -printf "$dirs"; } | LC_ALL=C sort) \
    <(cd "$2" && { find . ! -type d -printf "$list"; find . -type d -printf "$dirs"; } | LC_ALL=C sort) || return 1
  (cd "$1" && find . -type f | LC_ALL=C sort | awk 'NR % 1000 == 1') |
    while read -r f; do cmp "$1/$f" "$2/$f" || return 1; done
}

# on_image LABEL: with --loop, a fresh ext4 image mounted at $work/fs-LABEL, where the
# tree's files go; else $work. Prints the directory.
on_image() {
  if [[ -z $loop ]]; then echo "$work"; return; fi
  bench_image_on "$work/fs-$1" "$loop"
}
off_image() { # LABEL
  [[ -z $loop ]] || bench_image_off "$work/fs-$1"
}
images_off() { # every image this run left, on any exit
  local m
  for m in "$work"/fs-*; do [[ -d $m ]] && off_image "${m##*/fs-}"; done
  return 0
}
[[ -z $loop ]] || trap images_off EXIT

run_tree() { # label N PER_DIR
  local label=$1 n=$2 per=$3 base
  base=$(on_image "$label")
  local data="$base/data-$1"
  rm -rf "$data" "$base"/{restic,state,restore-restic,restore-haul}-"$label" "$base/restic-cache" "$base/haul-cache"
  echo "generating $n files ($per per directory) ..." >&2
  gen "$data" "$n" "$per"
  local restic_=(restic -r "$base/restic-$label" --cache-dir "$base/restic-cache")
  local haul_=("$haul" --state-dir "$base/state-$label" --config /dev/null --cache-dir "$base/haul-cache")
  local restic=false
  [[ $tools == *restic* ]] && restic=true
  if $restic; then
    "${restic_[@]}" -q init --repository-version 2 >"$logs/$label.restic.init.log" 2>&1
    measure "$label.restic.full" backup "${restic_[@]}" backup -q "$data"
  fi
  measure "$label.haul.full" pull "${haul_[@]}" --json pull --local "$data"
  ! $restic || measure "$label.restic.unchanged" backup "${restic_[@]}" backup -q "$data"
  measure "$label.haul.unchanged" pull "${haul_[@]}" --json pull --local "$data"
  ! $restic || measure "$label.restic.ls" ls "${restic_[@]}" ls latest
  measure "$label.haul.ls" ls "${haul_[@]}" ls latest
  # One restore at a time, checked and removed before the next: a tree of five
  # million files takes 20 GiB.
  for t in $tools; do
    local into
    into=$(on_image "$label-$t")/restore-$t-$label
    if [[ $t == restic ]]; then
      measure "$label.$t.restore" restore "${restic_[@]}" restore latest --target "$into"
    else
      measure "$label.$t.restore" restore "${haul_[@]}" restore latest --target "$into"
    fi
    if verify "$data" "$into$data" "$n" >"$logs/$label.$t.verify.log" 2>&1; then
      echo "$label $t restore-verify OK"
    else
      echo "$label $t restore-verify FAILED (see $logs/$label.$t.verify.log)"
    fi
    if [[ -n $loop ]]; then off_image "$label-$t"; else rm -rf "$into"; fi
  done
  for phase in full unchanged ls restore; do
    local h="$label.haul.$phase" r="$label.restic.$phase"
    printf '%-10s %-10s %9s %9s %7s %10s %10s %10s %10s\n' "$label" "$phase" "${wall[$h]:--}" "${wall[$r]:--}" \
      "$(awk -v h="${wall[$h]:-0}" -v r="${wall[$r]:-0}" 'BEGIN { if (r > 0) printf "%.2fx", h / r; else print "-" }')" \
      "${pbs[$h]:--}" "${agent[$h]:--}" "${rss[$h]:--}" "${rss[$r]:--}"
  done
  if [[ -n $loop ]]; then off_image "$label"
  else rm -rf "$data" "$base"/{restic,state,restore-restic,restore-haul}-"$label"; fi
}

printf '%-10s %-10s %9s %9s %7s %10s %10s %10s %10s\n' tree phase haul_s restic_s ratio pbs_mib agent_mib haul_mib restic_mib
for n in $files; do run_tree "$n" "$n" 1000; done
[[ -z $flat ]] || run_tree "flat$flat" "$flat" "$flat"
echo "(pull rows: pbs_mib and agent_mib from the run record; haul_mib is /usr/bin/time's peak of the command)"
echo "logs: $logs" >&2
