#!/usr/bin/env bash
# Monitoring suite: the admin endpoint's real /metrics through promtool, the
# alert rules (promtool check rules + unit tests), the Grafana dashboard, the
# docs covering every exported metric, and `edgegate demo` serving its admin
# endpoint. Installs promtool (Debian package `prometheus`) when missing and
# running as root.
#
#   tests/monitoring/run.sh
#
# Ends with one line "N passed, M failed"; exits non-zero if anything failed.
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
cd "$REPO"
WORK=$(mktemp -d /tmp/edgegate-monitoring.XXXXXX)
passed=0
failed=0
DEMO_PID=

cleanup() {
    if [ -n "$DEMO_PID" ]; then
        kill -INT "$DEMO_PID" 2>/dev/null
        wait "$DEMO_PID" 2>/dev/null
    fi
}
trap cleanup EXIT

# Cargo's own "N passed; M failed" lines are renamed in failure output, so
# that run-all.sh counts only this script's checks.
show_log() {
    sed -E 's/([0-9]+) (passed|failed)/\2: \1/g; s/^/    /' "$1" | tail -n 60
}

check() {
    local name=$1
    shift
    local log=$WORK/check-$((passed + failed)).log
    if "$@" >"$log" 2>&1; then
        echo "PASS: $name"
        passed=$((passed + 1))
    else
        echo "FAIL: $name"
        show_log "$log"
        failed=$((failed + 1))
    fi
}

# --- promtool ---------------------------------------------------------------
if ! command -v promtool >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing promtool (Debian package prometheus)"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >"$WORK/apt.log" 2>&1
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >>"$WORK/apt.log" 2>&1
    fi
fi
check "promtool is installed" command -v promtool
if ! command -v promtool >/dev/null 2>&1; then
    show_log "$WORK/apt.log" 2>/dev/null
    echo "$passed passed, $((failed + 1)) failed"
    exit 1
fi

# --- real /metrics ------------------------------------------------------------
METRICS=$WORK/metrics.txt
check "admin endpoint integration tests (scrape under load, promtool check metrics inside)" \
    env EDGEGATE_REQUIRE_PROMTOOL=1 EDGEGATE_METRICS_OUT="$METRICS" \
    cargo test --locked -p edgegate-tests --test admin
check "promtool check metrics passes on a real scrape" bash -c "test -s '$METRICS' && promtool check metrics < '$METRICS'"
check "the scrape has the poll-delay histogram the benchmark reads" \
    grep -q '^edgegate_runtime_poll_delay_seconds_bucket{le="+Inf"}' "$METRICS"

documented() {
    local missing=0 name
    for name in $(awk '/^# TYPE /{print $3}' "$METRICS"); do
        if ! grep -q "\`$name\`" docs/monitoring.md; then
            echo "not in docs/monitoring.md: $name"
            missing=1
        fi
    done
    return $missing
}
check "every exported metric is documented in docs/monitoring.md" documented

# Names used by alerts and the dashboard exist in the scrape (histogram and
# counter suffixes included), so a rename cannot silently break them.
used_names_exist() {
    local missing=0 name
    for name in $(grep -ohE 'edgegate_[a-z0-9_]+' monitoring/alerts.yml monitoring/grafana-dashboard.json | sort -u); do
        if ! grep -qE "^$name[ {]" "$METRICS"; then
            echo "used but not exported: $name"
            missing=1
        fi
    done
    return $missing
}
check "every metric the alerts and the dashboard use is exported" used_names_exist

# --- alert rules and dashboard ------------------------------------------------
check "promtool check rules monitoring/alerts.yml" promtool check rules monitoring/alerts.yml
check "promtool test rules monitoring/alerts.test.yml (alerts fire on synthetic series)" \
    promtool test rules monitoring/alerts.test.yml
check "grafana dashboard is valid JSON with panels and a datasource variable" python3 - monitoring/grafana-dashboard.json <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
panels = [p for p in d["panels"] if p["type"] != "row"]
assert len(panels) >= 10, len(panels)
assert all(p["targets"] and all(t["expr"] for t in p["targets"]) for p in panels)
assert any(v["type"] == "datasource" for v in d["templating"]["list"])
ids = [p["id"] for p in d["panels"]]
assert len(ids) == len(set(ids)), "duplicate panel ids"
EOF
check "the package installs the monitoring files" bash -c \
    "grep -q 'monitoring/alerts.yml' gateway/Cargo.toml && grep -q 'monitoring/grafana-dashboard.json' gateway/Cargo.toml"

# --- the demo serves its admin endpoint -------------------------------------
check "edgegate binary builds" cargo build --locked -p edgegate --bin edgegate
free_ports() {
    python3 -c 'import socket
ss = [socket.socket() for _ in range(3)]
for s in ss: s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in ss))'
}
read -r CLIENT_PORT SERVICE_PORT ADMIN_PORT <<<"$(free_ports)"
target/debug/edgegate demo --listen "127.0.0.1:$CLIENT_PORT" --service "127.0.0.1:$SERVICE_PORT" \
    --admin "127.0.0.1:$ADMIN_PORT" >"$WORK/demo.out" 2>"$WORK/demo.err" &
DEMO_PID=$!
http_status() {
    python3 - "$@" <<'EOF'
import sys, time, urllib.request, urllib.error
url, want = sys.argv[1], int(sys.argv[2])
for _ in range(100):
    try:
        status = urllib.request.urlopen(url, timeout=2).status
    except urllib.error.HTTPError as e:
        status = e.code
    except OSError:
        status = None
    if status == want:
        sys.exit(0)
    time.sleep(0.1)
print(f"{url}: last status {status}, wanted {want}")
sys.exit(1)
EOF
}
check "demo: /healthz answers 200 on its admin port" http_status "http://127.0.0.1:$ADMIN_PORT/healthz" 200
check "demo: /readyz answers 200 once the example service's links are up" http_status "http://127.0.0.1:$ADMIN_PORT/readyz" 200
fetch() {
    python3 -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=3).read().decode())' "$1"
}
check "demo: /metrics passes promtool check metrics" bash -c \
    "$(declare -f fetch); fetch http://127.0.0.1:$ADMIN_PORT/metrics | promtool check metrics"
check "demo: the client port does not serve /metrics" bash -c \
    "$(declare -f fetch); ! fetch http://127.0.0.1:$CLIENT_PORT/metrics"
check "demo: the default admin address is 127.0.0.1:7611" bash -c \
    "target/debug/edgegate demo --help | grep -q '127.0.0.1:7611'"

echo
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
