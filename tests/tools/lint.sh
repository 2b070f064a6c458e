#!/usr/bin/env bash
# The guards: formatting and clippy with warnings as errors. Each check is one pass or one fail;
# ends with "N passed, M failed" and exits non-zero if anything failed.
#
#   bash tests/tools/lint.sh
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$REPO"
passed=0
failed=0

check() {
    local name=$1
    shift
    echo "--- $name: $*"
    if "$@"; then
        echo "--- $name: ok"
        passed=$((passed + 1))
    else
        echo "--- $name: FAILED"
        failed=$((failed + 1))
    fi
}

# rustfmt and clippy are rustup components; a minimal toolchain lacks them.
# `rustup component add` downloads, so it needs the network (or a local
# rustup mirror via RUSTUP_DIST_SERVER).
components() {
    command -v rustup >/dev/null || { cargo fmt --version && cargo clippy --version; return; }
    local installed missing=()
    installed=$(rustup component list --installed)
    for c in rustfmt clippy; do
        grep -q "^$c" <<<"$installed" || missing+=("$c")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "installing ${missing[*]}"
        rustup component add "${missing[@]}" || return 1
    fi
    cargo fmt --version && cargo clippy --version
}

check components components
check fmt cargo fmt --all --check
check clippy cargo clippy --workspace --all-targets --locked -- -D warnings

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
