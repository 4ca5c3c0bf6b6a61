#!/bin/bash
# Package test "pg-upgrade", part 1, in a fresh booted Debian 12 root: install
# koprogo (PostgreSQL 15), write API rows and a 200k-row table, record their
# digest in /root/digest.before, then disable and stop the unit. The host then
# upgrades the root to Debian 13 (pgup-distupgrade.sh) before pgup-2.sh.
# Called by packaging/test-package.sh: boot() copies it into the root as /root/ci.sh
# (ci-lib.sh beside it) and runs it as the oneshot ci.service under systemd; the
# results are /root/ci.log (STEP and MEASURE lines are read by the host) and
# /root/ci.result.
# shellcheck source=SCRIPTDIR/ci-lib.sh
. /root/ci-lib.sh
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
