#!/usr/bin/env bash
# Scans a running edgegate's TLS with independent scanners (Debian's
# sslscan and testssl.sh): no protocol below TLS 1.2, no weak cipher suite,
# TLS 1.2 and 1.3 offered, no compression, no Heartbleed, and none of the
# vulnerabilities testssl.sh probes (CCS injection, Ticketbleed, ROBOT,
# renegotiation, CRIME, POODLE, SWEET32, FREAK, DROWN, LOGJAM, BEAST,
# LUCKY13, RC4). Runs the real binary with a self-signed certificate from
# `openssl req` (one RSA, one ECDSA; testssl.sh, ~90 s a scan, on the ECDSA
# one) and the example service; also asks `openssl s_client` for TLS 1.0/1.1
# directly.
#
#   tests/hostile/tlsscan.sh        (root for apt-get; the rest needs no root)
#   EDGEGATE_TEST_TLS_STREAM=rustls tests/hostile/tlsscan.sh   the same on the fallback TLS stream
#
# Last line: "N passed, M failed"; exits non-zero if anything failed.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$REPO"
WORK=$(mktemp -d /tmp/edgegate-tlsscan.XXXXXX)
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

if ! command -v sslscan >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq sslscan >/dev/null
fi
command -v sslscan >/dev/null
check "sslscan installed ($(sslscan --version 2>/dev/null | grep -Eo '[0-9]+\.[0-9]+\.[0-9]+' | head -1))" $?
if ! command -v testssl >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq testssl.sh >/dev/null
fi
command -v testssl >/dev/null
check "testssl.sh installed ($(dpkg-query -W -f='${Version}' testssl.sh 2>/dev/null))" $?

cargo build --quiet -p edgegate --bin edgegate && cargo build --quiet -p edgegate-link --example example_service
check "edgegate and example_service build" $?
BIN=$(cargo metadata --format-version 1 --no-deps 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/debug

# Which TLS stream the scanned listener uses (docs/config.md, `tls_stream`;
# "lean" is the default).
TLS_STREAM=${EDGEGATE_TEST_TLS_STREAM:-lean}
echo "tls_stream = $TLS_STREAM"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

SERVICE_PORT=$(free_port)
"$BIN/examples/example_service" --listen "127.0.0.1:$SERVICE_PORT" >"$WORK/service.log" 2>&1 &
pids+=($!)

scan() { # scan KEYTYPE OPENSSL-NEWKEY-ARGS...
    local kind=$1
    shift
    local dir=$WORK/$kind port admin
    mkdir -p "$dir"
    openssl req -x509 -nodes -days 2 -subj /CN=localhost -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
        "$@" -keyout "$dir/key.pem" -out "$dir/cert.pem" >/dev/null 2>&1
    check "$kind: self-signed certificate from openssl req" $?
    port=$(free_port)
    admin=$(free_port)
    cat >"$dir/edgegate.toml" <<TOML
[admin]
bind = "127.0.0.1:$admin"
[[listener]]
name = "public"
bind = "127.0.0.1:$port"
tls_cert_path = "$dir/cert.pem"
tls_key_path = "$dir/key.pem"
tls_stream = "$TLS_STREAM"
[[route]]
listener = "public"
path = "/echo"
service = "example"
[[service]]
name = "example"
addresses = ["127.0.0.1:$SERVICE_PORT"]
TOML
    "$BIN/edgegate" run --config "$dir/edgegate.toml" >"$dir/edgegate.log" 2>&1 &
    local gw=$!
    pids+=($gw)
    local up=1
    for _ in $(seq 100); do
        if curl -fsS "http://127.0.0.1:$admin/readyz" >/dev/null 2>&1; then up=0; break; fi
        sleep 0.1
    done
    check "$kind: edgegate run is ready" $up
    grep -Eq "listening.*tls_stream=\"?$TLS_STREAM" "$dir/edgegate.log"
    check "$kind: the listener runs on tls_stream $TLS_STREAM" $?

    sslscan --no-colour --show-sigs "127.0.0.1:$port" >"$dir/sslscan.txt" 2>&1
    check "$kind: sslscan completed" $?
    local out=$dir/sslscan.txt
    echo "--- sslscan ($kind) summary:"
    grep -E '^(SSLv|TLSv)[0-9.]+ +(enabled|disabled)' "$out" | sed 's/^/    /'
    grep -E '^(Preferred|Accepted) ' "$out" | sed 's/^/    /'

    for proto in SSLv2 SSLv3 TLSv1.0 TLSv1.1; do
        grep -Eq "^$proto +disabled" "$out"
        check "$kind: $proto disabled" $?
    done
    for proto in TLSv1.2 TLSv1.3; do
        grep -Eq "^$proto +enabled" "$out"
        check "$kind: $proto enabled" $?
    done
    # Accepted suites: only AEAD (GCM, CHACHA20-POLY1305), only forward secret
    # (ECDHE, or TLS 1.3 whose suites are all ephemeral).
    local accepted weak
    accepted=$(grep -E '^(Preferred|Accepted) ' "$out")
    [ -n "$accepted" ]
    check "$kind: scanner saw accepted cipher suites" $?
    weak=$(echo "$accepted" | grep -Eiv '(GCM|CHACHA20)' ; echo "$accepted" | grep -E 'TLSv1\.2' | grep -Ev 'ECDHE')
    [ -z "$weak" ]
    check "$kind: every accepted suite is AEAD with forward secrecy${weak:+ (weak: $(echo "$weak" | awk '{print $5}' | tr '\n' ' '))}" $?
    echo "$accepted" | grep -Eiq '(RC4|DES|NULL|EXP|MD5|anon|CBC|SHA +$)'
    [ $? -ne 0 ]
    check "$kind: no RC4, DES, NULL, export, anonymous, MD5 or CBC suite" $?
    # rustls has no TLS compression; Debian's sslscan is built against an
    # OpenSSL without it and says so instead of testing.
    if grep -Eq 'does not support compression' "$out"; then
        echo "skip  $kind: TLS compression (this sslscan cannot test it)"
    else
        grep -Eq 'Compression disabled' "$out"
        check "$kind: TLS compression disabled" $?
    fi
    if grep -Eq 'Heartbleed' "$out"; then
        ! grep -Eq 'vulnerable to heartbleed' "$out" || grep -Eq 'not vulnerable to heartbleed' "$out"
        check "$kind: not vulnerable to Heartbleed" $?
    fi
    # And directly: a TLS 1.1 / 1.0 handshake must fail even with every legacy suite allowed.
    for v in tls1 tls1_1; do
        echo | timeout 10 openssl s_client -connect "127.0.0.1:$port" -servername localhost "-$v" \
            -cipher 'DEFAULT@SECLEVEL=0' >"$dir/s_client-$v.txt" 2>&1
        local rc=$? alert
        alert=$(grep -Eo 'alert number [0-9]+' "$dir/s_client-$v.txt" | head -1)
        [ $rc -ne 0 ] && grep -q 'Cipher is (NONE)' "$dir/s_client-$v.txt"
        check "$kind: openssl s_client -$v is refused (${alert:-no alert})" $?
    done
    echo | timeout 10 openssl s_client -connect "127.0.0.1:$port" -servername localhost -tls1_2 >"$dir/s_client-tls1_2.txt" 2>&1
    grep -Eq 'Protocol *: *TLSv1\.2' "$dir/s_client-tls1_2.txt"
    check "$kind: openssl s_client -tls1_2 succeeds" $?
    [ "$kind" = ecdsa-p256 ] && testssl_scan "$kind" "$port" "$dir"
    kill "$gw" 2>/dev/null
    wait "$gw" 2>/dev/null
}

# testssl.sh's findings, as JSON. Every vulnerability it probes must be
# OK; apart from what a self-signed test certificate and an HTTP-less echo
# route are (chain of trust, expiry, revocation, HSTS, headers, CAA) and
# rustls following the client's cipher order, nothing may be rated HIGH or
# CRITICAL.
testssl_scan() { # testssl_scan KIND PORT DIR
    local kind=$1 port=$2 dir=$3
    timeout 600 testssl --quiet --color 0 --warnings batch --jsonfile "$dir/testssl.json" \
        "127.0.0.1:$port" >"$dir/testssl.txt" 2>&1
    [ -s "$dir/testssl.json" ]
    check "$kind: testssl.sh completed" $?
    python3 - "$dir/testssl.json" >"$dir/testssl-verdict.txt" <<'PY'
import json, sys
findings = {f["id"]: f for f in json.load(open(sys.argv[1]))}
vulns = ["heartbleed", "CCS", "ticketbleed", "ROBOT", "secure_renego", "secure_client_renego",
         "CRIME_TLS", "BREACH", "POODLE_SSL", "fallback_SCSV", "SWEET32", "FREAK", "DROWN",
         "LOGJAM", "BEAST", "LUCKY13", "RC4"]
expected_high = {"cert_chain_of_trust", "cert_expirationStatus", "cert_notAfter", "cert_revocation",
                 "cipher_order"}
bad = [f"{v}: {findings[v]['severity']} {findings[v]['finding']}" if v in findings else f"{v}: missing"
       for v in vulns if findings.get(v, {}).get("severity") != "OK"]
bad += [f"{i}: {f['severity']} {f['finding']}" for i, f in findings.items()
        if f["severity"] in ("HIGH", "CRITICAL") and i not in expected_high]
for line in bad:
    print(line)
sys.exit(1 if bad else 0)
PY
    local rc=$?
    sed 's/^/    /' "$dir/testssl-verdict.txt"
    check "$kind: testssl.sh finds no vulnerability and nothing else rated high" $rc
}

scan rsa2048 -newkey rsa:2048
scan ecdsa-p256 -newkey ec -pkeyopt ec_paramgen_curve:P-256

echo
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
