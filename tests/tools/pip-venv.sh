#!/usr/bin/env bash
# Prints the path of a venv that has one pinned package from PyPI, creating
# it on first use. Cached in $EDGEGATE_CI_CACHE (default /var/tmp/edgegate-ci),
# keyed on NAME; suites and tests running at once share it (one makes it, the
# others wait on a lock). The one place the test tools make a venv:
# python-clients.sh and autobahn-client.sh call it.
#
#   venv=$(tests/tools/pip-venv.sh NAME PACKAGE==VERSION IMPORT-NAME)
#
# Exits non-zero (with pip's output on stderr) when the venv cannot be made.
set -euo pipefail
[ $# -eq 3 ] || { echo "usage: pip-venv.sh NAME PACKAGE==VERSION IMPORT-NAME" >&2; exit 2; }
name=$1 requirement=$2 module=$3
CACHE=${EDGEGATE_CI_CACHE:-/var/tmp/edgegate-ci}
VENV=$CACHE/venv-$name
mkdir -p "$CACHE"
exec 9>"$CACHE/venv-$name.lock"
flock 9
if ! "$VENV/bin/python" -c "import $module" 2>/dev/null; then
    rm -rf "$VENV"
    {
        python3 -m venv "$VENV" &&
            "$VENV/bin/pip" install --quiet --disable-pip-version-check "$requirement"
    } >"$CACHE/venv-$name.log" 2>&1 || {
        cat "$CACHE/venv-$name.log" >&2
        echo "pip-venv.sh: cannot install $requirement from PyPI into $VENV" >&2
        rm -rf "$VENV"
        exit 1
    }
fi
echo "$VENV"
