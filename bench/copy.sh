#!/usr/bin/env bash
# Benchmark (not a test): copies between repositories. haul and restic each back the
# same data up into a repository, then copy it, in one run:
#   local  into a second repository on the same disk (haul copy --to DIR, restic copy);
#   ssh    to another machine over SSH, played by a private sshd on 127.0.0.1: haul to
#          another pbs (copy --to pbs:NAME, the key's forced command `haul-pbs receive`
#          into a repository there), restic into a repository there over SFTP
#          (restic's way of reaching a machine by SSH);
#   again  the same SSH copies once more, nothing new (what a nightly copy costs).
# Then both copies made over SSH are restored and compared with the data. Page caches
# are dropped before every phase. Printed per phase: wall, user+sys CPU (of the command
# measured: the sshd side is not in it for either tool), peak RSS.
#
# usage: bench/copy.sh [--mib N] [--work DIR]   (defaults: 1024, /tmp/haul-bench-copy)
# env:   HAUL_BIN=dir     directory holding haul-pbs and haul-agent (default: the
#                         workspace's target/release, built if missing)
set -euo pipefail

mib=1024 work=/tmp/haul-bench-copy
. "$(dirname "$(readlink -f "$0")")/lib.sh"
bench_mib_work_args "$@"
bench_needs restic python3 jq ssh ssh-keygen /usr/sbin/sshd
bench_haul_binaries

rm -rf "$work" && mkdir -p "$work/logs" "$work/sshd" /run/sshd
work=$(cd "$work" && pwd -P)
data="$work/data" logs="$work/logs" d="$work/sshd"
exec > >(tee "$work/results.txt")
bench_passwords "$work"
echo "generating ${mib} MiB dataset in $data ..." >&2
python3 "$root/bench/gen_dataset.py" "$data" --mib "$mib" >"$logs/gen.log" 2>&1

# The other machine: haul's key runs `haul-pbs receive` into $work/haul-far; restic's
# key may only use SFTP (restic runs `ssh ... -s sftp`).
ssh-keygen -q -t ed25519 -N '' -f "$d/hostkey"
ssh-keygen -q -t ed25519 -N '' -f "$d/id_haul"
ssh-keygen -q -t ed25519 -N '' -f "$d/id_restic"
port=$(bench_free_port)
printf 'command="env HAUL_STATE_DIR=%s HAUL_CONFIG=/dev/null %s --repo %s --password-file %s --cache-dir %s receive",restrict %s\n' \
  "$work/far-state" "$haul" "$work/haul-far" "$work/password" "$work/far-cache" "$(cat "$d/id_haul.pub")" >"$d/authorized_keys"
printf 'restrict %s\n' "$(cat "$d/id_restic.pub")" >>"$d/authorized_keys"
printf '[127.0.0.1]:%s %s\n' "$port" "$(cut -d' ' -f1,2 "$d/hostkey.pub")" >"$d/known_hosts"
bench_sshd_config "$d" "$port"
echo "Subsystem sftp internal-sftp" >>"$d/sshd_config"
bench_login "$work"
/usr/sbin/sshd -D -f "$d/sshd_config" -E "$d/sshd.log" & sshd=$!
trap 'kill $sshd 2>/dev/null; bench_login_off' EXIT
sleep 1
printf '[[remote]]\nname = "far"\naddress = "127.0.0.1"\nport = %s\nuser = "%s"\nidentity = "%s"\nknown_hosts = "%s"\n' \
  "$port" "$login" "$d/id_haul" "$d/known_hosts" >"$work/pbs.toml"
sftp_command="ssh -i $d/id_restic -p $port -o UserKnownHostsFile=$d/known_hosts -o StrictHostKeyChecking=yes $login@127.0.0.1 -s sftp"

haul_=("$haul" --config "$work/pbs.toml" --repo "$work/haul" --password-file "$work/password" --cache-dir "$work/haul-cache")
restic_=(restic -r "$work/restic" --cache-dir "$work/restic-cache")
restic_far=(restic -r "sftp:$login@127.0.0.1:$work/restic-far" -o "sftp.command=$sftp_command" --cache-dir "$work/restic-cache")
"${haul_[@]}" init >"$logs/haul.init.log" 2>&1
"$haul" --repo "$work/haul-copy" --password-file "$work/password" init >"$logs/haul.init-copy.log" 2>&1
"$haul" --repo "$work/haul-far" --password-file "$work/password" init >"$logs/haul.init-far.log" 2>&1
"${restic_[@]}" -q init --repository-version 2 >"$logs/restic.init.log" 2>&1
for r in "$work/restic-copy" "sftp:$login@127.0.0.1:$work/restic-far"; do
  restic -r "$r" -o "sftp.command=$sftp_command" -q init --repository-version 2 \
    --copy-chunker-params --from-repo "$work/restic" --from-password-file "$work/password" \
    >>"$logs/restic.init-copies.log" 2>&1
done
echo "backing up ..." >&2
"${haul_[@]}" --json pull --local "$data" --state-dir "$work/state" >"$logs/haul.backup.log" 2>&1
"${restic_[@]}" backup -q "$data" >"$logs/restic.backup.log" 2>&1

declare -A wall
printf '%-7s %-10s %8s %8s %10s\n' tool phase wall_s cpu_s rss_mib
bench_measure restic local restic -r "$work/restic-copy" --cache-dir "$work/restic-cache" \
  copy --from-repo "$work/restic" --from-password-file "$work/password"
bench_measure haul local "${haul_[@]}" --json copy --to "$work/haul-copy" --to-password-file "$work/password"
for phase in ssh again; do
  bench_measure restic "$phase" "${restic_far[@]}" copy --from-repo "$work/restic" --from-password-file "$work/password"
  bench_measure haul "$phase" "${haul_[@]}" --json copy --to pbs:far
done

echo "restoring the copies made over SSH ..." >&2
"$haul" --repo "$work/haul-far" --password-file "$work/password" --cache-dir "$work/far-cache" \
  restore latest --target "$work/restore-haul" >"$logs/haul.restore.log" 2>&1
"${restic_far[@]}" restore latest --target "$work/restore-restic" >"$logs/restic.restore.log" 2>&1
for t in restic haul; do
  bench_verify "$t" "$data" "$work/restore-$t$data" "$logs/$t.verify.log"
done
bench_ratios local ssh again
echo "logs: $logs" >&2
