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
#   all         build lint install real offline pg-upgrade
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
  packaging/build-deb.sh --no-build --out "$DEBS/prev" --version "$v~prev-1" \
    --api "$target/release/demo-backend" --frontend tests/demo-frontend >/dev/null &&
  packaging/build-deb.sh --no-build --out "$DEBS/cur" \
    --api "$target/release/demo-backend" --frontend tests/demo-frontend >/dev/null ||
    { FAILED+=("build: build-deb.sh --api --frontend"); return 1; }
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
  local t deb rc=0
  for deb in "$(deb_of base)" "$(deb_of cur)"; do
    lint_deb "$deb" || rc=1
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
# The checks run inside the booted root as a oneshot ci.service; they write
# /root/ci.log (STEP lines carry timings) and /root/ci.result, then power off.
write_ci_lib() {
  local root=$1
  cat > "$root/root/ci-lib.sh" <<'EOF'
exec > /root/ci.log 2>&1
set -uo pipefail
export DEBIAN_FRONTEND=noninteractive PATH=/usr/sbin:/usr/bin:/sbin:/bin
FAILS=0
STEP=setup STEP_T=$(date +%s.%N)
step() { STEP=$1; STEP_T=$(date +%s.%N); echo "--- $1"; }
step_done() { awk -v n="$STEP" -v a="$STEP_T" -v b="$(date +%s.%N)" 'BEGIN { printf "STEP %s|%.1f\n", n, b - a }'; }
ok() { echo "ok: $*"; }
fail() { echo "FAIL: $*"; FAILS=$((FAILS + 1)); }
check() { local what=$1; shift; if "$@"; then ok "$what"; else fail "$what"; fi; }
# Like check, but nothing after it makes sense when it fails: stop here.
must() { local what=$1; shift; if "$@"; then ok "$what"; else fail "$what (stopping here)"; exit 1; fi; }
# wait_for SECONDS CMD...: true as soon as CMD succeeds.
wait_for() {
  local end=$(( $(date +%s) + $1 )); shift
  while [ "$(date +%s)" -lt "$end" ]; do "$@" >/dev/null 2>&1 && return 0; sleep 0.3; done
  "$@" >/dev/null 2>&1
}
perm() { stat -c '%a %U:%G' "$1" 2>/dev/null; }
is_eq() { [ "$1" = "$2" ] || { echo "  expected [$2], got [$1]"; return 1; }; }
has() { case "$1" in *"$2"*) return 0 ;; esac; echo "  [$2] not found"; return 1; }
ready() { koprogo status >/dev/null 2>&1; }
active() { [ "$(systemctl is-active koprogo)" = active ]; }
http() { curl -ksS -o /tmp/body -w '%{http_code}' --max-time 10 "$@"; }
# The unit's processes: its main pid and every descendant.
unit_pids() {
  local all main changed s p pp
  main=$(systemctl show -p MainPID --value koprogo)
  [ "${main:-0}" -gt 0 ] || return 0
  all=" $main "; changed=1
  while [ $changed = 1 ]; do
    changed=0
    for s in /proc/[0-9]*/status; do
      p=${s#/proc/}; p=${p%/status}
      pp=$(awk '/^PPid:/ { print $2 }' "$s" 2>/dev/null) || continue
      case "$all" in *" $pp "*) case "$all" in *" $p "*) ;; *) all="$all$p "; changed=1 ;; esac ;; esac
    done
  done
  echo $all
}
# Processes of a user (by name, or by uid once the user is gone), from /proc
# (minbase has no ps).
user_procs() {
  local uid s
  case $1 in
    *[!0-9]*) uid=$(id -u "$1" 2>/dev/null) || return 0 ;;
    *) uid=$1 ;;
  esac
  for s in /proc/[0-9]*/status; do
    awk -v u="$uid" '/^Uid:/ && $2 == u { found = 1 } END { exit !found }' "$s" 2>/dev/null &&
      { s=${s#/proc/}; echo "${s%/status}"; }
  done
  return 0
}
# Lets the host run checks from outside (its curl in our network namespace).
host_checks() {
  rm -f /root/hook.done
  touch /root/hook.wait
  wait_for 180 test -f /root/hook.done
  local r
  r=$(cat /root/hook.done 2>/dev/null)
  rm -f /root/hook.wait /root/hook.done
  [ "$r" = PASS ]
}
field() { awk -v k="$2:" '$1 == k { print $2; exit }' "/proc/$1/status" 2>/dev/null; }
check_processes() {
  local uid api main p n=0 bad=0
  uid=$(id -u koprogo)
  api=$(id -u koprogo-api)
  main=$(systemctl show -p MainPID --value koprogo)
  for p in $(unit_pids); do
    n=$((n + 1))
    case "$(field "$p" Uid)" in
      "$uid" | "$api") ;;
      *) echo "  pid $p ($(cat /proc/$p/comm)) uid $(field "$p" Uid)"; bad=1 ;;
    esac
    if [ "$p" != "$main" ]; then
      [ "$(field "$p" CapEff)" = 0000000000000000 ] || { echo "  pid $p CapEff $(field "$p" CapEff)"; bad=1; }
      [ "$(field "$p" CapAmb)" = 0000000000000000 ] || { echo "  pid $p CapAmb $(field "$p" CapAmb)"; bad=1; }
    fi
  done
  echo "  $n processes, all uid $uid or $api; children without capabilities"
  [ $n -ge 3 ] && [ $bad = 0 ]
}
# The API server and the launcher run as koprogo-api, which reads nothing of the
# appliance but its uploads and temp files.
check_api_user() {
  local p n=0 bad=0
  for p in $(user_procs koprogo-api); do n=$((n + 1)); done
  [ $n -ge 2 ] || { echo "  $n processes of koprogo-api (API + launcher expected)"; bad=1; }
  for f in /var/lib/koprogo/secrets.env /var/lib/koprogo/tls/ca/root.key /var/lib/koprogo/pgdata/PG_VERSION; do
    if runuser -u koprogo-api -- cat "$f" >/dev/null 2>&1; then echo "  koprogo-api can read $f"; bad=1; fi
  done
  if runuser -u koprogo-api -- ls /var/lib/koprogo >/dev/null 2>&1; then echo "  koprogo-api can list the state"; bad=1; fi
  if runuser -u koprogo-api -- koprogo status >/dev/null 2>&1; then echo "  koprogo-api can use the control socket"; bad=1; fi
  [ $bad = 0 ]
}
# What every installed package must look like once it runs under systemd: unit,
# PostgreSQL, the site and API through the proxy, the user, modes, processes.
installed_checks() {
  check "enabled" [ "$(systemctl is-enabled koprogo)" = enabled ]
  check "PostgreSQL installed as a dependency" test -x /usr/lib/postgresql/15/bin/postgres
  check "no distro cluster created" [ -z "$(ls /etc/postgresql 2>/dev/null)" ]
  check "no distro cluster running" [ -z "$(pg_lsclusters -h 2>/dev/null)" ]
  check "site through the proxy" is_eq "$(http https://localhost/)" 200
  check "site is the frontend" grep -q "<html" /tmp/body
  check "API health through the proxy" is_eq "$(http https://localhost/api/v1/health)" 200
  check "plain HTTP answers (redirect)" [ "$(http http://localhost/)" -lt 500 ]
  check "user koprogo (system, nologin)" is_eq "$(getent passwd koprogo | cut -d: -f6,7)" "/var/lib/koprogo:/usr/sbin/nologin"
  check "user koprogo-api (system, nologin)" is_eq "$(getent passwd koprogo-api | cut -d: -f7)" "/usr/sbin/nologin"
  check "koprogo in group koprogo-api" sh -c 'id -nG koprogo | tr " " "\n" | grep -qx koprogo-api'
  check "state dir (passable for the API's group)" is_eq "$(perm /var/lib/koprogo)" "710 koprogo:koprogo-api"
  check "log dir" is_eq "$(perm /var/log/koprogo)" "750 koprogo:koprogo"
  check "run dir (passable for the API's group)" is_eq "$(perm /run/koprogo)" "710 koprogo:koprogo-api"
  check "cluster dir" is_eq "$(perm /var/lib/koprogo/pgdata)" "700 koprogo:koprogo"
  check "secrets generated, 0600" is_eq "$(perm /var/lib/koprogo/secrets.env)" "600 koprogo:koprogo"
  check "secrets complete" grep -q '^JWT_SECRET=.' /var/lib/koprogo/secrets.env
  check "config dir" is_eq "$(perm /etc/koprogo)" "750 root:koprogo"
  check "config file (conffile)" is_eq "$(perm /etc/koprogo/koprogo.toml)" "640 root:koprogo"
  check "no secret in the package" sh -c '! dpkg -L koprogo | grep -qi secret'
  check "apt keeps PostgreSQL 15" grep -q '"^postgresql-15\$"' /etc/apt/apt.conf.d/02autoremove-koprogo
  check "processes: service users, no stray capabilities" check_processes
  check "the API runs as koprogo-api and reads nothing of the appliance" check_api_user
  check "supervisor has CAP_NET_BIND_SERVICE only" is_eq "$(field "$(systemctl show -p MainPID --value koprogo)" CapEff)" 0000000000000400
}
# apt-get purge, then nothing of koprogo may be left: files, user, group, overrides,
# systemd links, dpkg records, processes.
purge_checks() {
  local uid
  uid=$(id -u koprogo 2>/dev/null)
  step "purge"
  check "purge" apt-get purge -y -q koprogo
  step_done
  check "package gone" sh -c '! dpkg -l koprogo 2>/dev/null | grep -q "^[ir]"'
  for p in /var/lib/koprogo /var/log/koprogo /run/koprogo /etc/koprogo \
           /etc/apt/apt.conf.d/02autoremove-koprogo /etc/postgresql-common/createcluster.d/koprogo.conf \
           /usr/bin/koprogo /usr/lib/koprogo /usr/share/koprogo; do
    check "purged: $p" test ! -e "$p"
  done
  check "purged: user" sh -c '! getent passwd koprogo'
  check "purged: group" sh -c '! getent group koprogo'
  check "purged: user koprogo-api" sh -c '! getent passwd koprogo-api'
  check "purged: group koprogo-api" sh -c '! getent group koprogo-api'
  check "purged: statoverrides" sh -c '! dpkg-statoverride --list | grep -q koprogo'
  check "purged: systemd links" [ -z "$(find /etc/systemd /var/lib/systemd -name 'koprogo*' 2>/dev/null)" ]
  check "purged: nothing under /var/lib/dpkg/info" [ -z "$(ls /var/lib/dpkg/info/koprogo.* 2>/dev/null)" ]
  if [ -n "$uid" ]; then check "purged: no process of uid $uid left" [ -z "$(user_procs "$uid")" ]; fi
}
finish() {
  journalctl -u koprogo --no-pager > /root/koprogo.journal 2>&1 || true
  if [ $FAILS -eq 0 ]; then echo PASS > /root/ci.result; else echo "FAIL ($FAILS checks)" > /root/ci.result; fi
  sync
  systemctl poweroff --no-block
}
trap finish EXIT
EOF
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

# boot ROOT NAME LIMIT_SECONDS SCRIPT [nspawn options...]: runs SCRIPT (bash, with
# ci-lib.sh sourced) as a oneshot unit in ROOT booted with systemd as PID 1. With
# HOOK=function set, `host_checks` inside runs "function ROOT PID1" on the host.
boot() {
  local root=$1 name=$2 limit=$3 script=$4; shift 4
  write_ci_lib "$root"
  { echo '. /root/ci-lib.sh'; cat "$script"; } > "$root/root/ci.sh"
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

  cat > "$W/install-1.sh" <<EOF
PREV_V='$prev_v' CUR_V='$cur_v'
EOF
  cat >> "$W/install-1.sh" <<'EOF'
apt-get install -y -qq curl >/dev/null
step "apt-get install ./koprogo (prev, pulls PostgreSQL)"
check "install prev" apt-get install -y -q /root/debs/prev.deb
step_done
step "unit active and status all ready"
must "unit active" wait_for 120 active
must "status all ready" wait_for 120 ready
step_done
koprogo status
installed_checks

step "write a row through the proxy"
id=$(curl -ksS --max-time 10 -X POST --data 'row written before the upgrade' https://localhost/api/v1/items | sed -n 's/.*"id":\([0-9]*\).*/\1/p')
check "row created (id ${id:-none})" [ -n "$id" ]
echo "$id" > /root/item.id
step_done
step "backup create + verify under the hardened unit"
check "backup create" koprogo backup create
check "backup verify" koprogo backup verify
step_done

step "apt-get install --reinstall (same version)"
sha=$(sha256sum /var/lib/koprogo/secrets.env)
check "reinstall" apt-get install -y -q --reinstall /root/debs/prev.deb
check "active after reinstall" wait_for 120 ready
check "reinstall keeps the secrets" is_eq "$(sha256sum /var/lib/koprogo/secrets.env)" "$sha"
step_done

step "upgrade refused while the pre-upgrade backup fails"
pid=$(systemctl show -p MainPID --value koprogo)
backups() { ls /var/lib/koprogo/backups/*.kbk 2>/dev/null | wc -l; }
# backup.dir is a file now: the backup fails with a clear error.
mv /var/lib/koprogo/backups /var/lib/koprogo/backups.away && touch /var/lib/koprogo/backups
out=$(apt-get install -y -q /root/debs/cur.deb 2>&1); code=$?
echo "$out" | grep "koprogo:"
rm -f /var/lib/koprogo/backups && mv /var/lib/koprogo/backups.away /var/lib/koprogo/backups
check "apt-get install fails" [ "$code" -ne 0 ]
check "says why and what to do" has "$out" "the backup before the upgrade failed"
check "old version still installed" is_eq "$(dpkg-query -W -f '${Version} ${Status}' koprogo)" "$PREV_V install ok installed"
# (dpkg's abort-upgrade runs the old postinst, whose debhelper part restarts it.)
check "old version running" wait_for 120 ready
check "the data untouched" has "$(curl -ksS --max-time 10 https://localhost/api/v1/items/$(cat /root/item.id))" "row written before the upgrade"
pid=$(systemctl show -p MainPID --value koprogo)
step_done
step "upgrade prev -> cur (apt-get install ./cur)"
before=$(backups)
out=$(apt-get install -y -q /root/debs/cur.deb 2>&1); code=$?
echo "$out" | grep "koprogo:"
check "upgrade" is_eq "$code" 0
check "a backup taken before the upgrade" is_eq "$(backups)" "$((before + 1))"
check "the upgrade names it" has "$out" "backup written: /var/lib/koprogo/backups/"
check "status ready after the upgrade" wait_for 120 ready
step_done
check "new version installed" is_eq "$(dpkg-query -W -f '${Version}' koprogo)" "$CUR_V"
check "service restarted by the upgrade" [ "$(systemctl show -p MainPID --value koprogo)" != "$pid" ]
check "upgrade keeps the secrets" is_eq "$(sha256sum /var/lib/koprogo/secrets.env)" "$sha"
check "row kept across the upgrade" has "$(curl -ksS --max-time 10 https://localhost/api/v1/items/$id)" "row written before the upgrade"
check "config perms kept" is_eq "$(perm /etc/koprogo/koprogo.toml)" "640 root:koprogo"

step "systemctl stop"
check "stop" systemctl stop koprogo
step_done
check "inactive" [ "$(systemctl is-active koprogo)" = inactive ]
check "PostgreSQL shut down cleanly" sh -c '/usr/lib/postgresql/15/bin/pg_controldata /var/lib/koprogo/pgdata | grep -q "cluster state: *shut down$"'
check "no process of koprogo left" [ -z "$(user_procs koprogo)" ]
check "journal: no notify from children" sh -c '! journalctl -u koprogo | grep -q "reception only permitted"'
check "journal: no watchdog timeout" sh -c '! journalctl -u koprogo | grep -qi "watchdog timeout"'
check "journal: stopped in order" sh -c 'journalctl -u koprogo | grep -q "koprogo stopped after"'
systemctl disable -q koprogo
EOF

  # Part 2: koprogo as PID 1 of a container (no systemd), on the same root.
  cat > "$W/install-3.sh" <<'EOF'
id=$(cat /root/item.id)
step "remove (keeps data)"
check "remove" apt-get remove -y -q koprogo
step_done
check "data kept on remove" test -f /var/lib/koprogo/pgdata/PG_VERSION
check "secrets kept on remove" test -f /var/lib/koprogo/secrets.env
check "user kept on remove" getent passwd koprogo
check "config kept on remove" test -f /etc/koprogo/koprogo.toml
check "apt still keeps PostgreSQL 15" test -f /etc/apt/apt.conf.d/02autoremove-koprogo

purge_checks
EOF
  boot "$root" install-1 900 "$W/install-1.sh" --private-network || rc=1
  if [[ $rc -eq 0 ]]; then pid1_test "$root" || rc=1; fi
  if [[ $rc -eq 0 ]]; then boot "$root" install-3 300 "$W/install-3.sh" --private-network || rc=1; fi
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
  (cd "$x" && find root -type f -perm -u+x -exec sh -c 'head -c 4 "$1" | grep -q ELF' sh {} \; -print |
    xargs dpkg-shlibdeps -O 2>/dev/null) |
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
  cat > "$W/real.sh" <<EOF
INDEX_SHA='$index_sha' FILES='$files'
EOF
  cat >> "$W/real.sh" <<'EOF'
apt-get install -y -qq curl >/dev/null
step "apt-get install ./koprogo (whole site: pulls PostgreSQL, libssl3; first start)"
must "install" apt-get install -y -q /root/debs/real.deb
step_done
step "unit active and status all ready"
must "unit active" wait_for 300 active
must "status all ready" wait_for 300 ready
step_done
koprogo status
usec() { systemctl show -p "$1" --value koprogo; }
echo "MEASURE first start (initdb, migrations): koprogo run to READY=1|$(awk -v a="$(usec ExecMainStartTimestampMonotonic)" -v b="$(usec ActiveEnterTimestampMonotonic)" 'BEGIN { printf "%.1f s", (b - a) / 1e6 }')"
installed_checks
check "libssl3 installed" is_eq "$(dpkg-query -W -f '${Status}' libssl3)" "install ok installed"
check "koprogo-api finds its libraries" sh -c 'ldd /usr/lib/koprogo/koprogo-api && ! ldd /usr/lib/koprogo/koprogo-api | grep -q "not found"'

# Over HTTPS, the certificate checked against the appliance's local CA.
tls() { curl -sS --max-time 30 --cacert <(koprogo ca export) "$@"; }
login() {
  tls -o /tmp/login -w '%{http_code}' -H 'Content-Type: application/json' \
    --data "{\"email\":\"admin@koprogo.com\",\"password\":\"$1\"}" https://localhost/api/v1/auth/login
}
superadmin_checks() {
  local pw token
  pw=$(koprogo admin-password)
  check "koprogo admin-password: a generated password" sh -c '[ -n "$1" ] && [ "$1" != admin123 ]' sh "$pw"
  check "admin123 refused" is_eq "$(login admin123)" 401
  check "the generated password logs in" is_eq "$(login "$pw")" 200
  token=$(sed -n 's/.*"token" *: *"\([^"]*\)".*/\1/p' /tmp/login)
  check "the login answer has a token" [ -n "$token" ]
  check "the token works (/api/v1/auth/me)" has "$(tls -H "Authorization: Bearer $token" https://localhost/api/v1/auth/me)" '"admin@koprogo.com"'
}
superadmin_checks
check "/ answers" is_eq "$(tls -o /tmp/index.html -w '%{http_code}' https://localhost/)" 200
check "/ is the real frontend's index.html" is_eq "$(sha256sum < /tmp/index.html | cut -d' ' -f1)" "$INDEX_SHA"
check "/config.js answers" is_eq "$(tls -o /tmp/config.js -w '%{http_code}' https://localhost/config.js)" 200
cat /tmp/config.js
check "/config.js points to /api/v1" grep -Eq "API_URL: *[\"']/api/v1[\"']" /tmp/config.js
asset=$(cd /usr/share/koprogo/frontend && find _astro -type f -name '*.js' | head -n 1)
check "an asset (/$asset)" sh -c 'curl -sS --max-time 30 --cacert "$1" -o /tmp/asset "https://localhost/$2" && cmp /tmp/asset "/usr/share/koprogo/frontend/$2"' sh <(koprogo ca export) "$asset"
check "the frontend installed ($FILES files)" is_eq "$(find /usr/share/koprogo/frontend -type f | wc -l)" "$FILES"

# Memory of the whole tree (supervisor, PostgreSQL, API) after start and these requests.
rss=0 pss=0 n=0
for p in $(unit_pids); do
  r=$(field "$p" VmRSS); s=$(awk '/^Pss:/ { print $2 }' "/proc/$p/smaps_rollup" 2>/dev/null)
  echo "  $p $(cat "/proc/$p/comm"): RSS ${r:-0} kB, PSS ${s:-0} kB"
  rss=$((rss + ${r:-0})); pss=$((pss + ${s:-0})); n=$((n + 1))
done
echo "MEASURE memory of the tree ($n processes)|RSS $((rss / 1024)) MiB (sum), PSS $((pss / 1024)) MiB"
check "the tree has processes" [ "$n" -ge 3 ]

step "systemctl stop"
check "stop" systemctl stop koprogo
step_done
check "PostgreSQL shut down cleanly" sh -c '/usr/lib/postgresql/15/bin/pg_controldata /var/lib/koprogo/pgdata | grep -q "cluster state: *shut down$"'
check "no process of koprogo left" [ -z "$(user_procs koprogo)" ]
check "journal: stopped in order" sh -c 'journalctl -u koprogo | grep -q "koprogo stopped after"'
step "systemctl start -> status all ready"
t0=$(date +%s.%N)
check "start" systemctl start koprogo
t1=$(date +%s.%N)
must "status all ready" wait_for 300 ready
step_done
echo "MEASURE systemctl start: returned (READY=1)|$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f s", b - a }')"
# The API resets admin@koprogo.com to admin123 at every start: closed again.
superadmin_checks
check "journal: no notify from children" sh -c '! journalctl -u koprogo | grep -q "reception only permitted"'
check "journal: no watchdog timeout" sh -c '! journalctl -u koprogo | grep -qi "watchdog timeout"'

# Purged while running: prerm stops it.
purge_checks
EOF
  boot "$root" real 900 "$W/real.sh" --private-network || rc=1
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
  cat > "$W/offline.sh" <<EOF
BUNDLE='$(basename "$bundle")'
EOF
  cat >> "$W/offline.sh" <<'EOF'
check "no apt sources" [ -z "$(cat /etc/apt/sources.list /etc/apt/sources.list.d/* 2>/dev/null)" ]
check "no network but loopback" [ "$(ls /sys/class/net | tr '\n' ' ')" = "lo " ]
step "unpack + install.sh (no network, no sources)"
cd /root && tar -xf "$BUNDLE"
check "install.sh" "/root/${BUNDLE%.tar}/install.sh"
step_done
must "unit active" wait_for 60 active
must "status all ready" wait_for 120 ready
check "tls mode internal" sh -c 'koprogo check 2>&1 | grep -qi "tls mode internal"'
check "site and API through the proxy (curl from the host, in our network namespace)" host_checks
check "ca export" koprogo ca export /root/ca.pem
check "secrets generated" is_eq "$(perm /var/lib/koprogo/secrets.env)" "600 koprogo:koprogo"
systemctl stop koprogo
EOF
  HOOK=offline_host_checks boot "$root" offline 600 "$W/offline.sh" --private-network || rc=1
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
  cat > "$W/pgup-1.sh" <<'EOF'
apt-get install -y -qq curl >/dev/null
step "install koprogo (PostgreSQL 15)"
must "install" apt-get install -y -q /root/debs/cur.deb
must "ready" wait_for 120 ready
step_done
step "write data (API rows + 200k-row table)"
for i in 1 2 3; do
  curl -ksS --max-time 10 -X POST --data "row $i before PostgreSQL 17" https://localhost/api/v1/items >/dev/null
done
koprogo psql -q -c "CREATE TABLE t (id int PRIMARY KEY, v text, j jsonb, u uuid DEFAULT gen_random_uuid());
  INSERT INTO t (id, v, j) SELECT g, md5(g::text), jsonb_build_object('g', g) FROM generate_series(1, 200000) g;
  CREATE INDEX ON t (v);"
step_done
digest() {
  koprogo psql -Atc "SELECT (SELECT count(*) FROM t), (SELECT md5(string_agg(id || v || j::text || u::text, ',' ORDER BY id)) FROM t),
    (SELECT md5(string_agg(id || body, ',' ORDER BY id)) FROM items)"
}
digest > /root/digest.before
cat /root/digest.before
check "digest taken" grep -q '^200000|' /root/digest.before
check "cluster is 15" is_eq "$(cat /var/lib/koprogo/pgdata/PG_VERSION)" 15
systemctl disable -q --now koprogo
check "stopped" [ "$(systemctl is-active koprogo)" = inactive ]
EOF
  boot "$root" pgup-1 900 "$W/pgup-1.sh" --private-network || rc=1

  if [[ $rc -eq 0 ]]; then
    t=$(now)
    kp_log "pgup: upgrading the root to Debian 13 (apt full-upgrade)"
    kp_sources trixie > "$root/etc/apt/sources.list"
    if in_root "$root" sh -c 'export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq &&
        apt-get -y -q -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold full-upgrade &&
        apt-get -y -q install postgresql &&
        echo "--- apt-get autoremove --dry-run" && apt-get autoremove --dry-run &&
        mv /etc/apt/apt.conf.d/02autoremove-koprogo /root/keep.conf &&
        echo "--- without koprogo'"'"'s entry" && apt-get autoremove --dry-run &&
        mv /root/keep.conf /etc/apt/apt.conf.d/02autoremove-koprogo' > "$W/pgup-distupgrade.log" 2>&1; then
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

  cat > "$W/pgup-2.sh" <<'EOF'
digest() {
  koprogo psql -Atc "SELECT (SELECT count(*) FROM t), (SELECT md5(string_agg(id || v || j::text || u::text, ',' ORDER BY id)) FROM t),
    (SELECT md5(string_agg(id || body, ',' ORDER BY id)) FROM items)"
}
grep VERSION_CODENAME /etc/os-release
check "Debian 13" grep -q 'VERSION_CODENAME=trixie' /etc/os-release
check "no distro cluster created" [ -z "$(ls /etc/postgresql 2>/dev/null)" ]
step "refused while PostgreSQL 15 is gone"
mv /usr/lib/postgresql/15 /root/pg15.away
out=$(koprogo check 2>&1); echo "$out"
check "check names the fix" has "$out" "install postgresql-15 again"
out=$(timeout 60 koprogo run 2>&1); code=$?; echo "$out"
check "run refuses (exit 2)" is_eq "$code" 2
check "nothing touched" sh -c '[ "$(cat /var/lib/koprogo/pgdata/PG_VERSION)" = 15 ] && [ ! -e /var/lib/koprogo/pgdata.15 ]'
mv /root/pg15.away /usr/lib/postgresql/15
step_done
step "start: pg_upgrade 15 -> 17 until all ready"
systemctl enable -q koprogo
check "start" systemctl start koprogo
must "ready" wait_for 300 ready
step_done
koprogo status
grep -iE "upgrad|pg_upgrade|copy|extension|statistics" /var/log/koprogo/koprogo.log | cut -c1-600
check "cluster is 17" is_eq "$(cat /var/lib/koprogo/pgdata/PG_VERSION)" 17
check "old cluster kept" test -f /var/lib/koprogo/pgdata.15/PG_VERSION
check "revert instructions kept" grep -q "mv /var/lib/koprogo/pgdata.15 /var/lib/koprogo/pgdata" /var/lib/koprogo/pgdata.15.README
check "log: upgraded" grep -q "PostgreSQL upgraded from 15 to 17" /var/log/koprogo/koprogo.log
check "log: how to go back" grep -q "To go back to PostgreSQL 15" /var/log/koprogo/koprogo.log
digest > /root/digest.after
cat /root/digest.after
check "data identical" is_eq "$(cat /root/digest.after)" "$(cat /root/digest.before)"
check "API reads the old rows" has "$(curl -ksS --max-time 10 https://localhost/api/v1/items/1)" "row 1 before PostgreSQL 17"
check "API writes" has "$(curl -ksS --max-time 10 -X POST --data 'row after' https://localhost/api/v1/items)" '"id"'
check "server is 17" has "$(koprogo psql -Atc 'SHOW server_version')" "17."
check "extensions updated" wait_for 60 sh -c '[ -z "$(koprogo psql -Atc "SELECT e.extname FROM pg_extension e JOIN pg_available_extensions a ON a.name = e.extname WHERE a.default_version <> e.extversion")" ]'
check "statistics rebuilt" wait_for 60 grep -q "optimizer statistics rebuilt" /var/log/koprogo/koprogo.log
step "go back to 15 by the logged instructions"
systemctl stop koprogo
mv /var/lib/koprogo/pgdata /var/lib/koprogo/pgdata.17.rejected
mv /var/lib/koprogo/pgdata.15 /var/lib/koprogo/pgdata
sed -i 's|^\[postgres\]$|[postgres]\nbin_dir = "/usr/lib/postgresql/15/bin"|' /etc/koprogo/koprogo.toml
check "start on 15" systemctl start koprogo
check "ready on 15" wait_for 120 ready
step_done
check "server is 15 again" has "$(koprogo psql -Atc 'SHOW server_version')" "15."
check "data as before the upgrade" is_eq "$(digest)" "$(cat /root/digest.before)"
step "upgrade again (bin_dir removed)"
systemctl stop koprogo
sed -i '\|^bin_dir = "/usr/lib/postgresql/15/bin"$|d' /etc/koprogo/koprogo.toml
rm -rf /var/lib/koprogo/pgdata.17.rejected
check "start" systemctl start koprogo
check "ready" wait_for 300 ready
step_done
check "cluster is 17 again" is_eq "$(cat /var/lib/koprogo/pgdata/PG_VERSION)" 17
check "data identical again" is_eq "$(digest)" "$(cat /root/digest.before)"
step "restart: clean stop, start, old copy deleted"
check "restart" systemctl restart koprogo
check "ready" wait_for 120 ready
step_done
check "old copy deleted after a clean start" test ! -e /var/lib/koprogo/pgdata.15
check "README deleted" test ! -e /var/lib/koprogo/pgdata.15.README
check "upgrade record gone" test ! -e /var/lib/koprogo/pg_upgrade.json
check "data still identical" is_eq "$(digest | cut -d'|' -f1,2)" "$(cut -d'|' -f1,2 /root/digest.before)"
systemctl restart koprogo && wait_for 120 ready
check "apt keeps 17 only now" sh -c 'grep -q "postgresql-17" /etc/apt/apt.conf.d/02autoremove-koprogo && ! grep -q "postgresql-15" /etc/apt/apt.conf.d/02autoremove-koprogo'
check "stop clean" systemctl stop koprogo
check "17 shut down cleanly" sh -c '/usr/lib/postgresql/17/bin/pg_controldata /var/lib/koprogo/pgdata | grep -q "cluster state: *shut down$"'
EOF
  if [[ $rc -eq 0 ]]; then boot "$root" pgup-2 900 "$W/pgup-2.sh" --private-network || rc=1; fi
  drop_root "$root" $rc
  [[ $rc -eq 0 ]] || FAILED+=("pg-upgrade")
  return $rc
}

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
  cat > "$W/watchdog.sh" <<'EOF'
check "install" apt-get install -y -q /root/debs/cur.deb
check "ready" wait_for 120 ready
main=$(systemctl show -p MainPID --value koprogo)
step "API crash loop for 150 s"
printf '#!/bin/sh\necho "broken on purpose"\nexit 1\n' > /usr/lib/koprogo/koprogo-api.new
chmod 0755 /usr/lib/koprogo/koprogo-api.new
mv /usr/lib/koprogo/koprogo-api.new /usr/lib/koprogo/koprogo-api
koprogo restart api
sleep 150
step_done
journalctl -u koprogo --no-pager | grep -iE "watchdog|restarting in|Main process exited|starting \(pid" | tail -n 20
check "no watchdog timeout" sh -c '! journalctl -u koprogo | grep -qi "watchdog timeout"'
check "supervisor not restarted" is_eq "$(systemctl show -p MainPID --value koprogo)" "$main"
check "PostgreSQL kept running" sh -c 'koprogo status | grep -q "^postgres *ready"'
EOF
  boot "$root" watchdog 600 "$W/watchdog.sh" --private-network || rc=1
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
[[ " $* " == *" all "* ]] && set -- build lint install real offline pg-upgrade
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
    clean) cmd_clean ;;
    *) kp_die "unknown command $c: build | lint | install | real | offline | pg-upgrade | watchdog | all | clean" ;;
  esac
done
left=
for p in $(ns_procs); do [[ $ns_before == *" $p "* ]] || left="$left $p"; done
for d in "$W"/install "$W"/real "$W"/offline "$W"/pgupgrade "$W"/watchdog; do [[ -d $d ]] && left="$left$(kp_mounts_in "$d" | tr '\n' ' ')"; done
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
