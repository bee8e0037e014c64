#!/usr/bin/env bash
# Benchmark (not a test): is the SSH tunnel the bottleneck of a pull? Pulls the same
# dataset with the agent as a local child (`pull --local`) and over SSH through a private
# OpenSSH sshd on 127.0.0.1 and haul-wrapper (`pull HOST`), with several SSH window
# sizes, each into a fresh repository, page caches dropped before each run; and restic
# backing the same data up over the same sshd with its sftp backend. cpu_s is
# the pbs command's own CPU: locally that includes the agent, over SSH the agent and
# sshd run under sshd and are not counted. With --rounds N, N-1 more rounds follow, each
# an SSH pull with the default window and a restic backup, alternating, and the medians
# close the report: on a machine whose speed drifts, only interleaved rounds compare.
#
# usage: bench/ssh_pull.sh [--mib N] [--work DIR] [--rounds N]
#        (defaults: 1024, /tmp/haul-bench-ssh, 1)
# needs: openssh-server, openssh-client, restic, jq, python3, root (sshd, drop_caches)
set -euo pipefail
mib=1024 work=/tmp/haul-bench-ssh rounds=1
while (($#)); do
  case $1 in
    --mib) mib=${2:?}; shift 2 ;;
    --work) work=${2:?}; shift 2 ;;
    --rounds) rounds=${2:?}; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "ssh_pull.sh: unknown argument: $1" >&2; exit 2 ;;
  esac
done
root=$(cd "$(dirname "$(readlink -f "$0")")/.." && pwd -P)
. "$root/bench/lib.sh"
(cd "$root" && cargo build --release -q -p haul-pbs -p haul-agent -p haul-wrapper)
bin=${CARGO_TARGET_DIR:-$root/target}/release
rm -rf "$work" && mkdir -p "$work/sshd/sockets" /run/sshd && chmod 700 "$work/sshd/sockets"
data=$work/data
python3 "$root/bench/gen_dataset.py" "$data" --mib "$mib" >/dev/null
d=$work/sshd
ssh-keygen -q -t ed25519 -N '' -f "$d/hostkey" && ssh-keygen -q -t ed25519 -N '' -f "$d/id_ed25519"
ssh-keygen -q -t ed25519 -N '' -f "$d/id_restic"
port=$(bench_free_port)
printf 'agent = "%s"\nsocket_dir = "%s"\nbackup_roots = ["%s"]\n' "$bin/haul-agent" "$d/sockets" "$data" >"$d/wrapper.toml"
printf 'command="%s --policy %s",restrict,port-forwarding %s\n' "$bin/haul-wrapper" "$d/wrapper.toml" "$(cat "$d/id_ed25519.pub")" >"$d/authorized_keys"
printf 'restrict %s\n' "$(cat "$d/id_restic.pub")" >>"$d/authorized_keys"   # restic: sftp only
printf '[127.0.0.1]:%s %s\n' "$port" "$(cut -d' ' -f1,2 "$d/hostkey.pub")" >"$d/known_hosts"
bench_sshd_config "$d" "$port"
echo "Subsystem sftp internal-sftp" >>"$d/sshd_config"
bench_login "$work"
/usr/sbin/sshd -D -f "$d/sshd_config" -E "$d/sshd.log" & sshd=$!
trap 'kill $sshd 2>/dev/null; bench_login_off' EXIT
sleep 1
printf 'x\n' >"$work/pass"
# Machine-wide busy CPU (user, nice, system, irq, softirq, steal) in seconds: with
# nothing else running, the CPU of both sides (pbs, agent, sshd; restic, its ssh client
# and sshd's sftp server).
hz=$(getconf CLK_TCK)
busy() { awk -v hz="$hz" '/^cpu /{printf "%.2f", ($2+$3+$4+$7+$8+$9)/hz}' /proc/stat; }
printf '%-22s %8s %8s %10s %10s %10s\n' run wall_s cpu_s agent_mib pbs_mib all_cpu_s
one() { # label, pull args...
  local label=$1; shift
  rm -rf "$work/repo" "$work/cache" "$work/state"
  "$bin/haul-pbs" --repo "$work/repo" --password-file "$work/pass" init >/dev/null
  sync; echo 3 >/proc/sys/vm/drop_caches
  local b0; b0=$(busy)
  /usr/bin/time -f '%e %U %S' -o "$work/t" "$bin/haul-pbs" --repo "$work/repo" --password-file "$work/pass" \
    --cache-dir "$work/cache" --json pull "$@" --state-dir "$work/state" >"$work/$label.log"
  local all; all=$(echo "$(busy) - $b0" | bc)
  read -r w u s <"$work/t"
  local rec; rec=$(jq -c 'select(.type=="run") | .run' "$work/$label.log")
  [[ $(jq -r .status <<<"$rec") == ok ]] || { echo "$label failed: $(jq -r .error <<<"$rec")"; return; }
  printf '%-22s %8s %8.2f %10d %10d %10.2f\n' "$label" "$w" "$(echo "$u + $s" | bc)" \
    $(( $(jq .agent_peak_rss_kib <<<"$rec") / 1024 )) $(( $(jq .pbs_peak_rss_kib <<<"$rec") / 1024 )) "$all"
  echo "$w" >>"$work/walls.$label"
}
config() { # window in MiB
  printf '[[host]]\nname = "bench"\naddress = "127.0.0.1"\nport = %s\nuser = "%s"\nidentity = "%s"\nknown_hosts = "%s"\nsocket_dir = "%s"\nwindow_mib = %s\npaths = ["%s"]\n' \
    "$port" "$login" "$d/id_ed25519" "$d/known_hosts" "$d/sockets" "$1" "$data" >"$work/pbs.toml"
}

# restic over sftp through the same sshd, into a fresh repository.
export RESTIC_PASSWORD=bench
sftp_cmd="ssh -i $d/id_restic -p $port -o UserKnownHostsFile=$d/known_hosts -o StrictHostKeyChecking=yes $login@127.0.0.1 -s sftp"
restic_run() {
  rm -rf "$work/restic-repo"
  restic -q -r "sftp:$login@127.0.0.1:$work/restic-repo" -o sftp.command="$sftp_cmd" init --repository-version 2 >/dev/null
  sync; echo 3 >/proc/sys/vm/drop_caches
  local b0; b0=$(busy)
  /usr/bin/time -f '%e %U %S %M' -o "$work/t" restic -q -r "sftp:$login@127.0.0.1:$work/restic-repo" \
    -o sftp.command="$sftp_cmd" --cache-dir "$work/restic-cache" backup "$data" >"$work/restic.log" 2>&1
  local all; all=$(echo "$(busy) - $b0" | bc)
  read -r w u s m <"$work/t"
  printf '%-22s %8s %8.2f %10d %10s %10.2f   (restic: cpu and rss of restic itself)\n' "restic sftp" "$w" "$(echo "$u + $s" | bc)" $((m / 1024)) - "$all"
  echo "$w" >>"$work/walls.restic"
}

rm -f "$work"/walls.*
one local --local "$data"
for win in 2 8 32; do
  config "$win"
  one "ssh window ${win} MiB" bench --config "$work/pbs.toml"
done
restic_run
config 8
for ((r = 2; r <= rounds; r++)); do
  one "ssh window 8 MiB" bench --config "$work/pbs.toml"
  restic_run
done
if ((rounds > 1)); then
  paste "$work/walls.ssh window 8 MiB" "$work/walls.restic" | python3 -c '
import statistics, sys
rows = [tuple(map(float, l.split())) for l in sys.stdin if l.strip()]
haul, restic = [r[0] for r in rows], [r[1] for r in rows]
ratios = [h / r for h, r in rows]
print("rounds: " + ", ".join(f"{h:.2f}/{r:.2f} s = {h / r:.3f}x" for h, r in rows))
print(f"median SSH pull {statistics.median(haul):.2f} s, median restic {statistics.median(restic):.2f} s: "
      f"{statistics.median(haul) / statistics.median(restic):.3f}x; median of the ratios "
      f"{statistics.median(ratios):.3f}x, mean {statistics.mean(ratios):.3f}x")'
fi
