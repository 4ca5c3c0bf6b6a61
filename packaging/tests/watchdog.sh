#!/bin/bash
# Package test "watchdog": an API that crash-loops for 150 s after READY must not
# get the appliance killed by systemd's watchdog (same supervisor pid, PostgreSQL
# still ready).
# Called by packaging/test-package.sh: boot() copies it into the root as /root/ci.sh
# (ci-lib.sh beside it) and runs it as the oneshot ci.service under systemd; the
# results are /root/ci.log (STEP and MEASURE lines are read by the host) and
# /root/ci.result.
# shellcheck source=SCRIPTDIR/ci-lib.sh
. /root/ci-lib.sh
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
