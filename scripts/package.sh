#!/usr/bin/env bash
# Builds the Debian package of haul: target/deb/haul_<version>_<arch>.deb.
#
#   scripts/package.sh            release binaries (cargo build --release)
#   scripts/package.sh --debug    the debug binaries of `cargo build` (to test the packaging)
#
# It holds the three binaries in /usr/bin, the hardened systemd unit, a tmpfiles.d entry,
# manual pages (made by `haul-pbs man-pages` and `haul-wrapper --man-page`, clap_mangen),
# shell completions (`haul-pbs completions`, clap_complete) and the examples. Built with
# dpkg-deb alone: no debhelper, no cargo-deb to build first.
set -euo pipefail
cd "$(dirname "$0")/.."

profile=release
compress=()
if [[ "${1:-}" == --debug ]]; then
  # Debug binaries are large, and this package is only for testing: not compressed.
  profile=debug
  compress=(-Znone)
fi
if [[ $profile == release ]]; then
  cargo build --release --workspace --bins
else
  cargo build --workspace --bins
fi
bin=target/$profile
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
arch=$(dpkg --print-architecture)
root=target/deb/root
rm -rf "$root"
install -d "$root/DEBIAN" "$root/usr/bin" "$root/lib/systemd/system" "$root/usr/lib/tmpfiles.d" \
  "$root/usr/share/man/man1" "$root/usr/share/bash-completion/completions" \
  "$root/usr/share/zsh/vendor-completions" "$root/usr/share/fish/vendor_completions.d" \
  "$root/usr/share/doc/haul/examples"

for b in haul-pbs haul-agent haul-wrapper; do
  install -m 0755 "$bin/$b" "$root/usr/bin/$b"
done
install -m 0644 packaging/haul-pbs.service "$root/lib/systemd/system/haul-pbs.service"
install -m 0644 packaging/haul.tmpfiles "$root/usr/lib/tmpfiles.d/haul.conf"

"$bin/haul-pbs" man-pages "$root/usr/share/man/man1"
"$bin/haul-wrapper" --man-page > "$root/usr/share/man/man1/haul-wrapper.1"
gzip -9n "$root"/usr/share/man/man1/*.1

"$bin/haul-pbs" completions bash > "$root/usr/share/bash-completion/completions/haul-pbs"
"$bin/haul-pbs" completions zsh > "$root/usr/share/zsh/vendor-completions/_haul-pbs"
"$bin/haul-pbs" completions fish > "$root/usr/share/fish/vendor_completions.d/haul-pbs.fish"

install -m 0644 examples/pbs.toml examples/wrapper.toml examples/alerts.yml \
  examples/supervisord.conf "$root/usr/share/doc/haul/examples/"
cat > "$root/usr/share/doc/haul/copyright" <<COPYRIGHT
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: haul
License: Apache-2.0
 On Debian systems the full text of the Apache License 2.0 is in
 /usr/share/common-licenses/Apache-2.0.
COPYRIGHT

install -m 0755 packaging/postinst packaging/prerm packaging/postrm "$root/DEBIAN/"
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
cat > "$root/DEBIAN/control" <<CONTROL
Package: haul
Version: $version
Architecture: $arch
Maintainer: haul developers <haul@localhost>
Installed-Size: $size
Depends: libc6 (>= 2.34), passwd
Recommends: libcap2-bin, fuse3
Suggests: openssh-server, prometheus
Section: admin
Priority: optional
Description: pull-mode backups over SSH
 haul's backup server (haul-pbs) pulls backups from hosts over SSH into
 deduplicated, encrypted repositories it alone holds keys for, and pushes
 standby copies to clone hosts. On a source host, haul-wrapper is the SSH
 forced command that admits only what its policy allows, and haul-agent reads
 the files. Includes a hardened systemd unit, manual pages and completions.
CONTROL

out="target/deb/haul_${version}_${arch}.deb"
dpkg-deb --root-owner-group "${compress[@]}" --build "$root" "$out" >/dev/null
echo "$out"
