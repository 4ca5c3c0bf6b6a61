# shellcheck shell=bash
# Sourced by packaging/test-package.sh: `repo`, the signed APT repository test.
# (Being written: issue 14.)
cmd_repo() {
  FAILED+=("repo: not written yet")
  return 1
}
