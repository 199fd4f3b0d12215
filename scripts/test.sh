#!/usr/bin/env bash
# Install dependencies, then run the whole test suite.
#
# pytest's own output (including the final summary line CI parses) is passed
# through untouched. Exit code 5 ("no tests collected") is turned into a
# failure: a suite that silently collects nothing -- a broken conftest, a
# typo in -k -- must not look green.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/install-deps.sh

# install-deps built the datagram AEAD's C extension: a test fails if it did not, so CI
# exercises the native path rather than silently falling back to the Python one
export KAKEHASHI_REQUIRE_NATIVE_AEAD="${KAKEHASHI_REQUIRE_NATIVE_AEAD:-1}"

rc=0
python3 -m pytest -q -p no:cacheprovider --durations=15 tests "$@" || rc=$?
if [ "$rc" -eq 5 ]; then
  echo "test.sh: pytest collected no tests (exit 5); treating that as a failure" >&2
  exit 1
fi
exit "$rc"
