#!/usr/bin/env bash
# Proxy benchmark: koprogo's HTTPS front door against nginx and Caddy (Debian
# packages), side by side in one run, with the same certificate (the appliance's
# local-CA leaf, ECDSA P-256), the same fast backend (the demo backend supervised by
# the appliance, /api/v1/health needs no database), the same frontend files and the
# same CPU pinning: the proxy (all its threads) on one CPU, the backend, PostgreSQL
# and the load generator (oha) on another. Each proxy is measured alone while the
# others sit idle. Figures are printed, never asserted. Traffic goes to 127.0.0.1
# only; every wait is bounded; every process started here is stopped on exit.
#
# Usage: scripts/bench-proxy.sh          (as root it installs what is missing)
# Knobs (environment): BENCH_SECONDS=10 (one run of a, c/app.js, b, e), BENCH_REPEAT=3
#   (rounds of a, c and f), BENCH_CONNS=32, BENCH_WARMUP=2 (seconds), BENCH_INDEX_SECONDS=5
#   (one run of c/index.html and of f), BENCH_HS_CLIENTS=4 (openssl s_time processes in f),
#   BENCH_SOAK_SECONDS=0 (g: N > 0 runs koprogo under load N s and reports its RSS slope),
#   BENCH_QUIET_WAIT=90 (seconds to wait, before each run, for other jobs to leave the
#   CPUs), BENCH_PIN_LOG_THREADS=1 (koprogo's threads capturing the backend's and
#   Postgres' output go with the backend), BENCH_KEEP=1 (keep the temp dir),
#   BENCH_HOLD=N (debugging: wait N s before measuring, ports printed), BENCH_PERF=1
#   (perf profile of koprogo in round 1 of phase a: its CPU per request by stage).
#
# Phases: (d) idle RSS of each proxy before any load; then REPEAT alternating rounds (the
# first proxy rotating each round) of (a) keep-alive GET /api/v1/health, RSS sampled every
# 200 ms, (c) GET /_astro/app.<hash>.js (~50 KB) and / (index.html, ~2 KB), (f) full TLS
# handshakes (no session resumption); then per proxy (b) a new connection per request
# (oha: sessions mostly resumed) and (e) p99 at half of (a)'s rate with latency
# correction, through the proxy and straight to the backend; (g) optional soak.
# Medians over the rounds. Total about 8 minutes.
set -euo pipefail
umask 022
cd "$(dirname "$0")/.."
ROOT=$PWD

SECS=${BENCH_SECONDS:-10}
REPEAT=${BENCH_REPEAT:-3}
CONNS=${BENCH_CONNS:-32}
WARMUP=${BENCH_WARMUP:-2}
INDEX_SECS=${BENCH_INDEX_SECONDS:-5}
export PATH="$PATH:$HOME/.cargo/bin"

say() { printf '%s %s\n' "$(date +%T)" "$*" >&2; }
die() { say "error: $*"; exit 1; }
is_root() { [[ $(id -u) -eq 0 ]]; }

# ---------------------------------------------------------------- 1. what we need
. scripts/deps.sh
koprogo_install_deps
koprogo_make_reachable "$PWD"

install_debs() { # nginx / caddy, without letting their postinst start the services
  local missing=()
  command -v nginx >/dev/null 2>&1 || [[ -x /usr/sbin/nginx ]] || missing+=(nginx-light)
  command -v caddy >/dev/null 2>&1 || missing+=(caddy)
  command -v taskset >/dev/null 2>&1 || missing+=(util-linux)
  command -v jq >/dev/null 2>&1 || missing+=(jq)
  command -v curl >/dev/null 2>&1 || missing+=(curl)
  command -v ss >/dev/null 2>&1 || missing+=(iproute2)
  [[ ${#missing[@]} -eq 0 ]] && return 0
  is_root || die "missing Debian packages: ${missing[*]} (run this script as root to install them)"
  say "installing: ${missing[*]}"
  local policy=/usr/sbin/policy-rc.d ours=0
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\n# bench-proxy.sh: no service starts during its install\nexit 101\n' > "$policy"
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
CADDY=$(command -v caddy)
if ! command -v oha >/dev/null 2>&1; then
  say "installing the load generator: cargo install oha --locked (a few minutes)"
  cargo install oha --locked
fi
OHA=$(command -v oha)

# ---------------------------------------------------------------- 2. build
cargo build --release --workspace --locked
KOPROGO=$ROOT/target/release/koprogo
[[ -x $KOPROGO && -x $ROOT/target/release/demo-backend ]] || die "release binaries missing"

# ---------------------------------------------------------------- CPUs
expand_cpus() { # "0-2,5" -> "0 1 2 5"
  local part parts cpus=() a b i
  IFS=, read -ra parts <<<"$1"
  for part in "${parts[@]}"; do
    if [[ $part == *-* ]]; then a=${part%-*}; b=${part#*-}; for ((i = a; i <= b; i++)); do cpus+=("$i"); done
    else cpus+=("$part"); fi
  done
  echo "${cpus[@]}"
}
NCPU=$(grep -c '^processor' /proc/cpuinfo)
read -ra CPUS <<<"$(expand_cpus "$(taskset -pc $$ | sed 's/.*: *//')")"
if [[ ${#CPUS[@]} -ge 2 ]]; then
  PROXY_CPU=${CPUS[0]}; LOAD_CPU=${CPUS[1]}; PINNING="proxy on CPU $PROXY_CPU; backend, PostgreSQL, oha on CPU $LOAD_CPU"
else
  PROXY_CPU=${CPUS[0]}; LOAD_CPU=${CPUS[0]}; PINNING="only one CPU ($PROXY_CPU): everything shares it (figures are not comparable with 2-CPU runs)"
fi
pin() { taskset -a -p -c "$1" "$2" >/dev/null 2>&1 || true; } # cpu pid (all threads)
# This shell and everything it starts from now on (oha, curl, samplers) run on LOAD_CPU.
taskset -p -c "$LOAD_CPU" $$ >/dev/null

# ---------------------------------------------------------------- cleanup
TMP=$(mktemp -d "${TMPDIR:-/tmp}/kpgbench.XXXXXX")
chmod 0755 "$TMP"
KPID="" NPID="" CPID="" SAMPLER="" CHILD="" PGIDS=() KNOWN=()
run_child() { # a long foreground command, in the background so that a signal is handled at once
  local rc=0
  "$@" &
  CHILD=$!
  wait "$CHILD" || rc=$?
  CHILD=""
  return "$rc"
}
# shellcheck disable=SC2046 # split on purpose: the pids on one line (read -ra reads one)
nginx_pids() { if [[ -n $NPID ]]; then echo "$NPID" $(ps -o pid= --ppid "$NPID" 2>/dev/null); fi; }
stop_sampler() {
  if [[ -n $SAMPLER ]]; then kill "$SAMPLER" 2>/dev/null || true; wait "$SAMPLER" 2>/dev/null || true; SAMPLER=""; fi
}
stop_pid() { # pid signal seconds: signal, wait (bounded), then SIGKILL
  local pid=$1 sig=$2 secs=$3 i
  [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 0
  kill "-$sig" "$pid" 2>/dev/null || true
  for ((i = 0; i < secs * 10; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
  wait "$pid" 2>/dev/null || true
}
leftovers() { # processes of this run: $TMP on the command line, in a service group of the
  # appliance, or a pid we saw (nginx workers)
  local pid pgid args mine=" ${PGIDS[*]} " known=" ${KNOWN[*]} "
  while read -r pid pgid args; do
    if [[ $args == *"$TMP"* || $mine == *" $pgid "* || $known == *" $pid "* ]]; then echo "$pid $args"; fi
  done < <(ps -e -o pid=,pgid=,args= 2>/dev/null)
}
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  stop_sampler
  stop_pid "${PERF_PID:-}" INT 5
  stop_pid "$CHILD" TERM 5
  for p in $(nginx_pids); do KNOWN+=("$p"); done
  stop_pid "$CPID" TERM 10
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
pick_port() { # VAR: a free loopback port not picked before
  local p i
  for ((i = 0; i < 500; i++)); do
    p=$((20000 + RANDOM % 40000))
    [[ $PICKED == *" $p "* ]] && continue
    if [[ -z $(ss -Htan "( sport = :$p or dport = :$p )" 2>/dev/null) ]]; then
      PICKED+="$p "; printf -v "$1" '%s' "$p"; return 0
    fi
  done
  die "no free port found"
}
pick_port BACKEND_PORT; pick_port K_HTTP; pick_port K_HTTPS; pick_port N_HTTPS; pick_port C_HTTPS

# ---------------------------------------------------------------- frontend
FRONT=$TMP/frontend
mkdir -p "$FRONT/_astro"
awk 'BEGIN { for (i = 0; i < 760; i++) printf "export const k%04d=function(a,b){return a*%d+b.concat(\"v%04d\")};\n", i, i, i }' > "$TMP/app.js"
JS_NAME="app.$(sha256sum "$TMP/app.js" | cut -c1-8).js"
mv "$TMP/app.js" "$FRONT/_astro/$JS_NAME"
{
  printf '<!doctype html>\n<html lang="fr"><head><meta charset="utf-8"><title>KoproGo</title>\n'
  printf '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
  printf '<script type="module" src="/_astro/%s"></script></head><body>\n' "$JS_NAME"
  for i in $(seq 1 22); do printf '<p class="row">Copropriété, ligne %02d : charges, assemblées, documents.</p>\n' "$i"; done
  printf '</body></html>\n'
} > "$FRONT/index.html"
chmod -R a+rX "$FRONT"
JS_SIZE=$(stat -c %s "$FRONT/_astro/$JS_NAME")
INDEX_SIZE=$(stat -c %s "$FRONT/index.html")

# ---------------------------------------------------------------- the appliance
cp "$ROOT/target/release/demo-backend" "$TMP/demo-backend"
chmod 0755 "$TMP/demo-backend"
cat > "$TMP/koprogo.toml" <<EOF
domain = "localhost"
user = "koprogo"

[paths]
state = "state"
logs = "logs"
run = "run"

[postgres]
memory = "128MB"
max_connections = 12
start_timeout = "60s"
stop_timeout = "20s"

[backend]
command = "$TMP/demo-backend"
port = $BACKEND_PORT
start_timeout = "30s"
stop_timeout = "10s"
pool_max = 4
pool_min = 1

[proxy]
http = ["127.0.0.1:$K_HTTP"]
https = ["127.0.0.1:$K_HTTPS"]
frontend = "frontend"
rate = 0
max_conns_per_ip = 0
EOF
kp() { "$KOPROGO" --config "$TMP/koprogo.toml" "$@"; }
say "starting the appliance in $TMP (script pid $$)"
taskset -c "$LOAD_CPU" "$KOPROGO" --config "$TMP/koprogo.toml" run </dev/null >/dev/null 2>"$TMP/koprogo.err" &
KPID=$!
STATUS=""
for ((i = 0; i < 900; i++)); do # 90 s
  kill -0 "$KPID" 2>/dev/null || { cat "$TMP/koprogo.err" >&2; die "koprogo exited during boot"; }
  STATUS=$(kp status --json 2>/dev/null || true)
  [[ $(jq -r '.all_ready // false' <<<"${STATUS:-null}" 2>/dev/null) == true ]] && break
  STATUS=""; sleep 0.1
done
[[ -n $STATUS ]] || { tail -20 "$TMP/koprogo.err" >&2; die "the appliance was not all ready within 90 s"; }
mapfile -t PGIDS < <(jq -r '.services[].pid // empty' <<<"$STATUS")
say "appliance ready (koprogo pid $KPID, service groups ${PGIDS[*]})"

pin_koprogo() { # koprogo (the proxy) on PROXY_CPU, its children's groups on LOAD_CPU
  pin "$PROXY_CPU" "$KPID"
  local pid pgid tid comm mine=" ${PGIDS[*]} "
  while read -r pid pgid; do
    if [[ $mine == *" $pgid "* ]]; then pin "$LOAD_CPU" "$pid"; fi
  done < <(ps -e -o pid=,pgid=)
  # The demo backend logs every request on stdout: the threads of koprogo that capture
  # the services' output (log-api, logz-api, log-postgres…) are the backend's cost, paid
  # during every proxy's run, so they go with the backend (BENCH_PIN_LOG_THREADS=0: not).
  if [[ ${BENCH_PIN_LOG_THREADS:-1} == 1 ]]; then
    for tid in /proc/"$KPID"/task/*; do
      comm=$(cat "$tid/comm" 2>/dev/null || true)
      case $comm in log-api | logz-api | log-postgres | logz-postgres) taskset -p -c "$LOAD_CPU" "${tid##*/}" >/dev/null 2>&1 || true ;; esac
    done
  fi
}
pin_koprogo

# The certificate koprogo serves: <state>/tls/local/leaf.pem holds key then certificate.
LEAF=$TMP/state/tls/local/leaf.pem
[[ -r $LEAF ]] || die "$LEAF not readable (run as root, or as the appliance's user)"
mkdir -p "$TMP/certs"
awk -v key="$TMP/certs/key.pem" -v crt="$TMP/certs/cert.pem" '
  /-----BEGIN .*PRIVATE KEY-----/ { out = key } /-----BEGIN CERTIFICATE-----/ { out = crt }
  out != "" { print > out } /-----END / { out = "" }' "$LEAF"
[[ -s $TMP/certs/key.pem && -s $TMP/certs/cert.pem ]] || die "could not split $LEAF into key and certificate"
chmod 0644 "$TMP/certs/cert.pem"; chmod 0600 "$TMP/certs/key.pem"

# ---------------------------------------------------------------- nginx
mkdir -p "$TMP/nginx/tmp"
NGINX_VERSION=$("$NGINX" -v 2>&1 | sed 's/.*nginx\///; s/ .*//')
if printf '%s\n1.25.1\n' "$NGINX_VERSION" | sort -V -C; then # older than 1.25.1
  # shellcheck disable=SC2153 # N_HTTPS is set by pick_port (printf -v)
  N_LISTEN="listen 127.0.0.1:$N_HTTPS ssl http2;"; N_HTTP2=""
else
  N_LISTEN="listen 127.0.0.1:$N_HTTPS ssl;"; N_HTTP2="http2 on;"
fi
N_USER=""
if is_root; then
  if getent passwd www-data >/dev/null; then N_USER="user www-data;"; else N_USER="user nobody nogroup;"; fi
fi
SEC_HEADERS_NGINX='add_header Strict-Transport-Security "max-age=31536000" always;
    add_header X-Frame-Options DENY always;
    add_header X-Content-Type-Options nosniff always;
    add_header Referrer-Policy strict-origin-when-cross-origin always;'
cat > "$TMP/nginx/nginx.conf" <<EOF
$N_USER
worker_processes 1;
pid $TMP/nginx/nginx.pid;
error_log $TMP/nginx/error.log warn;
events { worker_connections 4096; }
http {
  include /etc/nginx/mime.types;
  default_type application/octet-stream;
  log_format bench '\$remote_addr [\$time_iso8601] "\$request" \$status \$body_bytes_sent \$request_time \$upstream_response_time reused=\$ssl_session_reused';
  access_log $TMP/nginx/access.log bench;
  client_body_temp_path $TMP/nginx/tmp/body;
  proxy_temp_path $TMP/nginx/tmp/proxy;
  fastcgi_temp_path $TMP/nginx/tmp/fastcgi;
  uwsgi_temp_path $TMP/nginx/tmp/uwsgi;
  scgi_temp_path $TMP/nginx/tmp/scgi;
  sendfile on;
  tcp_nodelay on;
  keepalive_requests 1000000;
  server_tokens off;
  upstream backend {
    server 127.0.0.1:$BACKEND_PORT;
    keepalive 64;
    keepalive_requests 1000000;
  }
  server {
    $N_LISTEN
    $N_HTTP2
    server_name localhost;
    ssl_certificate $TMP/certs/cert.pem;
    ssl_certificate_key $TMP/certs/key.pem;
    ssl_protocols TLSv1.2 TLSv1.3;
    $SEC_HEADERS_NGINX
    root $FRONT;
    location /api/ {
      proxy_pass http://backend;
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
taskset -c "$PROXY_CPU" "$NGINX" -e "$TMP/nginx/error.log" -p "$TMP/nginx" -c "$TMP/nginx/nginx.conf" \
  -g 'daemon off;' </dev/null >"$TMP/nginx/stdout.log" 2>&1 &
NPID=$!

# ---------------------------------------------------------------- Caddy
mkdir -p "$TMP/caddy/home" "$TMP/caddy/data" "$TMP/caddy/config"
cat > "$TMP/caddy/Caddyfile" <<EOF
{
	admin off
	auto_https off
	storage file_system {
		root $TMP/caddy/data
	}
	log {
		output file $TMP/caddy/caddy.log
		level WARN
	}
}

https://:$C_HTTPS {
	bind 127.0.0.1
	tls $TMP/certs/cert.pem $TMP/certs/key.pem {
		protocols tls1.2 tls1.3
	}
	log {
		output file $TMP/caddy/access.log {
			roll_disabled
		}
	}
	header {
		Strict-Transport-Security "max-age=31536000"
		X-Frame-Options DENY
		X-Content-Type-Options nosniff
		Referrer-Policy strict-origin-when-cross-origin
	}
	handle /api/* {
		reverse_proxy 127.0.0.1:$BACKEND_PORT {
			transport http {
				keepalive_idle_conns_per_host 64
			}
		}
	}
	handle {
		root * $FRONT
		try_files {path} /index.html
		file_server
	}
}
EOF
(
  cd "$TMP/caddy"
  export HOME=$TMP/caddy/home XDG_DATA_HOME=$TMP/caddy/data XDG_CONFIG_HOME=$TMP/caddy/config
  exec taskset -c "$PROXY_CPU" "$CADDY" run --config "$TMP/caddy/Caddyfile" --adapter caddyfile
) </dev/null >"$TMP/caddy/stdout.log" 2>&1 &
CPID=$!

# ---------------------------------------------------------------- checks
wait_https() { # name port pid
  local i
  for ((i = 0; i < 150; i++)); do # 15 s
    kill -0 "$3" 2>/dev/null || return 1
    curl -sk -m 2 -o /dev/null "https://127.0.0.1:$2/api/v1/health" && return 0
    sleep 0.1
  done
  return 1
}
wait_https nginx "$N_HTTPS" "$NPID" || { cat "$TMP/nginx/error.log" "$TMP/nginx/stdout.log" >&2; die "nginx did not answer within 15 s"; }
wait_https caddy "$C_HTTPS" "$CPID" || { tail -20 "$TMP/caddy/stdout.log" >&2; die "caddy did not answer within 15 s"; }
pin "$PROXY_CPU" "$CPID"
for p in $(nginx_pids); do pin "$PROXY_CPU" "$p"; KNOWN+=("$p"); done

declare -A PORT=([koprogo]=$K_HTTPS [nginx]=$N_HTTPS [caddy]=$C_HTTPS)
CERT_FP=$(openssl x509 -in "$TMP/certs/cert.pem" -noout -fingerprint -sha256 2>/dev/null | sed 's/.*=//' || true)
for name in koprogo nginx caddy; do
  port=${PORT[$name]}
  code=$(curl -sk -m 5 -o "$TMP/check.$name" -w '%{http_code} %{size_download}' "https://127.0.0.1:$port/api/v1/health")
  [[ $code == 200\ * ]] || die "$name: GET /api/v1/health -> $code"
  code=$(curl -sk -m 5 -o /dev/null -w '%{http_code} %{size_download}' "https://127.0.0.1:$port/_astro/$JS_NAME")
  [[ $code == "200 $JS_SIZE" ]] || die "$name: GET /_astro/$JS_NAME -> $code (want 200 $JS_SIZE)"
  code=$(curl -sk -m 5 -o /dev/null -w '%{http_code} %{size_download}' "https://127.0.0.1:$port/")
  [[ $code == "200 $INDEX_SIZE" ]] || die "$name: GET / -> $code (want 200 $INDEX_SIZE)"
  code=$(curl -sk -m 5 -o /dev/null -w '%{http_code} %{size_download}' "https://127.0.0.1:$port/some/page")
  [[ $code == "200 $INDEX_SIZE" ]] || die "$name: GET /some/page (fallback) -> $code"
  alpn=$(curl -sk -m 5 --http2 -o /dev/null -w '%{http_version}' "https://127.0.0.1:$port/")
  [[ $alpn == 2 ]] || say "warning: $name did not negotiate h2 with curl (got HTTP/$alpn)"
  if [[ -n $CERT_FP ]] && command -v openssl >/dev/null; then
    fp=$(timeout 5 openssl s_client -connect "127.0.0.1:$port" -servername localhost </dev/null 2>/dev/null |
      openssl x509 -noout -fingerprint -sha256 2>/dev/null | sed 's/.*=//' || true)
    [[ $fp == "$CERT_FP" ]] || die "$name serves another certificate ($fp, want $CERT_FP)"
  fi
done
say "all three serve the same certificate, /api/ through the backend on :$BACKEND_PORT, the frontend and the fallback"
say "pinning: $PINNING"
if [[ -n ${BENCH_HOLD:-} ]]; then # debugging: look around before measuring
  say "holding ${BENCH_HOLD}s: koprogo :$K_HTTPS nginx :$N_HTTPS caddy :$C_HTTPS backend :$BACKEND_PORT in $TMP"
  run_child sleep "$BENCH_HOLD"
fi

# ---------------------------------------------------------------- measuring
rss_kib() { # sum of VmRSS over pids
  local p s=0 v
  for p in "$@"; do
    v=$(awk '/^VmRSS:/ {print $2}' "/proc/$p/status" 2>/dev/null || true)
    s=$((s + ${v:-0}))
  done
  echo "$s"
}
anon_kib() { # sum of RssAnon over pids: the memory that is theirs alone (no file pages)
  local p s=0 v
  for p in "$@"; do
    v=$(awk '/^RssAnon:/ {print $2}' "/proc/$p/status" 2>/dev/null || true)
    s=$((s + ${v:-0}))
  done
  echo "$s"
}
proxy_pids() {
  case $1 in
    koprogo) echo "$KPID" ;; nginx) nginx_pids ;; caddy) echo "$CPID" ;;
  esac
}
start_sampler() { # outfile pids...: peak VmRSS sum every 200 ms
  local out=$1; shift
  (
    max=0
    while :; do
      s=$(rss_kib "$@"); ((s > max)) && { max=$s; echo "$max" > "$out"; }
      sleep 0.2
    done
  ) &
  SAMPLER=$!
}

LOG_THREADS=" log-api logz-api log-postgres logz-postgres "
stat_ticks() { awk '{sub(/^.*\) /, ""); print $12 + $13}' "$1" 2>/dev/null || echo 0; }
proxy_ticks() { # CPU ticks used so far by the proxy (koprogo: minus the services' log threads)
  local name=$1 p t sum=0 v comm
  for p in $(proxy_pids "$name"); do
    v=$(stat_ticks "/proc/$p/stat"); sum=$((sum + ${v:-0}))
    if [[ $name == koprogo && ${BENCH_PIN_LOG_THREADS:-1} == 1 ]]; then
      for t in /proc/"$p"/task/*; do
        comm=$(cat "$t/comm" 2>/dev/null || true)
        if [[ $LOG_THREADS == *" $comm "* ]]; then v=$(stat_ticks "$t/stat"); sum=$((sum - ${v:-0})); fi
      done
    fi
  done
  echo "$sum"
}
cpu_busy() { # "busy total" ticks of one CPU from /proc/stat
  awk -v c="cpu$1" '$1 == c {t = 0; for (i = 2; i <= NF; i++) t += $i; print t - $5 - $6, t}' /proc/stat
}

WARNINGS=()
oha_run() { # out-json secs url [oha args...]
  local out=$1 secs=$2 url=$3; shift 3
  run_child timeout $((secs + 60)) "$OHA" --no-tui --insecure --disable-compression --output-format json \
    -c "$CONNS" -z "${secs}s" "$@" "$url" > "$out" 2>"$out.err" || {
    cat "$out.err" >&2; die "oha failed on $url"; }
  local bad
  bad=$(jq '([.statusCodeDistribution | to_entries[] | select(.key != "200") | .value] | add // 0)
    + ([.errorDistribution | to_entries[] | select(.key != "aborted due to deadline") | .value] | add // 0)' "$out")
  local total
  total=$(jq '[.statusCodeDistribution[]] | add // 0' "$out")
  if ((bad > 0)); then
    WARNINGS+=("$(basename "$out"): $bad non-200 or failed requests of $total: $(jq -c '{status: .statusCodeDistribution, errors: .errorDistribution}' "$out")")
  fi
}
j() { jq -r "$1" "$2"; }
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR] = $1} END {print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }
log_lines() { case $1 in nginx) wc -l < "$TMP/nginx/access.log" ;; caddy) wc -l < "$TMP/caddy/access.log" ;; *) echo 0 ;; esac; }

wait_quiet() { # secs: until both CPUs are < 20 % busy over a second (others' jobs), bounded
  local limit=$1 start=$SECONDS b0 t0 b1 t1 d0 u0 d1 u1 busy0 busy1
  while :; do
    read -r b0 t0 <<<"$(cpu_busy "$PROXY_CPU")"; read -r d0 u0 <<<"$(cpu_busy "$LOAD_CPU")"
    run_child sleep 1
    read -r b1 t1 <<<"$(cpu_busy "$PROXY_CPU")"; read -r d1 u1 <<<"$(cpu_busy "$LOAD_CPU")"
    busy0=$(( (b1 - b0) * 100 / (t1 - t0 > 0 ? t1 - t0 : 1) )); busy1=$(( (d1 - d0) * 100 / (u1 - u0 > 0 ? u1 - u0 : 1) ))
    if ((busy0 < 20 && busy1 < 20)); then return 0; fi
    if ((SECONDS - start >= limit)); then
      say "   the machine stays busy (CPU $PROXY_CPU ${busy0}%, CPU $LOAD_CPU ${busy1}% used by other jobs): measuring anyway"
      QUIET_NOTE="yes"; return 0
    fi
    if ((SECONDS - start < 2)); then say "   waiting (at most ${limit}s) for other jobs to leave the CPUs (CPU $PROXY_CPU ${busy0}%, CPU $LOAD_CPU ${busy1}%)"; fi
  done
}
QUIET_NOTE=""

f0() { awk -v x="$1" 'BEGIN {printf "%.0f", x}'; }
f3() { awk -v x="$1" 'BEGIN {printf "%.3f", x}'; }
declare -A R
RES=$TMP/results
mkdir -p "$RES"
HEALTH=/api/v1/health
CLK=$(getconf CLK_TCK)
measured() { # name phase oha_run-args…: oha_run, plus the proxy's CPU ticks, the ticks of
  # both CPUs and the requests done, summed per phase in R[name.phase.*]
  local name=$1 ph=$2 t0 b0 a0 l0 m0 t1 b1 a1 l1 m1
  shift 2
  t0=$(proxy_ticks "$name"); read -r b0 a0 <<<"$(cpu_busy "$PROXY_CPU")"; read -r l0 m0 <<<"$(cpu_busy "$LOAD_CPU")"
  oha_run "$@"
  t1=$(proxy_ticks "$name"); read -r b1 a1 <<<"$(cpu_busy "$PROXY_CPU")"; read -r l1 m1 <<<"$(cpu_busy "$LOAD_CPU")"
  R[$name.$ph.ticks]=$(( ${R[$name.$ph.ticks]:-0} + t1 - t0 ))
  R[$name.$ph.pbusy]=$(( ${R[$name.$ph.pbusy]:-0} + b1 - b0 ))
  R[$name.$ph.ptot]=$(( ${R[$name.$ph.ptot]:-0} + a1 - a0 ))
  R[$name.$ph.lbusy]=$(( ${R[$name.$ph.lbusy]:-0} + l1 - l0 ))
  R[$name.$ph.ltot]=$(( ${R[$name.$ph.ltot]:-0} + m1 - m0 ))
  R[$name.$ph.reqs]=$(( ${R[$name.$ph.reqs]:-0} + $(jq '.statusCodeDistribution["200"] // 0' "$1") ))
}
pct() { awk -v a="$1" -v t="$2" 'BEGIN {printf "%.0f", t ? 100 * a / t : 0}'; }
per_cpu_s() { awk -v n="$1" -v t="$2" -v c="$CLK" 'BEGIN {printf "%.0f", t ? n * c / t : 0}'; }
round() { local x r=(); for x in "$@"; do r+=("$(awk -v x="$x" 'BEGIN {printf "%.0f", x}')"); done; echo "${r[*]}"; }

full_handshakes() { # name out secs: new TLS sessions (no resumption) from $HS_PROCS openssl
  # s_time clients on the load CPU; prints the handshakes done
  local name=$1 out=$2 secs=$3 k pids=() n=0 c
  for ((k = 0; k < HS_PROCS; k++)); do
    timeout $((secs + 30)) openssl s_time -connect "127.0.0.1:${PORT[$name]}" -new -time "$secs" \
      >"$out.$k" 2>&1 </dev/null &
    pids+=($!)
  done
  for k in "${pids[@]}"; do wait "$k" || true; done
  for ((k = 0; k < HS_PROCS; k++)); do
    c=$(awk '/connections in .* real seconds/ {print $1; exit}' "$out.$k")
    n=$((n + ${c:-0}))
  done
  echo "$n"
}
HS_PROCS=${BENCH_HS_CLIENTS:-4}

# d. idle RSS of each proxy before any load: median of 5 samples over a second
for name in koprogo nginx caddy; do
  read -ra pids <<<"$(proxy_pids "$name")"
  samples=()
  for i in 1 2 3 4 5; do samples+=("$(rss_kib "${pids[@]}")"); sleep 0.2; done
  R[$name.rss_idle]=$(median "${samples[@]}")
  R[$name.anon_idle]=$(anon_kib "${pids[@]}")
done
for name in koprogo nginx caddy; do
  oha_run "$RES/$name.warm.json" "$WARMUP" "https://127.0.0.1:${PORT[$name]}$HEALTH"
  echo 0 > "$RES/$name.rsspeak"
done

# a, c, f: alternating rounds (the first proxy rotating each round), medians over rounds.
NAMES=(koprogo nginx caddy)
for ((r = 1; r <= REPEAT; r++)); do
  order=()
  for ((k = 0; k < ${#NAMES[@]}; k++)); do order+=("${NAMES[(k + r - 1) % ${#NAMES[@]}]}"); done
  for name in "${order[@]}"; do
    port=${PORT[$name]}
    base="https://127.0.0.1:$port"
    if [[ $name == koprogo ]]; then pin_koprogo; fi
    read -ra pids <<<"$(proxy_pids "$name")"
    for p in "${pids[@]}"; do pin "$PROXY_CPU" "$p"; done
    wait_quiet "${BENCH_QUIET_WAIT:-90}"
    say "== round $r: $name (pids ${pids[*]}, https :$port, load avg $(cut -d' ' -f1-3 /proc/loadavg))"
    # a. keep-alive API requests through the proxy, RSS sampled meanwhile
    start_sampler "$RES/$name.rsspeak" "${pids[@]}"
    if [[ ${BENCH_PERF:-0} == 1 && $name == koprogo && $r == 1 ]]; then
      perf record -q -e cpu-clock -F 2000 -p "$KPID" -o "$RES/perf.data" >/dev/null 2>"$RES/perf.err" &
      PERF_PID=$!
    fi
    measured "$name" a "$RES/$name.a$r.json" "$SECS" "$base$HEALTH"
    if [[ -n ${PERF_PID:-} ]]; then kill -INT "$PERF_PID" 2>/dev/null || true; wait "$PERF_PID" 2>/dev/null || true; PERF_PID=""; fi
    stop_sampler
    R[$name.rps_all]+="$(j .summary.requestsPerSec "$RES/$name.a$r.json") "
    R[$name.p50_all]+="$(j '.latencyPercentiles.p50 * 1000' "$RES/$name.a$r.json") "
    R[$name.p99_all]+="$(j '.latencyPercentiles.p99 * 1000' "$RES/$name.a$r.json") "
    say "   a keep-alive $HEALTH: $(round "$(j .summary.requestsPerSec "$RES/$name.a$r.json")") req/s"
    # c. static files, keep-alive: the ~50 KB script, then index.html
    measured "$name" c "$RES/$name.c$r.json" "$SECS" "$base/_astro/$JS_NAME"
    R[$name.static_all]+="$(j .summary.requestsPerSec "$RES/$name.c$r.json") "
    measured "$name" i "$RES/$name.i$r.json" "$INDEX_SECS" "$base/"
    R[$name.index_all]+="$(j .summary.requestsPerSec "$RES/$name.i$r.json") "
    say "   c static /_astro/$JS_NAME: $(round "$(j .summary.requestsPerSec "$RES/$name.c$r.json")") req/s, / (index.html): $(round "$(j .summary.requestsPerSec "$RES/$name.i$r.json")") req/s"
    # f. full TLS handshakes: a new session each time (openssl s_time -new: no resumption)
    t0=$(proxy_ticks "$name")
    n=$(full_handshakes "$name" "$RES/$name.f$r" "$INDEX_SECS")
    t1=$(proxy_ticks "$name")
    R[$name.f.ticks]=$(( ${R[$name.f.ticks]:-0} + t1 - t0 )); R[$name.f.n]=$(( ${R[$name.f.n]:-0} + n ))
    R[$name.full_all]+="$(awk -v n="$n" -v s="$INDEX_SECS" 'BEGIN {print n / s}') "
    say "   f full TLS handshakes ($HS_PROCS openssl s_time -new): $(round "$(awk -v n="$n" -v s="$INDEX_SECS" 'BEGIN {print n / s}')")/s"
  done
done
for name in koprogo nginx caddy; do
  read -ra v <<<"${R[$name.rps_all]}"; R[$name.rps]=$(median "${v[@]}")
  read -ra v <<<"${R[$name.p50_all]}"; R[$name.p50]=$(median "${v[@]}")
  read -ra v <<<"${R[$name.p99_all]}"; R[$name.p99]=$(median "${v[@]}")
  read -ra v <<<"${R[$name.static_all]}"; R[$name.static]=$(median "${v[@]}")
  read -ra v <<<"${R[$name.index_all]}"; R[$name.index]=$(median "${v[@]}")
  read -ra v <<<"${R[$name.full_all]}"; R[$name.full]=$(median "${v[@]}")
  for key in rps_all static_all index_all full_all; do
    read -ra v <<<"${R[$name.$key]}"; R[$name.$key]=$(round "${v[@]}")
  done
  R[$name.rss_peak]=$(cat "$RES/$name.rsspeak")
  # CPU during phase a: the proxy's own use in % of one core (the proxy CPU's ticks are
  # the wall time), how busy the proxy's CPU was (the proxy plus anything else running)
  # and how busy the load CPU was (oha + backend + …).
  R[$name.cpu]=$(pct "${R[$name.a.ticks]}" "${R[$name.a.ptot]}")
  R[$name.busy]="$(pct "${R[$name.a.pbusy]}" "${R[$name.a.ptot]}") / $(pct "${R[$name.a.lbusy]}" "${R[$name.a.ltot]}")"
  R[$name.eff_a]=$(per_cpu_s "${R[$name.a.reqs]}" "${R[$name.a.ticks]}")
  R[$name.eff_c]=$(per_cpu_s "${R[$name.c.reqs]}" "${R[$name.c.ticks]}")
  R[$name.eff_i]=$(per_cpu_s "${R[$name.i.reqs]}" "${R[$name.i.ticks]}")
  R[$name.eff_f]=$(per_cpu_s "${R[$name.f.n]}" "${R[$name.f.ticks]}")
done

for name in koprogo nginx caddy; do
  port=${PORT[$name]}
  base="https://127.0.0.1:$port"
  if [[ $name == koprogo ]]; then pin_koprogo; fi
  read -ra pids <<<"$(proxy_pids "$name")"
  for p in "${pids[@]}"; do pin "$PROXY_CPU" "$p"; done
  wait_quiet "${BENCH_QUIET_WAIT:-90}"
  say "== $name: new connections and open-loop latency"
  # b. a new connection and TLS handshake per request
  before=$(log_lines "$name")
  measured "$name" b "$RES/$name.b.json" "$SECS" "$base$HEALTH" --disable-keepalive
  R[$name.hs]=$(j .summary.requestsPerSec "$RES/$name.b.json")
  R[$name.eff_b]=$(per_cpu_s "${R[$name.b.reqs]}" "${R[$name.b.ticks]}")
  case $name in
    nginx) R[$name.resumed]=$(tail -n +"$((before + 1))" "$TMP/nginx/access.log" | awk '/reused=r/ {r++} END {printf "%.0f", 100 * r / (NR ? NR : 1)}') ;;
    caddy) R[$name.resumed]=$(tail -n +"$((before + 1))" "$TMP/caddy/access.log" | awk '/"resumed":true/ {r++} END {printf "%.0f", 100 * r / (NR ? NR : 1)}') ;;
    *) R[$name.resumed]="?" ;;
  esac
  say "   b  new TLS connection per request: $(round "${R[$name.hs]}")/s, proxy $(pct "${R[$name.b.ticks]}" "${R[$name.b.ptot]}")% of a core (resumed sessions: ${R[$name.resumed]}%)"

  # e. p99 at half of the peak keep-alive rate, through the proxy and direct
  half=$(awk -v r="${R[$name.rps]}" 'BEGIN {printf "%d", r / 2}')
  oha_run "$RES/$name.e.json" "$SECS" "$base$HEALTH" -q "$half" --latency-correction
  oha_run "$RES/$name.e-direct.json" "$SECS" "http://127.0.0.1:$BACKEND_PORT$HEALTH" -q "$half" --latency-correction
  R[$name.hp99]=$(j '.latencyPercentiles.p99 * 1000' "$RES/$name.e.json")
  R[$name.dp99]=$(j '.latencyPercentiles.p99 * 1000' "$RES/$name.e-direct.json")
  R[$name.hrate]=$(j .summary.requestsPerSec "$RES/$name.e.json")
  R[$name.added]=$(awk -v a="${R[$name.hp99]}" -v b="${R[$name.dp99]}" 'BEGIN {print a - b}')
  say "   e  at $half req/s: p99 $(f3 "${R[$name.hp99]}") ms through $name, $(f3 "${R[$name.dp99]}") ms direct"
  kill -0 "${pids[0]}" 2>/dev/null || die "$name died during the run"
done

# g. BENCH_SOAK_SECONDS=N (0: skipped): koprogo under keep-alive load for N seconds, its
# RSS sampled every 5 s; the least-squares slope says whether it grows.
SOAK=${BENCH_SOAK_SECONDS:-0}
if ((SOAK > 0)); then
  pin_koprogo
  say "== soak: koprogo under keep-alive load for ${SOAK}s, RSS every 5 s"
  : > "$RES/soak.rss"
  (
    t0=$SECONDS
    while :; do echo "$((SECONDS - t0)) $(rss_kib "$KPID")" >> "$RES/soak.rss"; sleep 5; done
  ) &
  SAMPLER=$!
  oha_run "$RES/soak.json" "$SOAK" "https://127.0.0.1:$K_HTTPS$HEALTH"
  stop_sampler
  R[soak]=$(awk '{n++; sx += $1; sy += $2; sxx += $1 * $1; sxy += $1 * $2; if (n == 1) first = $2; last = $2; if ($2 > max) max = $2}
    END {d = n * sxx - sx * sx; slope = d ? (n * sxy - sx * sy) / d : 0
      printf "%d samples over %d s: RSS %.1f MiB at the start, %.1f MiB at the end, %.1f MiB peak; slope %.1f KiB per minute", n, '"$SOAK"', first / 1024, last / 1024, max / 1024, slope * 60}' "$RES/soak.rss")
  R[soak_rps]=$(j .summary.requestsPerSec "$RES/soak.json")
fi
kill -0 "$KPID" 2>/dev/null || die "koprogo died during the run"
KSTAT=$(kp status --json 2>/dev/null || true)
RESTARTS=$(jq -r '[.services[]?.restarts] | add // 0' <<<"${KSTAT:-null}" 2>/dev/null || echo "?")

# ---------------------------------------------------------------- the table
mib() { awk -v x="$1" 'BEGIN {printf "%.1f", x / 1024}'; }
ratio() {
  if [[ $1 == */* || $2 == */* ]]; then echo "—"; return; fi
  awk -v a="$1" -v b="$2" 'BEGIN {if (b == 0) print "—"; else printf "%.2f", a / b}'
}
row() { # label fmt key goal
  local label=$1 fmt=$2 key=$3 goal=$4 k n c
  k=${R[koprogo.$key]}; n=${R[nginx.$key]}; c=${R[caddy.$key]}
  printf '| %s | %s | %s | %s | %s | %s | %s |\n' "$label" "$($fmt "$k")" "$($fmt "$n")" "$($fmt "$c")" \
    "$(ratio "$k" "$n")" "$(ratio "$k" "$c")" "$goal"
}
pair() { echo "$1"; }
met() { awk "BEGIN {exit !($1)}" && echo "met" || echo "NOT met"; }
k=koprogo
G_TPUT="≥ nginx and ≥ 2× caddy: $(met "${R[$k.rps]} >= ${R[nginx.rps]} && ${R[$k.rps]} >= 2 * ${R[caddy.rps]}")"
G_HS="(same goal) $(met "${R[$k.hs]} >= ${R[nginx.hs]} && ${R[$k.hs]} >= 2 * ${R[caddy.hs]}")"
G_ST="(same goal) $(met "${R[$k.static]} >= ${R[nginx.static]} && ${R[$k.static]} >= 2 * ${R[caddy.static]}")"
G_IX="(same goal) $(met "${R[$k.index]} >= ${R[nginx.index]} && ${R[$k.index]} >= 2 * ${R[caddy.index]}")"
G_RSS="≤ 10 MiB: $(met "${R[$k.rss_idle]} <= 10 * 1024")"
G_PEAK="≤ 20 MiB: $(met "${R[$k.rss_peak]} <= 20 * 1024")"
G_FULL="≥ nginx and ≥ 2× caddy: $(met "${R[$k.full]} >= ${R[nginx.full]} && ${R[$k.full]} >= 2 * ${R[caddy.full]}")"
G_LAT="< 1 ms: $(met "${R[$k.added]} < 1")"

echo
echo "Proxy benchmark, $(date -u +%Y-%m-%dT%H:%MZ), $NCPU CPUs ($(grep -m1 'model name' /proc/cpuinfo | sed 's/.*: //')); $PINNING."
echo "HTTPS on 127.0.0.1, one ECDSA P-256 local-CA certificate, HTTP/1.1 (oha offers no ALPN), $CONNS connections, oha $("$OHA" --version | awk '{print $2}') --disable-compression;"
echo "nginx $NGINX_VERSION (1 worker), Caddy $("$CADDY" version | awk '{print $1}') (GOMAXPROCS from the pinning = 1), koprogo $(jq -r '.version // "?"' <<<"${KSTAT:-null}" 2>/dev/null) (in-process proxy, $(cat /proc/"$KPID"/task/*/comm 2>/dev/null | grep -c '^tokio-rt-worker$') tokio worker(s): one per CPU it was started on)."
echo "a, c and f: $REPEAT alternating rounds (the first proxy rotating each round), medians; a and app.js runs ${SECS} s,"
echo "  index.html and full-handshake runs ${INDEX_SECS} s, after a ${WARMUP} s warm-up of each proxy; b and e: one ${SECS} s run each."
echo
echo "| metric | koprogo | nginx | caddy | koprogo/nginx | koprogo/caddy | goal (koprogo) |"
echo "|---|---:|---:|---:|---:|---:|---|"
row "a. keep-alive req/s, GET $HEALTH (proxied)" f0 rps "$G_TPUT"
row "a. p50 latency, ms" f3 p50 "lower is better"
row "a. p99 latency, ms" f3 p99 "lower is better"
row "a. proxy CPU use, % of one core" f0 cpu "—"
row "a. busy % of the proxy's CPU / of the load CPU" pair busy "—"
row "a. requests per proxy CPU-second" f0 eff_a "—"
row "b. new TLS connections/s (--disable-keepalive, resumed sessions)" f0 hs "$G_HS"
row "b. new connections per proxy CPU-second" f0 eff_b "—"
row "c. static req/s, /_astro/app.js ($((JS_SIZE / 1024)) KiB)" f0 static "$G_ST"
row "c. app.js requests per proxy CPU-second" f0 eff_c "—"
row "c. static req/s, / = index.html ($INDEX_SIZE B)" f0 index "$G_IX"
row "c. index.html requests per proxy CPU-second" f0 eff_i "—"
row "d. proxy RSS idle, MiB" mib rss_idle "$G_RSS"
row "d. … of which anonymous (heap, stacks; no file pages), MiB" mib anon_idle "—"
row "d. proxy RSS peak under load (phase a), MiB" mib rss_peak "$G_PEAK"
row "f. full TLS handshakes/s (openssl s_time -new, $HS_PROCS clients)" f0 full "$G_FULL"
row "f. full handshakes per proxy CPU-second" f0 eff_f "—"
row "e. load used (half of a), req/s" f0 hrate "—"
row "e. p99 through the proxy at that load, ms" f3 hp99 "—"
row "e. p99 direct to the backend at that load, ms" f3 dp99 "—"
row "e. p99 added latency, ms" f3 added "$G_LAT"
echo
echo "Runs, in round order: keep-alive req/s koprogo [${R[koprogo.rps_all]}], nginx [${R[nginx.rps_all]}], caddy [${R[caddy.rps_all]}];"
echo "      app.js req/s koprogo [${R[koprogo.static_all]}], nginx [${R[nginx.static_all]}], caddy [${R[caddy.static_all]}];"
echo "      index.html req/s koprogo [${R[koprogo.index_all]}], nginx [${R[nginx.index_all]}], caddy [${R[caddy.index_all]}];"
echo "      full handshakes/s koprogo [${R[koprogo.full_all]}], nginx [${R[nginx.full_all]}], caddy [${R[caddy.full_all]}]."
if ((SOAK > 0)); then echo "Soak (g): koprogo at $(f0 "${R[soak_rps]}") keep-alive req/s for ${SOAK} s: ${R[soak]}."; fi
echo "Handshakes: oha keeps a TLS session cache, so phase b measures new TCP+TLS connections, mostly resumed; phase f"
echo "  makes every session new (openssl s_time -new, TLS 1.3, no request), so it measures full handshakes alone."
echo "  In phase b nginx resumed ${R[nginx.resumed]}% of the sessions, caddy ${R[caddy.resumed]}% (their access logs; koprogo does not log it)."
echo "Same for all three: security headers (HSTS, X-Frame-Options, nosniff, Referrer-Policy), X-Forwarded-*, an access"
echo "  log written to a file (koprogo's through its log pipeline), no compression (the client asks for none),"
echo "  upstream keep-alive (nginx keepalive 64, caddy 64 idle conns), no per-connection request cap (nginx keepalive_requests raised)."
echo "CPU: the proxy's user+system time (koprogo: its process minus the threads capturing the backend's and Postgres'"
echo "  output, which run with the backend); where the proxy uses < ~95 % of its core, req/s is bounded by the load"
echo "  side (oha + backend share one CPU) and the per-CPU-second rows are the fairer comparison."
echo "RSS: koprogo = the supervisor process (proxy, TLS, log pipeline, supervision; not its children); nginx = master + worker; caddy = its one process."
echo "koprogo's services restarted during the run: $RESTARTS."
if [[ -n $QUIET_NOTE ]]; then echo "warning: other jobs kept the CPUs busy at the start of a proxy's runs: figures are disturbed (see the busy % row)."; fi
for w in "${WARNINGS[@]}"; do echo "warning: $w"; done
if [[ ${BENCH_PERF:-0} == 1 && -s $RES/perf.data ]]; then
  # Where koprogo's CPU went in phase a (round 1), by stage: the share of perf's samples
  # (cpu-clock, 2 kHz) whose function falls in each group, and that share of its CPU
  # time per request.
  us=$(awk -v t="${R[koprogo.a.ticks]}" -v n="${R[koprogo.a.reqs]}" -v c="$CLK" 'BEGIN {printf "%.2f", n ? t / c / n * 1e6 : 0}')
  echo
  echo "koprogo's CPU per keep-alive request in phase a: $us µs (all rounds); by stage (BENCH_PERF=1, perf cpu-clock, round 1):"
  echo
  echo "| stage | share of samples | µs per request |"
  echo "|---|---:|---:|"
  perf report -q -i "$RES/perf.data" --stdio --no-children --sort dso,sym 2>/dev/null | awk -v us="$us" '
    $1 ~ /%$/ {
      pct = $1; sub(/%/, "", pct); dso = $2; sym = ""; for (i = 4; i <= NF; i++) sym = sym " " $i
      if (dso ~ /kernel/) {
        if (sym ~ /tcp|skb|ip_|inet|sock|net_|__dev|loopback|napi|xmit/) st = "kernel: TCP/IP over loopback"
        else st = "kernel: system calls, scheduling, wake-ups"
      } else if (dso ~ /libc/ && sym ~ /writev|recv|send|read|write|epoll|poll|asynccancel|clock_gettime|futex/) st = "kernel: system calls, scheduling, wake-ups"
      else if (sym ~ /ring_core|ring::|rustls|tokio_rustls|aes|gcm|chacha|sha2|p256|ecdsa/) st = "TLS (rustls, ring)"
      else if ((dso ~ /libc/ && sym ~ /malloc|free|realloc|calloc|memmove|memcpy|memset|cfree|consolidate|unlink_chunk/) || sym ~ /bytes::/) st = "memory: malloc, free, copies, buffer refcounts"
      else if (sym ~ /hyper_util::client|pool|Checkout|connect::|hyper::client|sip::Hasher|hash_one|hashbrown/) st = "upstream: client pool, dispatch, pool-key hashing"
      else if (sym ~ /hyper::|hyper_util::server|httparse|http::header|http::uri|http::request|http::response|HeaderMap|HeaderName|HeaderValue|parse_hdr|PathAndQuery|Authority/) st = "HTTP parsing, encoding, headers"
      else if (sym ~ /tokio::|mio::|waker|Waker|scheduled_io|Registration|PollEvented|futures_|poll_fn|PollFn/) st = "async runtime (tokio: tasks, I/O readiness)"
      else if (sym ~ /AccessLog|format_line|escaped|fmt::|float_to_decimal|flt2dec|grisu|miniz|deflate|logs::/) st = "logs: access-log lines, formatting, compression"
      else if (sym ~ /koprogo::proxy/) st = "koprogo proxy code (routing, headers, limits)"
      else if (dso ~ /vdso/) st = "clock reads (vdso)"
      else st = "other"
      share[st] += pct
    }
    END { for (st in share) printf "| %s | %.1f %% | %.2f |\n", st, share[st], share[st] * us / 100 }' | sort -t'|' -k3 -rn
fi
