# shellcheck shell=bash
# The library of the package tests' in-container scripts (packaging/tests/*.sh):
# each sources it first, as /root/ci-lib.sh in the booted root (boot() in
# packaging/test-package.sh copies it there). It sends all output to /root/ci.log,
# gives step/step_done (STEP lines: the host's timings), ok/fail/check/must,
# wait_for and the checks every installed package must pass (installed_checks,
# purge_checks, ...); at exit it writes /root/ci.result ("PASS" or "FAIL (N
# checks)") and powers the container off. Not executable: it is only sourced.
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
  echo "$all"
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
      *) echo "  pid $p ($(cat "/proc/$p/comm")) uid $(field "$p" Uid)"; bad=1 ;;
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
# A client sending requests one after another (curl through the proxy over HTTPS)
# until load_stop: each line of /root/load.log is "curl-exit http-code seconds".
# curl's exit 7 is a refused connection; --connect-timeout bounds a wait in the
# backlog, --max-time a request.
load_start() {
  rm -f /root/load.stop /root/load.log
  (
    while [ ! -e /root/load.stop ]; do
      out=$(curl -ksS -o /dev/null -w '%{http_code} %{time_total}' --connect-timeout 60 \
        --max-time 120 https://localhost/api/v1/health 2>/dev/null)
      echo "$? $out" >> /root/load.log
      sleep 0.05
    done
  ) &
  LOAD_PID=$!
}
load_stop() { touch /root/load.stop; wait "$LOAD_PID" 2>/dev/null; }
# load_report WHAT SECONDS: the MEASURE line of the load; LOAD_REFUSED is set.
load_report() {
  # shellcheck disable=SC2034 # read by the caller
  LOAD_REFUSED=$(awk '$1 == 7 { n++ } END { print n + 0 }' /root/load.log)
  echo "MEASURE $1: client through the proxy|$(awk -v total="$2" '
    { n++; if ($1 == 7) refused++; else if ($1 != 0 || $2 != 200) failed++;
      if ($3 > longest) longest = $3 }
    END { printf "%d requests, %d refused, %d failed, longest %.1f s, total %.1f s",
      n, refused, failed, longest, total }' /root/load.log)"
  awk '$1 != 0 || $2 != 200 { print "  request: curl exit " $1 ", HTTP " $2 ", " $3 " s" }' /root/load.log | sort | uniq -c | head -n 10
}
