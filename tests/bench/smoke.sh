#!/usr/bin/env bash
# CI smoke of the benchmark machinery: builds the debug binaries it needs, runs
# a few hundred idle clients and a few seconds of echo against a real gateway,
# and ends with the line `N passed, M failed`. Never judges the numbers.
#
# Usage: tests/bench/smoke.sh   (from anywhere)
set -uo pipefail
cd "$(dirname "$0")/../.."

if ! cargo build -q -p edgegate -p edgegate-tests -p edgegate-link \
        --bin edgegate --bin edgegate-load --example example_service; then
    echo "FAIL build of edgegate, edgegate-load and example_service"
    echo "0 passed, 1 failed"
    exit 1
fi
exec python3 tests/bench/smoke.py --profile debug "$@"
