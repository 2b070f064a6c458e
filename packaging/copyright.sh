#!/usr/bin/env bash
# Generates packaging/copyright from Cargo.lock: cargo-about lists the crates
# linked into /usr/bin/edgegate with the license texts found in each crate's
# source (packaging/about.toml), packaging/copyright.py writes them in
# Debian's machine-readable format.
#
#   packaging/copyright.sh           rewrite packaging/copyright
#   packaging/copyright.sh --check   exit 1, with the diff, when it is not current
#
# Installs cargo-about (pinned, `cargo install --locked`, about 3 minutes of
# compiling the first time) into $EDGEGATE_CI_CACHE (default
# /var/tmp/edgegate-ci) unless that version is on PATH. Offline apart from
# crates.io: cargo-about reads the crates' sources that cargo fetches, and
# asks no other service (--frozen).
set -euo pipefail

CARGO_ABOUT_VERSION=0.9.3
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${EDGEGATE_CI_CACHE:-/var/tmp/edgegate-ci}
TOOL_ROOT=$CACHE/cargo-about-$CARGO_ABOUT_VERSION
OUT=$REPO/packaging/copyright

mode=write
case ${1:-} in
    "") ;;
    --check) mode=check ;;
    *)
        echo "usage: $0 [--check]" >&2
        exit 2
        ;;
esac

about=$(command -v cargo-about || true)
if [ -z "$about" ] || ! "$about" --version | grep -qF " $CARGO_ABOUT_VERSION"; then
    about=$TOOL_ROOT/bin/cargo-about
    if ! "$about" --version >/dev/null 2>&1; then
        echo "installing cargo-about $CARGO_ABOUT_VERSION into $TOOL_ROOT" >&2
        mkdir -p "$CACHE"
        cargo install --locked --quiet cargo-about --version "$CARGO_ABOUT_VERSION" \
            --features cli --root "$TOOL_ROOT" >&2
    fi
fi

cd "$REPO"
# The crates' sources (where cargo-about finds the license files), fetched
# the way the build fetches them.
cargo fetch --locked --quiet
json=$(mktemp)
new=$(mktemp)
trap 'rm -f "$json" "$new"' EXIT
"$about" generate --frozen --fail --format json -c packaging/about.toml \
    -m gateway/Cargo.toml -o "$json" 2> >(grep -v '^\s*$' >&2)
python3 -B packaging/copyright.py "cargo-about $CARGO_ABOUT_VERSION" <"$json" >"$new"

if [ "$mode" = check ]; then
    if diff -u "$OUT" "$new"; then
        echo "packaging/copyright is current: $(grep -c '^Files: crates.io/' "$OUT") crates"
    else
        echo "packaging/copyright is not what Cargo.lock gives: run packaging/copyright.sh" >&2
        exit 1
    fi
else
    cp "$new" "$OUT"
    echo "wrote packaging/copyright: $(grep -c '^Files: crates.io/' "$OUT") crates"
fi
