#!/bin/bash
# Package test "install", the debconf questions (issue 14), in the same boot as
# install-1.sh: packaging/test-package.sh appends this file to install-1.sh, so it
# starts where that one ends (the "cur" package installed noninteractively, its
# unit stopped and disabled) and leaves the root the same way for part 2.
#   - the noninteractive install's answers: this machine's name and the internal
#     CA in /etc/koprogo/debconf.toml (0640 root:koprogo), and the site serves
#     that name (a real TLS client trusting the exported root);
#   - preseed + dpkg-reconfigure -fnoninteractive: debconf.toml rewritten (TOML
#     escaping of a password with quote and backslash, read back by koprogo),
#     the service restarted, the new name served once the CA is rotated, an
#     administrator's edits of koprogo.toml untouched and winning key by key,
#     the password not left in debconf's database;
#   - interactive answers (the teletype frontend, fed on stdin): a bad domain and
#     a bad port explained and asked again, an empty password keeps the current;
#   - bad preseeded answers (acme without e-mail, an invalid domain): refused
#     with a clear message, the previous file kept, the site not restarted;
#   - a version that does not start (PostgreSQL's binary gone during a version
#     change): installed, and the output and journal say why and the way back;
#     a hand edit of debconf.toml made before is taken as the answer;
#   - purge removes debconf.toml and debconf's records; a preseeded fresh
#     install right after takes the preseeded name.
# Run on its own (boot() copies it as /root/ci.sh) it first sources ci-lib.sh.
# shellcheck source=SCRIPTDIR/ci-lib.sh
declare -F step >/dev/null || . /root/ci-lib.sh

MANAGED=/etc/koprogo/debconf.toml
preseed() { printf '%s\n' "$@" | debconf-set-selections; }
db_value() { printf 'GET %s\n' "$1" | debconf-communicate koprogo 2>/dev/null | sed 's/ *$//'; }
main_pid() { systemctl show -p MainPID --value koprogo; }
sha() { sha256sum "$1" | cut -d' ' -f1; }
# The environment koprogo hands the API server (its /proc environ, as root).
api_env() {
  local p
  for p in $(user_procs koprogo-api); do
    tr '\0' '\n' < "/proc/$p/environ" 2>/dev/null | grep -q '^SMTP_ENABLED=' || continue
    tr '\0' '\n' < "/proc/$p/environ" | grep "^$1=" | head -n 1 | cut -d= -f2-
    return 0
  done
  return 1
}
# serves NAME: an HTTPS request to NAME (resolved to 127.0.0.1) trusting only the
# exported local root succeeds: the served certificate names NAME.
serves() {
  koprogo ca export > /tmp/kp-root.pem 2>/dev/null &&
    curl -sS -o /dev/null --max-time 10 --cacert /tmp/kp-root.pem \
      --resolve "$1:443:127.0.0.1" "https://$1/api/v1/health"
}

step "debconf: the noninteractive install's answers"
host=$(hostname -f 2>/dev/null || true)
[ -n "$host" ] || host=$(hostname)
host=$(printf '%s' "${host%.}" | tr '[:upper:]' '[:lower:]')
echo "  machine name: $host"
check "debconf.toml written, 0640 root:koprogo" is_eq "$(perm $MANAGED)" "640 root:koprogo"
check "domain = the machine's name" grep -qx "domain = \"$host\"" $MANAGED
check "tls mode internal" grep -qx 'mode = "internal"' $MANAGED
check "no mail" grep -qx 'enabled = false' $MANAGED
check "sealed by the package" sh -c "head -n 1 $MANAGED | grep -q '^# koprogo-debconf sha256:'"
check "debconf knows the answer" has "$(debconf-show koprogo)" "koprogo/domain: $host"
check "koprogo.toml does not set domain" sh -c '! grep -q "^domain" /etc/koprogo/koprogo.toml'
systemctl enable -q --now koprogo
must "ready" wait_for 120 ready
check "the site serves the machine's name (TLS, exported root)" wait_for 30 serves "$host"
step_done

step "debconf: preseed + dpkg-reconfigure -fnoninteractive"
# An administrator's edits of koprogo.toml: a value of their own, and a mail
# relay that wins over the debconf answer.
sed -i 's/^max_connections = 20$/max_connections = 24/' /etc/koprogo/koprogo.toml
printf '\n[backend.smtp]\nhost = "relay.admin.test"\nfrom_name = "Syndic Office"\n' >> /etc/koprogo/koprogo.toml
main_sha=$(sha /etc/koprogo/koprogo.toml)
pw='p"a\ss #1'
preseed "koprogo koprogo/domain string syndic.example.test" \
  "koprogo koprogo/tls_mode select internal" \
  "koprogo koprogo/smtp boolean true" \
  "koprogo koprogo/smtp_host string smtp.example.test" \
  "koprogo koprogo/smtp_port string 2525" \
  "koprogo koprogo/smtp_username string kp user" \
  "koprogo koprogo/smtp_password password $pw" \
  "koprogo koprogo/smtp_from string noreply@example.test"
pid=$(main_pid)
out=$(dpkg-reconfigure -fnoninteractive koprogo 2>&1); code=$?
echo "$out" | grep "koprogo"
check "dpkg-reconfigure" is_eq "$code" 0
check "debconf.toml: the new domain" grep -qx 'domain = "syndic.example.test"' $MANAGED
check "debconf.toml: mail on" grep -qx 'enabled = true' $MANAGED
check "debconf.toml: port" grep -qx 'port = 2525' $MANAGED
check "debconf.toml: password escaped" grep -qxF 'password = "p\"a\\ss #1"' $MANAGED
check "debconf.toml still 0640 root:koprogo" is_eq "$(perm $MANAGED)" "640 root:koprogo"
check "koprogo.toml untouched (the administrator's edits)" is_eq "$(sha /etc/koprogo/koprogo.toml)" "$main_sha"
check "the password is not kept in debconf's database" is_eq "$(db_value koprogo/smtp_password)" "0"
check "no temporary file left" sh -c '! ls -d /etc/koprogo/.debconf.* 2>/dev/null'
check "service restarted" wait_for 120 sh -c "[ \"\$(systemctl show -p MainPID --value koprogo)\" != $pid ] && koprogo status"
check "API: mail on" is_eq "$(api_env SMTP_ENABLED)" true
check "API: the relay of koprogo.toml wins" is_eq "$(api_env SMTP_HOST)" relay.admin.test
check "API: the port answered" is_eq "$(api_env SMTP_PORT)" 2525
check "API: the password, unescaped" is_eq "$(api_env SMTP_PASSWORD)" "$pw"
check "API: the user name answered" is_eq "$(api_env SMTP_USERNAME)" "kp user"
check "says the local CA does not cover the new name" has "$out" "does not cover syndic.example.test"
check "ca rotate" koprogo ca rotate
check "the site serves the new name (TLS, the new root)" wait_for 30 serves syndic.example.test
check "koprogo check" koprogo check
step_done

step "debconf: interactive answers are checked and asked again (teletype frontend)"
# dpkg-reconfigure asks every question: a bad domain, then a bad port, each
# explained and asked again; an empty password keeps the current one.
file_pw=$(grep '^password = ' $MANAGED)
pid=$(main_pid)
out=$(printf '%s\n' 'Bad Domain!' syndic.example.test internal y \
  smtp.example.test 99999 'kp user' '' noreply@example.test \
  smtp.example.test 2626 'kp user' '' noreply@example.test |
  DEBIAN_FRONTEND=teletype timeout 120 dpkg-reconfigure -fteletype koprogo 2>&1); code=$?
check "dpkg-reconfigure -fteletype" is_eq "$code" 0
check "the bad domain explained" has "$out" '"Bad Domain!" is not a DNS name'
check "the bad port explained" has "$out" '"99999" is not a port number'
check "debconf.toml: the port answered again" grep -qx 'port = 2626' $MANAGED
check "debconf.toml: the password kept" is_eq "$(grep '^password = ' $MANAGED)" "$file_pw"
check "service restarted" wait_for 120 sh -c "[ \"\$(systemctl show -p MainPID --value koprogo)\" != $pid ] && koprogo status"
check "API: the new port" is_eq "$(api_env SMTP_PORT)" 2626
step_done

step "debconf: bad preseeded answers are refused"
file_sha=$(sha $MANAGED)
pid=$(main_pid)
preseed "koprogo koprogo/tls_mode select acme" "koprogo koprogo/acme_email string "
out=$(dpkg-reconfigure -fnoninteractive koprogo 2>&1); code=$?
echo "$out" | grep "koprogo"
check "acme without e-mail: refused" [ "$code" -ne 0 ]
check "says which answer and why" has "$out" "koprogo/acme_email is refused: TLS mode acme needs a contact e-mail address"
check "says nothing changed" has "$out" "nothing was changed"
check "says how to answer again" has "$out" "debconf-set-selections"
preseed "koprogo koprogo/tls_mode select internal" "koprogo koprogo/domain string bad_name!.example"
out=$(dpkg-reconfigure -fnoninteractive koprogo 2>&1); code=$?
echo "$out" | grep "koprogo"
check "invalid domain: refused" [ "$code" -ne 0 ]
check "says which answer and why" has "$out" "koprogo/domain is refused: \"bad_name!.example\" is not a DNS name"
check "the previous file kept" is_eq "$(sha $MANAGED)" "$file_sha"
check "journal has the refusal" sh -c 'journalctl -t koprogo-postinst --no-pager | grep -q "koprogo/domain is refused"'
check "not restarted" is_eq "$(main_pid)" "$pid"
check "site still serves" serves syndic.example.test
preseed "koprogo koprogo/domain string syndic.example.test"
step_done

step "debconf: a version that does not start says the way back"
# The PostgreSQL binaries gone: the new version (here: prev, a version change)
# is installed but cannot start.
# Meanwhile an administrator edited debconf.toml by hand: the next run of the
# questions starts from the file (it no longer matches the package's seal).
sed -i 's/^from_email = .*/from_email = "office@example.test"/' $MANAGED
mv /usr/lib/postgresql/15/bin/postgres /usr/lib/postgresql/15/bin/postgres.away
out=$(apt-get install -y -q --allow-downgrades /root/debs/prev.deb 2>&1); code=$?
mv /usr/lib/postgresql/15/bin/postgres.away /usr/lib/postgresql/15/bin/postgres
echo "$out" | grep "koprogo:"
check "the package is installed (exit 0)" is_eq "$code" 0
check "says it does not start and where to read why" has "$out" "koprogo $PREV_V does not start"
check "says the way back" has "$out" "the way back to $CUR_V: apt install koprogo=$CUR_V"
check "names koprogo restore" has "$out" "koprogo restore FILE"
check "the journal has it" sh -c "journalctl -t koprogo-postinst --no-pager | grep -q 'the way back to $CUR_V'"
check "the hand edit taken as the answer" has "$(debconf-show koprogo)" "koprogo/smtp_from: office@example.test"
check "the hand edit kept in debconf.toml" grep -qx 'from_email = "office@example.test"' $MANAGED
check "debconf.toml sealed again" is_eq "$(head -n 1 $MANAGED)" "# koprogo-debconf sha256:$(tail -n +2 $MANAGED | sha256sum | cut -d' ' -f1)"
check "the password carried over" is_eq "$(grep '^password = ' $MANAGED)" "$file_pw"
systemctl restart koprogo
check "starts once the cause is fixed" wait_for 120 ready
step_done

step "debconf: purge, then a preseeded fresh install"
check "purge" apt-get purge -y -q koprogo
check "purged: debconf.toml" test ! -e $MANAGED
check "purged: debconf's records" is_eq "$(debconf-show koprogo 2>/dev/null)" ""
preseed "koprogo koprogo/domain string office.example.test" "koprogo koprogo/tls_mode select internal"
check "preseeded install" apt-get install -y -q /root/debs/cur.deb
check "debconf.toml: the preseeded domain" grep -qx 'domain = "office.example.test"' $MANAGED
must "ready" wait_for 120 ready
check "the site serves the preseeded name (TLS, exported root)" wait_for 30 serves office.example.test
step_done
# As install-1.sh left the root: installed, stopped, disabled.
systemctl stop koprogo
systemctl disable -q koprogo
