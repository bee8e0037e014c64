#!/usr/bin/env bash
# Benchmark (not a test): `haul-pbs import-rdiff` against rdiff-backup itself.
#
# usage: bench/import.sh [--sessions N] [--mib M] [--big-mib B] [--work DIR]
#        (defaults: 20 sessions of 256 MiB, a 512 MiB file, /tmp/haul-bench-import)
#
# 1. The rdiff-backup fixture (tests/fixtures/make-rdiff-fixture.sh): import time and
#    repository size.
# 2. A generated history: bench/gen_dataset.py --mib M, backed up by
#    rdiff-backup N times with `gen_dataset.py --mutate` between sessions (one session
#    a day, via --current-time). Then, in one run: haul imports every session; and
#    rdiff-backup restores every session (`restore --at`), which is what a user of the
#    old tree must do to get a state back. Wall, CPU and peak RSS of both, and the sizes
#    of the rdiff-backup tree and of haul's repository.
# 3. One large file (--big-mib) rewritten in part between three sessions: haul's peak
#    RSS while it rebuilds the old versions.
set -euo pipefail

sessions=20 mib=256 big=512 work=/tmp/haul-bench-import
while (($#)); do
  case $1 in
    --sessions) sessions=${2:?}; shift 2 ;;
    --mib) mib=${2:?}; shift 2 ;;
    --big-mib) big=${2:?}; shift 2 ;;
    --work) work=${2:?}; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "import.sh: unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ $sessions =~ ^[1-9][0-9]*$ && $mib =~ ^[1-9][0-9]*$ && $big =~ ^[1-9][0-9]*$ ]] || { echo "import.sh: --sessions, --mib and --big-mib want positive integers" >&2; exit 2; }
for t in rdiff-backup python3 /usr/bin/time; do
  command -v $t >/dev/null || { echo "import.sh: needs $t (apt-get install -y rdiff-backup python3 time)" >&2; exit 2; }
done
here=$(cd "$(dirname "$(readlink -f "$0")")" && pwd -P)
root=$(cd "$here/.." && pwd -P)
echo "building haul-pbs (release) ..." >&2
(cd "$root" && cargo build --release -q -p haul-pbs)
haul=${CARGO_TARGET_DIR:-$root/target}/release/haul-pbs

rm -rf "$work"; mkdir -p "$work/logs"
work=$(cd "$work" && pwd -P)
logs=$work/logs
printf 'bench\n' >"$work/pw"; chmod 600 "$work/pw"
exec > >(tee "$work/results.txt")

measure() { # label cmd...  -> prints wall cpu rss
  local label=$1 t="$logs/$1.time"; shift
  /usr/bin/time -f '%e %U %S %M' -o "$t" "$@" >"$logs/$label.log" 2>&1 || { echo "$label FAILED: see $logs/$label.log" >&2; tail -3 "$logs/$label.log" >&2; exit 1; }
  read -r w u s m <"$t"
  printf '%-34s %8s s wall %8.2f s cpu %7d MiB\n' "$label" "$w" "$(awk -v u="$u" -v s="$s" 'BEGIN{print u+s}')" $((m / 1024))
}

echo "== the rdiff-backup fixture"
bash "$root/tests/fixtures/make-rdiff-fixture.sh" "$work/fixture" >"$logs/fixture.log" 2>&1
h=("$haul" --repo "$work/haul-fixture" --password-file "$work/pw" --cache-dir "$work/cache-fixture")
"${h[@]}" init >/dev/null 2>&1
measure "haul import (fixture repo)" "${h[@]}" import-rdiff "$work/fixture/repo" --host fixture --path /srv
printf 'sizes: rdiff-backup tree %s MiB, haul repository %s MiB\n' \
  "$(du -sm "$work/fixture/repo" | cut -f1)" "$(du -sm "$work/haul-fixture" | cut -f1)"

echo "== a generated history: $sessions sessions of $mib MiB"
data=$work/data rd=$work/rdiff
python3 "$root/bench/gen_dataset.py" "$data" --mib "$mib" >"$logs/gen.log" 2>&1
t0=1704067200   # 2024-01-01, one session a day
start=$(date +%s)
for i in $(seq 0 $((sessions - 1))); do
  ((i > 0)) && python3 "$root/bench/gen_dataset.py" "$data" --mutate --seed "$i" >>"$logs/gen.log" 2>&1
  rdiff-backup --current-time $((t0 + i * 86400)) backup "$data" "$rd" >>"$logs/rdiff-backup.log" 2>&1
done
echo "rdiff-backup wrote the $sessions sessions in $(( $(date +%s) - start )) s"
sync; { echo 3 >/proc/sys/vm/drop_caches; } 2>/dev/null || true
h=("$haul" --repo "$work/haul-history" --password-file "$work/pw" --cache-dir "$work/cache-history")
"${h[@]}" init >/dev/null 2>&1
measure "haul import ($sessions sessions)" "${h[@]}" import-rdiff "$rd" --host bench --path /data
sync; { echo 3 >/proc/sys/vm/drop_caches; } 2>/dev/null || true
restore_all() {
  for i in $(seq 0 $((sessions - 1))); do
    rm -rf "$work/restore"
    rdiff-backup restore --at $((t0 + i * 86400)) "$rd" "$work/restore"
  done
  rm -rf "$work/restore"
}
export -f restore_all; export work sessions t0 rd
measure "rdiff-backup restore of every session" bash -c restore_all
printf 'sizes: rdiff-backup tree %s MiB, haul repository %s MiB (%s sessions of %s MiB)\n' \
  "$(du -sm "$rd" | cut -f1)" "$(du -sm "$work/haul-history" | cut -f1)" "$sessions" "$mib"

echo "== one large file: $big MiB of random bytes, three sessions (half, then a quarter, of its MiB rewritten)"
# Peak RSS shows whether a file is rebuilt in bounded memory: large versions spill to
# \$TMPDIR and deltas are streamed, so it stays far below the file's size.
big_src=$work/big-src big_rd=$work/big-rdiff
mkdir -p "$big_src"
for i in 0 1 2; do
  python3 - "$big_src/big" "$big" "$i" <<'PY'
import random, sys
path, mib, step = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
r = random.Random(step)
with open(path, "wb" if step == 0 else "r+b") as f:
    for m in range(0 if step < 2 else 1, mib, [1, 2, 4][step]):
        f.seek(m << 20)
        f.write(r.randbytes(1 << 20))
PY
  touch -d "@$((t0 + i * 86400))" "$big_src/big"
  rdiff-backup --current-time $((t0 + i * 86400)) backup "$big_src" "$big_rd" >>"$logs/rdiff-backup-big.log" 2>&1
done
h=("$haul" --repo "$work/haul-big" --password-file "$work/pw" --cache-dir "$work/cache-big")
"${h[@]}" init >/dev/null 2>&1
measure "haul import (one $big MiB file)" "${h[@]}" import-rdiff "$big_rd" --host big --path /big
printf 'sizes: rdiff-backup tree %s MiB, haul repository %s MiB\n' \
  "$(du -sm "$big_rd" | cut -f1)" "$(du -sm "$work/haul-big" | cut -f1)"
echo "logs: $logs"
