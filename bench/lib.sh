# Sourced by the bench scripts that run haul beside restic: what they share.
#   root                   the workspace
#   bench_help             prints the script's usage (its leading comment) and exits 0
#   bench_unknown ARG      says ARG is no option of the script and exits 2
#   bench_count FLAG N [MIN]  N must be an integer of at least MIN (default 1), or exit 2
#   bench_needs [TOOL...]  the tools (default: restic python3 jq) and /usr/bin/time, or
#                          exit 2 saying so
#   bench_haul_binaries    sets bin and haul: $HAUL_BIN, else target/release (built
#                          when missing)
#   bench_sshd_config DIR PORT  writes DIR/sshd_config: a private sshd on 127.0.0.1:PORT
#                          with DIR's hostkey and authorized_keys, forwards for haul
#   bench_mib_work_args ARGS...  parses --mib N and --work DIR (and --help) into mib and
#                          work, or exits 2
#   bench_free_port        prints a TCP port free on 127.0.0.1
#   bench_passwords WORK   restic's password in the environment (only it), haul's in
#                          WORK/password (0600): both "bench"
#   bench_verify TOOL DATA RESTORED LOG  prints whether RESTORED equals DATA (diff -r,
#                          differences in LOG)
#   bench_measure TOOL PHASE CMD...  runs CMD with the page caches dropped before, output
#                          in $logs/TOOL.PHASE.log; prints wall, user+sys CPU and peak
#                          RSS, and keeps the wall in wall[TOOL.PHASE] (declare -A wall)
#   bench_ratios PHASE...  prints haul's wall over restic's for each phase measured
#   bench_login DIR        sets login: a uid-0 account whose shell is /bin/sh, made
#                          (home in DIR) if missing, removed by bench_login_off

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

bench_help() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
  exit 0
}

bench_unknown() {
  echo "$me: unknown argument: $1 (see --help)" >&2
  exit 2
}

bench_count() {
  local min=${3:-1}
  if [[ ! $2 =~ ^[0-9]+$ ]] || ((10#$2 < min)); then
    if ((min == 1)); then echo "$me: $1 wants a positive integer" >&2
    else echo "$me: $1 wants an integer of at least $min" >&2; fi
    exit 2
  fi
}

bench_sshd_config() {
  cat >"$1/sshd_config" <<EOF
Port $2
ListenAddress 127.0.0.1
HostKey $1/hostkey
PidFile $1/sshd.pid
AuthorizedKeysFile $1/authorized_keys
StrictModes no
UsePAM no
PermitRootLogin prohibit-password
PasswordAuthentication no
AllowTcpForwarding remote
PermitListen none
AllowStreamLocalForwarding remote
StreamLocalBindUnlink yes
EOF
}

# Both haul and the tool it is measured against log in as this account: sshd runs a
# forced command through the login shell, and bash sourcing a heavy ~/.bashrc there (on
# the machine this was written on, root's runs `pyenv init`: 0.14 s) would be counted
# against one side only. `--force` on removal: uid 0 always has processes.
bench_login() {
  login=haulbench made_login=
  if ! getent passwd "$login" >/dev/null; then
    mkdir -p "$1/home"
    useradd --non-unique --uid 0 --gid 0 --no-create-home --home-dir "$1/home" --shell /bin/sh "$login" 2>/dev/null
    usermod --password '*' "$login"   # no password, not locked: key logins only
    made_login=1
  fi
}
bench_login_off() { [[ -z $made_login ]] || userdel --force "$login" 2>/dev/null || true; }

# bench_image_on DIR GIB: a fresh ext4 image of GIB GiB (sparse, an inode per 4 KiB, with
# a journal, as a server's disk has) at DIR.img, mounted by loop at DIR; prints DIR.
bench_image_on() {
  local mnt=$1 img=$1.img
  bench_image_off "$mnt"
  truncate -s "${2}G" "$img"
  mkfs.ext4 -q -F -i 4096 -E lazy_itable_init=0,lazy_journal_init=0 "$img" >&2
  mkdir -p "$mnt"
  # Direct I/O: a buffered loop device caches every page twice and copies it once
  # more, which made a restore of a million files slower by a third.
  local dev
  dev=$(losetup --direct-io=on -f --show "$img")
  mount -o noatime "$dev" "$mnt"
  echo "$mnt"
}
# bench_image_off DIR: unmounts and removes what bench_image_on made at DIR.
bench_image_off() {
  local mnt=$1
  if mountpoint -q "$mnt"; then
    local dev
    dev=$(findmnt -n -o SOURCE "$mnt")
    # Busy while anything still reads it (a shell cd'd there, a check run by hand):
    # tried for a minute before the run gives up.
    local try
    for try in 1 2 3 4 5 6 7 8 9 10 11 12; do
      umount "$mnt" 2>/dev/null && break
      ((try < 12)) || { echo "$me: $mnt stays busy; unmount it by hand" >&2; return 1; }
      sleep 5
    done
    losetup -d "$dev"
  fi
  # (A directory with files in it is not an image's: it is left to whoever made it.)
  [[ ! -d $mnt ]] || rmdir "$mnt" 2>/dev/null || true
  rm -f "$mnt.img"
}

bench_verify() {
  if diff -r --no-dereference "$2" "$3" >"$4" 2>&1; then
    printf '%-7s restore-verify OK\n' "$1"
  else
    printf '%-7s restore-verify FAILED (see %s)\n' "$1" "$4"
  fi
}

bench_measure() {
  local tool=$1 phase=$2 t="$logs/$1.$2.time"; shift 2
  sync; { echo 3 >/proc/sys/vm/drop_caches; } 2>/dev/null || true
  if ! /usr/bin/time -f '%e %U %S %M' -o "$t" "$@" >"$logs/$tool.$phase.log" 2>&1; then
    printf '%-7s %-10s FAILED\n' "$tool" "$phase"; tail -3 "$logs/$tool.$phase.log" | sed 's/^/        | /'
    return 0
  fi
  local w u s m
  read -r w u s m <"$t"
  wall[$tool.$phase]=$w
  printf '%-7s %-10s %8s %8.2f %10d\n' "$tool" "$phase" "$w" \
    "$(awk -v u="$u" -v s="$s" 'BEGIN { print u + s }')" $((m / 1024))
}

bench_ratios() {
  echo
  echo "haul/restic (below 1 = haul better):"
  local phase hw rw
  for phase in "$@"; do
    hw=${wall[haul.$phase]:-} rw=${wall[restic.$phase]:-}
    [[ -n $hw && -n $rw ]] || { printf '%-10s n/a\n' "$phase"; continue; }
    awk -v p="$phase" -v hw="$hw" -v rw="$rw" 'BEGIN { printf "%-10s wall %.2fx\n", p, hw / rw }'
  done
}

bench_passwords() {
  unset RESTIC_REPOSITORY RESTIC_PASSWORD_FILE RESTIC_PASSWORD_COMMAND HAUL_PASSWORD
  export RESTIC_PASSWORD=bench
  printf 'bench\n' >"$1/password"
  chmod 600 "$1/password"
}

# The usual arguments of a benchmark that takes only a dataset size and a work
# directory: sets $mib and $work (their defaults set by the caller), or prints help, or
# refuses anything else.
bench_mib_work_args() {
  while (($#)); do
    case $1 in
      --mib) mib=${2:?--mib needs a value}; shift 2 ;;
      --work) work=${2:?--work needs a value}; shift 2 ;;
      -h|--help) bench_help ;;
      *) bench_unknown "$1" ;;
    esac
  done
  bench_count --mib "$mib"
}

# A TCP port free on 127.0.0.1 now.
bench_free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
