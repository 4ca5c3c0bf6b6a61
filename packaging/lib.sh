# shellcheck shell=bash
# Shared by packaging/offline-bundle.sh and packaging/test-package.sh (sourced).
# Debian mirrors, minimal roots made with debootstrap (cached as tarballs), and
# their cleanup.

KP_CACHE=${KOPROGO_CACHE:-/var/cache/koprogo-packaging}
# A cached root is made again when older than this many days (point releases).
KP_CACHE_DAYS=${KOPROGO_CACHE_DAYS:-7}

kp_log() { printf '%s %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
kp_die() { echo "${0##*/}: $*" >&2; exit 2; }

# The Debian mirror this machine's apt uses (KOPROGO_MIRROR overrides).
kp_mirror() {
  if [[ -n ${KOPROGO_MIRROR:-} ]]; then echo "$KOPROGO_MIRROR"; return; fi
  local m
  # shellcheck disable=SC2016 # apt's own $(FIELD) syntax
  m=$(apt-get indextargets --format '$(REPO_URI) $(RELEASE) $(IDENTIFIER)' 2>/dev/null |
    awk '$3 == "Packages" && $2 ~ /^[a-z]+$/ { print $1; exit }')
  [[ -n $m ]] || m=http://deb.debian.org/debian/
  echo "$m"
}

# Its security mirror (KOPROGO_SECURITY_MIRROR overrides).
kp_security_mirror() {
  if [[ -n ${KOPROGO_SECURITY_MIRROR:-} ]]; then echo "$KOPROGO_SECURITY_MIRROR"; return; fi
  local m
  # shellcheck disable=SC2016 # apt's own $(FIELD) syntax
  m=$(apt-get indextargets --format '$(REPO_URI) $(RELEASE) $(IDENTIFIER)' 2>/dev/null |
    awk '$3 == "Packages" && $2 ~ /-security$/ { print $1; exit }')
  [[ -n $m ]] || m=http://deb.debian.org/debian-security/
  echo "$m"
}

# sources.list lines for SUITE: main, updates, security.
kp_sources() {
  local suite=$1
  echo "deb $(kp_mirror) $suite main"
  echo "deb $(kp_mirror) $suite-updates main"
  echo "deb $(kp_security_mirror) $suite-security main"
}

# kp_root DIR SUITE [INCLUDE]: a fresh minimal root of SUITE in DIR (debootstrap
# --variant=minbase, plus the comma-separated INCLUDE packages), with our sources
# and DNS. Unpacked from a cached tarball when one is fresh enough.
kp_root() {
  local dir=$1 suite=$2 include=${3:-}
  local key=$suite-minbase${include:+-${include//,/-}}
  local tarball=$KP_CACHE/$key.tar.zst
  command -v debootstrap >/dev/null || kp_die "debootstrap is missing: apt-get install debootstrap"
  command -v zstd >/dev/null || kp_die "zstd is missing: apt-get install zstd"
  mkdir -p "$KP_CACHE"
  if [[ -f $tarball ]] && [[ -z $(find "$tarball" -mtime "+$KP_CACHE_DAYS") ]]; then
    mkdir -p "$dir"
    tar --zstd -xpf "$tarball" -C "$dir"
  else
    local tmp=$KP_CACHE/$key.building
    rm -rf --one-file-system "$tmp"
    kp_log "debootstrap $suite ($key) from $(kp_mirror): once, cached in $tarball"
    debootstrap --variant=minbase ${include:+--include="$include"} "$suite" "$tmp" "$(kp_mirror)" \
      > "$KP_CACHE/$key.debootstrap.log" 2>&1 ||
      { tail -n 20 "$KP_CACHE/$key.debootstrap.log" >&2; kp_die "debootstrap $suite failed (log: $KP_CACHE/$key.debootstrap.log)"; }
    kp_sources "$suite" > "$tmp/etc/apt/sources.list"
    rm -f "$tmp"/var/cache/apt/archives/*.deb
    tar --zstd -cpf "$tarball.new" -C "$tmp" . && mv -f "$tarball.new" "$tarball"
    rm -rf --one-file-system "$tmp"
    mkdir -p "$dir"
    tar --zstd -xpf "$tarball" -C "$dir"
  fi
  kp_sources "$suite" > "$dir/etc/apt/sources.list"
  cp -L /etc/resolv.conf "$dir/etc/resolv.conf" 2>/dev/null || true
}

# Processes whose root directory is under DIR (a container or chroot left behind).
kp_procs_in() {
  local dir p r
  dir=$(readlink -f "$1")
  for p in /proc/[0-9]*; do
    r=$(readlink "$p/root" 2>/dev/null) || continue
    [[ $r == "$dir" || $r == "$dir"/* ]] && echo "${p#/proc/}"
  done
  return 0
}

# Mounts under DIR.
kp_mounts_in() {
  local dir
  dir=$(readlink -f "$1")
  awk -v d="$dir" '$5 == d || index($5, d "/") == 1 { print $5 }' /proc/self/mountinfo
}

# Removes a root made by kp_root; fails loudly if something still runs or is
# mounted in it (never removes through a mount).
kp_remove_root() {
  local dir=$1
  [[ -d $dir ]] || return 0
  local procs mounts
  procs=$(kp_procs_in "$dir")
  mounts=$(kp_mounts_in "$dir")
  if [[ -n $procs || -n $mounts ]]; then
    echo "still in use, not removed: $dir (processes: ${procs:-none}; mounts: ${mounts:-none})" >&2
    return 1
  fi
  rm -rf --one-file-system "$dir"
}
