#!/usr/bin/env bash
# The offline installer for air-gapped offices: one archive holding koprogo's .deb
# and every .deb it needs that a minimal Debian system lacks, a local apt repository
# index over them, and install.sh.
#
#   packaging/offline-bundle.sh --deb target/debian/koprogo_<version>_amd64.deb
#                               [--out DIR] [--suite bookworm]
#
# Run as root on a machine that reaches a Debian mirror (the one its apt uses, or
# KOPROGO_MIRROR / KOPROGO_SECURITY_MIRROR), with debootstrap and dpkg-dev.
# What is "missing" is asked of apt itself: in a fresh minimal root of the suite
# (debootstrap --variant=minbase, cached under KOPROGO_CACHE), with the suite's
# current sources, `apt-get install --download-only ./koprogo.deb` downloads exactly
# the packages that root lacks, with the alternatives apt really picks.
# On the target (no network, no apt sources):
#   tar -xf koprogo-offline_<version>_amd64.tar && ./koprogo-offline_<version>_amd64/install.sh
# Prints the archive's path on its last line.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=packaging/lib.sh
. "$here/lib.sh"

deb='' out=target/debian suite=bookworm
while [[ $# -gt 0 ]]; do
  case $1 in
    --deb) [[ $# -ge 2 ]] || kp_die "--deb needs the koprogo .deb"; deb=$2; shift 2 ;;
    --out) [[ $# -ge 2 ]] || kp_die "--out needs a directory"; out=$2; shift 2 ;;
    --suite) [[ $# -ge 2 ]] || kp_die "--suite needs a Debian suite (bookworm)"; suite=$2; shift 2 ;;
    -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) kp_die "unknown argument $1 (see --help)" ;;
  esac
done
[[ -n $deb ]] || kp_die "--deb is required: build it first with packaging/build-deb.sh"
[[ -f $deb ]] || kp_die "--deb $deb: no such file: build it with packaging/build-deb.sh"
[[ $(id -u) -eq 0 ]] || kp_die "run as root (debootstrap and chroot need it)"
command -v dpkg-scanpackages >/dev/null || kp_die "dpkg-scanpackages is missing: apt-get install dpkg-dev"

version=$(dpkg-deb -f "$deb" Version)
arch=$(dpkg-deb -f "$deb" Architecture)
name=koprogo-offline_${version}_${arch}
started=$(date +%s)

work=$(mktemp -d /var/tmp/koprogo-bundle.XXXXXX)
root=$work/root
cleanup() {
  kp_remove_root "$root" || true
  rm -rf --one-file-system "$work"
}
trap cleanup EXIT

kp_log "minimal $suite root (the baseline: what it has is not bundled)"
kp_root "$root" "$suite"
mkdir -p "$root/bundle/debs"
cp "$deb" "$root/bundle/debs/"
kp_log "asking apt in that root what installing $(basename "$deb") downloads"
# Recommends are left out (tls.mode = internal needs nothing more); a chroot has
# no /proc or /dev of its own, which apt-get --download-only does not need.
chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
  sh -c 'apt-get update -qq &&
         apt-get install -qq -y --download-only --no-install-recommends \
           -o Dir::Cache::archives=/bundle/debs /bundle/debs/'"$(basename "$deb")" \
  > "$work/apt.log" 2>&1 || { tail -n 30 "$work/apt.log" >&2; kp_die "apt-get --download-only failed in the $suite root"; }
rm -rf "$root/bundle/debs/partial" "$root/bundle/debs/lock"

dest=$work/$name
mkdir -p "$dest/debs"
mv "$root"/bundle/debs/*.deb "$dest/debs/"
(cd "$dest/debs" && dpkg-scanpackages --multiversion . /dev/null 2>/dev/null > Packages &&
  gzip -9kn Packages && sha256sum ./*.deb > SHA256SUMS)
count=$(find "$dest/debs" -name "*.deb" | wc -l)

cat > "$dest/install.sh" <<'EOF'
#!/bin/sh
# Installs koprogo and the Debian packages it needs from this directory only: no
# network, no apt sources needed. Run as root: ./install.sh
set -eu
here=$(cd "$(dirname "$0")" && pwd)
[ "$(id -u)" -eq 0 ] || { echo "install.sh: run it as root (sudo ./install.sh)" >&2; exit 1; }
. /etc/os-release
suite=@SUITE@
if [ "${VERSION_CODENAME:-}" != "$suite" ] && [ "${1:-}" != "--force" ]; then
  echo "install.sh: this bundle is for Debian $suite, this machine is ${PRETTY_NAME:-unknown}:" \
       "use the bundle made for it, or ./install.sh --force to try anyway" >&2
  exit 1
fi
echo "checking the packages (SHA256SUMS)"
(cd "$here/debs" && sha256sum --quiet -c SHA256SUMS) ||
  { echo "install.sh: some .deb files are damaged: copy the archive again" >&2; exit 1; }

# A throw-away apt configuration whose only source is ./debs.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/lists/partial" "$tmp/parts"
echo "deb [trusted=yes] file:$here/debs ./" > "$tmp/sources.list"
apt_local() {
  DEBIAN_FRONTEND=noninteractive apt-get -q \
    -o Dir::Etc::SourceList="$tmp/sources.list" -o Dir::Etc::SourceParts="$tmp/parts" \
    -o Dir::State::Lists="$tmp/lists" -o Dir::Cache::pkgcache= -o Dir::Cache::srcpkgcache= \
    -o APT::Sandbox::User=root -o Acquire::Languages=none "$@"
}
apt_local update
apt_local install -y --no-install-recommends koprogo

echo
if [ -d /run/systemd/system ]; then
  echo "waiting for koprogo to be ready (up to 3 minutes)"
  i=0
  while [ $i -lt 180 ]; do
    if koprogo status >/dev/null 2>&1; then break; fi
    sleep 1; i=$((i + 1))
  done
  koprogo status || true
else
  echo "no systemd running here: start koprogo with: koprogo run (as root; it drops to the koprogo user)"
fi
cat <<MSG

koprogo is installed. The site uses its own local certificate authority (tls.mode =
"internal" in /etc/koprogo/koprogo.toml). First set domain (the name the PCs use)
and aliases in /etc/koprogo/koprogo.toml, then
  systemctl restart koprogo
Then, for the office PCs to trust the site, export the CA (it is limited to the names
configured now) and import it on each PC (or in the browsers):
  koprogo ca export /root/koprogo-ca.pem
MSG
EOF
sed -i "s/@SUITE@/$suite/" "$dest/install.sh"
chmod 0755 "$dest/install.sh"
cat > "$dest/README" <<EOF
koprogo $version offline installer for Debian $suite ($arch)

  tar -xf $name.tar
  cd $name && ./install.sh

debs/ holds koprogo and the $((count - 1)) Debian packages it needs that a minimal
Debian $suite lacks (a flat apt repository; install.sh uses it as apt's only source).
Made on $(date -u +%Y-%m-%d) from $(kp_mirror).
EOF

mkdir -p "$out"
tar -cf "$out/$name.tar" -C "$work" "$name"
kp_log "bundle: $out/$name.tar ($count packages, $(du -h "$out/$name.tar" | cut -f1), $(( $(date +%s) - started )) s)"
echo "$out/$name.tar"
