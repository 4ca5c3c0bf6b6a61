#!/bin/bash
# Package test "real": the whole KoproGo site (the real koprogo-api and
# frontend) installed with apt in a fresh booted Debian 12: all ready,
# installed_checks, libssl3 and the API's libraries, admin123 refused and the
# generated password logs in over HTTPS checked against the local CA, the real
# index.html, /config.js and an asset served, memory of the tree, stop and start
# timed (MEASURE lines), the super-admin closed again after the restart, then purge.
# Called by packaging/test-package.sh: boot() copies it into the root as /root/ci.sh
# (ci-lib.sh beside it) and runs it as the oneshot ci.service under systemd; the
# results are /root/ci.log (STEP and MEASURE lines are read by the host) and
# /root/ci.result.
# /root/ci.env (written by the host) holds INDEX_SHA (sha256 of the frontend's index.html) and FILES (its file count).
# shellcheck source=SCRIPTDIR/ci-lib.sh
. /root/ci-lib.sh
# shellcheck source=/dev/null # /root/ci.env is written by test-package.sh (ci_env)
. /root/ci.env
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
  # shellcheck disable=SC2016 # expanded by the inner sh
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
# shellcheck disable=SC2016 # expanded by the inner sh
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

# The OOM policy under the unit (README, Self-healing). status --json reads the
# API's value through the launcher: ProtectProc=invisible hides the API's
# processes from the supervisor. -1000 and -900 need CAP_SYS_RESOURCE, which a
# container may lack (systemd then skips OOMScoreAdjust=): shown, not asserted.
json=$(koprogo status --json | tr -d ' \n')
api_pid=$(printf '%s' "$json" | sed -n 's/.*"name":"api","state":"[a-z-]*","pid":\([0-9]*\).*/\1/p')
pg_pid=$(printf '%s' "$json" | sed -n 's/.*"name":"postgres","state":"[a-z-]*","pid":\([0-9]*\).*/\1/p')
main=$(systemctl show -p MainPID --value koprogo)
echo "MEASURE oom_score_adj under the unit|supervisor $(cat "/proc/$main/oom_score_adj"), postmaster $(cat "/proc/$pg_pid/oom_score_adj" 2>/dev/null), API $(cat "/proc/$api_pid/oom_score_adj" 2>/dev/null)"
check "the API's oom_score_adj is 700" is_eq "$(cat "/proc/$api_pid/oom_score_adj" 2>/dev/null)" 700
check "status --json shows the API's oom_score_adj (through the launcher)" has "$json" '"oom_score_adj":700'
if [ "$(cat "/proc/$main/oom_score_adj")" = -1000 ]; then
  check "the postmaster's oom_score_adj is -900" is_eq "$(cat "/proc/$pg_pid/oom_score_adj")" -900
fi

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
