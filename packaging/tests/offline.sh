#!/bin/bash
# Package test "offline": the offline bundle unpacked and installed with its
# install.sh in a root with no apt sources and no network; unit active, all ready,
# TLS mode internal, site and API through the proxy (checked from the host through
# host_checks), ca export, secrets generated.
# Called by packaging/test-package.sh: boot() copies it into the root as /root/ci.sh
# (ci-lib.sh beside it) and runs it as the oneshot ci.service under systemd; the
# results are /root/ci.log (STEP and MEASURE lines are read by the host) and
# /root/ci.result.
# /root/ci.env (written by the host) holds BUNDLE (the bundle's file name in /root).
# shellcheck source=SCRIPTDIR/ci-lib.sh
. /root/ci-lib.sh
# shellcheck source=/dev/null # /root/ci.env is written by test-package.sh (ci_env)
. /root/ci.env
check "no apt sources" [ -z "$(cat /etc/apt/sources.list /etc/apt/sources.list.d/* 2>/dev/null)" ]
# shellcheck disable=SC2012 # interface names have no blanks; the exact listing is the check
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
