#!/bin/sh
# Package test "pg-upgrade", between pgup-1.sh and pgup-2.sh: upgrades the root
# (its sources.list already says trixie) to Debian 13 and installs PostgreSQL 17,
# then shows what apt autoremove would remove with koprogo's apt entry
# (/etc/apt/apt.conf.d/02autoremove-koprogo) and without it; the host reads the two
# "--- ..." sections of the output to check that the entry keeps postgresql-15.
# Called by packaging/test-package.sh (cmd_pg_upgrade): copied into the root as
# /root/pgup-distupgrade.sh and run there by in_root (systemd-nspawn, not booted),
# its output going to $W/pgup-distupgrade.log; exit status 0 when every step worked.
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq &&
  apt-get -y -q -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold full-upgrade &&
  apt-get -y -q install postgresql &&
  echo "--- apt-get autoremove --dry-run" && apt-get autoremove --dry-run &&
  mv /etc/apt/apt.conf.d/02autoremove-koprogo /root/keep.conf &&
  echo "--- without koprogo's entry" && apt-get autoremove --dry-run &&
  mv /root/keep.conf /etc/apt/apt.conf.d/02autoremove-koprogo
