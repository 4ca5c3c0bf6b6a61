#!/bin/bash
# Package test "pg-upgrade", part 2, on the root upgraded to Debian 13: refused
# while PostgreSQL 15's binaries are gone, pg_upgrade 15 -> 17 at start, data
# identical, old cluster and revert instructions kept, going back to 15 by the
# logged instructions, upgrading again, and the old copy deleted after a clean
# restart.
# Called by packaging/test-package.sh: boot() copies it into the root as /root/ci.sh
# (ci-lib.sh beside it) and runs it as the oneshot ci.service under systemd; the
# results are /root/ci.log (STEP and MEASURE lines are read by the host) and
# /root/ci.result.
# shellcheck source=SCRIPTDIR/ci-lib.sh
. /root/ci-lib.sh
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
# shellcheck disable=SC2016 # expanded by the inner sh
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
# shellcheck disable=SC2016 # expanded by the inner sh
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
