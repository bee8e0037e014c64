# Sourced by the bench scripts that run haul beside restic: what they share.
#   root                   the workspace
#   bench_needs [TOOL...]  the tools (default: restic python3 jq) and /usr/bin/time, or
#                          exit 2 saying so
#   bench_haul_binaries    sets bin and haul: $HAUL_BIN, else target/release (built
#                          when missing)

root=$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd -P)
me=$(basename "$0")

bench_needs() {
  local t tools=("$@")
  ((${#tools[@]})) || tools=(restic python3 jq)
  for t in "${tools[@]}"; do
    command -v "$t" >/dev/null || { echo "$me: needs $t (apt-get install -y ${tools[*]} time)" >&2; exit 2; }
  done
  [[ -x /usr/bin/time ]] || { echo "$me: needs /usr/bin/time (apt-get install -y time)" >&2; exit 2; }
}

bench_haul_binaries() {
  bin=${HAUL_BIN:-${CARGO_TARGET_DIR:-$root/target}/release}
  if [[ -z ${HAUL_BIN:-} && ( ! -x $bin/haul-pbs || ! -x $bin/haul-agent ) ]]; then
    echo "building haul-pbs and haul-agent ..." >&2
    (cd "$root" && cargo build --release -p haul-pbs -p haul-agent) >&2
  fi
  haul=$bin/haul-pbs
}
