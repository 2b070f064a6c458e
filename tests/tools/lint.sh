#!/usr/bin/env bash
# The guards: formatting, clippy with warnings as errors, the import-graph
# ratchet of gateway/src and link/src (import_graph.toml), the links of every
# Markdown file (doc_links.py: each file, folder and #anchor linked exists),
# and Cargo.toml's rust-version against what Cargo.lock's crates declare
# (msrv.py). Each check is one pass or one fail;
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
check tools-unit python3 -B -m unittest discover -s tests/tools
check import-graph python3 -B tests/tools/import_graph.py
check doc-links python3 -B tests/tools/doc_links.py
check rust-version python3 -B tests/tools/msrv.py

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
