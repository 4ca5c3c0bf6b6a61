#!/usr/bin/env bash
# The whole test suite: installs what is missing (as root), builds the workspace
# (the koprogo binary and the demo backend), then runs every test with
# cargo-nextest (or cargo test when nextest is absent). Usage: scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh
koprogo_install_deps
koprogo_make_reachable "$PWD"

export CARGO_TERM_COLOR=never
cargo build --workspace --all-targets --locked
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast --failure-output final
else
  cargo test --workspace --locked --no-fail-fast
fi
