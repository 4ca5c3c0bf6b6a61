#!/usr/bin/env bash
# Installs what the appliance's development and tests need from Debian's packages,
# when run as root and only what is missing, and creates the `koprogo` service user
# (the supervisor drops to it when started as root). Sourced by dev.sh and test.sh.
set -euo pipefail

# Debian packages the suite uses, as "command-or-path:package".
KOPROGO_NEEDS=(
  "/usr/lib/postgresql/15/bin/postgres:postgresql-15"
  "/usr/lib/postgresql/15/bin/psql:postgresql-client-15"
  "unshare:util-linux"
  "mount:mount"
  "/usr/bin/chromium:chromium"
  "certutil:libnss3-tools"
  "pebble:pebble"
  "curl:curl"
  "xz:xz-utils"
  "testssl:testssl.sh"
)

koprogo_missing_packages() {
  local item what pkg missing=()
  for item in "${KOPROGO_NEEDS[@]}"; do
    what=${item%%:*}; pkg=${item##*:}
    if [[ $what == /* ]]; then [[ -e $what ]] || missing+=("$pkg")
    else command -v "$what" >/dev/null 2>&1 || missing+=("$pkg"); fi
  done
  printf '%s\n' "${missing[@]}" | sort -u | grep -v '^$' || true
}

koprogo_install_deps() {
  local missing
  missing=$(koprogo_missing_packages)
  if [[ -n $missing ]]; then
    if [[ $(id -u) -ne 0 ]]; then
      echo "missing Debian packages: $missing (run this script as root to install them)" >&2
      return 1
    fi
    echo "installing: $missing"
    # The distro's own "main" cluster wastes RAM and a port: we run a private one.
    mkdir -p /etc/postgresql-common/createcluster.d
    [[ -e /etc/postgresql-common/createcluster.d/koprogo.conf ]] ||
      echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.d/koprogo.conf
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    # Packages with a service (nginx, caddy, …) must not start it behind our back.
    local policy=/usr/sbin/policy-rc.d created=0
    if [[ ! -e $policy ]]; then printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod +x "$policy"; created=1; fi
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing
    if [[ $created -eq 1 ]]; then rm -f "$policy"; fi
  fi
  if [[ $(id -u) -eq 0 ]] && ! getent passwd koprogo >/dev/null; then
    adduser --system --group --home /var/lib/koprogo --no-create-home \
      --shell /usr/sbin/nologin koprogo >/dev/null
    echo "created the system user koprogo"
  fi
  # The API server's own user (backend.user); the supervisor's user is in its group.
  if [[ $(id -u) -eq 0 ]] && ! getent passwd koprogo-api >/dev/null; then
    adduser --system --group --home /nonexistent --no-create-home \
      --shell /usr/sbin/nologin koprogo-api >/dev/null
    echo "created the system user koprogo-api"
  fi
  if [[ $(id -u) -eq 0 ]] && ! id -nG koprogo | tr ' ' '\n' | grep -qx koprogo-api; then
    adduser koprogo koprogo-api >/dev/null
  fi
}

# As root, the service user must be able to reach the checkout (a fresh clone in a
# 0700 mktemp directory is not): make the blocking directories searchable (o+x).
koprogo_make_reachable() {
  [[ $(id -u) -eq 0 ]] || return 0
  local d=$1
  while [[ $d != / && -n $d ]]; do
    if ! su -s /bin/sh koprogo -c "test -x '$d'" 2>/dev/null; then
      chmod o+x "$d"
      echo "made $d searchable by the koprogo user (chmod o+x)"
    fi
    d=$(dirname "$d")
  done
}
