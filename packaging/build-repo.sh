#!/usr/bin/env bash
# A signed APT repository of koprogo packages in a directory, ready to upload to
# any static web host (users then `apt install koprogo`).
#
#   packaging/build-repo.sh --repo DIR --gnupghome KEYDIR [--url URL]
#                           [--passphrase-file FILE] [--suite stable]
#                           [--valid-days N] DEB...
#   packaging/build-repo.sh --repo DIR --gnupghome KEYDIR --resign [...]
#
#   --repo DIR            the repository (created when missing; an existing one gets
#                         the new packages beside the ones it has: older versions
#                         stay in pool/, so `apt install koprogo=<older>` works)
#   --gnupghome KEYDIR    the signing key's GnuPG home (packaging/repo-key.sh new)
#   --key FINGERPRINT     the key to sign with when KEYDIR holds several
#   --passphrase-file F   the key's passphrase (first line); without it the key
#                         must have none. gpg never prompts.
#   --url URL             where users' apt will fetch DIR from (https://…/koprogo/),
#                         written into DIR/koprogo.sources; default: the URL of the
#                         koprogo.sources already in DIR
#   --suite NAME          the suite (default stable; also the Codename)
#   --valid-days N        write Valid-Until N days ahead (default: none, see below);
#                         the repository must then be re-signed (--resign) before
#                         that date, or apt refuses it
#   --resign              no new package: index and sign again (new Date and
#                         Valid-Until, the current public keyring)
#   --allow-key-change    sign with a key that is not in the keyring the repository
#                         was published with (users' apt refuses it until they
#                         install the new keyring: see the README)
#   --also-trust FILE     publish the keys of FILE (a public keyring, binary or
#                         armoured; repeatable) in the repository's keyring beside
#                         the signing key: the next key, published ahead of a key
#                         change. Signing later with a key the published keyring
#                         holds needs no --allow-key-change.
#
# What it writes (an apt-ftparchive flat pool, one component "main", amd64):
#   pool/main/k/koprogo/koprogo_<version>_amd64.deb   every version ever added
#   dists/<suite>/main/binary-amd64/Packages{,.gz,.xz} (and by-hash/ copies)
#   dists/<suite>/Release, InRelease (clear-signed), Release.gpg (detached)
#   koprogo-archive-keyring.pgp   the public key (binary), for Signed-By
#   koprogo.sources               the deb822 source users put in /etc/apt/sources.list.d/
# Release carries Origin and Label "KoproGo" (what the package's unattended-upgrades
# file matches) and Acquire-By-Hash: yes, so a client updating while the upload is
# half done gets consistent files. Upload pool/ and by-hash first, InRelease last.
#
# Valid-Until is left out by default: it protects against a mirror serving an old
# (signed) Release for ever, but a repository not re-signed in time then breaks
# every user's `apt update`, and re-signing on a schedule means keeping the key on
# a machine that is online. A small project with an offline key is safer without it;
# --valid-days is there for those who re-sign automatically.
#
# Needs apt-ftparchive (apt-utils), gpg, gpgv, xz and dpkg-deb (installed when
# missing when run as root). Prints the repository's path on its last line.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=packaging/lib.sh
. "$here/lib.sh"

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

repo='' keydir='' key='' pass='' url='' suite=stable valid_days='' resign=0 key_change=0
debs=() also_trust=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --repo) [[ $# -ge 2 ]] || kp_die "--repo needs a directory"; repo=$2; shift 2 ;;
    --gnupghome) [[ $# -ge 2 ]] || kp_die "--gnupghome needs the key's directory (packaging/repo-key.sh new DIR)"; keydir=$2; shift 2 ;;
    --key) [[ $# -ge 2 ]] || kp_die "--key needs a fingerprint"; key=$2; shift 2 ;;
    --passphrase-file) [[ $# -ge 2 ]] || kp_die "--passphrase-file needs a file"; pass=$2; shift 2 ;;
    --url) [[ $# -ge 2 ]] || kp_die "--url needs the repository's address (https://example.org/koprogo/)"; url=$2; shift 2 ;;
    --suite) [[ $# -ge 2 ]] || kp_die "--suite needs a name (stable)"; suite=$2; shift 2 ;;
    --valid-days) [[ $# -ge 2 ]] || kp_die "--valid-days needs a number of days"; valid_days=$2; shift 2 ;;
    --resign) resign=1; shift ;;
    --allow-key-change) key_change=1; shift ;;
    --also-trust) [[ $# -ge 2 ]] || kp_die "--also-trust needs a public keyring file (the next key's koprogo-archive-keyring.pgp)"; also_trust+=("$2"); shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; debs+=("$@"); break ;;
    -*) kp_die "unknown option $1 (see --help)" ;;
    *) debs+=("$1"); shift ;;
  esac
done

# ---------------------------------------------------------------- checks
[[ -n $repo ]] || kp_die "--repo DIR is required (the repository's directory)"
[[ -n $keydir ]] || kp_die "--gnupghome KEYDIR is required (the signing key's GnuPG home; create one with packaging/repo-key.sh new KEYDIR)"
[[ -d $keydir ]] || kp_die "--gnupghome $keydir: no such directory (create the key with packaging/repo-key.sh new $keydir)"
[[ $suite =~ ^[a-z0-9][a-z0-9.+-]*$ ]] || kp_die "--suite $suite: use lower-case letters, digits and . + - (e.g. stable)"
[[ -z $valid_days || $valid_days =~ ^[1-9][0-9]*$ ]] || kp_die "--valid-days $valid_days: a whole number of days (1 or more)"
if [[ -n $pass ]]; then
  [[ -r $pass ]] || kp_die "--passphrase-file $pass: no such readable file"
fi
if [[ $resign -eq 1 && ${#debs[@]} -gt 0 ]]; then kp_die "--resign adds no package: drop ${debs[*]}, or drop --resign"; fi
if [[ $resign -eq 0 && ${#debs[@]} -eq 0 ]]; then
  kp_die "no .deb given: name the packages to publish (packaging/build-deb.sh makes them), or --resign to sign the repository again without new ones"
fi
if [[ $resign -eq 1 ]]; then
  [[ -d $repo/pool ]] || kp_die "--resign: $repo is not a repository yet (no pool/): build it with some .deb first"
fi
if [[ -n $url ]]; then
  [[ $url =~ ^(https?|file)://[^[:space:]]+$ ]] || kp_die "--url $url: give an http(s):// address (https://example.org/koprogo/)"
  [[ $url == */ ]] || url=$url/
elif [[ -f $repo/koprogo.sources ]]; then
  url=$(sed -n 's/^URIs: *//p' "$repo/koprogo.sources" | head -n 1)
fi
[[ -n $url ]] || kp_die "--url is required for a new repository: the address users' apt fetches it from (https://example.org/koprogo/)"

# The tools, from Debian's packages.
need=()
command -v apt-ftparchive >/dev/null || need+=(apt-utils)
command -v gpg >/dev/null || need+=(gpg gpg-agent)
command -v gpgv >/dev/null || need+=(gpgv)
command -v xz >/dev/null || need+=(xz-utils)
command -v dpkg-deb >/dev/null || need+=(dpkg)
if [[ ${#need[@]} -gt 0 ]]; then
  [[ $(id -u) -eq 0 ]] || kp_die "missing tools: apt-get install ${need[*]} (or run as root, which installs them)"
  kp_log "installing ${need[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null ||
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null; } ||
    kp_die "cannot install ${need[*]}: apt-get install them"
fi

# Every package: a real .deb, for amd64 (or all), named as the pool names it.
declare -A pool_of=()
for deb in "${debs[@]}"; do
  [[ -f $deb ]] || kp_die "$deb: no such file (build it with packaging/build-deb.sh)"
  fields=$(dpkg-deb -f "$deb" Package Version Architecture 2>/dev/null) ||
    kp_die "$deb: not a Debian package (dpkg-deb cannot read it): give the .deb built by packaging/build-deb.sh"
  pkg=$(sed -n 's/^Package: //p' <<<"$fields")
  ver=$(sed -n 's/^Version: //p' <<<"$fields")
  arch=$(sed -n 's/^Architecture: //p' <<<"$fields")
  [[ -n $pkg && -n $ver && -n $arch ]] || kp_die "$deb: its control file lacks Package, Version or Architecture"
  [[ $arch == amd64 || $arch == all ]] ||
    kp_die "$deb: architecture $arch, but this repository is for amd64 only (build the package on amd64)"
  { dpkg-deb --ctrl-tarfile "$deb" >/dev/null 2>&1 && dpkg-deb --fsys-tarfile "$deb" | tar -t >/dev/null 2>&1; } ||
    kp_die "$deb: damaged (its contents cannot be read): build it again"
  # An epoch's colon is left out of file names, as Debian does.
  name=${pkg}_${ver#*:}_$arch.deb
  first=${pkg:0:1}
  [[ $pkg == lib* ]] && first=${pkg:0:4}
  rel=pool/main/$first/$pkg/$name
  if [[ -e $repo/$rel ]] && ! cmp -s "$deb" "$repo/$rel"; then
    kp_die "$deb: $rel already holds a different package with the same version $ver: a published version never changes (apt caches it); build it with a new version (build-deb.sh --version)"
  fi
  [[ -z ${pool_of[$rel]:-} ]] || cmp -s "$deb" "${pool_of[$rel]}" ||
    kp_die "$deb and ${pool_of[$rel]} are both $pkg $ver $arch but differ: give one of them"
  pool_of[$rel]=$deb
done

# ---------------------------------------------------------------- the key
gpgh() { gpg --homedir "$keydir" --batch --quiet --no-tty "$@"; }
trap 'gpgconf --homedir "$keydir" --kill gpg-agent >/dev/null 2>&1 || true; [[ -z ${work:-} ]] || rm -rf "$work"' EXIT
secret=$(gpgh --with-colons --list-secret-keys 2>/dev/null |
  awk -F: '$1 == "sec" { s = 1; next } s && $1 == "fpr" { print $10; s = 0 }') || true
[[ -n $secret ]] || kp_die "$keydir holds no secret key: create one with packaging/repo-key.sh new $keydir"
if [[ -z $key ]]; then
  [[ $(wc -l <<<"$secret") -eq 1 ]] || kp_die "$keydir holds several secret keys: choose one with --key ($(tr '\n' ' ' <<<"$secret"))"
  key=$secret
else
  key=${key// /}
  key=${key^^}
  grep -qx "$key" <<<"$secret" || kp_die "--key $key: no such secret key in $keydir (it has: $(tr '\n' ' ' <<<"$secret"))"
fi
# Validity and expiry of the primary key (it signs: repo-key.sh makes no subkeys).
read -r validity expires caps < <(gpgh --with-colons --list-keys "$key" | awk -F: '$1 == "pub" { print ($2 == "" ? "-" : $2), ($7 == "" ? 0 : $7), $12; exit }')
case $validity in
  e) kp_die "the key $key in $keydir expired on $(date -u -d "@$expires" +%Y-%m-%d): extend it with packaging/repo-key.sh extend $keydir, then publish the new keyring" ;;
  r) kp_die "the key $key in $keydir is revoked: create a new key (packaging/repo-key.sh new) and tell users to install its keyring" ;;
  d|i|n) kp_die "the key $key in $keydir is not usable (gpg validity $validity)" ;;
esac
[[ $caps == *S* ]] || kp_die "the key $key in $keydir cannot sign (capabilities: $caps): create a signing key with packaging/repo-key.sh new"
now_s=$(date +%s)
if [[ $expires -gt 0 && $expires -lt $((now_s + 30 * 86400)) ]]; then
  kp_log "WARNING: the key $key expires on $(date -u -d "@$expires" +%Y-%m-%d): extend it now (packaging/repo-key.sh extend $keydir) and publish the new keyring; users' apt refuses the repository once it has expired"
fi
if [[ -n $valid_days && $expires -gt 0 && $expires -lt $((now_s + valid_days * 86400)) ]]; then
  kp_log "WARNING: Valid-Until ($valid_days days) is past the key's expiry ($(date -u -d "@$expires" +%Y-%m-%d))"
fi
sign_args=(--local-user "$key!" --digest-algo SHA512 --pinentry-mode loopback)
if [[ -n $pass ]]; then sign_args+=(--passphrase-file "$pass"); else sign_args+=(--passphrase ''); fi

work=$(mktemp -d "${TMPDIR:-/tmp}/koprogo-repo.XXXXXX")
# A trial signature first: a missing or wrong passphrase stops here, before the
# repository is touched.
if ! echo "trial" | gpgh "${sign_args[@]}" --clearsign > /dev/null 2> "$work/trial.err"; then
  cat "$work/trial.err" >&2
  if grep -qi "passphrase\|pinentry" "$work/trial.err"; then
    kp_die "signing with $key failed: the key has a passphrase: give it with --passphrase-file FILE${pass:+ (is $pass the right one?)}"
  fi
  kp_die "signing with $key from $keydir failed (gpg's message above)"
fi
gpgh --export-options export-minimal --export "$key" > "$work/keyring.pgp"
[[ -s $work/keyring.pgp ]] || kp_die "could not export the public key $key from $keydir"
# The other keys to publish (--also-trust), through a GnuPG home of their own.
if [[ ${#also_trust[@]} -gt 0 ]]; then
  mkdir -m 0700 "$work/also"
  for f in "${also_trust[@]}"; do
    [[ -f $f ]] || kp_die "--also-trust $f: no such file"
    gpg --homedir "$work/also" --batch --quiet --no-tty --import "$f" 2> "$work/also.err" ||
      { cat "$work/also.err" >&2; kp_die "--also-trust $f: not an OpenPGP public keyring (gpg's message above)"; }
  done
  gpg --homedir "$work/also" --batch --quiet --no-tty --export-options export-minimal --export > "$work/also.pgp"
  gpgconf --homedir "$work/also" --kill gpg-agent >/dev/null 2>&1 || true
  [[ -s $work/also.pgp ]] || kp_die "--also-trust ${also_trust[*]}: no public key in it"
  cat "$work/also.pgp" >> "$work/keyring.pgp"
fi
# Every fingerprint of a keyring file.
fprs_of() {
  [[ -d $work/show ]] || mkdir -m 0700 "$work/show"
  gpg --homedir "$work/show" --batch --no-tty --with-colons --show-keys "$1" 2>/dev/null | awk -F: '$1 == "fpr" { print $10 }'
}
# The repository keeps the key it was published with: users trust only that one.
if [[ -f $repo/koprogo-archive-keyring.pgp ]] && ! cmp -s "$work/keyring.pgp" "$repo/koprogo-archive-keyring.pgp"; then
  old=$(fprs_of "$repo/koprogo-archive-keyring.pgp" | head -n 1)
  # A key the published keyring already holds is trusted by its users.
  if ! fprs_of "$repo/koprogo-archive-keyring.pgp" | grep -qx "$key" && [[ $key_change -eq 0 ]]; then
    kp_die "$repo was published with the key ${old:-?}, not $key: users' apt would refuse it. Use the right --gnupghome; to change the key, first publish it with the old one (--also-trust NEW-KEYRING) and let users fetch the keyring again, or force it with --allow-key-change (README: changing the key)"
  fi
fi

# ---------------------------------------------------------------- the repository
mkdir -p "$repo/pool" "$repo/dists"
for rel in "${!pool_of[@]}"; do
  if [[ ! -e $repo/$rel ]]; then
    mkdir -p "$(dirname "$repo/$rel")"
    cp "${pool_of[$rel]}" "$repo/$rel.tmp" && chmod 0644 "$repo/$rel.tmp" && mv "$repo/$rel.tmp" "$repo/$rel"
    kp_log "added $rel"
  else
    kp_log "already there: $rel"
  fi
done

# The indexes are made in a scratch copy of dists/<suite>, then moved in place, the
# signed Release last: a client reading the directory meanwhile sees the old set or
# (by hash) the new one, never a mix.
bin=main/binary-amd64
stage=$work/dists/$suite
mkdir -p "$stage/$bin"
(cd "$repo" && apt-ftparchive packages pool/main) > "$stage/$bin/Packages" 2> "$work/ftparchive.err" ||
  { cat "$work/ftparchive.err" >&2; kp_die "apt-ftparchive packages failed in $repo"; }
if grep -q . "$work/ftparchive.err"; then cat "$work/ftparchive.err" >&2; fi
[[ -s $stage/$bin/Packages ]] || kp_die "$repo/pool holds no package"
gzip -9nc "$stage/$bin/Packages" > "$stage/$bin/Packages.gz"
xz -9c "$stage/$bin/Packages" > "$stage/$bin/Packages.xz"
ftp=(-o APT::FTPArchive::Release::Origin=KoproGo
     -o APT::FTPArchive::Release::Label=KoproGo
     -o "APT::FTPArchive::Release::Suite=$suite"
     -o "APT::FTPArchive::Release::Codename=$suite"
     -o APT::FTPArchive::Release::Architectures=amd64
     -o APT::FTPArchive::Release::Components=main
     -o "APT::FTPArchive::Release::Description=KoproGo appliance packages"
     -o APT::FTPArchive::Release::Acquire-By-Hash=yes
     -o "APT::FTPArchive::Release::Date=$(LC_ALL=C date -u -d "@$now_s" '+%a, %d %b %Y %H:%M:%S UTC')")
if [[ -n $valid_days ]]; then
  ftp+=(-o "APT::FTPArchive::Release::ValidTime=$((valid_days * 86400))")
fi
(cd "$stage" && apt-ftparchive "${ftp[@]}" release .) > "$work/Release" ||
  kp_die "apt-ftparchive release failed"
grep -q "^ [0-9a-f]\{64\} \+[0-9]\+ $bin/Packages$" "$work/Release" ||
  kp_die "apt-ftparchive wrote a Release without $bin/Packages"
# by-hash: each index also under its SHA256 (older ones kept for clients mid-update).
for f in Packages Packages.gz Packages.xz; do
  h=$(sha256sum < "$stage/$bin/$f" | cut -d' ' -f1)
  mkdir -p "$repo/dists/$suite/$bin/by-hash/SHA256"
  cp "$stage/$bin/$f" "$repo/dists/$suite/$bin/by-hash/SHA256/$h"
done

sign_err=$work/gpg.err
{ gpgh "${sign_args[@]}" --clearsign -o "$work/InRelease" "$work/Release" 2> "$sign_err" &&
  gpgh "${sign_args[@]}" --armor --detach-sign -o "$work/Release.gpg" "$work/Release" 2>> "$sign_err"; } || {
  cat "$sign_err" >&2
  if grep -qi "passphrase\|pinentry" "$sign_err"; then
    kp_die "signing with $key failed: the key has a passphrase: give it with --passphrase-file FILE"
  fi
  kp_die "signing with $key from $keydir failed (gpg's message above)"
}
# What apt will do: check both signatures against the published keyring.
{ gpgv --keyring "$work/keyring.pgp" "$work/InRelease" 2> "$work/gpgv.err" &&
  gpgv --keyring "$work/keyring.pgp" "$work/Release.gpg" "$work/Release" 2>> "$work/gpgv.err"; } ||
  { cat "$work/gpgv.err" >&2; kp_die "the new signatures do not verify with the exported keyring"; }

for f in Packages Packages.gz Packages.xz; do
  cp "$stage/$bin/$f" "$repo/dists/$suite/$bin/$f.new"
  mv "$repo/dists/$suite/$bin/$f.new" "$repo/dists/$suite/$bin/$f"
done
for f in Release Release.gpg InRelease; do
  cp "$work/$f" "$repo/dists/$suite/$f.new"
  mv "$repo/dists/$suite/$f.new" "$repo/dists/$suite/$f"
done
install -m 0644 "$work/keyring.pgp" "$repo/koprogo-archive-keyring.pgp"
cat > "$repo/koprogo.sources.new" <<EOF
# The KoproGo APT repository. Install with:
#   sudo install -m 0644 koprogo-archive-keyring.pgp /usr/share/keyrings/
#   sudo install -m 0644 koprogo.sources /etc/apt/sources.list.d/
#   sudo apt update && sudo apt install koprogo
# Signing key: $key
Types: deb
URIs: $url
Suites: $suite
Components: main
Architectures: amd64
Signed-By: /usr/share/keyrings/koprogo-archive-keyring.pgp
EOF
chmod 0644 "$repo/koprogo.sources.new"
mv "$repo/koprogo.sources.new" "$repo/koprogo.sources"

versions=$(awk '/^Package: /{ p = $2 } /^Version: /{ print p " " $2 }' "$repo/dists/$suite/$bin/Packages" | sort -V | tr '\n' ',' | sed 's/,$//; s/,/, /g')
kp_log "repository $repo signed by $key (suite $suite, ${valid_days:+valid $valid_days days, }$url): $versions"
echo "$repo"
