#!/usr/bin/env bash
# Benchmark (not a test): repositories on object storage. haul and restic back the same
# data up into the same store, a Ceph cluster on loopback (scripts/ceph-cluster.sh: a
# monitor, three memstore OSDs, the RADOS Gateway), in one run.
#
# usage: bench/object_store.sh [--mib N] [--work DIR] [--copies N]
#        (defaults: 1024, /tmp/haul-bench-s3, 1: replicas the pools keep; 3 needs three
#        times the OSDs' memory)
# env:   HAUL_BIN=dir     directory holding haul-pbs and haul-agent (default: the
#                         workspace's target/release, built if missing)
#
# Phases: full (haul pull --local into s3:, restic backup -r s3:), unchanged, restore
# (haul restore --via-agent, restic restore), copy (haul copy --to another prefix of the
# bucket, restic copy into another repository there). Page caches are dropped before
# every phase. Printed per phase: wall, user+sys CPU, peak RSS; then the CPU the store's
# own processes spent in each phase, and the store's floor: how long the store alone
# takes to take in and to give back haul's repository bytes (repo/examples/store_floor.rs),
# which no tool moving those bytes through it can beat.
set -euo pipefail

mib=1024 work=/tmp/haul-bench-s3 copies=1
. "$(dirname "$(readlink -f "$0")")/lib.sh"
while (($#)); do
  case $1 in
    --mib) mib=${2:?--mib needs a value}; shift 2 ;;
    --work) work=${2:?--work needs a value}; shift 2 ;;
    --copies) copies=${2:?--copies needs a value}; shift 2 ;;
    -h|--help) bench_help ;;
    *) bench_unknown "$1" ;;
  esac
done
bench_count --mib "$mib"
bench_count --copies "$copies"
gen="$root/bench/gen_dataset.py"
bench_needs restic python3 jq curl radosgw
bench_haul_binaries
floor_bin=$bin/examples/store_floor
[[ -x $floor_bin ]] || (cd "$root" && cargo build --release -q -p haul-repo --example store_floor)

mkdir -p "$work"
work=$(cd "$work" && pwd -P)
data="$work/data" logs="$work/logs" cluster="$work/ceph"
"$root/scripts/ceph-cluster.sh" stop "$cluster" 2>/dev/null || true
rm -rf "$data" "$logs" "$cluster" "$work"/{restic,haul}-cache "$work"/restore-* "$work/state"
mkdir -p "$logs"
exec > >(tee "$work/results.txt")
trap '"$root/scripts/ceph-cluster.sh" stop "$cluster"' EXIT
bench_passwords "$work"

echo "generating ${mib} MiB dataset in $data ..." >&2
python3 "$gen" "$data" --mib "$mib" >"$logs/gen.log" 2>&1
# Each OSD holds its share of every repository: four (two tools, each copied once).
osd_mib=$(((mib * 5 * copies / 3) + 1024))
echo "starting the Ceph cluster ($osd_mib MiB per OSD, $copies replica(s)) ..." >&2
"$root/scripts/ceph-cluster.sh" start "$cluster" "$osd_mib" "$copies" >"$logs/ceph.log"
set -a; . "$cluster/s3.env"; set +a
"$root/scripts/ceph-cluster.sh" bucket "$cluster" bench

restic_=(restic -r "s3:$ENDPOINT/bench/restic" --cache-dir "$work/restic-cache")
haul_=("$haul" --repo "s3:$ENDPOINT/bench/haul" --password-file "$work/password" --cache-dir "$work/haul-cache")
"${restic_[@]}" -q init --repository-version 2 >"$logs/restic.init.log" 2>&1
restic -r "s3:$ENDPOINT/bench/restic-copy" -q init --repository-version 2 \
  --copy-chunker-params --from-repo "s3:$ENDPOINT/bench/restic" --from-password-file "$work/password" \
  >"$logs/restic.init-copy.log" 2>&1
"${haul_[@]}" init >"$logs/haul.init.log" 2>&1
"$haul" --repo "s3:$ENDPOINT/bench/haul-copy" --password-file "$work/password" init >"$logs/haul.init-copy.log" 2>&1

declare -A wall store_cpu
# CPU seconds the store's own processes (radosgw, OSDs, monitor) have used so far.
store_cpu_now() {
  ps -C radosgw,ceph-osd,ceph-mon -o times= | awk '{ s += $1 } END { print s + 0 }'
}
measure() {
  local before; before=$(store_cpu_now)
  bench_measure "$@"
  store_cpu[$1.$2]=$(($(store_cpu_now) - before))
}

printf '%-7s %-10s %8s %8s %10s\n' tool phase wall_s cpu_s rss_mib
for phase in full unchanged; do
  measure restic "$phase" "${restic_[@]}" backup -q "$data"
  measure haul "$phase" "${haul_[@]}" --json pull --local "$data" --state-dir "$work/state"
done
# The floor: the store alone, given haul's repository bytes with no tool's work around
# them (repo/examples/store_floor.rs): every object read, then written under another
# prefix, 16 and then 64 requests in flight.
floor() {
  sync; echo 3 >/proc/sys/vm/drop_caches
  "$floor_bin" "s3:$ENDPOINT/bench/haul" "floor-$1" "$1" | while read -r what n mib s rate; do
    printf '%-7s %-10s %8s %8s %10s  (%s MiB, %s MiB/s)\n' store "$what/$1" "$s" - - "$mib" "$rate"
    echo "$s" >"$logs/floor.$what.$1"
  done
}
floor 16
floor 64
measure restic restore "${restic_[@]}" restore latest --target "$work/restore-restic"
measure haul restore "${haul_[@]}" --json restore latest --via-agent --target "$work/restore-haul"
measure restic copy restic -r "s3:$ENDPOINT/bench/restic-copy" --cache-dir "$work/restic-cache" \
  copy --from-repo "s3:$ENDPOINT/bench/restic" --from-password-file "$work/password"
measure haul copy "${haul_[@]}" --json copy --to "s3:$ENDPOINT/bench/haul-copy" --to-password-file "$work/password"

for t in restic haul; do
  bench_verify "$t" "$data" "$work/restore-$t$data" "$logs/$t.verify.log"
done
bench_ratios full unchanged restore copy
echo
echo "CPU seconds of the store's processes during each phase (haul / restic):"
for phase in full unchanged restore copy; do
  printf '%-10s %6s / %6s\n' "$phase" "${store_cpu[haul.$phase]:-?}" "${store_cpu[restic.$phase]:-?}"
done
echo
echo "floor (the store alone moving haul's bytes, best of 16 and 64 in flight) against a third of restic:"
best() { sort -n "$logs/floor.$1".* | head -1; }
awk -v put="$(best put)" -v get="$(best get)" -v rf="${wall[restic.full]:-0}" -v rr="${wall[restic.restore]:-0}" -v rc="${wall[restic.copy]:-0}" 'BEGIN {
  printf "full      store put %.2f s, restic/3 %.2f s\n", put, rf / 3
  printf "restore   store get %.2f s, restic/3 %.2f s\n", get, rr / 3
  printf "copy      store put %.2f s, restic/3 %.2f s\n", put, rc / 3 }'
echo "logs: $logs" >&2
