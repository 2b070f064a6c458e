#!/usr/bin/env bash
# Monitoring suite: the admin endpoint's real /metrics through promtool, the
# alert rules (promtool check rules + unit tests; every alert tested firing and
# quiet, with a runbook_url to its section of docs/runbook.md), the Grafana
# dashboard, the docs covering every exported metric, and `edgegate demo`
# serving its admin endpoint. Installs promtool (Debian package `prometheus`)
# when missing and running as root.
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

# Each alert: a test case where it fires and one where it must not (below the
# threshold or before its `for:`), a runbook_url under the base the package
# installs the runbook at (file:///usr/share/doc/edgegate/runbook.md, the
# Ansible role's default and what it replaces) whose anchor is a heading of
# docs/runbook.md, and no runbook section for an alert that does not exist.
# Links to runbook anchors (its own, and from the other docs) must resolve
# too. Line-based, so no YAML module is needed: the files keep one
# `- alert:` / `alertname:` / `exp_alerts:` / `runbook_url:` per line.
check "every alert has a firing and a quiet test case, and a runbook_url to its docs/runbook.md section" \
    python3 - monitoring/alerts.yml monitoring/alerts.test.yml docs/runbook.md gateway/Cargo.toml \
    ansible/roles/edgegate/vars/main.yml ansible/roles/edgegate/defaults/main.yml \
    docs/capacity.md docs/monitoring.md <<'EOF'
import re, sys
rules_path, tests_path, runbook_path, package_path, role_vars, role_defaults, *linking = sys.argv[1:]

def setting(path, name):
    m = re.search(rf'^{name}:\s*"?([^"\s]+)"?\s*$', open(path).read(), re.M)
    return m.group(1) if m else None

problems = []
base = setting(role_vars, "edgegate_packaged_runbook_url")
if setting(role_defaults, "edgegate_runbook_url") != base:
    problems.append(f"{role_defaults}: edgegate_runbook_url is not {role_vars}'s {base}")
# The default base opens on the host: the package installs the runbook there.
installed = base.removeprefix("file:///")
if not re.search(rf'\["\.\./{re.escape(runbook_path)}",\s*"{re.escape(installed)}"', open(package_path).read()):
    problems.append(f"{package_path}: does not install {runbook_path} at /{installed} ({base})")
prefix = base + "#"

alerts, current = {}, None
for line in open(rules_path):
    m = re.match(r'\s*- alert:\s*(\S+)', line)
    if m:
        current = m.group(1)
        alerts[current] = None
    m = re.match(r'\s*runbook_url:\s*["\']?([^"\'\s]+)', line)
    if m and current:
        alerts[current] = m.group(1)

# GitHub's heading anchors: lowercase, punctuation dropped, spaces to '-',
# repeats suffixed -1, -2, ...
anchors, seen, headings = set(), {}, []
in_code = False
for line in open(runbook_path):
    if line.startswith("```"):
        in_code = not in_code
    m = re.match(r'(#{1,6})\s+(.*?)\s*#*\s*$', line)
    if in_code or not m:
        continue
    headings.append(m.group(2).strip())
    slug = re.sub(r'[^\w\- ]', '', m.group(2).strip().lower()).replace(' ', '-')
    n = seen.get(slug, 0)
    seen[slug] = n + 1
    anchors.add(slug if n == 0 else f"{slug}-{n}")

firing, quiet, current = set(), set(), None
for line in open(tests_path):
    m = re.match(r'\s*(?:- )?alertname:\s*(\S+)', line)
    if m:
        current = m.group(1)
    m = re.match(r'\s*exp_alerts:\s*(\S*)', line)
    if m and current:
        (quiet if m.group(1) == "[]" else firing).add(current)
        current = None

if len(alerts) == 0:
    problems.append(f"no alerts found in {rules_path}")
for name in sorted((firing | quiet) - set(alerts)):
    problems.append(f"{tests_path} tests {name}, which {rules_path} does not define")
for name, url in alerts.items():
    if name not in firing:
        problems.append(f"{name}: no test case where it fires")
    if name not in quiet:
        problems.append(f"{name}: no test case where it must not fire (exp_alerts: [])")
    want = prefix + name.lower()
    if url is None:
        problems.append(f"{name}: no runbook_url annotation")
        continue
    if url != want:
        problems.append(f"{name}: runbook_url is {url}, expected {want}")
    anchor = url.partition("#")[2]
    if anchor not in anchors:
        problems.append(f"{name}: runbook_url anchor #{anchor} is no heading of {runbook_path}")
for h in headings:
    if re.fullmatch(r'EdgeGate[A-Za-z]+', h) and h not in alerts:
        problems.append(f"{runbook_path}: section '## {h}' for an alert {rules_path} does not define")
# Links to runbook anchors: its own (#x) and the other docs' (runbook.md#x).
for path, pattern in [(runbook_path, r'\]\(#([^)]+)\)')] + [(p, r'\]\(runbook\.md#([^)]+)\)') for p in linking]:
    for anchor in re.findall(pattern, open(path).read()):
        if anchor not in anchors:
            problems.append(f"{path}: link to {runbook_path}#{anchor}, which is no heading there")
print("\n".join(problems) or f"{len(alerts)} alerts: each tested both ways, each with a runbook section")
sys.exit(1 if problems else 0)
EOF
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
