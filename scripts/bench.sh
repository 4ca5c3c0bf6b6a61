#!/usr/bin/env bash
# Benchmarks that print figures (never timed tests): boot to "all ready" (cold and
# warm), supervisor idle RSS/CPU, and log pipeline throughput. Release builds.
# Usage: scripts/bench.sh [boot|log_pipeline]...
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh
koprogo_install_deps
koprogo_make_reachable "$PWD"
cargo build --release --workspace --locked
benches=("$@")
[[ ${#benches[@]} -gt 0 ]] || benches=(boot log_pipeline)
for b in "${benches[@]}"; do
  echo "== $b"
  cargo bench --locked --bench "$b" 2>/dev/null
done
