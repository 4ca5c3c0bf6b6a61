#!/usr/bin/env bash
# The offline installer for air-gapped offices: one archive holding koprogo's .deb
# and every .deb it needs that a minimal Debian system lacks, a local apt repository
# index over them, and install.sh.
#
#   packaging/offline-bundle.sh --deb target/debian/koprogo_<version>_amd64.deb
#                               [--out DIR] [--suite bookworm]
#   packaging/offline-bundle.sh --from-repo REPO --keyring KEYRING [--version V]
#                               [--repo-suite stable] [--out DIR] [--suite bookworm]
#
# --from-repo takes koprogo's .deb from a repository made by build-repo.sh (a
# directory: a local copy, or the one about to be uploaded), trusting nothing in it
# but what the key signed: REPO/dists/<repo-suite>/InRelease is checked with gpgv
# against KEYRING (the public keyring you trust, e.g. the key's own
# koprogo-archive-keyring.pgp; not the copy inside REPO, which whoever can write REPO
# can replace), the Packages index against the SHA256 the signed Release gives, and
# the .deb (copied out first) against the SHA256 of its Packages entry. --version
# picks a version (default: the highest in the repository).
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

deb='' out=target/debian suite=bookworm from_repo='' keyring='' want_version='' repo_suite=stable
while [[ $# -gt 0 ]]; do
  case $1 in
    --deb) [[ $# -ge 2 ]] || kp_die "--deb needs the koprogo .deb"; deb=$2; shift 2 ;;
    --from-repo) [[ $# -ge 2 ]] || kp_die "--from-repo needs the repository's directory (made by build-repo.sh)"; from_repo=$2; shift 2 ;;
    --keyring) [[ $# -ge 2 ]] || kp_die "--keyring needs the repository's public keyring (koprogo-archive-keyring.pgp)"; keyring=$2; shift 2 ;;
    --version) [[ $# -ge 2 ]] || kp_die "--version needs a koprogo version"; want_version=$2; shift 2 ;;
    --repo-suite) [[ $# -ge 2 ]] || kp_die "--repo-suite needs the repository's suite (stable)"; repo_suite=$2; shift 2 ;;
    --out) [[ $# -ge 2 ]] || kp_die "--out needs a directory"; out=$2; shift 2 ;;
    --suite) [[ $# -ge 2 ]] || kp_die "--suite needs a Debian suite (bookworm)"; suite=$2; shift 2 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) kp_die "unknown argument $1 (see --help)" ;;
  esac
done
[[ $(id -u) -eq 0 ]] || kp_die "run as root (debootstrap and chroot need it)"
command -v dpkg-scanpackages >/dev/null || kp_die "dpkg-scanpackages is missing: apt-get install dpkg-dev"

work=$(mktemp -d /var/tmp/koprogo-bundle.XXXXXX)
root=$work/root
cleanup() {
  kp_remove_root "$root" || true
  rm -rf --one-file-system "$work"
}
trap cleanup EXIT

# The koprogo .deb of a signed repository, checked from the signature down.
# Sets deb (a verified copy in $work).
deb_from_repo() {
  local repo=$1 rel=$work/Release idx=main/binary-amd64/Packages line want_sha want_size sha size
  local stanza filename
  [[ -z $deb ]] || kp_die "--deb and --from-repo exclude each other: give one"
  [[ -n $keyring ]] || kp_die "--from-repo needs --keyring FILE: the repository's public keyring you trust (not the copy inside $repo)"
  [[ -f $keyring ]] || kp_die "--keyring $keyring: no such file"
  [[ -d $repo ]] || kp_die "--from-repo $repo: no such directory"
  [[ $repo_suite =~ ^[a-z0-9][a-z0-9.+-]*$ ]] || kp_die "--repo-suite $repo_suite: not a suite name (stable)"
  command -v gpgv >/dev/null || kp_die "gpgv is missing: apt-get install gpgv"
  local inrel=$repo/dists/$repo_suite/InRelease
  [[ -f $inrel ]] || kp_die "$inrel: no such file: is $repo a repository made by build-repo.sh (suite $repo_suite)?"
  # The keyring as a file of our own (gpgv takes a path; a relative one would be
  # looked up in ~/.gnupg).
  cp "$keyring" "$work/keyring.pgp"
  # As apt does: a good signature (VALIDSIG) by an unexpired, unrevoked key.
  if ! gpgv --status-fd 3 --keyring "$work/keyring.pgp" --output "$rel" "$inrel" 2> "$work/gpgv.err" 3> "$work/gpgv.status" ||
     ! grep -q '^\[GNUPG:\] VALIDSIG ' "$work/gpgv.status" ||
     grep -q '^\[GNUPG:\] \(EXPKEYSIG\|REVKEYSIG\|EXPSIG\|BADSIG\|ERRSIG\) ' "$work/gpgv.status"; then
    cat "$work/gpgv.err" >&2
    kp_die "$inrel: its signature does not verify with $keyring (gpgv's message above): the repository was changed, signed with another key, or the key expired; nothing is taken from it"
  fi
  # The Packages index, as the signed Release describes it.
  line=$(awk -v f="$idx" '/^SHA256:/ { s = 1; next } /^[^ ]/ { s = 0 } s && $3 == f { print $1, $2; exit }' "$rel")
  [[ -n $line ]] || kp_die "$inrel: the signed Release lists no SHA256 for $idx"
  read -r want_sha want_size <<<"$line"
  cp "$repo/dists/$repo_suite/$idx" "$work/Packages" 2>/dev/null ||
    kp_die "$repo/dists/$repo_suite/$idx: cannot read it"
  sha=$(sha256sum < "$work/Packages" | cut -d' ' -f1)
  size=$(stat -c %s "$work/Packages")
  [[ $sha == "$want_sha" && $size == "$want_size" ]] ||
    kp_die "$repo/dists/$repo_suite/$idx: SHA256 $sha ($size bytes), but the signed Release says $want_sha ($want_size bytes): the index was changed; nothing is taken from it"
  # The koprogo entry: the version asked for, or the highest.
  if [[ -z $want_version ]]; then
    local v
    while read -r v; do
      dpkg --compare-versions "$v" gt "$want_version" && want_version=$v
    done < <(awk '/^Package: / { p = $2 } /^Version: / && p == "koprogo" { print $2 }' "$work/Packages")
    [[ -n $want_version ]] || kp_die "$repo holds no koprogo package (its signed Packages index lists none)"
  fi
  stanza=$(awk -v v="$want_version" 'BEGIN { RS = ""; FS = "\n" }
    { p = ""; ver = ""; for (i = 1; i <= NF; i++) { if ($i ~ /^Package: /) p = substr($i, 10); if ($i ~ /^Version: /) ver = substr($i, 10) }
      if (p == "koprogo" && ver == v) { print; exit } }' "$work/Packages")
  [[ -n $stanza ]] || kp_die "$repo has no koprogo $want_version (versions: $(awk '/^Package: / { p = $2 } /^Version: / && p == "koprogo" { printf "%s ", $2 }' "$work/Packages"))"
  filename=$(sed -n 's/^Filename: //p' <<<"$stanza")
  want_sha=$(sed -n 's/^SHA256: //p' <<<"$stanza")
  want_size=$(sed -n 's/^Size: //p' <<<"$stanza")
  [[ $filename =~ ^pool/[A-Za-z0-9._+~/-]+\.deb$ && $filename != *..* ]] ||
    kp_die "$repo: koprogo $want_version has an unexpected Filename ($filename)"
  [[ $want_sha =~ ^[0-9a-f]{64}$ ]] || kp_die "$repo: koprogo $want_version has no SHA256 in the index"
  # Copied first, then checked: the copy is what gets bundled.
  deb=$work/${filename##*/}
  cp "$repo/$filename" "$deb" 2>/dev/null || kp_die "$repo/$filename: cannot read it (the index lists it)"
  sha=$(sha256sum < "$deb" | cut -d' ' -f1)
  size=$(stat -c %s "$deb")
  [[ $sha == "$want_sha" && $size == "$want_size" ]] ||
    kp_die "$repo/$filename: SHA256 $sha ($size bytes), but the signed index says $want_sha ($want_size bytes): the package was changed; nothing is bundled"
  [[ $(dpkg-deb -f "$deb" Package 2>/dev/null) == koprogo && $(dpkg-deb -f "$deb" Version 2>/dev/null) == "$want_version" ]] ||
    kp_die "$repo/$filename: not the koprogo $want_version package its index describes"
  kp_log "from $repo: koprogo $want_version, signature (InRelease), index and package checked ($sha)"
}

if [[ -n $from_repo ]]; then
  deb_from_repo "$from_repo"
else
  [[ -n $deb ]] || kp_die "--deb (or --from-repo) is required: build the .deb first with packaging/build-deb.sh"
  [[ -f $deb ]] || kp_die "--deb $deb: no such file: build it with packaging/build-deb.sh"
fi

version=$(dpkg-deb -f "$deb" Version)
arch=$(dpkg-deb -f "$deb" Architecture)
name=koprogo-offline_${version}_${arch}
started=$(date +%s)

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

# A throw-away apt configuration whose only source is ./debs, with its own
# archive directory (apt locks it: the machine's apt may be running meanwhile,
# e.g. unattended-upgrades).
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/lists/partial" "$tmp/parts" "$tmp/archives/partial"
echo "deb [trusted=yes] file:$here/debs ./" > "$tmp/sources.list"
apt_local() {
  DEBIAN_FRONTEND=noninteractive apt-get -q \
    -o Dir::Etc::SourceList="$tmp/sources.list" -o Dir::Etc::SourceParts="$tmp/parts" \
    -o Dir::State::Lists="$tmp/lists" -o Dir::Cache::pkgcache= -o Dir::Cache::srcpkgcache= \
    -o Dir::Cache::Archives="$tmp/archives/" \
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
