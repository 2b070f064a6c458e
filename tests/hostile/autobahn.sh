#!/usr/bin/env bash
# The Autobahn WebSocket conformance cases (RFC 6455: framing, pings,
# reserved bits and opcodes, fragmentation, UTF-8, close handshake and
# codes, limits and performance) against the real binary's `/echo` route
# (example service), over TLS, once on each TLS stream (`tls_stream =
# "rustls"` and `"lean"`).
#
# The fuzzing client is kosoku (the Autobahn TestSuite's case files under a
# Rust runner; tests/tools/autobahn-client.sh says why not `wstest`). It
# speaks ws:// only, so socat is the TLS client in between: it verifies the
# gateway's self-signed certificate (from `openssl req`, name localhost)
# and carries each case's bytes as they are written, so the chopped and
# slow cases reach the gateway as many small TLS records.
#
# Verdicts: a case passes when its behaviour and its close are OK; or
# NON-STRICT or INFORMATIONAL (Autobahn's own rule) for the cases named in
# `explained` below, each with its reason (docs/hostile-input.md,
# "Autobahn"), printed on every run. Anything else (FAILED, WRONG CODE,
# UNCLEAN, ..., or an unexplained non-strict pass) fails the suite.
# The permessage-deflate cases 12.* and 13.* are skipped and said so:
# compression is issue 30, not built yet (the gateway offers no extension).
#
#   tests/hostile/autobahn.sh                 both streams (root for apt-get socat)
#   EDGEGATE_AUTOBAHN_STREAMS=lean tests/hostile/autobahn.sh    one stream
#   EDGEGATE_AUTOBAHN_CASES='1.* 7.*' tests/hostile/autobahn.sh  some cases
#
# Last line: "N passed, M failed" (each case on each stream counts once);
# exits non-zero if anything failed.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$REPO"
WORK=$(mktemp -d /tmp/edgegate-autobahn.XXXXXX)
STREAMS=${EDGEGATE_AUTOBAHN_STREAMS:-rustls lean}
CASES=${EDGEGATE_AUTOBAHN_CASES:-}
# 9.1.6 and 9.2.6 send 16 MiB messages; a link frame carries a message
# and 10 bytes of its own.
MAX_MESSAGE_BYTES=16777216
MAX_FRAME_BYTES=$((MAX_MESSAGE_BYTES + 10))
passed=0
failed=0
pids=()

cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
    rm -rf "$WORK"
}
trap cleanup EXIT

check() { # check NAME CONDITION-EXIT-CODE
    if [ "$2" -eq 0 ]; then
        echo "ok    $1"
        passed=$((passed + 1))
    else
        echo "FAIL  $1"
        failed=$((failed + 1))
    fi
}

finish() {
    echo
    echo "$passed passed, $failed failed"
    [ "$failed" -eq 0 ]
    exit
}

if ! command -v socat >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq socat >/dev/null
fi
command -v socat >/dev/null
check "socat installed ($(socat -V 2>/dev/null | grep -Eo 'socat version [0-9.]+' | head -1))" $?
KOSOKU=$(bash tests/tools/autobahn-client.sh)
check "kosoku installed ($KOSOKU)" $?
[ -x "$KOSOKU" ] || finish

cargo build --quiet -p edgegate --bin edgegate && cargo build --quiet -p edgegate-link --example example_service
check "edgegate and example_service build" $?
BIN=$(cargo metadata --format-version 1 --no-deps 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/debug
[ -x "$BIN/edgegate" ] || finish

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

openssl req -x509 -nodes -days 2 -subj /CN=localhost -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
    -newkey ec -pkeyopt ec_paramgen_curve:P-256 -keyout "$WORK/key.pem" -out "$WORK/cert.pem" >/dev/null 2>&1
check "self-signed certificate from openssl req" $?

SERVICE_PORT=$(free_port)
"$BIN/examples/example_service" --listen "127.0.0.1:$SERVICE_PORT" --max-frame-bytes "$MAX_FRAME_BYTES" \
    >"$WORK/service.log" 2>&1 &
pids+=($!)

# The case selection, as kosoku arguments.
select_args=(-x '12.*' -x '13.*')
for c in $CASES; do select_args+=(-i "$c"); done
skipped=$("${KOSOKU%/*}/python" -c 'from kosoku.cases import CASES; print(sum(1 for c in CASES if c.split(".")[0] in ("12", "13")))')
total=$("${KOSOKU%/*}/python" -c 'from kosoku.cases import CASES; print(len(CASES))')

run_stream() { # run_stream TLS_STREAM
    local stream=$1 dir=$WORK/$1 port admin relay
    mkdir -p "$dir"
    port=$(free_port)
    admin=$(free_port)
    cat >"$dir/edgegate.toml" <<TOML
[admin]
bind = "127.0.0.1:$admin"
control_socket = ""
[[listener]]
name = "public"
bind = "127.0.0.1:$port"
tls_cert_path = "$WORK/cert.pem"
tls_key_path = "$WORK/key.pem"
tls_stream = "$stream"
[[route]]
listener = "public"
path = "/echo"
service = "example"
[[service]]
name = "example"
addresses = ["127.0.0.1:$SERVICE_PORT"]
max_frame_bytes = $MAX_FRAME_BYTES
[limits]
max_message_bytes = $MAX_MESSAGE_BYTES
TOML
    "$BIN/edgegate" run --config "$dir/edgegate.toml" >"$dir/edgegate.log" 2>&1 &
    local gw=$!
    pids+=($gw)
    local up=1
    for _ in $(seq 100); do
        if curl -fsS "http://127.0.0.1:$admin/readyz" >/dev/null 2>&1; then up=0; break; fi
        sleep 0.1
    done
    check "$stream: edgegate run is ready" $up
    grep -Eq "listening.*tls_stream=\"?$stream" "$dir/edgegate.log"
    check "$stream: the listener runs on tls_stream $stream" $?

    # The TLS client: one TLS connection to the gateway per case connection,
    # the certificate verified against itself (it is its own CA) for the
    # name localhost.
    relay=$(free_port)
    socat TCP-LISTEN:"$relay",bind=127.0.0.1,reuseaddr,fork \
        OPENSSL:127.0.0.1:"$port",cafile="$WORK/cert.pem",commonname=localhost,verify=1 \
        2>"$dir/socat.log" &
    local socat_pid=$!
    pids+=($socat_pid)

    local start=$SECONDS
    timeout 1200 "$KOSOKU" "ws://127.0.0.1:$relay/echo" "${select_args[@]}" -o "$dir/reports" \
        >"$dir/kosoku.log" 2>&1
    local rc=$? took=$((SECONDS - start))
    [ -s "$dir/reports/index.json" ]
    check "$stream: kosoku ran (exit $rc, ${took}s)" $?
    if [ -s "$dir/reports/index.json" ]; then
        verdicts "$stream" "$dir/reports/index.json"
    else
        sed 's/^/    /' "$dir/kosoku.log" | tail -20
    fi
    kill "$socat_pid" "$gw" 2>/dev/null
    wait "$socat_pid" "$gw" 2>/dev/null
    # Every case's connection is gone: nothing held after the run.
    grep -q 'panicked' "$dir/edgegate.log"
    [ $? -ne 0 ]
    check "$stream: no panic in the gateway's log" $?
}

# One line per case that did not pass (each counts as a failure), one per
# non-strict or informational case, and a summary of verdicts. Prints
# "PASSED n" and "FAILED n" last for the caller.
verdicts() { # verdicts STREAM INDEX-JSON
    local stream=$1 index=$2 out
    out=$(python3 - "$stream" "$index" <<'PY'
import collections, json, sys
stream, index = sys.argv[1], sys.argv[2]
(agent, cases), = json.load(open(index)).items()
def key(case_id):
    return [int(p) for p in case_id.split(".")]
passing = {"OK", "NON-STRICT", "INFORMATIONAL"}
# The cases that may pass other than OK, and why (docs/hostile-input.md,
# "Autobahn"). A case not named here that passes NON-STRICT or
# INFORMATIONAL fails the suite until it is explained there and here.
explained = {
    # A message, then a frame that fails the connection, sent back to back:
    # the echo comes from the service, a link round trip away, and the
    # gateway fails the connection (1002) as it reads the bad frame, before
    # the echo is back.
    **dict.fromkeys(["3.2", "3.3", "3.4", "4.1.3", "4.1.4", "4.1.5", "4.2.3", "4.2.4", "4.2.5",
                     "5.15"], "echo lost to the 1002 (the echo is a link round trip away)"),
    # Invalid UTF-8 in the middle of one frame: tungstenite checks a frame
    # when it has all of it, so the 1007 comes after the last chop, not the
    # bad one.
    **dict.fromkeys(["6.4.3", "6.4.4"], "1007 at the frame's end, not at the bad byte"),
    # Informational by definition: the RFC leaves the outcome open.
    "7.1.6": "a 256 KiB message, close and ping back to back: the RFC leaves it open",
    "7.13.1": "close code 5000: undefined by the RFC (the gateway answers 1002)",
    "7.13.2": "close code 65535: undefined by the RFC (the gateway answers 1002)",
}
tally = collections.Counter()
passed = failed = 0
for case_id in sorted(cases, key=key):
    c = cases[case_id]
    verdict = (c["behavior"], c["behaviorClose"])
    tally[verdict] += 1
    said = (f"behavior={c['behavior']} close={c['behaviorClose']}"
            f" (remote close code {c.get('remoteCloseCode')})")
    if verdict == ("OK", "OK"):
        passed += 1
    elif c["behavior"] in passing and c["behaviorClose"] in passing and case_id in explained:
        passed += 1
        print(f"    note  {stream}: {case_id} {said}: {explained[case_id]}")
    elif c["behavior"] in passing and c["behaviorClose"] in passing:
        failed += 1
        print(f"FAIL  {stream}: case {case_id} {said}: passes, but not as OK and not explained")
    else:
        failed += 1
        print(f"FAIL  {stream}: case {case_id} {said}; report {c['reportfile']}")
print(f"    {stream}: agent {agent!r}, {len(cases)} cases: "
      + ", ".join(f"{b}/{cl} {n}" for (b, cl), n in sorted(tally.items())))
print(f"PASSED {passed}")
print(f"FAILED {failed}")
PY
)
    echo "$out" | grep -Ev '^(PASSED|FAILED) '
    local p f
    p=$(echo "$out" | awk '$1 == "PASSED" {print $2}')
    f=$(echo "$out" | awk '$1 == "FAILED" {print $2}')
    passed=$((passed + ${p:-0}))
    failed=$((failed + ${f:-1}))
    # Keep the failing cases' reports for a look, outside the removed work dir.
    if [ "${f:-1}" -ne 0 ]; then
        local keep=/tmp/edgegate-autobahn-reports-$stream
        rm -rf "$keep" && cp -r "${index%/*}" "$keep" && echo "    reports kept in $keep"
    fi
}

echo "skip  12.* and 13.* ($skipped of the $total cases): permessage-deflate is issue 30, not built yet"
for stream in $STREAMS; do
    run_stream "$stream"
done
finish
