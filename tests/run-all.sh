#!/usr/bin/env bash
# Runs every EdgeGate test: the Rust workspace (unit, integration, CLI, link
# protocol, load-generator smoke) on the default TLS stream (`tls_stream =
# "lean"`), again with every test listener on the fallback stream
# (`"rustls"`, through EDGEGATE_TEST_TLS_STREAM), the WebSocket integration
# tests again on our own codec (`ws_codec = "edgegate"`, through
# EDGEGATE_TEST_WS_CODEC), then the appliance (.deb in a fresh Debian root),
# monitoring, TLS scan (on both TLS streams), Autobahn WebSocket conformance
# (on both TLS streams), Ansible and lab (a Debian 12 VM) suites.
# Must run as root on Debian 12; each suite installs what it needs itself.
#
#   tests/run-all.sh            everything
#   tests/run-all.sh rust       only the cargo tests (no root needed)
#
# Ends with one line "N passed, M failed" summing every suite, and exits
# non-zero if anything failed.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
ONLY=${1:-all}
LOGDIR=$(mktemp -d /tmp/edgegate-tests.XXXXXX)
total_passed=0
total_failed=0
suites_failed=()

# Sums "test result: ... N passed; M failed" (cargo) and "N passed, M failed" (scripts).
count() {
    local log=$1 p f
    p=$(grep -Eo '([0-9]+) passed' "$log" | awk '{s+=$1} END {print s+0}')
    f=$(grep -Eo '([0-9]+) failed' "$log" | awk '{s+=$1} END {print s+0}')
    total_passed=$((total_passed + p))
    total_failed=$((total_failed + f))
}

suite() {
    local name=$1
    shift
    echo "=== $name: $*"
    local log=$LOGDIR/$name.log
    local start=$SECONDS
    "$@" 2>&1 | tee "$log"
    local rc=${PIPESTATUS[0]}
    count "$log"
    echo "=== $name: exit $rc in $((SECONDS - start))s"
    if [ "$rc" -ne 0 ]; then
        suites_failed+=("$name")
        # A suite that died before counting still counts as a failure.
        if ! grep -Eq '[0-9]+ failed' "$log"; then total_failed=$((total_failed + 1)); fi
    fi
}

# The guards (fmt, clippy, import graph, doc links) run in every mode, before the tests.
suite lint bash tests/tools/lint.sh
suite rust cargo test --workspace --locked
suite rust-rustls env EDGEGATE_TEST_TLS_STREAM=rustls cargo test --workspace --locked
suite rust-ws-codec env EDGEGATE_TEST_WS_CODEC=edgegate cargo test --locked -p edgegate-tests --test core --test hostile --test links --test admin
suite bench-smoke bash tests/bench/smoke.sh
if [ "$ONLY" = all ]; then
    suite appliance bash tests/appliance/run.sh
    suite monitoring bash tests/monitoring/run.sh
    suite tlsscan bash tests/hostile/tlsscan.sh
    suite tlsscan-rustls env EDGEGATE_TEST_TLS_STREAM=rustls bash tests/hostile/tlsscan.sh
    suite autobahn bash tests/hostile/autobahn.sh
    suite ansible bash tests/ansible/run.sh
    suite ansible-debian12 env EDGEGATE_ANSIBLE_CONTROLLER=debian12 bash tests/ansible/run.sh
    suite lab bash tests/lab/run.sh
fi

echo
if [ ${#suites_failed[@]} -gt 0 ]; then
    echo "failed suites: ${suites_failed[*]} (logs in $LOGDIR)"
fi
echo "$total_passed passed, $total_failed failed"
[ ${#suites_failed[@]} -eq 0 ] && [ "$total_failed" -eq 0 ]
