#!/usr/bin/env bash
# CI smoke of the benchmark machinery: builds the debug binaries it needs, runs
# a few hundred idle clients and a few seconds of echo against a real gateway,
# then fan-out to a few dozen subscribers on EdgeGate (`run` and `demo`), the
# write floor and nginx + nchan (skipped, saying so, when it is not installed
# and cannot be), and ends with the line `N passed, M failed`. Never judges
# the numbers.
# First the unit tests of the benchmark's parsing and report pieces
# (tests/bench/test_bench.py), with their own `N passed, M failed` line.
#
# Usage: tests/bench/smoke.sh   (from anywhere)
set -uo pipefail
cd "$(dirname "$0")/../.."

if ! cargo build -q -p edgegate -p edgegate-tests -p edgegate-link \
        --bin edgegate --bin edgegate-load --bin edgegate-write-floor --example example_service; then
    echo "FAIL build of edgegate, edgegate-load, edgegate-write-floor and example_service"
    echo "0 passed, 1 failed"
    exit 1
fi
units_ok=0
python3 -B - <<'PY' || units_ok=1
import sys, unittest
sys.path.insert(0, "tests/bench")
suite = unittest.defaultTestLoader.discover("tests/bench", pattern="test_*.py")
r = unittest.TextTestRunner(stream=sys.stdout, verbosity=1).run(suite)
bad = len(r.failures) + len(r.errors)
print(f"bench unit tests: {r.testsRun - bad} passed, {bad} failed")
sys.exit(1 if bad else 0)
PY
python3 tests/bench/smoke.py --profile debug "$@"
rc=$?
[ "$units_ok" -eq 0 ] && exit "$rc"
exit 1
