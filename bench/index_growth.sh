#!/usr/bin/env bash
# Benchmark (not a test): the agent's memory does not depend on the size of the
# repository. Grows a repository's index from 10,000 to 1,000,000 synthetic entries and
# pulls a small directory (with one changed file) at each size, printing the peak RSS
# of the agent and of the pbs (VmHWM each reports in the run record).
#
# usage: bench/index_growth.sh [--work DIR]     (default: /tmp/haul-bench-index)
set -euo pipefail
work=/tmp/haul-bench-index
while (($#)); do
  case $1 in
    --work) work=${2:?--work needs a value}; shift 2 ;;
    -h|--help) sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "index_growth.sh: unknown argument: $1" >&2; exit 2 ;;
  esac
done
command -v jq >/dev/null || { echo "index_growth.sh: needs jq (apt-get install -y jq)" >&2; exit 2; }
root=$(cd "$(dirname "$(readlink -f "$0")")/.." && pwd -P)
(cd "$root" && cargo build --release -q -p haul-pbs -p haul-agent && cargo build --release -q -p haul-repo --example grow_index)
bin=${CARGO_TARGET_DIR:-$root/target}/release
rm -rf "$work" && mkdir -p "$work/src"
printf 'bench\n' >"$work/password" && chmod 600 "$work/password"
pbs=("$bin/haul-pbs" --repo "$work/repo" --password-file "$work/password" --cache-dir "$work/cache")
"${pbs[@]}" init >/dev/null
for i in $(seq 1 200); do head -c $((i * 5000)) /dev/urandom >"$work/src/f$i"; done

# The first pull stores the directory; each measured pull then finds one changed file.
"${pbs[@]}" pull --local "$work/src" --state-dir "$work/state" >/dev/null
printf '%-13s %10s %10s %8s\n' index_entries agent_kib pbs_kib wall_s
have=0
for n in 10000 100000 1000000; do
  "$bin/examples/grow_index" "$work/repo" "$work/password" $((n - have)) "$n" >/dev/null
  have=$n
  head -c 100000 /dev/urandom >"$work/src/changed"
  start=$(date +%s.%N)
  rec=$("${pbs[@]}" --json pull --local "$work/src" --state-dir "$work/state" | jq -c 'select(.type=="run") | .run')
  end=$(date +%s.%N)
  [[ $(jq -r .status <<<"$rec") == ok ]] || { echo "pull failed: $rec" >&2; exit 1; }
  printf '%-13s %10s %10s %8.2f\n' "$n" "$(jq .agent_peak_rss_kib <<<"$rec")" \
    "$(jq .pbs_peak_rss_kib <<<"$rec")" "$(echo "$end - $start" | bc)"
done
