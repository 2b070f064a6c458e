#!/usr/bin/env bash
# Prints the path of the Autobahn fuzzing client the conformance suite drives
# the gateway with, creating its venv on first use from PyPI. Cached in
# $EDGEGATE_CI_CACHE (default /var/tmp/edgegate-ci), keyed on the pinned
# version.
#
#   kosoku=$(tests/tools/autobahn-client.sh) && "$kosoku" ws://127.0.0.1:9001/echo -o reports
#
# Why kosoku and not `wstest` (PyPI `autobahntestsuite`): even its 2025
# release is Python 2 code (implicit relative imports, `print` statements,
# pinned to Twisted 19 and Autobahn 0.10.9; its README: "Python 3 will *not*
# work"), and Debian 12 has no Python 2. kosoku runs the Autobahn
# TestSuite's own case files (carried in the wheel, mechanically ported to
# Python 3) under a Rust runner, writes the same report (index.json with
# `behavior` / `behaviorClose` per case), and installs as one wheel with no
# dependencies. It speaks ws:// only: tests/hostile/autobahn.sh puts a TLS
# client (socat, OpenSSL) between it and the gateway.
#
# Exits non-zero (with pip's output on stderr) when the venv cannot be made.
set -euo pipefail
KOSOKU_VERSION=0.1.0
CACHE=${EDGEGATE_CI_CACHE:-/var/tmp/edgegate-ci}
VENV=$CACHE/venv-autobahn-kosoku-$KOSOKU_VERSION
mkdir -p "$CACHE"
# Two runs at once: one makes the venv, the other waits for it.
exec 9>"$CACHE/venv-autobahn.lock"
flock 9
if ! "$VENV/bin/python" -c 'import kosoku' 2>/dev/null; then
    rm -rf "$VENV"
    {
        python3 -m venv "$VENV" &&
            "$VENV/bin/pip" install --quiet --disable-pip-version-check "kosoku==$KOSOKU_VERSION"
    } >"$CACHE/venv-autobahn.log" 2>&1 || {
        cat "$CACHE/venv-autobahn.log" >&2
        echo "autobahn-client.sh: cannot install kosoku $KOSOKU_VERSION from PyPI into $VENV" >&2
        rm -rf "$VENV"
        exit 1
    }
fi
echo "$VENV/bin/kosoku"
