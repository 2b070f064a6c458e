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
venv=$("$(dirname "${BASH_SOURCE[0]}")/pip-venv.sh" "clients-websockets-$WEBSOCKETS_VERSION" \
    "websockets==$WEBSOCKETS_VERSION" websockets)
echo "$venv/bin/python"
