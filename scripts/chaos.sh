#!/usr/bin/env bash
# The chaos soak, long run (issue 13): the real KoproGo (../shared/koprogo-real) under
# a realistic authenticated load through the appliance's HTTPS proxy (the mix of
# scripts/bench-real.lua at a fixed, moderate rate), a writer logging every
# acknowledged write (id + content) outside the appliance, and faults on a seeded
# random schedule, each kind several times: SIGKILL of the API, of the postmaster, of
# one PostgreSQL backend; SIGSTOP/SIGCONT of the API; SIGKILL of the supervisor and a
# new `koprogo run`; a power cut (the whole tree SIGKILLed, then boot); the state file
# system (a tmpfs, as root) full then freed; the ACME CA (Pebble) away during a
# renewal; `koprogo reload`, `backup create` and SIGHUP under load. After each fault
# and at the end: acknowledged writes present with their content, the site serving,
# no zombie, no leftover process; PostgreSQL never SIGKILLed by the supervisor; the
# API's log lines kept. The figures table (per fault kind, and overall) is printed at
# the end and kept in target/tmp/chaos/figures-seedN.md. It is tests/chaos.rs run
# longer, in a release build; the suite runs the short one (150 s).
#
# Usage: scripts/chaos.sh [--minutes N] [--seed S]   (default 30 minutes, seed 13)
# Knobs (environment): CHAOS_RATE=20 (load requests/s), CHAOS_CLIENTS=4,
#   CHAOS_WRITES=2 (writer requests/s), CHAOS_GAP=10-30 (quiet seconds between
#   faults), CHAOS_FAULTS (a comma-separated subset of the kinds), CHAOS_OUT (where
#   the acknowledgement log and the figures go), KOPROGO_REAL_DIR.
set -euo pipefail
umask 022
cd "$(dirname "$0")/.."
export PATH="$PATH:$HOME/.cargo/bin"

MINUTES=30
SEED=${CHAOS_SEED:-13}
while [[ $# -gt 0 ]]; do
  case $1 in
    --minutes) MINUTES=${2:?--minutes needs a number}; shift 2 ;;
    --seed) SEED=${2:?--seed needs a number}; shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1 (usage: scripts/chaos.sh [--minutes N] [--seed S])" >&2; exit 2 ;;
  esac
done
[[ $MINUTES =~ ^[0-9]+$ && $MINUTES -ge 1 ]] || { echo "--minutes: a whole number of minutes >= 1" >&2; exit 2; }
[[ $SEED =~ ^[0-9]+$ ]] || { echo "--seed: a whole number" >&2; exit 2; }

. scripts/deps.sh
koprogo_install_deps
koprogo_make_reachable "$PWD"

# The release build of koprogo and of the demo backend the harness copies (the test
# binary finds them next to each other: target/release/).
cargo build --release --locked --workspace --bins
export CHAOS_SECONDS=$((MINUTES * 60)) CHAOS_SEED=$SEED
echo "$(date +%T) chaos soak: ${MINUTES} min, seed $SEED, on $(nproc) CPUs ($(uname -r)); started $(date -u +%FT%TZ)" >&2
rc=0
cargo test --release --locked --test chaos -- --nocapture --test-threads=1 || rc=$?
OUT=${CHAOS_OUT:-$PWD/target/tmp/chaos}
if [[ -f $OUT/figures-seed$SEED.md ]]; then
  echo
  echo "Figures ($(date -u +%F), $(nproc) CPUs, $(uname -m)), ${MINUTES} min, seed $SEED:"
  cat "$OUT/figures-seed$SEED.md"
fi
exit "$rc"
