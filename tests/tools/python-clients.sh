#!/usr/bin/env bash
# Prints the path of a Python interpreter that has the third-party WebSocket
# client the tests drive the gateway with (`websockets`, pinned), creating
# its venv on first use from PyPI. Cached in $EDGEGATE_CI_CACHE (default
# /var/tmp/edgegate-ci), keyed on the pinned version.
#
#   python=$(tests/tools/python-clients.sh) && "$python" tests/hostile/still_writing.py ...
#
# Exits non-zero (with pip's output on stderr) when the venv cannot be made.
set -euo pipefail
WEBSOCKETS_VERSION=15.0.1
CACHE=${EDGEGATE_CI_CACHE:-/var/tmp/edgegate-ci}
VENV=$CACHE/venv-clients-websockets-$WEBSOCKETS_VERSION
mkdir -p "$CACHE"
# Tests run in parallel: one makes the venv, the others wait for it.
exec 9>"$CACHE/venv-clients.lock"
flock 9
if ! "$VENV/bin/python" -c 'import websockets' 2>/dev/null; then
    rm -rf "$VENV"
    {
        python3 -m venv "$VENV" &&
            "$VENV/bin/pip" install --quiet --disable-pip-version-check "websockets==$WEBSOCKETS_VERSION"
    } >"$CACHE/venv-clients.log" 2>&1 || { cat "$CACHE/venv-clients.log" >&2; rm -rf "$VENV"; exit 1; }
fi
echo "$VENV/bin/python"
