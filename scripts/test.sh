#!/usr/bin/env bash
# Installs what the tests need and runs all of them. Used by .ci/run; run it yourself
# on a fresh Debian machine with Rust: `scripts/test.sh` (as root, or with sudo for apt).
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages the tests use: a C compiler and pkg-config build zstd and aws-lc (for
# russh); OpenSSH's sshd and client for the SSH pull tests (each test starts its own
# sshd on 127.0.0.1); util-linux's setpriv runs a pull as an unprivileged user.
# Debian's python3-feedparser reads the RSS feeds and python3-prometheus-client the
# metrics (the tests call /usr/bin/python3); supervisor runs the daemon as in production.
# rdiff-backup (with attr, acl and its Python EA/ACL modules) builds the import fixtures.
# libcap2-bin's setcap and getcap give a fixture file a capability and read it back.
# prometheus brings promtool (checks the metrics and the example alert rules); chromium
# loads the status pages headless; iproute2 makes the network namespace a test binds in;
# man-db and systemd (for systemd-analyze) check the installed package; fuse3 (its
# fusermount3, with the kernel's /dev/fuse) mounts a repository. ceph-mon, ceph-osd,
# radosgw and ceph-common make the Ceph cluster (three OSDs, S3 through the RADOS
# Gateway) the object-storage tests start; curl makes its buckets.
packages=(build-essential pkg-config python3 python3-feedparser python3-prometheus-client
          supervisor openssh-server openssh-client util-linux
          rdiff-backup attr acl python3-pyxattr python3-pylibacl libcap2-bin
          prometheus chromium iproute2 man-db systemd fuse3
          ceph-mon ceph-osd radosgw ceph-common curl)
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -eq 0 ]]; then SUDO=(); else SUDO=(sudo); fi
  "${SUDO[@]}" apt-get update
  "${SUDO[@]}" apt-get install -y --no-install-recommends "${missing[@]}"
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# The integration tests run the real binaries: build them first.
cargo build --workspace --bins
# The Debian package: built, installed with dpkg, checked, purged (needs root).
if [[ $(id -u) -eq 0 ]]; then
  scripts/check-package.sh
else
  echo "scripts/check-package.sh skipped: it installs a package, run it as root"
fi
cargo test --workspace
