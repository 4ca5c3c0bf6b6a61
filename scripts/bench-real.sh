#!/usr/bin/env bash
# Realistic benchmark with the REAL koprogo-api (../shared/koprogo-real): the demo data
# seeded, then a mixed authenticated workload (scripts/bench-real.lua: 80 % GET of the
# list endpoints, 20 % POST creating expenses, owners, meetings and units) driven by wrk,
# 2 threads x 10 connections, against the same API process three ways in one run:
#   koprogo  through the appliance's own HTTPS proxy (local-CA certificate),
#   nginx    through nginx (Debian package, worker_processes 1) over HTTPS with the same
#            certificate, plain HTTP from nginx to the API's loopback port, as ours does,
#   direct   plain HTTP straight to the API's loopback port (backend.port).
# The appliance (supervisor, API, PostgreSQL) and nginx are pinned to ONE CPU, as on a
# 1 vCPU VPS (the appliance is started pinned, so it sizes itself for one core:
# ACTIX_WORKERS=1, PostgreSQL tuned for 2 GB); wrk and this script run on the other.
# Runs alternate (koprogo, nginx, direct, the starting mode rotating each round) and
# the figures are medians over the rounds: req/s, p50/p90/p99, non-2xx, CPU seconds per
# 1,000 requests of each process (supervisor, API, PostgreSQL, nginx) from
# /proc/<pid>/stat before/after each run. Figures are printed, never asserted. Traffic
# goes to 127.0.0.1 only; every wait is bounded; everything started here is stopped on
# exit (trap) and checked gone.
#
# Usage: scripts/bench-real.sh [--quick]   (as root it installs what is missing)
#   --quick: a smoke run (1 round of 5 s, 2 s warm-up) to check the set-up.
# Knobs (environment): BENCH_SECONDS=20 (one run), BENCH_ROUNDS=3, BENCH_WARMUP=5
#   (seconds, per mode, before the first round), BENCH_THREADS=2, BENCH_CONNS=10,
#   BENCH_QUIET_WAIT=30 (seconds to wait, before each run, for other jobs to leave the
#   CPUs), BENCH_RESET=1 (before each run, delete the rows created since the seed; 0:
#   let the lists grow over the whole run), BENCH_PROXY_LIMITS=1 (keep koprogo's default
#   per-client rate limit: wrk's one address is then throttled with 429, nginx has no
#   limit), KOPROGO_REAL_DIR (default: the first shared/koprogo-real above the
#   checkout), BENCH_KEEP=1 (keep the temp dir and its logs), BENCH_KOPROGO=path
#   (debugging the script: that koprogo binary instead of the release build).
set -euo pipefail
umask 022
cd "$(dirname "$0")/.."
ROOT=$PWD

QUICK=0
for arg in "$@"; do
  case $arg in
    --quick) QUICK=1 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $arg (usage: scripts/bench-real.sh [--quick])" >&2; exit 2 ;;
  esac
done
if [[ $QUICK == 1 ]]; then
  SECS=${BENCH_SECONDS:-5}; ROUNDS=${BENCH_ROUNDS:-1}; WARMUP=${BENCH_WARMUP:-2}
else
  SECS=${BENCH_SECONDS:-20}; ROUNDS=${BENCH_ROUNDS:-3}; WARMUP=${BENCH_WARMUP:-5}
fi
THREADS=${BENCH_THREADS:-2}
CONNS=${BENCH_CONNS:-10}
QUIET_WAIT=${BENCH_QUIET_WAIT:-30}
RESET=${BENCH_RESET:-1}
LUA=$ROOT/scripts/bench-real.lua
export PATH="$PATH:$HOME/.cargo/bin"

say() { printf '%s %s\n' "$(date +%T)" "$*" >&2; }
die() { say "error: $*"; exit 1; }
is_root() { [[ $(id -u) -eq 0 ]]; }

# ---------------------------------------------------------------- 1. what we need
. scripts/deps.sh
koprogo_install_deps
koprogo_make_reachable "$PWD"

install_debs() { # nginx and wrk (benchmark-only), without letting a postinst start nginx
  local missing=()
  command -v nginx >/dev/null 2>&1 || [[ -x /usr/sbin/nginx ]] || missing+=(nginx-light)
  command -v wrk >/dev/null 2>&1 || missing+=(wrk)
  command -v taskset >/dev/null 2>&1 || missing+=(util-linux)
  command -v jq >/dev/null 2>&1 || missing+=(jq)
  command -v curl >/dev/null 2>&1 || missing+=(curl)
  command -v ss >/dev/null 2>&1 || missing+=(iproute2)
  command -v xz >/dev/null 2>&1 || missing+=(xz-utils)
  [[ ${#missing[@]} -eq 0 ]] && return 0
  is_root || die "missing Debian packages: ${missing[*]} (run this script as root to install them)"
  say "installing: ${missing[*]}"
  local policy=/usr/sbin/policy-rc.d ours=0
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\n# bench-real.sh: no service starts during its install\nexit 101\n' > "$policy"
    chmod 0755 "$policy"
    ours=1
  fi
  local rc=0
  DEBIAN_FRONTEND=noninteractive apt-get update -qq || rc=$?
  [[ $rc -eq 0 ]] && { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" || rc=$?; }
  if [[ $ours -eq 1 ]]; then rm -f "$policy"; fi
  if [[ $rc -ne 0 ]]; then die "apt-get failed ($rc)"; fi
}
install_debs
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
WRK=$(command -v wrk)
[[ -r $LUA ]] || die "$LUA is missing"

# The real KoproGo: KOPROGO_REAL_DIR, else the first shared/koprogo-real above us.
REAL_SRC=${KOPROGO_REAL_DIR:-}
if [[ -z $REAL_SRC ]]; then
  d=$ROOT
  while [[ $d != / ]]; do
    if [[ -f $d/shared/koprogo-real/koprogo-api.xz ]]; then REAL_SRC=$d/shared/koprogo-real; break; fi
    d=$(dirname "$d")
  done
fi
[[ -n $REAL_SRC && -f $REAL_SRC/koprogo-api.xz && -f $REAL_SRC/frontend-dist.tar.xz ]] ||
  die "the real KoproGo is not on this machine: put koprogo-api.xz and frontend-dist.tar.xz in ../shared/koprogo-real or set KOPROGO_REAL_DIR"
REAL=$ROOT/target/koprogo-real
if [[ ! -x $REAL/koprogo-api || ! -f $REAL/frontend-dist/index.html ]]; then
  say "unpacking the real KoproGo from $REAL_SRC into $REAL"
  mkdir -p "$ROOT/target"
  rm -rf "$REAL.tmp.$$"; mkdir -p "$REAL.tmp.$$"
  xz -dc "$REAL_SRC/koprogo-api.xz" > "$REAL.tmp.$$/koprogo-api"
  chmod 0755 "$REAL.tmp.$$/koprogo-api"
  tar -C "$REAL.tmp.$$" -xJf "$REAL_SRC/frontend-dist.tar.xz"
  rm -rf "$REAL"; mv "$REAL.tmp.$$" "$REAL"
fi

# ---------------------------------------------------------------- 2. build
if [[ -n ${BENCH_KOPROGO:-} ]]; then
  KOPROGO=$BENCH_KOPROGO
  say "warning: BENCH_KOPROGO=$KOPROGO instead of a release build: its figures are not the product's"
else
  cargo build --release --locked --bin koprogo
  KOPROGO=$ROOT/target/release/koprogo
fi
[[ -x $KOPROGO ]] || die "$KOPROGO missing after the build"

# ---------------------------------------------------------------- CPUs
expand_cpus() { # "0-2,5" -> "0 1 2 5"
  local part out=() a b i
  IFS=, read -ra parts <<<"$1"
  for part in "${parts[@]}"; do
    if [[ $part == *-* ]]; then a=${part%-*}; b=${part#*-}; for ((i = a; i <= b; i++)); do out+=("$i"); done
    else out+=("$part"); fi
  done
  echo "${out[@]}"
}
NCPU=$(grep -c '^processor' /proc/cpuinfo)
read -ra CPUS <<<"$(expand_cpus "$(taskset -pc $$ | sed 's/.*: *//')")"
if [[ ${#CPUS[@]} -ge 2 ]]; then
  APP_CPU=${CPUS[0]}; LOAD_CPU=${CPUS[1]}
  PINNING="appliance (supervisor, API, PostgreSQL) and nginx on CPU $APP_CPU; wrk on CPU $LOAD_CPU"
else
  APP_CPU=${CPUS[0]}; LOAD_CPU=${CPUS[0]}
  PINNING="only one CPU ($APP_CPU): the load generator shares it with the appliance (figures are not comparable with 2-CPU runs)"
fi
# This shell and everything it starts from now on (wrk, curl) run on LOAD_CPU.
taskset -p -c "$LOAD_CPU" $$ >/dev/null

# ---------------------------------------------------------------- cleanup
TMP=$(mktemp -d "${TMPDIR:-/tmp}/kpgreal.XXXXXX")
chmod 0755 "$TMP"
KPID="" NPID="" CHILD="" PGIDS=() KNOWN=()
run_child() { # a long foreground command, in the background so that a signal is handled at once
  local rc=0
  "$@" &
  CHILD=$!
  wait "$CHILD" || rc=$?
  CHILD=""
  return "$rc"
}
children() { ps -o pid= --ppid "$1" 2>/dev/null || true; }
# shellcheck disable=SC2046 # split on purpose: the pids on one line
nginx_pids() { if [[ -n $NPID ]]; then echo "$NPID" $(children "$NPID"); fi; }
stop_pid() { # pid signal seconds: signal, wait (bounded), then SIGKILL
  local pid=$1 sig=$2 secs=$3 i
  [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 0
  kill "-$sig" "$pid" 2>/dev/null || true
  for ((i = 0; i < secs * 10; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
  wait "$pid" 2>/dev/null || true
}
leftovers() { # processes of this run: $TMP on the command line, in a service group of the
  # appliance, or a pid we saw (nginx workers, PostgreSQL backends)
  local pid pgid args mine=" ${PGIDS[*]} " known=" ${KNOWN[*]} "
  while read -r pid pgid args; do
    if [[ $args == *"$TMP"* || $mine == *" $pgid "* || $known == *" $pid "* ]]; then echo "$pid $args"; fi
  done < <(ps -e -o pid=,pgid=,args= 2>/dev/null)
}
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  stop_pid "$CHILD" TERM 5
  stop_pid "${PERF_PID:-}" INT 5
  for p in $(nginx_pids); do KNOWN+=("$p"); done
  if [[ -n ${PG_PID:-} ]]; then for p in $(children "$PG_PID"); do KNOWN+=("$p"); done; fi # backends: setsid
  stop_pid "$NPID" QUIT 10
  stop_pid "$KPID" TERM 90
  local i left=""
  for ((i = 0; i < 100; i++)); do
    left=$(leftovers)
    [[ -z $left ]] && break
    awk '{print $1}' <<<"$left" | xargs -r kill -KILL 2>/dev/null || true
    sleep 0.1
  done
  if [[ -n $left ]]; then
    say "processes left behind:"; echo "$left" >&2; rc=1
  else
    say "cleanup: no process of this run is left"
  fi
  if [[ ${BENCH_KEEP:-0} == 1 ]]; then say "kept $TMP"; else rm -rf "$TMP"; fi
  if [[ $rc -ne 0 ]]; then say "failed (exit $rc)"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- ports
PICKED=" "
pick_port() { # VAR [span]: a free loopback port (and the span-1 next ones) not picked before
  local p i k span=${2:-1} ok
  for ((i = 0; i < 500; i++)); do
    p=$((20000 + RANDOM % 40000)); ok=1
    for ((k = 0; k < span; k++)); do
      if [[ $PICKED == *" $((p + k)) "* || -n $(ss -Htan "( sport = :$((p + k)) )" 2>/dev/null) ]]; then ok=0; break; fi
    done
    if ((ok)); then
      for ((k = 0; k < span; k++)); do PICKED+="$((p + k)) "; done
      printf -v "$1" '%s' "$p"; return 0
    fi
  done
  die "no free port found"
}
# backend.port and the next one (its spare for update swaps) belong to the API.
pick_port API_PORT 2; pick_port K_HTTP; pick_port K_HTTPS; pick_port N_HTTPS; pick_port METRICS

# ---------------------------------------------------------------- the appliance
cp "$REAL/koprogo-api" "$TMP/koprogo-api"
chmod 0755 "$TMP/koprogo-api"
cp -a "$REAL/frontend-dist" "$TMP/frontend"
chmod -R a+rX "$TMP/frontend"
# The 2 GB VPS profile (postgres.memory), default pool and workers (ACTIX_WORKERS follows
# the one CPU the appliance is pinned to). The proxy's per-client limits are off: the
# whole load comes from one address and nginx has none. The API's login limiter is
# raised for this benchmark only (it logs in before every run, from one address).
if [[ ${BENCH_PROXY_LIMITS:-0} == 1 ]]; then PROXY_LIMITS="# the proxy's default per-client limits (BENCH_PROXY_LIMITS=1)"
else PROXY_LIMITS=$'rate = 0\nmax_conns_per_ip = 0'; fi
cat > "$TMP/koprogo.toml" <<EOF
domain = "localhost"
user = "koprogo"

[paths]
state = "state"
logs = "logs"
run = "run"

[postgres]
memory = "2GB"
start_timeout = "120s"
stop_timeout = "30s"

[backend]
command = "$TMP/koprogo-api"
port = $API_PORT
start_timeout = "180s"
stop_timeout = "35s"

[backend.env]
LOGIN_RATE_LIMIT_MAX = "100000"
LOGIN_RATE_LIMIT_WINDOW_SECS = "60"

[metrics]
listen = "127.0.0.1:$METRICS"

[proxy]
http = ["127.0.0.1:$K_HTTP"]
https = ["127.0.0.1:$K_HTTPS"]
frontend = "frontend"
$PROXY_LIMITS

[tls]
mode = "internal"
EOF
kp() { "$KOPROGO" --config "$TMP/koprogo.toml" "$@"; }
say "starting the appliance in $TMP on CPU $APP_CPU (script pid $$)"
taskset -c "$APP_CPU" "$KOPROGO" --config "$TMP/koprogo.toml" run </dev/null >/dev/null 2>"$TMP/koprogo.err" &
KPID=$!
STATUS=""
for ((i = 0; i < 1800; i++)); do # 180 s: the first boot runs the API's migrations
  kill -0 "$KPID" 2>/dev/null || { tail -20 "$TMP/koprogo.err" >&2; die "koprogo exited during boot"; }
  STATUS=$(kp status --json 2>/dev/null || true)
  [[ $(jq -r '.all_ready // false' <<<"${STATUS:-null}" 2>/dev/null) == true ]] && break
  STATUS=""; sleep 0.1
done
[[ -n $STATUS ]] || { tail -20 "$TMP/koprogo.err" >&2; die "the appliance was not all ready within 180 s (logs in $TMP/logs)"; }
mapfile -t PGIDS < <(jq -r '.services[].pid // empty' <<<"$STATUS")
PG_PID=$(jq -r '.services[] | select(.name == "postgres") | .pid' <<<"$STATUS")
API_PID=$(jq -r '.services[] | select(.name == "api") | .pid' <<<"$STATUS")
[[ -n $PG_PID && -n $API_PID ]] || die "status names no postgres or api pid: $STATUS"
API_WORKERS=$(tr '\0' '\n' < "/proc/$API_PID/environ" 2>/dev/null | sed -n 's/^ACTIX_WORKERS=//p')
say "appliance ready (koprogo pid $KPID, postgres $PG_PID, api $API_PID on :$API_PORT, ACTIX_WORKERS=${API_WORKERS:-?})"

# ---------------------------------------------------------------- demo data, ids
API=http://127.0.0.1:$API_PORT/api/v1
login() { # email password -> token (straight to the API; the limiter is raised)
  local out
  out=$(curl -sS -m 30 -H 'content-type: application/json' \
    -d "$(jq -cn --arg e "$1" --arg p "$2" '{email: $e, password: $p}')" "$API/auth/login") ||
    die "login of $1: no answer"
  jq -er '.token // empty' <<<"$out" 2>/dev/null || die "login of $1 refused: $(head -c 300 <<<"$out")"
}
ADMIN_PW=$(kp admin-password | awk 'NF {l = $0} END {gsub(/^[ \t]+|[ \t]+$/, "", l); print l}')
[[ -n $ADMIN_PW ]] || die "koprogo admin-password printed nothing"
SYNDIC_EMAIL=syndic@grandplace.be SYNDIC_PW=syndic123
ADMIN_TOKEN=$(login admin@koprogo.com "$ADMIN_PW")
say "seeding the demo data (POST /api/v1/seed/demo)"
seed=$(curl -sS -m 120 -o "$TMP/seed.json" -w '%{http_code}' -X POST -H "authorization: Bearer $ADMIN_TOKEN" "$API/seed/demo") || die "seed: no answer"
[[ $seed == 2* ]] || die "POST /seed/demo -> $seed: $(head -c 300 "$TMP/seed.json")"
SYNDIC_TOKEN=$(login "$SYNDIC_EMAIL" "$SYNDIC_PW")
# Every run starts from the seeded data: the rows created later (by the checks and the
# runs) are deleted before each run, so the lists do not grow from run to run.
T0=$(timeout 30 "$KOPROGO" --config "$TMP/koprogo.toml" psql -- -qAtc "SELECT now()") || die "koprogo psql: cannot read the time"
reset_data() {
  [[ $RESET == 1 ]] || return 0
  local t q=""
  for t in units owners meetings expenses; do q+="DELETE FROM $t WHERE created_at > '$T0'; "; done
  timeout 120 "$KOPROGO" --config "$TMP/koprogo.toml" psql -- -v ON_ERROR_STOP=1 -qAt \
    -c "BEGIN; $q COMMIT;" -c "VACUUM ANALYZE units, owners, meetings, expenses;" >/dev/null 2>"$TMP/reset.err" ||
    { cat "$TMP/reset.err" >&2; die "could not delete the rows created by the benchmark"; }
}
ORG=$(curl -sS -m 10 -H "authorization: Bearer $SYNDIC_TOKEN" "$API/auth/me" | jq -r '.organization_id // empty')
[[ -n $ORG ]] || die "GET /auth/me names no organisation for $SYNDIC_EMAIL"
BUILDINGS=$(curl -sS -m 10 -H "authorization: Bearer $SYNDIC_TOKEN" "$API/buildings" |
  jq -r --arg o "$ORG" '[.data[] | select(.organization_id == $o) | .id] | join(",")')
[[ -n $BUILDINGS ]] || die "GET /buildings gave no building of organisation $ORG"
say "organisation $ORG of $SYNDIC_EMAIL, buildings $BUILDINGS"
export BENCH_ORG=$ORG BENCH_BUILDINGS=$BUILDINGS BENCH_ADMIN_TOKEN=$ADMIN_TOKEN BENCH_SYNDIC_TOKEN=$SYNDIC_TOKEN

# ---------------------------------------------------------------- nginx
# The certificate koprogo serves: <state>/tls/local/leaf.pem holds key then certificate.
LEAF=$TMP/state/tls/local/leaf.pem
[[ -r $LEAF ]] || die "$LEAF not readable (run as root, or as the appliance's user)"
mkdir -p "$TMP/certs"
awk -v key="$TMP/certs/key.pem" -v crt="$TMP/certs/cert.pem" '
  /-----BEGIN .*PRIVATE KEY-----/ { out = key } /-----BEGIN CERTIFICATE-----/ { out = crt }
  out != "" { print > out } /-----END / { out = "" }' "$LEAF"
[[ -s $TMP/certs/key.pem && -s $TMP/certs/cert.pem ]] || die "could not split $LEAF into key and certificate"
chmod 0644 "$TMP/certs/cert.pem"; chmod 0600 "$TMP/certs/key.pem"
mkdir -p "$TMP/nginx/tmp"
NGINX_VERSION=$("$NGINX" -v 2>&1 | sed 's/.*nginx\///; s/ .*//')
N_USER=""
if is_root; then
  if getent passwd www-data >/dev/null; then N_USER="user www-data;"; else N_USER="user nobody nogroup;"; fi
fi
# As koprogo's proxy does: TLS 1.2/1.3, HTTP/1.1 keep-alive to the API, X-Forwarded-*
# replaced, the same security headers, an access log written to a file.
cat > "$TMP/nginx/nginx.conf" <<EOF
$N_USER
worker_processes 1;
pid $TMP/nginx/nginx.pid;
error_log $TMP/nginx/error.log warn;
events { worker_connections 1024; }
http {
  include /etc/nginx/mime.types;
  default_type application/octet-stream;
  access_log $TMP/nginx/access.log combined;
  client_body_temp_path $TMP/nginx/tmp/body;
  proxy_temp_path $TMP/nginx/tmp/proxy;
  fastcgi_temp_path $TMP/nginx/tmp/fastcgi;
  uwsgi_temp_path $TMP/nginx/tmp/uwsgi;
  scgi_temp_path $TMP/nginx/tmp/scgi;
  sendfile on;
  tcp_nodelay on;
  keepalive_requests 1000000;
  server_tokens off;
  client_max_body_size 1m;
  upstream api {
    server 127.0.0.1:$API_PORT;
    keepalive 32;
    keepalive_requests 1000000;
  }
  server {
    listen 127.0.0.1:$N_HTTPS ssl http2;
    server_name localhost;
    ssl_certificate $TMP/certs/cert.pem;
    ssl_certificate_key $TMP/certs/key.pem;
    ssl_protocols TLSv1.2 TLSv1.3;
    add_header Strict-Transport-Security "max-age=31536000" always;
    add_header X-Frame-Options DENY always;
    add_header X-Content-Type-Options nosniff always;
    add_header Referrer-Policy strict-origin-when-cross-origin always;
    root $TMP/frontend;
    location /api/ {
      proxy_pass http://api;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host \$host;
      proxy_set_header X-Forwarded-For \$remote_addr;
      proxy_set_header X-Forwarded-Proto \$scheme;
      proxy_set_header X-Forwarded-Host \$host;
    }
    location / {
      try_files \$uri \$uri/ /index.html;
    }
  }
}
EOF
"$NGINX" -t -q -e "$TMP/nginx/error.log" -p "$TMP/nginx" -c "$TMP/nginx/nginx.conf" ||
  { cat "$TMP/nginx/error.log" >&2; die "nginx refused its configuration"; }
taskset -c "$APP_CPU" "$NGINX" -e "$TMP/nginx/error.log" -p "$TMP/nginx" -c "$TMP/nginx/nginx.conf" \
  -g 'daemon off;' </dev/null >"$TMP/nginx/stdout.log" 2>&1 &
NPID=$!
for ((i = 0; i < 150; i++)); do # 15 s
  kill -0 "$NPID" 2>/dev/null || break
  curl -sk -m 2 -o /dev/null "https://127.0.0.1:$N_HTTPS/api/v1/health" && break
  sleep 0.1
done
curl -sk -m 2 -o /dev/null "https://127.0.0.1:$N_HTTPS/api/v1/health" ||
  { cat "$TMP/nginx/error.log" "$TMP/nginx/stdout.log" >&2; die "nginx did not answer within 15 s"; }
for p in $(nginx_pids); do KNOWN+=("$p"); done

declare -A URL=([koprogo]="https://127.0.0.1:$K_HTTPS" [nginx]="https://127.0.0.1:$N_HTTPS" [direct]="http://127.0.0.1:$API_PORT")
MODES=(koprogo nginx direct)

# ---------------------------------------------------------------- checks with curl
# Every request kind of bench-real.lua once through each of the three, each must be 2xx.
CHECK_N=0
check_one() { # mode method path token [json]
  local mode=$1 method=$2 path=$3 token=$4 body=${5:-} code args=()
  CHECK_N=$((CHECK_N + 1))
  args=(-sk -m 30 -o "$TMP/check.out" -w '%{http_code}' -X "$method" -H "authorization: Bearer $token")
  if [[ -n $body ]]; then args+=(-H 'content-type: application/json' -d "$body"); fi
  code=$(curl "${args[@]}" "${URL[$mode]}$path") || die "$mode: $method $path: no answer"
  [[ $code == 2* ]] || die "$mode: $method $path -> $code: $(head -c 300 "$TMP/check.out")"
}
B1=${BUILDINGS%%,*}
for mode in "${MODES[@]}"; do
  for list in buildings owners expenses meetings; do check_one "$mode" GET "/api/v1/$list" "$SYNDIC_TOKEN"; done
  id="check-$mode-$$"
  check_one "$mode" POST /api/v1/expenses "$SYNDIC_TOKEN" "$(jq -cn --arg b "$B1" --arg id "$id" \
    '{building_id: $b, category: "Maintenance", description: "Facture \($id)", amount: 123.45,
      expense_date: "2026-11-02T10:00:00Z", supplier: "Fournisseur SA", invoice_number: "F-\($id)"}')"
  check_one "$mode" POST /api/v1/owners "$SYNDIC_TOKEN" "$(jq -cn --arg id "$id" \
    '{first_name: "Marie", last_name: "Dupont \($id)", email: "\($id)@bench.example.be", phone: "+32470000001",
      address: "Rue de la Loi 1", city: "Bruxelles", postal_code: "1000", country: "Belgique"}')"
  check_one "$mode" POST /api/v1/meetings "$SYNDIC_TOKEN" "$(jq -cn --arg b "$B1" --arg id "$id" \
    '{building_id: $b, meeting_type: "Ordinary", title: "AG \($id)", description: "Budget et travaux",
      scheduled_date: "2027-03-02T18:30:00Z", location: "Salle du conseil"}')"
  check_one "$mode" POST /api/v1/units "$ADMIN_TOKEN" "$(jq -cn --arg o "$ORG" --arg b "$B1" --arg id "$id" \
    '{organization_id: $o, building_id: $b, unit_number: $id, unit_type: "Parking", floor: -1,
      surface_area: 12.5, quota: 1}')"
done
say "checked: $CHECK_N requests (4 lists, 4 kinds of POST, through koprogo, nginx and direct) all 2xx"

# ---------------------------------------------------------------- measuring
CLK=$(getconf CLK_TCK)
file_ticks() { # /proc/…/stat [with reaped children]: utime+stime (+cutime+cstime)
  awk -v c="${2:-0}" '{sub(/^.*\) /, ""); print $12 + $13 + (c ? $14 + $15 : 0)}' "$1" 2>/dev/null || echo 0
}
stat_ticks() { file_ticks "/proc/$1/stat" "${2:-0}"; } # pid [with reaped children]
tree_ticks() { # pid: the process, its reaped children, and its live descendants
  local pid=$1 sum c
  sum=$(stat_ticks "$pid" 1)
  for c in $(children "$pid"); do sum=$((sum + $(tree_ticks "$c"))); done
  echo "$sum"
}
log_thread_ticks() { # the supervisor's threads that capture and write the services' output
  local t sum=0 comm
  for t in /proc/"$KPID"/task/*; do
    comm=$(cat "$t/comm" 2>/dev/null || true)
    case $comm in log-* | logz-*) sum=$((sum + $(file_ticks "$t/stat"))) ;; esac
  done
  echo "$sum"
}
cpu_busy() { # "busy total" ticks of one CPU from /proc/stat
  awk -v c="cpu$1" '$1 == c {t = 0; for (i = 2; i <= NF; i++) t += $i; print t - $5 - $6, t}' /proc/stat
}
snapshot() { # VAR: "sup logs api pg nginx wrk app_busy app_total load_busy load_total"
  # wrk's CPU: this shell's reaped children, from the `times` builtin run here (in a
  # command substitution it would report the subshell's children).
  times > "$TMP/times"
  local wrk nt=0 p
  wrk=$(tail -1 "$TMP/times" | awk -v c="$CLK" '{
    s = 0; for (i = 1; i <= 2; i++) { split($i, a, /[ms]/); s += a[1] * 60 + a[2] } printf "%d", s * c + 0.5 }')
  for p in $(nginx_pids); do nt=$((nt + $(stat_ticks "$p" 1))); done
  read -ra "$1" <<<"$(stat_ticks "$KPID") $(log_thread_ticks) $(tree_ticks "$API_PID") $(tree_ticks "$PG_PID") $nt $wrk $(cpu_busy "$APP_CPU") $(cpu_busy "$LOAD_CPU")"
}
wait_quiet() { # until both CPUs are < 20 % busy over a second (others' jobs), bounded
  local start=$SECONDS a0 at0 l0 lt0 a1 at1 l1 lt1 busy_a busy_l
  while :; do
    read -r a0 at0 <<<"$(cpu_busy "$APP_CPU")"; read -r l0 lt0 <<<"$(cpu_busy "$LOAD_CPU")"
    run_child sleep 1
    read -r a1 at1 <<<"$(cpu_busy "$APP_CPU")"; read -r l1 lt1 <<<"$(cpu_busy "$LOAD_CPU")"
    busy_a=$(((a1 - a0) * 100 / (at1 - at0 > 0 ? at1 - at0 : 1))); busy_l=$(((l1 - l0) * 100 / (lt1 - lt0 > 0 ? lt1 - lt0 : 1)))
    if ((busy_a < 20 && busy_l < 20)); then return 0; fi
    if ((SECONDS - start >= QUIET_WAIT)); then
      say "   other jobs keep the CPUs busy (CPU $APP_CPU ${busy_a}%, CPU $LOAD_CPU ${busy_l}%): measuring anyway"
      NOISY=$((NOISY + 1)); return 0
    fi
  done
}
NOISY=0

per_k() { awk -v t="$1" -v c="$CLK" -v n="$reqs" 'BEGIN {printf "%.4f", t / c / n * 1000}'; } # ticks -> CPU s per 1,000 requests
wrk_run() { # mode seconds out: one wrk run with fresh tokens
  local mode=$1 secs=$2 out=$3
  BENCH_ADMIN_TOKEN=$(login admin@koprogo.com "$ADMIN_PW")
  BENCH_SYNDIC_TOKEN=$(login "$SYNDIC_EMAIL" "$SYNDIC_PW")
  BENCH_TAG="r$$${out##*/}"; BENCH_TAG=${BENCH_TAG//[^a-zA-Z0-9]/}
  export BENCH_ADMIN_TOKEN BENCH_SYNDIC_TOKEN BENCH_TAG
  run_child timeout $((secs + 60)) "$WRK" -t "$THREADS" -c "$CONNS" -d "${secs}s" --timeout 10s \
    -s "$LUA" "${URL[$mode]}/" > "$out" 2>"$out.err" || { cat "$out.err" >&2; die "wrk failed against $mode"; }
  tail -1 "$out" | jq -e .requests >/dev/null 2>&1 || { cat "$out" "$out.err" >&2; die "wrk printed no result line against $mode"; }
}

# BENCH_PERF=1: a CPU profile of the supervisor (perf, software clock: no hardware
# counters needed) during the first koprogo run, printed after the table.
# BENCH_PERF=strace: the system calls of the supervisor (first koprogo run) and of nginx
# (first nginx run), counted by strace -c and printed per request after the table
# (strace slows both down: those two runs' figures are not comparable with the others).
PERF=${BENCH_PERF:-0} PERF_PID="" PERF_TOOL=""
case $PERF in
  0) ;;
  1) PERF_TOOL=perf PERF_PKG=linux-perf ;;
  strace) PERF_TOOL=strace PERF_PKG=strace ;;
  *) die "BENCH_PERF=$PERF: expected 1 (perf) or strace" ;;
esac
if [[ -n $PERF_TOOL ]] && ! command -v "$PERF_TOOL" >/dev/null 2>&1; then
  is_root || die "BENCH_PERF=$PERF needs $PERF_TOOL (Debian's $PERF_PKG; run as root to install it)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$PERF_PKG" >/dev/null || die "apt-get install $PERF_PKG failed"
fi
perf_start() { # mode round
  [[ $2 == 1 ]] || return 0
  if [[ $PERF == 1 && $1 == koprogo ]]; then
    perf record -q -e cpu-clock -F 2000 --per-thread -p "$KPID" -o "$RES/perf.data" >/dev/null 2>"$RES/perf.err" &
  elif [[ $PERF == strace && ($1 == koprogo || $1 == nginx) ]]; then
    local pid=$KPID
    if [[ $1 == nginx ]]; then pid=$(children "$NPID" | head -1); fi
    strace -c -f -p "$pid" -o "$RES/strace-$1.txt" 2>"$RES/strace-$1.err" &
  else
    return 0
  fi
  PERF_PID=$!
  sleep 0.3
}
perf_stop() { # mode: after the run (its 2xx count in $RES/<mode>-1)
  [[ -n $PERF_PID ]] || return 0
  kill -INT "$PERF_PID" 2>/dev/null || true
  wait "$PERF_PID" 2>/dev/null || true
  PERF_PID=""
  if [[ $PERF == strace ]]; then jq '.requests' <<<"$(tail -1 "$RES/$1-1")" > "$RES/strace-$1.requests"; fi
}

declare -A R
RES=$TMP/results
mkdir -p "$RES"
say "pinning: $PINNING"
say "warm-up: ${WARMUP} s per mode"
for mode in "${MODES[@]}"; do wrk_run "$mode" "$WARMUP" "$RES/warm-$mode"; done

for ((r = 1; r <= ROUNDS; r++)); do
  order=()
  for ((k = 0; k < ${#MODES[@]}; k++)); do order+=("${MODES[(k + r - 1) % ${#MODES[@]}]}"); done
  for mode in "${order[@]}"; do
    reset_data
    wait_quiet
    out=$RES/$mode-$r
    snapshot s0
    perf_start "$mode" "$r"
    wrk_run "$mode" "$SECS" "$out"
    perf_stop "$mode"
    snapshot s1
    line=$(tail -1 "$out")
    # Only 2xx answers count as done work (req/s, CPU per 1,000 requests): a 429 or
    # 5xx is cheap and would flatter whoever answers it.
    reqs=$(jq '.requests - .non2xx' <<<"$line")
    ((reqs > 0)) || die "$mode: wrk completed no request with a 2xx answer: $line"
    d=()
    # shellcheck disable=SC2154 # s0 and s1 are set by snapshot (read -ra "$1")
    for i in "${!s0[@]}"; do d+=($((s1[i] - s0[i]))); done
    # d: 0 sup, 1 logs, 2 api, 3 pg, 4 nginx, 5 wrk, 6 app busy, 7 app total, 8 load busy, 9 load total
    ours=$((d[0] + d[2] + d[3] + d[4]))
    R[$mode.rps]+="$(jq '(.requests - .non2xx) / .duration_us * 1e6' <<<"$line") "
    R[$mode.p50]+="$(jq '.p50_us / 1000' <<<"$line") "
    R[$mode.p90]+="$(jq '.p90_us / 1000' <<<"$line") "
    R[$mode.p99]+="$(jq '.p99_us / 1000' <<<"$line") "
    R[$mode.non2xx]=$(( ${R[$mode.non2xx]:-0} + $(jq '.non2xx' <<<"$line") ))
    R[$mode.errors]=$(( ${R[$mode.errors]:-0} + $(jq '.errors.connect + .errors.read + .errors.write + .errors.timeout' <<<"$line") ))
    R[$mode.reqs]=$(( ${R[$mode.reqs]:-0} + $(jq '.requests' <<<"$line") ))
    R[$mode.posts]=$(( ${R[$mode.posts]:-0} + $(jq '.posts_sent' <<<"$line") ))
    R[$mode.statuses]+="$(jq -c '.statuses' <<<"$line") "
    R[$mode.sup]+="$(per_k "${d[0]}") "
    R[$mode.logs]+="$(per_k "${d[1]}") "
    R[$mode.api]+="$(per_k "${d[2]}") "
    R[$mode.pg]+="$(per_k "${d[3]}") "
    R[$mode.nginx]+="$(per_k "${d[4]}") "
    R[$mode.total]+="$(per_k "$ours") "
    R[$mode.wrk]+="$(per_k "${d[5]}") "
    R[$mode.app_busy]+="$(awk -v b="${d[6]}" -v t="${d[7]}" 'BEGIN {printf "%.0f", t ? 100 * b / t : 0}') "
    # Busy time of the appliance's CPU not used by the processes measured: other jobs.
    R[$mode.others]+="$(awk -v b="${d[6]}" -v o="$ours" -v t="${d[7]}" 'BEGIN {x = t ? 100 * (b - o) / t : 0; printf "%.0f", x < 0 ? 0 : x}') "
    R[$mode.load_busy]+="$(awk -v b="${d[8]}" -v t="${d[9]}" 'BEGIN {printf "%.0f", t ? 100 * b / t : 0}') "
    say "   round $r $mode: $(jq -r '"\((.requests - .non2xx) / .duration_us * 1e6 | floor) req/s (2xx), p50 \(.p50_us / 1000) ms, p90 \(.p90_us / 1000) ms, p99 \(.p99_us / 1000) ms, non-2xx \(.non2xx)"' <<<"$line"); CPU s/1000 req: supervisor $(per_k "${d[0]}"), API $(per_k "${d[2]}"), PostgreSQL $(per_k "${d[3]}"), nginx $(per_k "${d[4]}")"
  done
done
kill -0 "$KPID" 2>/dev/null || die "koprogo died during the run"
KSTAT=$(kp status --json 2>/dev/null || true)
RESTARTS=$(jq -r '[.services[]?.restarts] | add // 0' <<<"${KSTAT:-null}" 2>/dev/null || echo "?")
PANICS=$(cat "$TMP"/logs/api*.log 2>/dev/null | grep -c 'panicked at' || true)

# ---------------------------------------------------------------- the table
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR] = $1} END {print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }
med() { read -ra v <<<"${R[$1]}"; median "${v[@]}"; }
fmt() { awk -v x="$2" -v f="$1" 'BEGIN {printf f, x}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (b == 0) print "—"; else printf "%.2f", a / b}'; }
row() { # label format key
  printf '| %s | %s | %s | %s |\n' "$1" "$(fmt "$2" "$(med koprogo."$3")")" "$(fmt "$2" "$(med nginx."$3")")" "$(fmt "$2" "$(med direct."$3")")"
}
runs() { local x out=(); read -ra v <<<"${R[$1]}"; for x in "${v[@]}"; do out+=("$(fmt %.0f "$x")"); done; echo "${out[*]}"; }
K=$(med koprogo.rps) N=$(med nginx.rps) D=$(med direct.rps)

echo
echo "Real-API benchmark, $(date -u +%Y-%m-%dT%H:%MZ), $NCPU CPUs ($(grep -m1 'model name' /proc/cpuinfo | sed 's/.*: //')); $PINNING."
echo "koprogo-api from $(basename "$(dirname "$REAL_SRC")")/$(basename "$REAL_SRC") (ACTIX_WORKERS=${API_WORKERS:-?}), PostgreSQL $(sed 's/ .*//' "$TMP/state/pgdata/PG_VERSION" 2>/dev/null) tuned for 2 GB, demo data seeded;"
echo "req/s and CPU per 1,000 requests count 2xx answers only; latencies are of all answers."
echo "wrk $("$WRK" -v 2>&1 | head -1 | awk '{print $2}') -t$THREADS -c$CONNS, scripts/bench-real.lua: 80 % GET /api/v1/{buildings,owners,expenses,meetings}, 20 % POST"
echo "  /api/v1/{expenses,owners,meetings,units}, bearer tokens of the syndic (units: the superadmin), fresh before every run."
echo "koprogo: its HTTPS proxy (rustls, local-CA ECDSA P-256 certificate). nginx $NGINX_VERSION: worker_processes 1, HTTPS with the same"
echo "  certificate, plain HTTP/1.1 keep-alive to the API (as koprogo's proxy). direct: plain HTTP to the API's loopback port."
echo "$ROUNDS round(s) of ${SECS} s per mode after a ${WARMUP} s warm-up each, alternating (the first mode rotating each round); medians."
echo
echo "| metric (median of $ROUNDS) | koprogo | nginx | direct |"
echo "|---|---:|---:|---:|"
row "req/s (2xx answers)" %.0f rps
row "p50 latency, ms" %.1f p50
row "p90 latency, ms" %.1f p90
row "p99 latency, ms" %.1f p99
printf '| non-2xx / all answers (all runs) | %s / %s | %s / %s | %s / %s |\n' \
  "${R[koprogo.non2xx]}" "${R[koprogo.reqs]}" "${R[nginx.non2xx]}" "${R[nginx.reqs]}" "${R[direct.non2xx]}" "${R[direct.reqs]}"
printf '| socket errors (connect, read, write, timeout) | %s | %s | %s |\n' "${R[koprogo.errors]}" "${R[nginx.errors]}" "${R[direct.errors]}"
row "CPU s / 1,000 req: supervisor (koprogo)" %.3f sup
row "… of which its log threads (capture, files)" %.3f logs
row "CPU s / 1,000 req: API (koprogo-api)" %.3f api
row "CPU s / 1,000 req: PostgreSQL (all backends)" %.3f pg
row "CPU s / 1,000 req: nginx (master + worker)" %.3f nginx
row "CPU s / 1,000 req: all of the above" %.3f total
row "CPU s / 1,000 req: wrk (load CPU)" %.3f wrk
row "busy % of the appliance's CPU" %.0f app_busy
row "… of which other jobs (not measured processes)" %.0f others
row "busy % of the load CPU" %.0f load_busy
echo
echo "Ratios of median req/s: koprogo/nginx $(ratio "$K" "$N"), koprogo/direct $(ratio "$K" "$D"), nginx/direct $(ratio "$N" "$D")."
per_round() { # a b: the ratio of a's to b's req/s in each round, then their median
  local -a x y out=(); local i
  read -ra x <<<"${R[$1.rps]}"; read -ra y <<<"${R[$2.rps]}"
  for i in "${!x[@]}"; do out+=("$(ratio "${x[i]}" "${y[i]}")"); done
  echo "[${out[*]}] median $(median "${out[@]}")"
}
echo "Per-round ratios of req/s: koprogo/nginx $(per_round koprogo nginx), koprogo/direct $(per_round koprogo direct), nginx/direct $(per_round nginx direct)."
echo "Runs, req/s: koprogo [$(runs koprogo.rps)], nginx [$(runs nginx.rps)], direct [$(runs direct.rps)]."
for mode in "${MODES[@]}"; do
  if [[ ${R[$mode.non2xx]} != 0 ]]; then echo "warning: non-2xx answers through $mode (not counted in req/s nor CPU per 1,000 requests), per run: ${R[$mode.statuses]}"; fi
done
if [[ $RESET == 1 ]]; then GROWTH="each run started from the seeded data: the rows created before it were deleted"
else GROWTH="BENCH_RESET=0: the lists grew over the whole run; the rotating order spreads that over the modes"; fi
echo "POSTs sent: koprogo ${R[koprogo.posts]}, nginx ${R[nginx.posts]}, direct ${R[direct.posts]} ($GROWTH)."
echo "API restarts during the run: $RESTARTS; panics in the API's log: $PANICS."
if ((NOISY > 0)); then echo "warning: $NOISY run(s) started while other jobs kept the CPUs busy (see the 'other jobs' row)."; fi
if [[ $PERF == strace ]]; then
  for mode in koprogo nginx; do
    [[ -s $RES/strace-$mode.txt && -s $RES/strace-$mode.requests ]] || continue
    echo
    echo "System calls of $mode per request (BENCH_PERF=strace, first $mode run, $(cat "$RES/strace-$mode.requests") requests; strace -c -f):"
    awk -v n="$(cat "$RES/strace-$mode.requests")" '
      $1 ~ /^[0-9.]+$/ && NF >= 5 && $NF != "total" { name = $NF; calls = $4; errs = (NF == 6) ? $5 : 0
        total += calls; printf "  %-20s %8.2f calls/req  (%s errors)\n", name, calls / n, errs }
      END { printf "  %-20s %8.2f calls/req\n", "total", total / n }' "$RES/strace-$mode.txt"
  done
fi
if [[ $PERF == 1 && -s $RES/perf.data ]]; then
  echo
  echo "Supervisor CPU profile (BENCH_PERF=1, first koprogo run, perf cpu-clock at 2 kHz): by thread, then by function (>= 0.5 %)"
  perf report -q -i "$RES/perf.data" --stdio --no-children --sort comm 2>/dev/null | sed '/^$/d' | head -15
  perf report -q -i "$RES/perf.data" --stdio --no-children --sort dso,sym --percent-limit 0.5 2>/dev/null | sed '/^$/d' | head -60
fi
