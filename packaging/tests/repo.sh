#!/bin/bash
# Package test "repo", in a fresh booted Debian 12 root with only loopback: the
# signed KoproGo APT repository, used the way the README tells users to.
#  - python3 -m http.server on 127.0.0.1:$PORT serves /srv/repo/<variant> (the
#    host's $W/repo-www, read-only; see serve): "good" is the real repository (prev
#    only at first), the others are the variants apt must refuse or, for the key
#    change, accept (see packaging/test-repo.sh)
#  - keyring and koprogo.sources fetched from the repository, apt-get update,
#    apt-get install koprogo (downloaded from it), the site over HTTPS checked with
#    the local CA
#  - refused: another key (NO_PUBKEY), a changed Packages (Hash Sum mismatch), a
#    changed Release (BADSIG, InRelease and Release.gpg); koprogo's candidate and
#    apt's stored index stay those of the good repository
#  - accepted: a key change done in two steps (the next key published in the
#    keyring first, with build-repo.sh --also-trust, then the repository signed
#    with it)
#  - the host publishes cur into the served repository (host_checks runs its hook);
#    unattended-upgrade leaves koprogo alone without 52koprogo-unattended-upgrades
#    and upgrades it with it: backup taken, row kept, while a client counts refused
#    connections (none may be: REQUIRE_ZERO_REFUSED), failed requests and the
#    longest wait (MEASURE lines)
# Called by packaging/test-package.sh: boot() copies it into the root as /root/ci.sh
# (ci-lib.sh beside it) and runs it as the oneshot ci.service under systemd; the
# results are /root/ci.log (STEP and MEASURE lines are read by the host) and
# /root/ci.result.
# /root/ci.env (written by the host) holds PORT, PREV_V, CUR_V, KEY_FPR, OTHER_FPR,
# NEXT_FPR, KEYRING_SHA and REQUIRE_ZERO_REFUSED.
# shellcheck source=SCRIPTDIR/ci-lib.sh
. /root/ci-lib.sh
# shellcheck source=/dev/null # /root/ci.env is written by test-package.sh (ci_env)
. /root/ci.env
URL=http://127.0.0.1:$PORT
LISTS=/var/lib/apt/lists
SERVER=

stop_server() {
  [ -n "$SERVER" ] || return 0
  kill "$SERVER" 2>/dev/null
  wait "$SERVER" 2>/dev/null
  SERVER=
}
# serve VARIANT: the HTTP server on $PORT, serving /srv/repo/VARIANT. Its
# metadata (dists/, keyring, sources) is copied to /root/www with a modification
# time later than any served before, the pool linked: apt asks with
# If-Modified-Since (the time of what it stored) and http.server answers "304 Not
# Modified" to an older or equal time, so without this apt would not even fetch
# (nor check) a variant made in the same second as the previous one.
LAST_SERVED=0
serve() {
  stop_server
  rm -rf /root/www
  mkdir /root/www
  cp -r "/srv/repo/$1/dists" "/srv/repo/$1/koprogo-archive-keyring.pgp" "/srv/repo/$1/koprogo.sources" /root/www/ || return 1
  ln -s "/srv/repo/$1/pool" /root/www/pool
  while [ "$(date +%s)" -le "$LAST_SERVED" ]; do sleep 0.2; done
  LAST_SERVED=$(date +%s)
  find /root/www -exec touch -h -d "@$LAST_SERVED" {} +
  echo "--- serving /srv/repo/$1" >> /root/http.log
  python3 -m http.server --bind 127.0.0.1 --directory /root/www "$PORT" >> /root/http.log 2>&1 &
  SERVER=$!
  wait_for 15 curl -fsS -o /dev/null --max-time 2 "$URL/dists/stable/Release"
}
trap 'stop_server; finish' EXIT

candidate() { apt-cache policy koprogo 2>/dev/null | awk '$1 == "Candidate:" { print $2 }'; }
# apt's stored copy of our Release (what a refused update must leave as it was).
# (apt names them 127.0.0.1:PORT_dists_stable_…; an empty set fails: nothing to compare.)
stored() {
  local f
  f=$(ls "$LISTS"/127.0.0.1:"$PORT"_dists_stable_InRelease "$LISTS"/127.0.0.1:"$PORT"_dists_stable_main_binary-amd64_Packages 2>/dev/null)
  [ -n "$f" ] || { echo "none stored"; return 0; }
  # shellcheck disable=SC2086 # two paths without blanks
  cat $f | sha256sum | cut -d' ' -f1
}
ours() { grep -E "127\.0\.0\.1|^E:" || true; }

# shellcheck disable=SC2012 # interface names have no blanks; the exact listing is the check
check "no network but loopback" [ "$(ls /sys/class/net | tr '\n' ' ')" = "lo " ]
# The Debian mirrors of sources.list cannot be reached from here: apt warns
# ("Temporary failure resolving") and keeps their lists (the packages come from the
# host's cache). Without retries (apt waits 1 + 2 + 4 s between its 3 by default)
# each apt-get update gives up on them at once.
echo 'Acquire::Retries "0";' > /etc/apt/apt.conf.d/00koprogo-test-no-retries
# The packages: hard links to the host's cache in a directory of our own (the host's
# is shared, and locked by any other test root's apt).
echo 'Dir::Cache::Archives "/var/cache/koprogo-test-archives/";' > /etc/apt/apt.conf.d/00koprogo-test-archives
step "prerequisites (apt cache): Debian updates, python3, unattended-upgrades, curl"
must "apt-get upgrade (cached)" apt-get -y -q upgrade
must "install python3 unattended-upgrades curl" apt-get install -y -q --no-install-recommends python3 unattended-upgrades curl ca-certificates
# Their timers would start apt on their own: this test runs unattended-upgrade itself.
systemctl stop apt-daily.timer apt-daily-upgrade.timer 2>/dev/null
step_done

must "HTTP server on $URL" serve good

step "add the repository (keyring + koprogo.sources), apt-get update, apt-get install koprogo"
check "keyring fetched" curl -fsS --max-time 10 -o /usr/share/keyrings/koprogo-archive-keyring.pgp "$URL/koprogo-archive-keyring.pgp"
check "keyring is the key's" is_eq "$(sha256sum < /usr/share/keyrings/koprogo-archive-keyring.pgp | cut -d' ' -f1)" "$KEYRING_SHA"
check "sources fetched" curl -fsS --max-time 10 -o /etc/apt/sources.list.d/koprogo.sources "$URL/koprogo.sources"
check "sources: deb822 with Signed-By" grep -qx "Signed-By: /usr/share/keyrings/koprogo-archive-keyring.pgp" /etc/apt/sources.list.d/koprogo.sources
check "sources: URIs" grep -qx "URIs: $URL/" /etc/apt/sources.list.d/koprogo.sources
check "sources: no trusted=yes" sh -c '! grep -qi trusted /etc/apt/sources.list.d/koprogo.sources'
# The Debian sources cannot be reached here (only loopback): apt warns and keeps
# their lists; ours must come without a word.
out=$(apt-get update 2>&1); code=$?
echo "$out" | ours
must "apt-get update" is_eq "$code" 0
check "apt-get update: nothing said about our repository" [ -z "$(echo "$out" | grep -E '^(W|E|Err):?.*127\.0\.0\.1')" ]
check "apt read the signed InRelease" ls "$LISTS/127.0.0.1:${PORT}_dists_stable_InRelease"
check "apt stored our index" [ "$(stored)" != "none stored" ]
must "candidate is prev ($PREV_V)" is_eq "$(candidate)" "$PREV_V"
rm -f /var/cache/koprogo-test-archives/koprogo_*.deb
must "apt-get install koprogo" apt-get install -y -q koprogo
check "the .deb came from the repository" grep -q 'GET /pool/main/k/koprogo/koprogo_.*\.deb HTTP/1\.[01]" 200' /root/http.log
step_done
check "installed prev" is_eq "$(dpkg-query -W -f '${Version}' koprogo)" "$PREV_V"
must "unit active" wait_for 120 active
must "status all ready" wait_for 120 ready
installed_checks
check "ca export" koprogo ca export /root/ca.pem
tls() { curl -sS --max-time 10 --cacert /root/ca.pem -o /tmp/body -w '%{http_code}' "$@"; }
check "site over HTTPS (checked with the local CA)" is_eq "$(tls https://localhost/)" 200
check "site is the frontend" grep -q "<html" /tmp/body
check "API over HTTPS (checked with the local CA)" is_eq "$(tls https://localhost/api/v1/health)" 200
id=$(curl -sS --max-time 10 --cacert /root/ca.pem -X POST --data 'row written before the unattended upgrade' https://localhost/api/v1/items | sed -n 's/.*"id":\([0-9]*\).*/\1/p')
check "row created (id ${id:-none})" [ -n "$id" ]

# refused VARIANT WHAT PATTERN...: apt refuses the repository VARIANT serves, says
# PATTERN..., and keeps the good repository's index.
refused() {
  local variant=$1 what=$2 before p out code; shift 2
  before=$(stored)
  check "$what: served" serve "$variant"
  out=$(apt-get update 2>&1); code=$?
  echo "$out" | ours
  echo "  (apt-get update exit code $code)"
  check "$what: fetched (not a 304)" has "$out" "Get:"
  for p in "$@"; do check "$what: apt says $p" has "$out" "$p"; done
  check "$what: koprogo's candidate unchanged" is_eq "$(candidate)" "$PREV_V"
  check "$what: apt's stored index unchanged" is_eq "$(stored)" "$before"
}
step "refused: another key, a changed Packages, a changed Release"
# (A client that has the good index keeps it: apt warns, "The repository is not
# updated and the previous index files will be used", and exits 0 but for
# Release.gpg; a new client gets an error, below.)
refused other "another key" "NO_PUBKEY ${OTHER_FPR:24:16}" "The repository is not updated"
refused badpkg "changed Packages" "Hash Sum mismatch"
refused badrel "changed InRelease" "BADSIG ${KEY_FPR:24:16}" "The repository is not updated"
refused badrel-detached "changed Release (Release.gpg)" "BADSIG ${KEY_FPR:24:16}" "is no longer signed"
# A new client (nothing stored) must refuse the foreign key too: an error, no index.
rm -f "$LISTS"/127.0.0.1:"$PORT"_*
check "another key, new client: nothing stored" is_eq "$(stored)" "none stored"
check "another key, new client: served" serve other
out=$(apt-get update 2>&1); code=$?
echo "$out" | ours
check "another key, new client: apt-get update fails" [ "$code" -ne 0 ]
check "another key, new client: apt says NO_PUBKEY" has "$out" "NO_PUBKEY ${OTHER_FPR:24:16}"
check "another key, new client: apt says not signed" has "$out" "is not signed"
check "another key, new client: no index stored" is_eq "$(stored)" "none stored"
check "another key, new client: cur not offered" [ -z "$(apt-cache madison koprogo | grep -F "$CUR_V")" ]
check "good repository again" serve good
check "apt-get update (good again)" apt-get update -q
check "candidate prev again" is_eq "$(candidate)" "$PREV_V"
step_done

# accepted VARIANT WHAT: apt-get update takes the repository VARIANT serves.
accepted() {
  local out code
  check "$2: served" serve "$1"
  out=$(apt-get update 2>&1); code=$?
  echo "$out" | ours
  check "$2: apt-get update" is_eq "$code" 0
  check "$2: nothing said about our repository" [ -z "$(echo "$out" | grep -E '^(W|E|Err):?.*127\.0\.0\.1')" ]
  check "$2: stored" [ "$(stored)" != "none stored" ]
  check "$2: fetched (not a 304)" has "$out" "Get:"
}
step "key change: the next key published first (--also-trust), then signing with it"
accepted rotate1 "signed by our key, keyring with the next key"
check "key change: keyring fetched again" curl -fsS --max-time 10 -o /usr/share/keyrings/koprogo-archive-keyring.pgp "$URL/koprogo-archive-keyring.pgp"
accepted rotate2 "signed by the next key"
check "key change: signed by the next key indeed" grep -q "^# Signing key: $NEXT_FPR\$" /srv/repo/rotate2/koprogo.sources
# (back to the test's repository, and its keyring alone)
check "good repository again" serve good
check "keyring of the good repository again" curl -fsS --max-time 10 -o /usr/share/keyrings/koprogo-archive-keyring.pgp "$URL/koprogo-archive-keyring.pgp"
check "keyring is the key's again" is_eq "$(sha256sum < /usr/share/keyrings/koprogo-archive-keyring.pgp | cut -d' ' -f1)" "$KEYRING_SHA"
check "apt-get update (good again)" apt-get update -q
check "candidate prev again" is_eq "$(candidate)" "$PREV_V"
step_done

step "host publishes cur into the served repository (build-repo.sh)"
check "published (host hook)" host_checks
check "the published repository served" serve good
out=$(apt-get update 2>&1); code=$?
echo "$out" | ours
check "apt-get update after publishing" is_eq "$code" 0
check "candidate is cur ($CUR_V)" is_eq "$(candidate)" "$CUR_V"
check "prev still in the repository" sh -c "apt-cache madison koprogo | grep -qF '$PREV_V'"
step_done

step "unattended-upgrade without 52koprogo-unattended-upgrades: koprogo left alone"
check "the package ships it" is_eq "$(dpkg -S /etc/apt/apt.conf.d/52koprogo-unattended-upgrades 2>/dev/null)" "koprogo: /etc/apt/apt.conf.d/52koprogo-unattended-upgrades"
mv /etc/apt/apt.conf.d/52koprogo-unattended-upgrades /root/52koprogo-unattended-upgrades.away
apt-config dump Unattended-Upgrade::Origins-Pattern
unattended-upgrade -v > /root/uu-without.log 2>&1; code=$?
tail -n 5 /root/uu-without.log
mv /root/52koprogo-unattended-upgrades.away /etc/apt/apt.conf.d/52koprogo-unattended-upgrades
check "without it, unattended-upgrade allows Debian only" sh -c 'grep "^Allowed origins are:" /root/uu-without.log | grep -q "origin=Debian" && ! grep "^Allowed origins are:" /root/uu-without.log | grep -q KoproGo'
check "with it, apt's configuration allows the KoproGo origin" sh -c 'apt-config dump Unattended-Upgrade::Origins-Pattern | grep -qF "origin=KoproGo,label=KoproGo"'
check "unattended-upgrade ran" is_eq "$code" 0
check "koprogo not upgraded by Debian's default origins" is_eq "$(dpkg-query -W -f '${Version}' koprogo)" "$PREV_V"
step_done

backups() { local f n=0; for f in /var/lib/koprogo/backups/*.kbk; do [ -e "$f" ] && n=$((n + 1)); done; echo "$n"; }
ms() { echo $(( $(date +%s%N) / 1000000 )); }
# A client through the whole upgrade: one request after another (short connect
# timeout), until /root/client.stop exists.
client() {
  local n=0 refused=0 failed=0 longest=0 a b rc code
  while [ ! -e /root/client.stop ]; do
    a=$(ms)
    code=$(curl -sS -o /dev/null -w '%{http_code}' --connect-timeout 2 --max-time 60 \
      --cacert /root/ca.pem --resolve localhost:443:127.0.0.1 https://localhost/api/v1/health 2>>/root/client.err)
    rc=$?
    b=$(ms)
    n=$((n + 1))
    [ $((b - a)) -gt "$longest" ] && longest=$((b - a))
    if [ "$rc" -eq 7 ]; then refused=$((refused + 1))
    elif [ "$rc" -ne 0 ] || [ "$code" != 200 ]; then failed=$((failed + 1)); echo "$(date +%T.%N) curl $rc HTTP $code" >> /root/client.err
    fi
    sleep 0.05
  done
  echo "$n $refused $failed $longest" > /root/client.result
}
step "unattended-upgrade with it: koprogo upgraded to cur"
before=$(backups)
pid=$(systemctl show -p MainPID --value koprogo)
rm -f /root/client.stop /root/client.result /root/client.err
client &
cpid=$!
sleep 1
a=$(ms)
unattended-upgrade -v > /root/uu.log 2>&1; code=$?
b=$(ms)
wait_for 120 ready
c=$(ms)
touch /root/client.stop
wait "$cpid"
tail -n 15 /root/uu.log
check "unattended-upgrade ran" is_eq "$code" 0
step_done
check "unattended-upgrade allowed the KoproGo origin" grep -q "^Allowed origins are:.*origin=KoproGo,label=KoproGo" /root/uu.log
check "koprogo upgraded to cur" is_eq "$(dpkg-query -W -f '${Version}' koprogo)" "$CUR_V"
check "status ready after the upgrade" wait_for 60 ready
check "service restarted by the upgrade" [ "$(systemctl show -p MainPID --value koprogo)" != "$pid" ]
check "a backup taken before the upgrade" is_eq "$(backups)" "$((before + 1))"
check "the upgrade named it (dpkg log of unattended-upgrades)" grep -q "backup written: /var/lib/koprogo/backups/" /var/log/unattended-upgrades/unattended-upgrades-dpkg.log
check "row kept across the upgrade" has "$(curl -sS --max-time 10 --cacert /root/ca.pem "https://localhost/api/v1/items/$id")" "row written before the unattended upgrade"
if read -r n refused failed longest < /root/client.result; then
  echo "MEASURE unattended-upgrade of koprogo (prev -> cur), wall time|$(awk -v a="$a" -v b="$b" 'BEGIN { printf "%.1f s", (b - a) / 1000 }') (until ready again: $(awk -v a="$a" -v c="$c" 'BEGIN { printf "%.1f s", (c - a) / 1000 }'))"
  echo "MEASURE client during it: requests / refused (curl exit 7) / other failures|$n / $refused / $failed"
  echo "MEASURE client during it: longest request (connect timeout 2 s)|$longest ms"
  [ -s /root/client.err ] && sort /root/client.err | uniq -c | sort -rn | head -n 5 | sed 's/^/  client: /'
  check "the client made requests through the upgrade" [ "$n" -gt 0 ]
  if [ "${REQUIRE_ZERO_REFUSED:-1}" = 1 ]; then
    check "no connection refused during the upgrade (listeners kept in systemd's fd store)" is_eq "$refused" 0
  else
    echo "  (refused connections not asserted: REPO_REQUIRE_ZERO_REFUSED=0)"
  fi
else
  fail "the client wrote no result"
fi
check "the HTTP server served the new .deb" grep -q 'GET /pool/main/k/koprogo/koprogo_.*\.deb HTTP/1\.[01]" 200' /root/http.log

step "stop"
stop_server
check "HTTP server gone" [ -z "$(for s in /proc/[0-9]*/cmdline; do tr '\0' ' ' < "$s" 2>/dev/null | grep -q '^python3 -m http.server' && echo "$s"; done)" ]
check "stop koprogo" systemctl stop koprogo
step_done
check "no process of koprogo left" [ -z "$(user_procs koprogo)" ]
systemctl disable -q koprogo
