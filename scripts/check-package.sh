#!/usr/bin/env bash
# Builds the Debian package (scripts/package.sh --debug), installs it with dpkg on this
# machine, checks what a user gets (the binaries, manual pages, completions, the unit,
# the user and its socket directory), then purges it. Run as root (scripts/test.sh does).
set -euo pipefail
cd "$(dirname "$0")/.."
fail() { echo "check-package: FAILED: $*" >&2; exit 1; }

deb=$(scripts/package.sh --debug | tail -1)
dpkg-deb --info "$deb" >/dev/null || fail "dpkg-deb cannot read $deb"
if dpkg -s haul >/dev/null 2>&1; then
  fail "haul is installed on this machine: this check would replace and purge it; run it elsewhere"
fi
trap 'dpkg --purge haul >/dev/null 2>&1 || true' EXIT
dpkg -i "$deb" || fail "dpkg -i $deb"

version=$(/usr/bin/haul-pbs --version) || fail "haul-pbs --version"
[[ $version == "haul-pbs "* ]] || fail "haul-pbs --version said: $version"
/usr/bin/haul-wrapper --version >/dev/null || fail "haul-wrapper --version"
/usr/bin/haul-agent --version >/dev/null || fail "haul-agent --version"
man -w haul-pbs >/dev/null || fail "man -w haul-pbs"
MANPAGER=cat man haul-pbs 2>/dev/null | grep -q "The haul backup server" || fail "man haul-pbs"
MANPAGER=cat man haul-pbs-ssh-setup 2>/dev/null | grep -q -- "--from" || fail "man haul-pbs-ssh-setup"
MANPAGER=cat man haul-wrapper 2>/dev/null | grep -q "policy" || fail "man haul-wrapper"
haul-pbs completions bash | grep -q "complete -F _haul__pbs" || fail "haul-pbs completions bash"
[[ -f /usr/share/bash-completion/completions/haul-pbs ]] || fail "no bash completion installed"
# The completion, loaded in bash, completes a command.
words=$(bash -c 'source /usr/share/bash-completion/completions/haul-pbs
  COMP_WORDS=(haul-pbs ssh-s); COMP_CWORD=1; COMP_LINE="haul-pbs ssh-s"; COMP_POINT=${#COMP_LINE}
  _haul__pbs haul-pbs ssh-s haul-pbs; echo "${COMPREPLY[@]}"')
[[ $words == *ssh-setup* ]] || fail "bash completion of 'haul-pbs ssh-s' gave: $words"
getent passwd haul >/dev/null || fail "no user haul"
[[ -f /usr/lib/tmpfiles.d/haul.conf ]] || fail "no tmpfiles.d entry"
unit=/lib/systemd/system/haul-pbs.service
for d in "Type=notify" "KillMode=mixed" "ProtectSystem=strict" "NoNewPrivileges=yes" "PrivateTmp=yes" "ReadWritePaths=/var/lib/haul"; do
  grep -qx "$d" "$unit" || fail "$unit lacks $d"
done
if command -v systemd-analyze >/dev/null 2>&1; then
  systemd-analyze verify "$unit" || fail "systemd-analyze verify $unit"
fi
dpkg --purge haul >/dev/null || fail "dpkg --purge haul"
[[ ! -e /usr/bin/haul-pbs ]] || fail "purge left /usr/bin/haul-pbs"
echo "check-package: OK: $deb installs, and its binaries, manual pages, completions and unit work"
