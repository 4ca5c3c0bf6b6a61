#!/usr/bin/env bash
# Runs the appliance locally from this checkout with appliance/dev.toml: the demo
# backend, a private PostgreSQL and logs, all under ./dev-state, on high ports.
# Installs what is missing (as root) and builds first. Ctrl-C stops it cleanly.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh
koprogo_install_deps
koprogo_make_reachable "$PWD"
cargo build --workspace --locked
echo "koprogo: state, logs and sockets under $PWD/dev-state; in another shell:"
echo "  target/debug/koprogo --config appliance/dev.toml status"
exec target/debug/koprogo --config appliance/dev.toml run
