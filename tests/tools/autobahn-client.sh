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
venv=$("$(dirname "${BASH_SOURCE[0]}")/pip-venv.sh" "autobahn-kosoku-$KOSOKU_VERSION" \
    "kosoku==$KOSOKU_VERSION" kosoku)
echo "$venv/bin/kosoku"
