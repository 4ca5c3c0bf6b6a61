#!/bin/bash
# Package test "install", part 1, in a fresh booted Debian 12 root: install the
# "prev" package (pulls PostgreSQL), unit active and all ready, installed_checks,
# a row through the proxy, backup create/verify under the hardened unit, reinstall
# keeps the secrets, an upgrade refused while the pre-upgrade backup fails, the
# upgrade prev -> cur (backup taken, secrets and row kept, service restarted), then
# a clean systemctl stop. A client sends requests through a systemctl restart and
# through the upgrade: no connection may be refused (the listeners stay in
# systemd's fd store); the figures are MEASURE lines. Part 2 (koprogo as PID 1) runs from the host; part 3 is
# install-3.sh.
# Called by packaging/test-package.sh: boot() copies it into the root as /root/ci.sh
# (ci-lib.sh beside it) and runs it as the oneshot ci.service under systemd; the
# results are /root/ci.log (STEP and MEASURE lines are read by the host) and
# /root/ci.result.
# /root/ci.env (written by the host) holds PREV_V and CUR_V (the two package versions).
# shellcheck source=SCRIPTDIR/ci-lib.sh
. /root/ci-lib.sh
# shellcheck source=/dev/null # /root/ci.env is written by test-package.sh (ci_env)
. /root/ci.env
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
stored() { systemctl show -p NFileDescriptorStore --value koprogo 2>/dev/null; }
check "the proxy's listeners in systemd's fd store ($(stored))" [ "$(stored)" -ge 2 ]

step "systemctl restart with a client running (the fd store keeps the listeners)"
load_start
sleep 1
t=$(date +%s.%N)
check "restart" systemctl restart koprogo
check "ready after the restart" wait_for 120 ready
dt=$(awk -v a="$t" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
sleep 1
load_stop
load_report "systemctl restart to all ready" "$dt"
check "no connection refused during the restart" is_eq "$LOAD_REFUSED" 0
check "the fd store kept across the restart ($(stored))" [ "$(stored)" -ge 2 ]
check "the new process adopted the kept listeners" sh -c 'journalctl -u koprogo -n 200 | grep -q "adopted the listeners systemd kept"'
step_done

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
backups() { local f n=0; for f in /var/lib/koprogo/backups/*.kbk; do [ -e "$f" ] && n=$((n + 1)); done; echo "$n"; }
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
check "the data untouched" has "$(curl -ksS --max-time 10 https://localhost/api/v1/items/"$(cat /root/item.id)")" "row written before the upgrade"
pid=$(systemctl show -p MainPID --value koprogo)
step_done
step "upgrade prev -> cur (apt-get install ./cur)"
before=$(backups)
load_start
sleep 1
t=$(date +%s.%N)
out=$(apt-get install -y -q /root/debs/cur.deb 2>&1); code=$?
echo "$out" | grep "koprogo:"
check "upgrade" is_eq "$code" 0
check "a backup taken before the upgrade" is_eq "$(backups)" "$((before + 1))"
check "the upgrade names it" has "$out" "backup written: /var/lib/koprogo/backups/"
check "status ready after the upgrade" wait_for 120 ready
dt=$(awk -v a="$t" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
sleep 1
load_stop
load_report "upgrade prev -> cur (apt-get install to all ready)" "$dt"
check "no connection refused during the upgrade" is_eq "$LOAD_REFUSED" 0
step_done
check "new version installed" is_eq "$(dpkg-query -W -f '${Version}' koprogo)" "$CUR_V"
check "service restarted by the upgrade" [ "$(systemctl show -p MainPID --value koprogo)" != "$pid" ]
check "upgrade keeps the secrets" is_eq "$(sha256sum /var/lib/koprogo/secrets.env)" "$sha"
check "row kept across the upgrade" has "$(curl -ksS --max-time 10 https://localhost/api/v1/items/"$id")" "row written before the upgrade"
check "config perms kept" is_eq "$(perm /etc/koprogo/koprogo.toml)" "640 root:koprogo"

step "systemctl stop"
t=$(date +%s.%N)
check "stop" systemctl stop koprogo
echo "MEASURE systemctl stop (all ready, idle)|$(awk -v a="$t" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f s", b - a }')"
step_done
check "the fd store emptied by a full stop" is_eq "$(stored)" 0
check "inactive" [ "$(systemctl is-active koprogo)" = inactive ]
check "PostgreSQL shut down cleanly" sh -c '/usr/lib/postgresql/15/bin/pg_controldata /var/lib/koprogo/pgdata | grep -q "cluster state: *shut down$"'
check "no process of koprogo left" [ -z "$(user_procs koprogo)" ]
check "journal: no notify from children" sh -c '! journalctl -u koprogo | grep -q "reception only permitted"'
check "journal: no watchdog timeout" sh -c '! journalctl -u koprogo | grep -qi "watchdog timeout"'
check "journal: stopped in order" sh -c 'journalctl -u koprogo | grep -q "koprogo stopped after"'
systemctl disable -q koprogo
