#!/usr/bin/env bash
# Builds the Debian package koprogo_<version>_amd64.deb from a clean clone, with
# cargo-deb (the metadata is [package.metadata.deb] in Cargo.toml; maintainer
# scripts, unit, changelog and copyright are in debian/, the man page in man/).
#
#   packaging/build-deb.sh [--api PATH] [--frontend DIR] [--version VER]
#                          [--out DIR] [--no-build]
#
#   --api PATH       a prebuilt koprogo-api binary, shipped as /usr/lib/koprogo/koprogo-api
#   --frontend DIR   an Astro dist/ directory, shipped as /usr/share/koprogo/frontend
#   --version VER    the package version (default: Cargo's version, revision 1)
#   --out DIR        where the .deb goes (default: target/debian)
#   --no-build       reuse target/release/koprogo instead of running cargo build
#
# Without --api/--frontend the appliance still runs: `koprogo status`/`check` say the
# application is not installed and the site answers with its maintenance page.
# Prints the path of the package on its last line.
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_DEB_VERSION=3.8.0
# The package's one-line synopsis (Cargo's `description` starts with the package
# name and is longer than 80 characters, which lintian refuses). The long
# description is debian/description.
SYNOPSIS="appliance running a KoproGo site: PostgreSQL, API server and HTTPS"

die() { echo "build-deb.sh: $*" >&2; exit 2; }

api='' frontend='' version='' out=target/debian build=1
while [[ $# -gt 0 ]]; do
  case $1 in
    --api) [[ $# -ge 2 ]] || die "--api needs a PATH (a koprogo-api binary)"; api=$2; shift 2 ;;
    --frontend) [[ $# -ge 2 ]] || die "--frontend needs a DIR (an Astro dist/)"; frontend=$2; shift 2 ;;
    --version) [[ $# -ge 2 ]] || die "--version needs a version, e.g. 0.1.0-2"; version=$2; shift 2 ;;
    --out) [[ $# -ge 2 ]] || die "--out needs a directory"; out=$2; shift 2 ;;
    --no-build) build=0; shift ;;
    -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done

if [[ -n $api ]]; then
  [[ -f $api ]] || die "--api $api: no such file: pass the koprogo-api binary"
  [[ -x $api ]] || die "--api $api: not executable: chmod +x it"
fi
if [[ -n $frontend ]]; then
  [[ -d $frontend ]] || die "--frontend $frontend: no such directory: pass the Astro dist/ directory"
  [[ -f $frontend/index.html ]] || die "--frontend $frontend: no index.html there: pass the Astro dist/ directory (after npm run build)"
fi
if [[ -n $version && ! $version =~ ^[0-9][A-Za-z0-9.+~-]*$ ]]; then
  die "--version $version: not a Debian version (digits first, then letters, digits and . + ~ -)"
fi
for tool in cargo dpkg-deb md5sum; do
  command -v "$tool" >/dev/null || die "$tool is missing: install the Rust toolchain (rustup) and dpkg"
done

# cargo-deb, pinned (building it takes 2-3 minutes, once).
if [[ $(cargo deb --version 2>/dev/null || true) != "cargo-deb $CARGO_DEB_VERSION" ]]; then
  echo "installing cargo-deb $CARGO_DEB_VERSION (cargo install, about 3 minutes, once)" >&2
  cargo install cargo-deb --locked --version "$CARGO_DEB_VERSION" >&2
fi

if [[ $build -eq 1 ]]; then
  cargo build --release --locked --bin koprogo >&2
fi
bin=${CARGO_TARGET_DIR:-target}/release/koprogo
[[ -x $bin ]] || die "$bin is missing: run without --no-build"

# Stage the optional parts where the variants in Cargo.toml look for them.
stage=target/deb-stage
rm -rf "$stage"
mkdir -p "$stage"
variant=
if [[ -n $api ]]; then
  install -D -m 0755 "$api" "$stage/api/koprogo-api"
  # Like dh_strip: a prebuilt binary usually keeps its symbol table.
  if command -v strip >/dev/null && head -c 4 "$stage/api/koprogo-api" | grep -q 'ELF'; then
    strip --strip-unneeded --remove-section=.comment --remove-section=.note "$stage/api/koprogo-api"
  fi
  variant=api
fi
if [[ -n $frontend ]]; then
  mkdir -p "$stage/frontend"
  cp -rL "$frontend"/. "$stage/frontend/"
  variant=${variant:+full}
  variant=${variant:-frontend}
fi

raw=$(mktemp -d)
root=$(mktemp -d)
trap 'rm -rf "$raw" "$root"' EXIT
args=(--no-build --fast --output "$raw")
[[ -n $variant ]] && args+=(--variant "$variant")
[[ -n $version ]] && args+=(--deb-version "$version")
cargo deb "${args[@]}" >&2
deb=$(ls "$raw"/*.deb)

# Finish the package: our synopsis, and md5sums (dpkg --verify koprogo).
dpkg-deb -R "$deb" "$root"
awk -v syn="$SYNOPSIS" -v long=debian/description '
  /^Description:/ {
    print "Description: " syn
    while ((getline line < long) > 0) print " " (line == "" ? "." : line)
    skip = 1; next
  }
  skip && /^ / { next }
  { skip = 0; print }' "$root/DEBIAN/control" > "$raw/control"
install -m 0644 "$raw/control" "$root/DEBIAN/control"
# A frontend is a web site with remote resources of its own (see the file).
if [[ -n $frontend ]]; then
  grep -v '^#' debian/frontend.lintian-overrides >> "$root/usr/share/lintian/overrides/koprogo"
fi
(cd "$root" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | LC_ALL=C sort -z |
  xargs -0 md5sum > DEBIAN/md5sums)
chmod 0644 "$root/DEBIAN/md5sums"

pkgver=$(sed -n 's/^Version: //p' "$root/DEBIAN/control")
arch=$(sed -n 's/^Architecture: //p' "$root/DEBIAN/control")
mkdir -p "$out"
# Reproducible timestamps: the last commit's time (or the changelog's date).
if [[ -z ${SOURCE_DATE_EPOCH:-} ]]; then
  SOURCE_DATE_EPOCH=$(git log -1 --format=%ct 2>/dev/null ||
    date -d "$(sed -n 's/^ -- .*>  //p' debian/changelog | head -n 1)" +%s)
  export SOURCE_DATE_EPOCH
fi
final=$out/koprogo_${pkgver}_${arch}.deb
dpkg-deb --root-owner-group -Zxz -b "$root" "$final" >/dev/null
echo "built $final ($(du -h "$final" | cut -f1); ${variant:-appliance only})" >&2
echo "$final"
