#!/usr/bin/env bash
# Benchmark (not a test): raw throughput of the pbs's SSH tunnel (a russh reverse
# Unix-socket forward, as `haul-pbs pull` uses it) against OpenSSH's own `ssh -R`, both
# through the same private sshd on 127.0.0.1, with the same HTTP server behind the
# tunnel (pbs/examples/tunnel_bench.rs: axum + hyper, as the repository server) and
# curl on the host side.
#
# usage: bench/tunnel.sh [--mib N] [--rounds R] [--work DIR]   (defaults: 1024, 3, /tmp/haul-bench-tunnel)
#
# Directions: upload (host -> pbs, `curl -T` of an N MiB random file from /dev/shm; the
# backup direction) and download (pbs -> host, N MiB; the restore direction). Rounds
# alternate russh and OpenSSH; the table gives each run and the medians. Both clients
# use aes256-gcm@openssh.com (the pbs's first choice). MB/s = 10^6 bytes/s of body time
# as the receiving side measured it. CPU is the pbs side: the bench process for russh;
# the ssh client plus the local HTTP server for OpenSSH (sshd's own CPU is the same
# work for both and is not counted).
#
# The benchmark's key has no forced command (it must run curl): it exists only in DIR.
set -euo pipefail

mib=1024 rounds=3 work=/tmp/haul-bench-tunnel
while (($#)); do
  case $1 in
    --mib) mib=${2:?--mib needs a value}; shift 2 ;;
    --rounds) rounds=${2:?--rounds needs a value}; shift 2 ;;
    --work) work=${2:?--work needs a value}; shift 2 ;;
    -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "tunnel.sh: unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ $mib =~ ^[1-9][0-9]*$ && $rounds =~ ^[1-9][0-9]*$ ]] || { echo "tunnel.sh: --mib and --rounds want positive integers" >&2; exit 2; }
for t in /usr/sbin/sshd ssh ssh-keygen curl python3 /usr/bin/time; do
  command -v $t >/dev/null || { echo "tunnel.sh: needs $t (apt-get install -y openssh-server openssh-client curl python3 time)" >&2; exit 2; }
done

here=$(cd "$(dirname "$(readlink -f "$0")")" && pwd -P)
root=$(cd "$here/.." && pwd -P)
echo "building the tunnel bench (release) ..." >&2
(cd "$root" && cargo build --release -p haul-pbs --example tunnel_bench) >&2
bench=${CARGO_TARGET_DIR:-$root/target}/release/examples/tunnel_bench

rm -rf "$work"; mkdir -p "$work/sockets"; chmod 700 "$work/sockets"
work=$(cd "$work" && pwd -P)
mkdir -p /run/sshd
ssh-keygen -q -t ed25519 -N '' -C host -f "$work/hostkey"
ssh-keygen -q -t ed25519 -N '' -C bench -f "$work/id_ed25519"
user=$(id -un)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
echo "restrict,port-forwarding $(cat "$work/id_ed25519.pub")" >"$work/authorized_keys"
echo "[127.0.0.1]:$port $(cut -d' ' -f1,2 "$work/hostkey.pub")" >"$work/known_hosts"
cat >"$work/sshd_config" <<EOF
Port $port
ListenAddress 127.0.0.1
HostKey $work/hostkey
PidFile $work/sshd.pid
AuthorizedKeysFile $work/authorized_keys
StrictModes no
UsePAM no
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
AllowTcpForwarding remote
PermitListen none
AllowStreamLocalForwarding remote
StreamLocalBindUnlink yes
StreamLocalBindMask 0177
LogLevel ERROR
EOF
/usr/sbin/sshd -D -f "$work/sshd_config" -E "$work/sshd.log" &
sshd_pid=$!
data=/dev/shm/haul-tunnel-bench.$$
cleanup() { kill "$sshd_pid" 2>/dev/null || true; rm -f "$data"; }
trap cleanup EXIT
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.05; done
cat >"$work/pbs.toml" <<EOF
[[host]]
name = "bench"
address = "127.0.0.1"
port = $port
user = "$user"
identity = "$work/id_ed25519"
known_hosts = "$work/known_hosts"
socket_dir = "$work/sockets"
paths = ["/"]
EOF
echo "writing $mib MiB of random data to $data ..." >&2
head -c $((mib << 20)) /dev/urandom >"$data"
bytes=$((mib << 20))

ssh_=(ssh -q -T -o BatchMode=yes -o StrictHostKeyChecking=yes -o "UserKnownHostsFile=$work/known_hosts"
      -o ExitOnForwardFailure=yes -o StreamLocalBindUnlink=yes -c aes256-gcm@openssh.com
      -i "$work/id_ed25519" -p "$port")
curl_up="curl -sS --fail -T $data --unix-socket"
curl_down=(curl -sS --fail -o /dev/null -w '{"bytes":%{size_download},"seconds":%{time_total}}\n' --unix-socket)

declare -a rows
mbs() { python3 -c 'import json,sys; d=json.loads(sys.argv[1]); print("%.0f" % (d["bytes"]/d["seconds"]/1e6))' "$1"; }
cpu() { awk '{ print $2 + $3 }' "$1"; }

run_russh() { # direction round
  local t="$work/russh.$1.$2.time" out
  if [[ $1 == upload ]]; then
    out=$(/usr/bin/time -f '%e %U %S' -o "$t" "$bench" russh --config "$work/pbs.toml" bench --upload "$data")
  else
    out=$(/usr/bin/time -f '%e %U %S' -o "$t" "$bench" russh --config "$work/pbs.toml" bench --download "$bytes")
  fi
  check "$out" russh
  rows+=("$(printf '%-8s %-8s %5d %8s %8.2f' "$1" russh "$2" "$(mbs "$out")" "$(cpu "$t")")")
}

run_openssh() { # direction round
  local t="$work/openssh.$1.$2.time" ts="$work/serve.$1.$2.json" out sp
  local local_sock="$work/local.sock" remote_sock="$work/sockets/openssh.sock"
  "$bench" serve "$local_sock" >"$ts" &
  sp=$!
  for _ in $(seq 100); do [[ -S $local_sock ]] && break; sleep 0.02; done
  if [[ $1 == upload ]]; then
    out=$(/usr/bin/time -f '%e %U %S' -o "$t" "${ssh_[@]}" -R "$remote_sock:$local_sock" "$user@127.0.0.1" \
      "$curl_up $remote_sock http://pbs/sink")
  else
    out=$(/usr/bin/time -f '%e %U %S' -o "$t" "${ssh_[@]}" -R "$remote_sock:$local_sock" "$user@127.0.0.1" \
      "$(printf '%q ' "${curl_down[@]}" "$remote_sock" "http://pbs/source/$bytes")")
  fi
  kill -TERM "$sp"; wait "$sp" || true
  check "$out" openssh
  local c; c=$(python3 -c 'import json,sys; print(float(sys.argv[1]) + json.load(open(sys.argv[2]))["cpu_s"])' "$(cpu "$t")" "$ts")
  rows+=("$(printf '%-8s %-8s %5d %8s %8.2f' "$1" openssh "$2" "$(mbs "$out")" "$c")")
}

check() { # output who
  python3 -c 'import json,sys; d=json.loads(sys.argv[1]); assert d["bytes"]==int(sys.argv[2]), d' "$1" "$bytes" \
    || { echo "tunnel.sh: $2 moved the wrong number of bytes: $1" >&2; exit 1; }
}

for r in $(seq "$rounds"); do
  for dir in upload download; do
    echo "round $r/$rounds: $dir ..." >&2
    run_russh "$dir" "$r"
    run_openssh "$dir" "$r"
  done
done

exec > >(tee "$work/results.txt")
echo "raw tunnel throughput, $mib MiB per transfer, aes256-gcm, same sshd (127.0.0.1)"
printf '%-8s %-8s %5s %8s %8s\n' direction client round MB/s pbs_cpu_s
printf '%s\n' "${rows[@]}"
echo
printf '%s\n' "${rows[@]}" | python3 -c '
import sys, statistics
rows = [l.split() for l in sys.stdin if l.strip()]
for d in ("upload", "download"):
    med = {c: statistics.median(float(r[3]) for r in rows if r[0] == d and r[1] == c) for c in ("russh", "openssh")}
    cpu = {c: statistics.median(float(r[4]) for r in rows if r[0] == d and r[1] == c) for c in ("russh", "openssh")}
    print("%-8s median MB/s russh %5.0f  openssh %5.0f  ratio %.2fx (target >= 0.9)   pbs-side CPU s russh %.2f  openssh %.2f"
          % (d, med["russh"], med["openssh"], med["russh"] / med["openssh"], cpu["russh"], cpu["openssh"]))
'
echo "logs: $work"
