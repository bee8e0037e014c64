#!/usr/bin/env bash
# Benchmark (not a test): pushes to a clone host, side by side with what people use for
# standby copies, on the same data in one run, page caches dropped before each timed
# step. A private OpenSSH sshd on 127.0.0.1 plays the clone (haul-wrapper for haul; a
# plain key for rsync).
#
#   1. full: `haul-pbs push` of the dataset into an empty standby directory, against
#      `restic restore` of the same data (restic's local repository) and against
#      `rsync -a --delete` over the same sshd into an empty directory;
#   2. incremental: after `gen_dataset.py --mutate` and a new pull, `haul-pbs push`
#      against `rsync -a --delete` (each onto its copy of step 1), then a push with
#      nothing changed (what it sends is the snapshot's trees);
#   3. WAN: the pull of the dataset and the full push, on loopback, through the
#      delaying proxy (pbs/examples/delay_proxy.rs; this kernel has no `tc netem`) with
#      no delay, and through it adding 50 ms to every round trip (25 ms each way), and
#      the ratios. The proxy copies every byte on the same two cores: the run through
#      it without delay tells its own cost from the link's.
#
# With --loop GIB, the clone's directory and restic's restore target are each a fresh
# ext4 image of that size (with a journal, as a server's disk has) mounted by loop: the
# files a push or a restore creates then go to a filesystem like a clone's, whatever
# the machine's own disk is (this one's has no journal, and its inode allocator looks
# up each candidate's inode table block: a third of a full push's CPU).
#
# Reported per step: wall, bytes sent (haul: response bytes its server counted; rsync:
# its --stats "Total bytes sent"), peak RSS of each side (pbs and clone agent from the
# run record; restic and the local rsync from /usr/bin/time).
#
# usage: bench/push.sh [--mib N] [--work DIR] [--no-wan | --wan-only] [--loop GIB]
#        (defaults: 1024 MiB, /tmp/haul-bench-push)
# needs: root (sshd, drop_caches), openssh-server, openssh-client, rsync, restic, jq, python3, time
set -euo pipefail
mib=1024 work=/tmp/haul-bench-push wan=1 local=1 loop=
. "$(dirname "$(readlink -f "$0")")/lib.sh"
while (($#)); do
  case $1 in
    --mib) mib=${2:?--mib needs a value}; bench_count --mib "$mib"; shift 2 ;;
    --work) work=${2:?--work needs a value}; shift 2 ;;
    --no-wan) wan=; shift ;;
    --wan-only) local=; shift ;;
    --loop) loop=${2:?--loop needs a size in GiB}; bench_count --loop "$loop"; shift 2 ;;
    -h|--help) bench_help ;;
    *) bench_unknown "$1" ;;
  esac
done
bench_needs restic rsync jq python3 ssh ssh-keygen /usr/sbin/sshd
[[ -z $loop ]] || bench_needs mkfs.ext4 losetup
images_off() { [[ -z $loop ]] || { bench_image_off "$work/clone"; bench_image_off "$work/restic-restore"; }; }
images_off
(cd "$root" && cargo build --release -q -p haul-pbs -p haul-agent -p haul-wrapper \
  && cargo build --release -q -p haul-pbs --example delay_proxy)
bin=${CARGO_TARGET_DIR:-$root/target}/release
export RESTIC_PASSWORD=bench
unset HAUL_REPO HAUL_PASSWORD

rm -rf "$work" && mkdir -p "$work/sshd/sockets" "$work/clone" /run/sshd && chmod 700 "$work/sshd/sockets"
[[ -z $loop ]] || bench_image_on "$work/clone" "$loop" >/dev/null
data=$work/data
echo "generating $mib MiB ..." >&2
python3 "$root/bench/gen_dataset.py" "$data" --mib "$mib" >/dev/null
d=$work/sshd
ssh-keygen -q -t ed25519 -N '' -f "$d/hostkey"
ssh-keygen -q -t ed25519 -N '' -f "$d/id_ed25519"
ssh-keygen -q -t ed25519 -N '' -f "$d/id_rsync"
port=$(bench_free_port)
slow=$(bench_free_port)
flat=$(bench_free_port)
printf 'agent = "%s"\nsocket_dir = "%s"\nbackup_roots = ["%s"]\nrestore_targets = ["%s"]\n' \
  "$bin/haul-agent" "$d/sockets" "$data" "$work/clone" >"$d/wrapper.toml"
printf 'command="%s --policy %s",restrict,port-forwarding %s\n' "$bin/haul-wrapper" "$d/wrapper.toml" "$(cat "$d/id_ed25519.pub")" >"$d/authorized_keys"
printf 'restrict %s\n' "$(cat "$d/id_rsync.pub")" >>"$d/authorized_keys"   # rsync: runs `rsync --server`
{
  printf '[127.0.0.1]:%s %s\n' "$port" "$(cut -d' ' -f1,2 "$d/hostkey.pub")"
  printf '[127.0.0.1]:%s %s\n' "$slow" "$(cut -d' ' -f1,2 "$d/hostkey.pub")"
  printf '[127.0.0.1]:%s %s\n' "$flat" "$(cut -d' ' -f1,2 "$d/hostkey.pub")"
} >"$d/known_hosts"
bench_sshd_config "$d" "$port"
bench_login "$work"
/usr/sbin/sshd -D -f "$d/sshd_config" -E "$d/sshd.log" & sshd=$!
"$bin/examples/delay_proxy" "127.0.0.1:$slow" "127.0.0.1:$port" 25 & proxy=$!
"$bin/examples/delay_proxy" "127.0.0.1:$flat" "127.0.0.1:$port" 0 & proxy0=$!
trap 'kill $sshd $proxy $proxy0 2>/dev/null; bench_login_off; images_off' EXIT
sleep 1

# The pbs: host `bench` (its agent run here) pushed to clone `clone` through the sshd,
# directly or through the delaying proxy.
config() { # file, clone port, host transport (local | ssh), host port
  {
    printf '[server]\nstate_dir = "%s"\n\n' "$work/state"
    if [[ $3 == local ]]; then
      printf '[[host]]\nname = "bench"\naddress = "localhost"\ntransport = "local"\npaths = ["%s"]\n\n' "$data"
    else
      printf '[[host]]\nname = "bench"\naddress = "127.0.0.1"\nport = %s\nuser = "%s"\nidentity = "%s"\nknown_hosts = "%s"\nsocket_dir = "%s"\npaths = ["%s"]\n\n' \
        "$4" "$login" "$d/id_ed25519" "$d/known_hosts" "$d/sockets" "$data"
    fi
    printf '[[clone]]\nname = "clone"\naddress = "127.0.0.1"\nport = %s\nuser = "%s"\nidentity = "%s"\nknown_hosts = "%s"\nsocket_dir = "%s"\nstandby_dir = "%s"\n' \
      "$2" "$login" "$d/id_ed25519" "$d/known_hosts" "$d/sockets" "$work/clone"
  } >"$1"
}
config "$work/pbs.toml" "$port" local
pbs=("$bin/haul-pbs" --config "$work/pbs.toml" --cache-dir "$work/cache")
ssh_rsync="ssh -i $d/id_rsync -p $port -o UserKnownHostsFile=$d/known_hosts -o StrictHostKeyChecking=yes"

drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }
printf '%-34s %9s %12s %10s %10s\n' step wall_s sent_mib pbs_mib clone_mib
row() { printf '%-34s %9s %12s %10s %10s\n' "$@"; }
mib_of() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }

haul_push() { # label, pbs args...
  local label=$1; shift
  drop
  /usr/bin/time -f '%e %M' -o "$work/t" "${pbs[@]}" "$@" --json push bench >"$work/$label.log" 2>&1 || true
  local rec w m
  rec=$(jq -c 'select(.type=="run") | .run' "$work/$label.log")
  [[ $(jq -r .status <<<"$rec") == ok ]] || { echo "$label failed: $(jq -r .error <<<"$rec")"; return; }
  read -r w m <"$work/t"
  row "$label" "$w" "$(mib_of "$(jq .details.push.bytes_sent <<<"$rec")")" $((m / 1024)) $(($(jq .agent_peak_rss_kib <<<"$rec") / 1024))
  echo "$w" >"$work/wall.$label"
}
rsync_copy() { # label, target
  drop
  /usr/bin/time -f '%e %M' -o "$work/t" rsync -a --delete --stats -e "$ssh_rsync" "$data/" "$login@127.0.0.1:$2/" >"$work/$1.log" 2>&1
  local w m sent
  read -r w m <"$work/t"
  sent=$(awk -F': ' '/^Total bytes sent/ { gsub(/,/, "", $2); print $2 }' "$work/$1.log")
  row "$1" "$w" "$(mib_of "$sent")" "$((m / 1024)) (rsync)" -
}

echo "pulling into the pbs's repository ..." >&2
"${pbs[@]}" pull bench >/dev/null
if [[ -n $local ]]; then
echo "backing up with restic ..." >&2
restic -q -r "$work/restic" init --repository-version 2 >/dev/null
restic -q -r "$work/restic" --cache-dir "$work/restic-cache" backup "$data" >/dev/null

haul_push "full: haul push"
[[ -z $loop ]] || bench_image_on "$work/restic-restore" "$loop" >/dev/null
drop
/usr/bin/time -f '%e %M' -o "$work/t" restic -q -r "$work/restic" --cache-dir "$work/restic-cache" restore latest --target "$work/restic-restore" >/dev/null
read -r w m <"$work/t"
row "full: restic restore" "$w" - "$((m / 1024)) (restic)" -
if [[ -n $loop ]]; then bench_image_off "$work/restic-restore"; else rm -rf "$work/restic-restore"; fi
rsync_copy "full: rsync -a --delete" "$work/clone/rsync"
diff -r --no-dereference "$data" "$work/clone/bench$data" >/dev/null && echo "(the standby copy equals the data)" || echo "THE STANDBY COPY DIFFERS FROM THE DATA"

python3 "$root/bench/gen_dataset.py" "$data" --mutate >/dev/null
"${pbs[@]}" pull bench >/dev/null
haul_push "incremental: haul push"
rsync_copy "incremental: rsync -a --delete" "$work/clone/rsync"
diff -r --no-dereference "$data" "$work/clone/bench$data" >/dev/null && echo "(the standby copy equals the data)" || echo "THE STANDBY COPY DIFFERS FROM THE DATA"
# Nothing changed: what a push sends then is the snapshot's trees.
haul_push "unchanged: haul push"
fi

[[ -n $wan ]] || exit 0
# WAN: an SSH pull (fresh repository each) and a full push (fresh standby directory
# each), on loopback and through the proxy.
pull_over() { # label, host port
  config "$work/pbs-wan.toml" "$2" ssh "$2"
  rm -rf "$work/state"
  drop
  local t0 t1
  t0=$(date +%s.%N)
  "$bin/haul-pbs" --config "$work/pbs-wan.toml" --cache-dir "$work/cache-wan" --json pull bench >"$work/$1.log" 2>&1 || true
  t1=$(date +%s.%N)
  jq -e 'select(.type=="run") | .run.status == "ok"' "$work/$1.log" >/dev/null || { echo "$1 failed"; return; }
  row "$1" "$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')" - - -
  awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }' >"$work/wall.$1"
}
push_over() { # label, clone port
  config "$work/pbs-wan.toml" "$2" ssh "$2"
  rm -rf "$work/clone/bench" "$work/clone/.bench.haul-standby"
  pbs=("$bin/haul-pbs" --config "$work/pbs-wan.toml" --cache-dir "$work/cache-wan")
  haul_push "$1"
}
pull_over "wan: pull, loopback" "$port"
pull_over "wan: pull, proxy 0 ms" "$flat"
pull_over "wan: pull, 50 ms RTT" "$slow"
push_over "wan: push, loopback" "$port"
push_over "wan: push, proxy 0 ms" "$flat"
push_over "wan: push, 50 ms RTT" "$slow"
for what in pull push; do
  for base in loopback "proxy 0 ms"; do
    awk -v l="$(cat "$work/wall.wan: $what, $base")" -v s="$(cat "$work/wall.wan: $what, 50 ms RTT")" -v w="$what" -v b="$base" \
      'BEGIN { printf "%s at 50 ms RTT keeps %.0f%% of its throughput on %s\n", w, 100 * l / s, b }'
  done
done
