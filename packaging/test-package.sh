#!/usr/bin/env bash
# Tests of the Debian package the way users install it. Slow (minutes) and needs
# root and a Debian mirror (debootstrap, systemd-container, lintian, zstd, curl and
# dpkg-dev are installed when missing); not part of scripts/test.sh. Usage:
#
#   packaging/test-package.sh [COMMAND]...      (default: all)
#
#   build       build the packages under test (cargo release build, build-deb.sh):
#               the appliance alone, and two versions ("prev" < "cur") with the demo
#               backend as --api and tests/demo-frontend as --frontend
#   lint        lintian --fail-on error,warning; systemd-analyze verify (any stderr
#               fails) and security --offline=yes
#   install     a fresh Debian 12 root (debootstrap minbase + systemd-sysv, dbus)
#               booted with systemd-nspawn: install prev (pulls PostgreSQL), unit
#               active, status ready, site and API through the proxy, permissions,
#               reinstall keeps secrets, upgrade to cur keeps a row, clean stop;
#               the debconf questions (noninteractive defaults, preseed and
#               dpkg-reconfigure, bad answers refused, purge, preseeded install);
#               then koprogo as PID 1 of a container; then remove keeps data, purge
#               leaves nothing
#   real        the whole KoproGo site: build-deb.sh --api --frontend with the real
#               koprogo-api and frontend (../shared/koprogo-real, unpacked once into
#               target/koprogo-real; without it one "skipped: …" line), Depends
#               checked against dpkg-shlibdeps, lintian; installed with apt in a fresh
#               booted Debian 12 (private network): all ready, admin123 refused, the
#               generated password logs in over HTTPS (local CA), the real index.html
#               and /config.js served, stop/start timed, purge leaves nothing.
#               Prints package size, install and start times, memory of the tree
#   offline     offline-bundle.sh, installed in a root with no apt sources and no
#               network (nspawn --private-network)
#   pg-upgrade  a PostgreSQL 15 cluster with data, the root upgraded to Debian 13
#               (PostgreSQL 17): refused while 15's binaries are gone, upgraded at
#               start once they are back, data identical, copy dropped after a
#               clean restart
#   watchdog    an API crash loop after READY for 150 s: the supervisor must keep
#               pinging systemd's watchdog (not in "all": see the packaging notes)
#   repo        packaging/build-repo.sh: a signed APT repository served over loopback
#               HTTP to a fresh Debian 12 root (see packaging/test-repo.sh)
#   all         build lint install real offline pg-upgrade repo
#   clean       remove the work directory and the cached roots
#
# Every wait is bounded; the roots are removed at the end (KEEP=1 keeps them on
# failure); no machine, mount or process is left behind. Timings are printed per
# step and summed at the end.
#   KOPROGO_PKGTEST_DIR  work directory (default /var/tmp/koprogo-pkgtest)
#   KOPROGO_CACHE        debootstrap tarballs and apt archives (default /var/cache/koprogo-packaging)
#   KOPROGO_MIRROR, KOPROGO_SECURITY_MIRROR   override the Debian mirrors of this machine's apt
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=packaging/lib.sh
. packaging/lib.sh

W=${KOPROGO_PKGTEST_DIR:-/var/tmp/koprogo-pkgtest}
DEBS=$W/debs
CI_SCRIPTS=packaging/tests # the scripts run inside the test roots (not shipped)
APT_ARCHIVES=$KP_CACHE/apt-archives
KEEP=${KEEP:-0}
TIMINGS=()
FAILED=()

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
timing() { TIMINGS+=("$(printf '%-60s %7s s' "$1" "$2")"); kp_log "$1: $2 s"; }
MEASURES=()
measure() { MEASURES+=("$(printf '%-60s %s' "$1" "$2")"); kp_log "$1: $2"; }

# Installs what the tests need from Debian's packages when missing (as root).
need_root_tools() {
  [[ $(id -u) -eq 0 ]] || kp_die "run as root (debootstrap, systemd-nspawn)"
  local need=(debootstrap:debootstrap systemd-nspawn:systemd-container nsenter:util-linux
    zstd:zstd lintian:lintian curl:curl dpkg-scanpackages:dpkg-dev systemd-analyze:systemd)
  local item missing=()
  for item in "${need[@]}"; do
    command -v "${item%%:*}" >/dev/null || missing+=("${item##*:}")
  done
  if [[ ${#missing[@]} -gt 0 ]]; then
    kp_log "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null ||
      { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null; } ||
      kp_die "cannot install ${missing[*]}: apt-get install them"
  fi
}

cargo_version() { sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1; }
deb_of() { find "$DEBS/$1" -name "koprogo_*.deb" 2>/dev/null | head -n 1; }

# ---------------------------------------------------------------- build
cmd_build() {
  local t v target=${CARGO_TARGET_DIR:-target}
  v=$(cargo_version)
  rm -rf "$DEBS"
  mkdir -p "$DEBS"
  t=$(now)
  cargo build --release --locked -p koprogo -p demo-backend --bins >&2 ||
    { FAILED+=("build: cargo build --release"); return 1; }
  [[ -x $target/release/demo-backend ]] ||
    { FAILED+=("build: $target/release/demo-backend missing"); return 1; }
  timing "build: cargo build --release (koprogo, demo-backend)" "$(since "$t")"
  t=$(now)
  packaging/build-deb.sh --no-build --out "$DEBS/base" >/dev/null ||
    { FAILED+=("build: build-deb.sh (appliance only)"); return 1; }
  timing "build: build-deb.sh (appliance only)" "$(since "$t")"
  t=$(now)
  if ! { packaging/build-deb.sh --no-build --out "$DEBS/prev" --version "$v~prev-1" \
           --api "$target/release/demo-backend" --frontend tests/demo-frontend >/dev/null &&
         packaging/build-deb.sh --no-build --out "$DEBS/cur" \
           --api "$target/release/demo-backend" --frontend tests/demo-frontend >/dev/null; }; then
    FAILED+=("build: build-deb.sh --api --frontend"); return 1
  fi
  timing "build: build-deb.sh x2 (--api demo-backend --frontend)" "$(since "$t")"
  ls -l "$DEBS"/*/*.deb >&2
}

# The packages of the last build, built once when missing (a failed build is not
# retried by every later command).
BUILD_FAILED=0
ensure_built() {
  [[ -n $(deb_of base) && -n $(deb_of prev) && -n $(deb_of cur) ]] && return 0
  [[ $BUILD_FAILED -eq 0 ]] || return 1
  cmd_build || { BUILD_FAILED=1; return 1; }
}

# ---------------------------------------------------------------- lint
# lint_deb DEB: lintian --fail-on error,warning (its I: lines are shown too).
lint_deb() {
  local deb=$1 name t
  name=$(basename "$(dirname "$deb")")
  t=$(now)
  kp_log "lintian --fail-on error,warning $name/$(basename "$deb")"
  # lintian warns on stderr when run as root; its findings go to stdout.
  if ! lintian --fail-on error,warning --display-info "$deb" 2>/dev/null; then
    FAILED+=("lintian $deb"); timing "lint: lintian $name" "$(since "$t")"; return 1
  fi
  timing "lint: lintian $name" "$(since "$t")"
}

cmd_lint() {
  ensure_built || return 1
  local t deb rc=0 f
  for deb in "$(deb_of base)" "$(deb_of cur)"; do
    lint_deb "$deb" || rc=1
    # The package tests' own scripts (packaging/tests/) are not shipped.
    for f in "$CI_SCRIPTS"/*.sh; do
      if dpkg-deb -c "$deb" | grep -q "/${f##*/}\$"; then
        FAILED+=("lint: $(basename "$deb") ships the test script ${f##*/}"); rc=1
      fi
    done
  done

  # systemd-analyze on the packaged unit, its ExecStart pointing at the packaged
  # binaries (verify fails on a missing executable; it reports bad keys only on stderr).
  t=$(now)
  local x=$W/unit-check
  rm -rf "$x"; mkdir -p "$x/root" "$x/unit"
  dpkg-deb -x "$(deb_of base)" "$x/root"
  sed -e "s#/usr/bin/koprogo#$x/root/usr/bin/koprogo#" \
      -e "s#/usr/lib/koprogo/#$x/root/usr/lib/koprogo/#" \
      "$x/root/usr/lib/systemd/system/koprogo.service" > "$x/unit/koprogo.service"
  (cd "$x/unit" && systemd-analyze verify --man=no koprogo.service) > "$x/verify.out" 2> "$x/verify.err" || rc=1
  if [[ -s $x/verify.err ]]; then
    echo "systemd-analyze verify said:" >&2; cat "$x/verify.err" >&2
    FAILED+=("systemd-analyze verify"); rc=1
  else
    kp_log "systemd-analyze verify: clean (no output)"
  fi
  (cd "$x/unit" && systemd-analyze security --offline=yes --threshold=30 koprogo.service) > "$x/security.out" 2>&1 ||
    { FAILED+=("systemd-analyze security"); rc=1; }
  grep -E "Overall exposure|✗" "$x/security.out" >&2 || true
  timing "lint: systemd-analyze verify + security" "$(since "$t")"
  rm -rf "$x"
  return $rc
}

# ---------------------------------------------------------------- nspawn helpers
# The checks run inside the booted root as a oneshot ci.service: the scripts in
# packaging/tests/ (each sources ci-lib.sh); they write /root/ci.log (STEP lines
# carry timings) and /root/ci.result, then power off.

# ci_env ROOT VAR=VALUE...: the parameters of the next boot's script, in
# /root/ci.env (which the script sources); boot removes it once the root is off.
ci_env() {
  local root=$1 kv; shift
  for kv in "$@"; do printf '%s=%q\n' "${kv%%=*}" "${kv#*=}"; done > "$root/root/ci.env"
}

# The PID 1 of the container started under process PARENT (host pid).
container_pid1() {
  local queue=("$1") p c
  while [[ ${#queue[@]} -gt 0 ]]; do
    p=${queue[0]}
    queue=("${queue[@]:1}")
    for c in /proc/[0-9]*; do
      [[ $(awk '/^PPid:/ { print $2 }' "$c/status" 2>/dev/null) == "$p" ]] || continue
      if awk '/^NSpid:/ { exit !(NF >= 3 && $NF == 1) }' "$c/status" 2>/dev/null; then
        echo "${c#/proc/}"
        return 0
      fi
      queue+=("${c#/proc/}")
    done
  done
  return 0
}

# Processes in a child PID namespace (containers), to find any left behind.
ns_procs() {
  local c
  for c in /proc/[0-9]*; do
    awk '/^NSpid:/ { exit !(NF >= 3) }' "$c/status" 2>/dev/null && echo "${c#/proc/}"
  done
  return 0
}

# boot ROOT NAME LIMIT_SECONDS SCRIPT [nspawn options...]: runs SCRIPT (one of
# packaging/tests/*.sh, copied into ROOT as /root/ci.sh beside /root/ci-lib.sh) as
# a oneshot unit in ROOT booted with systemd as PID 1. With HOOK=function set,
# `host_checks` inside runs "function ROOT PID1" on the host.
boot() {
  local root=$1 name=$2 limit=$3 script=$4; shift 4
  install -m 0644 "$CI_SCRIPTS/ci-lib.sh" "$root/root/ci-lib.sh"
  install -m 0755 "$script" "$root/root/ci.sh"
  cat > "$root/etc/systemd/system/ci.service" <<'EOF'
[Unit]
Description=package test
After=basic.target
[Service]
Type=oneshot
ExecStart=/bin/bash /root/ci.sh
TimeoutStartSec=infinity
[Install]
WantedBy=multi-user.target
EOF
  mkdir -p "$root/etc/systemd/system/multi-user.target.wants" "$APT_ARCHIVES"
  ln -sf /etc/systemd/system/ci.service "$root/etc/systemd/system/multi-user.target.wants/ci.service"
  rm -f "$root/root/ci.result" "$root/root/ci.log"
  local t rc=0 nsp pid1
  t=$(now)
  rm -f "$root/root/hook.wait" "$root/root/hook.done"
  timeout --kill-after=20 "$limit" systemd-nspawn -q -D "$root" -b --register=no --keep-unit \
    --console=pipe --bind="$APT_ARCHIVES:/var/cache/apt/archives" "$@" \
    > "$W/$name.console" 2>&1 &
  nsp=$!
  if [[ -n ${HOOK:-} ]]; then
    while kill -0 "$nsp" 2>/dev/null && [[ ! -f $root/root/hook.wait ]]; do sleep 0.3; done
    if [[ -f $root/root/hook.wait ]]; then
      pid1=$(container_pid1 "$nsp")
      if [[ -n $pid1 ]] && "$HOOK" "$root" "$pid1"; then
        echo PASS > "$root/root/hook.done"
      else
        echo FAIL > "$root/root/hook.done"
      fi
    fi
  fi
  wait "$nsp" || rc=$?
  rm -f "$root/root/ci.env"
  kp_log "$name: container exited ($rc) after $(since "$t") s"
  [[ -f $root/root/ci.log ]] && sed 's/^/    /' "$root/root/ci.log" >&2
  local line
  while IFS= read -r line; do
    timing "$name: ${line%|*}" "${line#*|}"
  done < <(sed -n 's/^STEP //p' "$root/root/ci.log" 2>/dev/null)
  while IFS= read -r line; do
    measure "$name: ${line%%|*}" "${line#*|}"
  done < <(sed -n 's/^MEASURE //p' "$root/root/ci.log" 2>/dev/null)
  rm -f "$root/etc/systemd/system/multi-user.target.wants/ci.service"
  local result
  result=$(cat "$root/root/ci.result" 2>/dev/null || echo "no result: timed out or crashed (console: $W/$name.console)")
  kp_log "$name: $result"
  if [[ $result != PASS ]]; then
    tail -n 40 "$W/$name.console" >&2 || true
    [[ -f $root/root/koprogo.journal ]] && tail -n 60 "$root/root/koprogo.journal" >&2
    return 1
  fi
}

# Runs a command in ROOT without booting it (a chroot with /proc, /dev, /run).
in_root() {
  local root=$1; shift
  mkdir -p "$APT_ARCHIVES"
  systemd-nspawn -q -D "$root" --register=no --keep-unit --pipe --as-pid2 \
    --bind="$APT_ARCHIVES:/var/cache/apt/archives" "$@"
}

# The containers run with --private-network (ports 80/443 of this machine may be
# taken, and tests must not reach them): what apt will install is downloaded first,
# from outside, into the shared archive cache; apt inside then works offline.
predownload() {
  local root=$1 t; shift
  t=$(now)
  in_root "$root" sh -c 'export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq --download-only "$@" >/dev/null' sh "$@" ||
    { kp_log "apt-get --download-only $* failed in $root"; return 1; }
  timing "$(basename "$root"): apt download (update, PostgreSQL, curl)" "$(since "$t")"
}

new_root() {
  local root=$1 t
  t=$(now)
  kp_remove_root "$root"
  kp_root "$root" bookworm systemd-sysv,dbus
  # A throw-away root: dpkg need not fsync every file it unpacks (a test speed-up
  # only; the maintainer scripts and apt's decisions are the same).
  echo force-unsafe-io > "$root/etc/dpkg/dpkg.cfg.d/koprogo-test-unsafe-io"
  timing "$(basename "$root"): fresh Debian 12 root (cached debootstrap)" "$(since "$t")"
}

drop_root() {
  local root=$1 ok=$2
  if [[ $ok != 0 && $KEEP == 1 ]]; then
    kp_log "kept $root for inspection (KEEP=1); remove it with: rm -rf --one-file-system $root"
    return 0
  fi
  kp_remove_root "$root"
}

# ---------------------------------------------------------------- install
cmd_install() {
  ensure_built || return 1
  local root=$W/install rc=0
  new_root "$root"
  mkdir -p "$root/root/debs"
  cp "$(deb_of prev)" "$root/root/debs/prev.deb"
  cp "$(deb_of cur)" "$root/root/debs/cur.deb"
  predownload "$root" curl /root/debs/cur.deb || { FAILED+=("install"); return 1; }
  local prev_v cur_v
  prev_v=$(dpkg-deb -f "$(deb_of prev)" Version)
  cur_v=$(dpkg-deb -f "$(deb_of cur)" Version)

  ci_env "$root" PREV_V="$prev_v" CUR_V="$cur_v"

  # The debconf questions (debconf.sh) in the same boot, right after part 1: one
  # script, install-1.sh followed by debconf.sh (which sources nothing twice).
  cat "$CI_SCRIPTS/install-1.sh" "$CI_SCRIPTS/debconf.sh" > "$W/install-1+debconf.sh"
  boot "$root" install-1 900 "$W/install-1+debconf.sh" --private-network || rc=1
  # Part 2: koprogo as PID 1 of a container (no systemd), on the same root.
  if [[ $rc -eq 0 ]]; then pid1_test "$root" || rc=1; fi
  if [[ $rc -eq 0 ]]; then boot "$root" install-3 300 "$CI_SCRIPTS/install-3.sh" --private-network || rc=1; fi
  drop_root "$root" $rc
  [[ $rc -eq 0 ]] || FAILED+=("install")
  return $rc
}

# koprogo run as PID 1 of a container started as root: binds, prepares, drops to
# koprogo, serves; SIGTERM stops it cleanly.
pid1_test() {
  local root=$1 t nsp pid1='' c uid apiuid rc=0 code
  uid=$(awk -F: '$1 == "koprogo" { print $3 }' "$root/etc/passwd")
  apiuid=$(awk -F: '$1 == "koprogo-api" { print $3 }' "$root/etc/passwd")
  t=$(now)
  systemd-nspawn -q -D "$root" --register=no --keep-unit --private-network \
    --kill-signal=SIGTERM --console=pipe /usr/bin/koprogo run > "$W/pid1.console" 2>&1 &
  nsp=$!
  local end=$(( $(date +%s) + 20 ))
  while [[ -z $pid1 && $(date +%s) -lt $end ]]; do
    pid1=$(container_pid1 "$nsp")
    [[ -n $pid1 ]] || sleep 0.2
  done
  pid1_fail() { kp_log "PID 1: FAIL: $*"; rc=1; }
  inside() { nsenter -t "$pid1" -m -n -- "$@"; }
  if [[ -z $pid1 ]]; then
    pid1_fail "no container PID 1 found"
  else
    end=$(( $(date +%s) + 120 ))
    until inside /usr/bin/koprogo status >/dev/null 2>&1 || [[ $(date +%s) -ge $end ]]; do sleep 0.3; done
    if inside /usr/bin/koprogo status >&2; then
      timing "install-2: koprogo run as PID 1: all ready" "$(since "$t")"
    else
      pid1_fail "not ready within 120 s"
    fi
    [[ $(awk '/^Uid:/ { print $2 $3 $4 $5 }' "/proc/$pid1/status") == "$uid$uid$uid$uid" ]] ||
      pid1_fail "PID 1 did not drop to koprogo: $(grep ^Uid: "/proc/$pid1/status")"
    [[ $(awk '/^CapEff:/ { print $2 }' "/proc/$pid1/status") == 0000000000000000 ]] ||
      pid1_fail "PID 1 kept capabilities: $(grep ^CapEff: "/proc/$pid1/status")"
    local kids=0 apikids=0 cu
    for c in /proc/[0-9]*; do
      [[ $(awk '/^PPid:/ { print $2 }' "$c/status" 2>/dev/null) == "$pid1" ]] || continue
      kids=$((kids + 1))
      cu=$(awk '/^Uid:/ { print $2 }' "$c/status")
      case $cu in
        "$uid") ;;
        "$apiuid") apikids=$((apikids + 1)) ;;
        *) pid1_fail "child ${c#/proc/} runs as uid $cu" ;;
      esac
    done
    [[ $kids -ge 3 ]] || pid1_fail "expected PostgreSQL, the launcher and the API as children, found $kids"
    [[ $apikids -ge 2 ]] || pid1_fail "expected the launcher and the API as koprogo-api, found $apikids"
    code=$(inside curl -ksS -o /dev/null -w '%{http_code}' --max-time 10 https://localhost/api/v1/health) || true
    [[ $code == 200 ]] || pid1_fail "health through the proxy: $code"
    code=$(inside curl -ksS -o /dev/null -w '%{http_code}' --max-time 10 https://localhost/) || true
    [[ $code == 200 ]] || pid1_fail "site through the proxy: $code"
    kp_log "PID 1: uid $uid, no capabilities, $kids children ($apikids as koprogo-api), site and API answer"
  fi
  t=$(now)
  kill -TERM "$nsp" 2>/dev/null || true
  local waited=0
  while kill -0 "$nsp" 2>/dev/null && [[ $waited -lt 1500 ]]; do sleep 0.1; waited=$((waited + 1)); done
  if kill -0 "$nsp" 2>/dev/null; then
    pid1_fail "did not stop within 150 s of SIGTERM"
    kill -KILL "$nsp" 2>/dev/null || true
  fi
  local exit_code=0
  wait "$nsp" || exit_code=$?
  [[ $exit_code -eq 0 ]] || pid1_fail "exit code $exit_code after SIGTERM"
  timing "install-2: PID 1 SIGTERM -> exit" "$(since "$t")"
  in_root "$root" /usr/lib/postgresql/15/bin/pg_controldata -D /var/lib/koprogo/pgdata 2>/dev/null |
    grep -q "cluster state: *shut down$" || pid1_fail "PostgreSQL not shut down cleanly"
  if [[ $rc -eq 0 ]]; then kp_log "PID 1: PASS"; else tail -n 30 "$W/pid1.console" >&2; fi
  return $rc
}

# ---------------------------------------------------------------- real
# The real KoproGo (../shared/koprogo-real: koprogo-api and the Astro frontend built
# from the public repository, see its README), unpacked the way tests/common/real.rs
# does: into target/koprogo-real, once, with the same stamp file, so the Rust tests
# and this script share one copy and a newer build in the folder is unpacked again.

# The folder: KOPROGO_REAL_DIR, else the first shared/koprogo-real beside the
# checkout or one of its parents.
real_src() {
  if [[ -n ${KOPROGO_REAL_DIR:-} ]]; then echo "$KOPROGO_REAL_DIR"; return 0; fi
  local d
  d=$(pwd -P)
  while :; do
    [[ -f ${d%/}/shared/koprogo-real/koprogo-api.xz ]] && { echo "${d%/}/shared/koprogo-real"; return 0; }
    [[ $d == / ]] && return 1
    d=$(dirname "$d")
  done
}

# What real.rs writes for a file: "PATH SIZE Some(SECS.NANOSs)" (Rust's Debug of the
# modification time since the epoch: trailing zeros of the fraction dropped).
real_fingerprint() {
  local m
  m=$(stat -c '%.9Y' "$1")
  [[ $m == *.* ]] && { m=${m%"${m##*[!0]}"}; m=${m%.}; }
  echo "$1 $(stat -c %s "$1") Some(${m}s)"
}

# Sets REAL_API and REAL_FRONTEND. Returns 1 after one "skipped: …" line when the
# folder is absent (2 when it is required or broken).
real_artifacts() {
  local src dest=target/koprogo-real tmp stamp f
  if ! src=$(real_src); then
    if [[ -n ${KOPROGO_REAL_REQUIRED:-} ]]; then
      FAILED+=("real: KOPROGO_REAL_REQUIRED is set but no shared/koprogo-real was found"); return 2
    fi
    echo "skipped: real (the whole KoproGo site as a package) needs the real KoproGo (../shared/koprogo-real or KOPROGO_REAL_DIR), which is not on this machine"
    return 1
  fi
  for f in koprogo-api.xz frontend-dist.tar.xz; do
    [[ -f $src/$f ]] || { FAILED+=("real: $src/$f is missing (KOPROGO_REAL_DIR must hold koprogo-api.xz and frontend-dist.tar.xz)"); return 2; }
  done
  stamp="$(real_fingerprint "$src/koprogo-api.xz")
$(real_fingerprint "$src/frontend-dist.tar.xz")"
  if [[ ! -f $dest/.unpacked-from || $(cat "$dest/.unpacked-from") != "$stamp" ]]; then
    command -v xz >/dev/null || kp_die "xz is missing: apt-get install xz-utils"
    kp_log "real: unpacking $src into $dest"
    tmp=target/koprogo-real.tmp.$$
    rm -rf "$tmp"
    mkdir -p "$tmp"
    if ! xz -dc "$src/koprogo-api.xz" > "$tmp/koprogo-api" || ! chmod 0755 "$tmp/koprogo-api" ||
       ! tar -C "$tmp" -xJf "$src/frontend-dist.tar.xz" </dev/null; then
      rm -rf "$tmp"; FAILED+=("real: unpacking $src failed"); return 2
    fi
    printf '%s\n' "$stamp" > "$tmp/.unpacked-from"
    # A Rust test may have unpacked it meanwhile: theirs is as good as ours.
    rm -rf "$dest"
    mv -T "$tmp" "$dest" 2>/dev/null || rm -rf "$tmp"
  fi
  REAL_API=$PWD/$dest/koprogo-api
  REAL_FRONTEND=$PWD/$dest/frontend-dist
  [[ -x $REAL_API && -f $REAL_FRONTEND/index.html ]] ||
    { FAILED+=("real: $REAL_API or $REAL_FRONTEND/index.html missing after unpacking"); return 2; }
}

# The package names dpkg-shlibdeps derives for the ELF files of DEB, one a line.
shlib_packages() {
  local deb=$1 x
  x=$(mktemp -d)
  mkdir -p "$x/debian" "$x/root"
  dpkg-deb -x "$deb" "$x/root"
  printf 'Source: koprogo\n\nPackage: koprogo\nArchitecture: any\n' > "$x/debian/control"
  (cd "$x" && find root -type f -perm -u+x -exec sh -c 'head -c 4 "$1" | grep -q ELF' sh {} \; -print0 |
    xargs -0 dpkg-shlibdeps -O 2>/dev/null) |
    sed -n 's/^shlibs:Depends=//p' | tr ',' '\n' | awk '{ print $1 }' | sort -u
  rm -rf "$x"
}

# The whole KoproGo site as one package: build-deb.sh --api --frontend with the real
# artifacts, lintian, then installed with apt in a fresh booted Debian 12 (private
# network; packages downloaded first from the Debian mirror): all ready under
# systemd, admin123 refused, the generated password logs in over HTTPS checked
# against the local CA, the real frontend and /config.js served, stop and start
# timed, purge leaves nothing.
cmd_real() {
  local r=0
  real_artifacts || r=$?
  case $r in 0) ;; 1) return 0 ;; *) return 1 ;; esac
  ensure_built || return 1
  local root=$W/real rc=0 t deb pkg depends files index_sha
  t=$(now)
  packaging/build-deb.sh --no-build --out "$DEBS/real" --api "$REAL_API" --frontend "$REAL_FRONTEND" >/dev/null ||
    { FAILED+=("real: build-deb.sh --api --frontend (the real KoproGo)"); return 1; }
  timing "real: build-deb.sh --api koprogo-api --frontend frontend-dist" "$(since "$t")"
  deb=$(deb_of real)
  measure "real: package size" "$(du -h "$deb" | cut -f1) ($(stat -c %s "$deb") bytes; installed $(dpkg-deb -f "$deb" Installed-Size) KiB)"

  # Depends must name every library package of its binaries (koprogo-api links
  # libssl.so.3 and libcrypto.so.3: libssl3).
  depends=$(dpkg-deb -f "$deb" Depends)
  kp_log "real: Depends: $depends"
  # (cargo-deb leaves out libgcc-s1 on purpose: priority required, always installed.)
  for pkg in $(shlib_packages "$deb" | grep -v '^libgcc'); do
    [[ ", $depends," == *", $pkg "* || ", $depends," == *", $pkg,"* ]] || { FAILED+=("real: Depends lacks $pkg (dpkg-shlibdeps): $depends"); rc=1; }
  done
  [[ ", $depends," == *", libssl3 "* ]] || { FAILED+=("real: Depends lacks libssl3: $depends"); rc=1; }
  files=$(find "$REAL_FRONTEND" -type f | wc -l)
  [[ $(dpkg-deb -c "$deb" | grep -c '^-.* \./usr/share/koprogo/frontend/') -eq $files ]] ||
    { FAILED+=("real: the package does not hold the $files files of $REAL_FRONTEND"); rc=1; }
  lint_deb "$deb" || rc=1
  [[ $rc -eq 0 ]] || return 1

  new_root "$root"
  mkdir -p "$root/root/debs"
  cp "$deb" "$root/root/debs/real.deb"
  predownload "$root" curl /root/debs/real.deb || { FAILED+=("real: apt download"); drop_root "$root" 1; return 1; }
  index_sha=$(sha256sum < "$REAL_FRONTEND/index.html" | cut -d' ' -f1)
  ci_env "$root" INDEX_SHA="$index_sha" FILES="$files"
  boot "$root" real 900 "$CI_SCRIPTS/real.sh" --private-network || rc=1
  drop_root "$root" $rc
  [[ $rc -eq 0 ]] || FAILED+=("real")
  return $rc
}

# ---------------------------------------------------------------- offline
cmd_offline() {
  ensure_built || return 1
  local root=$W/offline rc=0 t bundle
  t=$(now)
  bundle=$(packaging/offline-bundle.sh --deb "$(deb_of cur)" --out "$W/bundle" | tail -n 1)
  timing "offline: offline-bundle.sh" "$(since "$t")"
  kp_log "bundle: $(tar -tf "$bundle" | grep -c '\.deb$') packages, $(du -h "$bundle" | cut -f1)"
  new_root "$root"
  rm -f "$root"/etc/apt/sources.list "$root"/etc/apt/sources.list.d/*
  rm -rf "$root"/var/lib/apt/lists/*
  cp "$bundle" "$root/root/"
  ci_env "$root" BUNDLE="$(basename "$bundle")"
  HOOK=offline_host_checks boot "$root" offline 600 "$CI_SCRIPTS/offline.sh" --private-network || rc=1
  drop_root "$root" $rc
  [[ $rc -eq 0 ]] || FAILED+=("offline")
  return $rc
}

# shellcheck disable=SC2317 # called through HOOK
offline_host_checks() {
  local root=$1 pid1=$2 code ok=0 url
  for url in https://localhost/ https://localhost/api/v1/health; do
    code=$(nsenter -t "$pid1" -n curl -ksS -o /dev/null -w '%{http_code}' --max-time 10 "$url" 2>&1) || true
    kp_log "offline: $url -> $code"
    [[ $code == 200 ]] || ok=1
  done
  return "$ok"
}

# ---------------------------------------------------------------- pg-upgrade
cmd_pg_upgrade() {
  ensure_built || return 1
  local root=$W/pgupgrade rc=0 t
  new_root "$root"
  mkdir -p "$root/root/debs"
  cp "$(deb_of cur)" "$root/root/debs/cur.deb"
  predownload "$root" curl /root/debs/cur.deb || { FAILED+=("pg-upgrade"); return 1; }
  boot "$root" pgup-1 900 "$CI_SCRIPTS/pgup-1.sh" --private-network || rc=1

  if [[ $rc -eq 0 ]]; then
    t=$(now)
    kp_log "pgup: upgrading the root to Debian 13 (apt full-upgrade)"
    kp_sources trixie > "$root/etc/apt/sources.list"
    install -m 0755 "$CI_SCRIPTS/pgup-distupgrade.sh" "$root/root/pgup-distupgrade.sh"
    if in_root "$root" /bin/sh /root/pgup-distupgrade.sh > "$W/pgup-distupgrade.log" 2>&1; then
      timing "pgup: apt full-upgrade to Debian 13" "$(since "$t")"
      tail -n 15 "$W/pgup-distupgrade.log" >&2
      if sed -n '/--- apt-get autoremove/,/--- without/p' "$W/pgup-distupgrade.log" | grep -q '^Remv postgresql-15 '; then
        kp_log "pgup: FAIL: apt autoremove would remove postgresql-15"; rc=1
      elif ! sed -n '/--- without/,$p' "$W/pgup-distupgrade.log" | grep -q '^Remv postgresql-15 '; then
        kp_log "pgup: FAIL: the check proves nothing (postgresql-15 not autoremovable even without our entry)"; rc=1
      else
        kp_log "pgup: apt autoremove keeps postgresql-15 thanks to 02autoremove-koprogo (it would remove it without)"
      fi
      [[ -x $root/usr/lib/postgresql/17/bin/postgres ]] || { kp_log "pgup: FAIL: no PostgreSQL 17"; rc=1; }
    else
      tail -n 40 "$W/pgup-distupgrade.log" >&2
      kp_log "pgup: FAIL: full-upgrade (log: $W/pgup-distupgrade.log)"; rc=1
    fi
  fi

  if [[ $rc -eq 0 ]]; then boot "$root" pgup-2 900 "$CI_SCRIPTS/pgup-2.sh" --private-network || rc=1; fi
  drop_root "$root" $rc
  [[ $rc -eq 0 ]] || FAILED+=("pg-upgrade")
  return $rc
}

# ---------------------------------------------------------------- repo
# cmd_repo: the signed APT repository, in its own file.
# shellcheck source=packaging/test-repo.sh
. packaging/test-repo.sh

# ---------------------------------------------------------------- watchdog
# A crash-looping API (after READY) must not get the whole appliance killed by
# systemd's watchdog: the supervisor has to keep pinging while its children flap.
cmd_watchdog() {
  ensure_built || return 1
  local root=$W/watchdog rc=0
  new_root "$root"
  mkdir -p "$root/root/debs"
  cp "$(deb_of cur)" "$root/root/debs/cur.deb"
  predownload "$root" /root/debs/cur.deb || { FAILED+=("watchdog"); return 1; }
  boot "$root" watchdog 600 "$CI_SCRIPTS/watchdog.sh" --private-network || rc=1
  drop_root "$root" $rc
  [[ $rc -eq 0 ]] || FAILED+=("watchdog")
  return $rc
}

cmd_clean() {
  local d
  for d in "$W"/*/; do [[ -d $d ]] && kp_remove_root "$d"; done
  rm -rf --one-file-system "$W" "$KP_CACHE"
  kp_log "removed $W and $KP_CACHE"
}

# ---------------------------------------------------------------- main
[[ $# -gt 0 ]] || set -- all
[[ " $* " == *" all "* ]] && set -- build lint install real offline pg-upgrade repo
need_root_tools
mkdir -p "$W"
started=$(now)
ns_before=" $(ns_procs | tr '\n' ' ') "
status=0
for c in "$@"; do
  case $c in
    build) cmd_build || { BUILD_FAILED=1; status=1; } ;;
    lint) cmd_lint || status=1 ;;
    install) cmd_install || status=1 ;;
    real) cmd_real || status=1 ;;
    offline) cmd_offline || status=1 ;;
    pg-upgrade) cmd_pg_upgrade || status=1 ;;
    watchdog) cmd_watchdog || status=1 ;;
    repo) cmd_repo || status=1 ;;
    clean) cmd_clean ;;
    *) kp_die "unknown command $c: build | lint | install | real | offline | pg-upgrade | repo | watchdog | all | clean" ;;
  esac
done
left=
for p in $(ns_procs); do [[ $ns_before == *" $p "* ]] || left="$left $p"; done
for d in "$W"/install "$W"/real "$W"/offline "$W"/pgupgrade "$W"/watchdog "$W"/repo; do [[ -d $d ]] && left="$left$(kp_mounts_in "$d" | tr '\n' ' ')"; done
if [[ -n ${left// /} ]]; then kp_log "LEFT BEHIND (processes in containers, mounts):$left"; status=1; fi
if pgrep -x systemd-nspawn >/dev/null 2>&1; then kp_log "LEFT BEHIND: a systemd-nspawn process"; status=1; fi
echo
echo "timings:"
printf '  %s\n' "${TIMINGS[@]}"
printf '  %-60s %7s s\n' "total" "$(since "$started")"
if [[ ${#MEASURES[@]} -gt 0 ]]; then
  echo "measured:"
  printf '  %s\n' "${MEASURES[@]}"
fi
if [[ $status -eq 0 ]]; then
  echo "package tests: PASS ($*)"
else
  echo "package tests: FAIL: ${FAILED[*]:-see above}"
fi
exit $status
