#!/usr/bin/env bash
# The whole test suite: installs what is missing (as root), builds the workspace
# (the koprogo binary and the demo backend), runs the package tests when root
# (packaging/test-package.sh all: lintian, systemd-analyze, install/upgrade/purge in
# a booted Debian 12 container, PID 1, offline bundle, PostgreSQL 15 -> 17), then
# every Rust test with cargo-nextest (or cargo test when nextest is absent), whose
# summary line closes the output. Usage: scripts/test.sh
#   KOPROGO_PACKAGE_TESTS=0   skip the package tests (they need root and a Debian mirror)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh
koprogo_install_deps
koprogo_make_reachable "$PWD"

# The real KoproGo (API server + frontend) the suite proves every capability with:
# KOPROGO_REAL_DIR, else shared/koprogo-real beside the checkout or a parent.
if [[ -z ${KOPROGO_REAL_DIR:-} ]]; then
  d=$PWD
  while [[ $d != / ]]; do
    if [[ -f $d/shared/koprogo-real/koprogo-api.xz ]]; then KOPROGO_REAL_DIR=$d/shared/koprogo-real; break; fi
    d=$(dirname "$d")
  done
fi
if [[ -n ${KOPROGO_REAL_DIR:-} ]]; then
  export KOPROGO_REAL_DIR
  echo "real KoproGo: $KOPROGO_REAL_DIR (tests/real_koprogo.rs and the package test use it)"
else
  echo "real KoproGo: NOT FOUND (no shared/koprogo-real beside the checkout, KOPROGO_REAL_DIR unset): the tests that need it say skipped"
fi

export CARGO_TERM_COLOR=never
cargo build --workspace --all-targets --locked

package_status=0
if [[ ${KOPROGO_PACKAGE_TESTS:-1} != 0 && $(id -u) -eq 0 ]]; then
  packaging/test-package.sh all 2>&1 | tee target/package-tests.log || package_status=1
  [[ $package_status -eq 0 ]] || echo "package tests FAILED (log: target/package-tests.log); the Rust tests run anyway"
else
  echo "package tests skipped (need root; KOPROGO_PACKAGE_TESTS=${KOPROGO_PACKAGE_TESTS:-1})"
fi

rust_status=0
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast --failure-output final || rust_status=$?
else
  cargo test --workspace --locked --no-fail-fast || rust_status=$?
fi
[[ $package_status -eq 0 ]] || { echo "package tests FAILED: see target/package-tests.log" >&2; exit 1; }
exit "$rust_status"
