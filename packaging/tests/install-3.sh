#!/bin/bash
# Package test "install", part 3, on the root of parts 1 and 2: apt-get remove
# keeps data, secrets, user, config and the apt entry for PostgreSQL 15; then
# purge_checks (purge leaves nothing).
# Called by packaging/test-package.sh: boot() copies it into the root as /root/ci.sh
# (ci-lib.sh beside it) and runs it as the oneshot ci.service under systemd; the
# results are /root/ci.log (STEP and MEASURE lines are read by the host) and
# /root/ci.result.
# shellcheck source=SCRIPTDIR/ci-lib.sh
. /root/ci-lib.sh
step "remove (keeps data)"
check "remove" apt-get remove -y -q koprogo
step_done
check "data kept on remove" test -f /var/lib/koprogo/pgdata/PG_VERSION
check "secrets kept on remove" test -f /var/lib/koprogo/secrets.env
check "user kept on remove" getent passwd koprogo
check "config kept on remove" test -f /etc/koprogo/koprogo.toml
check "apt still keeps PostgreSQL 15" test -f /etc/apt/apt.conf.d/02autoremove-koprogo

purge_checks
