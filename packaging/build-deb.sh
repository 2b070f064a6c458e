#!/usr/bin/env bash
# Builds the edgegate package: `cargo deb -p edgegate`, then adds the
# `md5sums` control file that cargo-deb (3.x) does not write. With it,
# `dpkg --verify edgegate` and debsums compare the installed files with what
# was built, not with what dpkg happened to unpack. Like dh_md5sums: every
# regular file of the package except the conffiles (dpkg tracks those itself).
#
#   packaging/build-deb.sh [cargo deb options]     e.g. --output DIR
#
# Prints the path of the .deb last, as cargo deb does.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"

out=$(cargo deb -p edgegate "$@")
deb=$(grep -E '/edgegate_[^/]*\.deb$' <<<"$out" | tail -n 1)
[ -f "$deb" ] || {
    printf '%s\n' "$out"
    echo "build-deb.sh: cargo deb printed no edgegate_*.deb path" >&2
    exit 1
}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
dpkg-deb -R "$deb" "$work/pkg"
(
    cd "$work/pkg"
    find . -path ./DEBIAN -prune -o -type f -printf '%P\n' | LC_ALL=C sort |
        { grep -vxF -f <(sed -n 's#^/##p' DEBIAN/conffiles 2>/dev/null) || true; } |
        xargs -r -d '\n' md5sum >DEBIAN/md5sums
)
chmod 0644 "$work/pkg/DEBIAN/md5sums"
# cargo-deb gives every entry one timestamp; keep it (unpacking renewed the
# folders'), so the same tree still makes the same package.
stamp=$(find "$work/pkg" -path "$work/pkg/DEBIAN" -prune -o -type f -printf '%T@\n' | sort -n | tail -n 1)
stamp=${stamp%.*}
find "$work/pkg" -exec touch -h -d "@$stamp" {} +
SOURCE_DATE_EPOCH=$stamp dpkg-deb --root-owner-group -Zxz -b "$work/pkg" "$deb" >/dev/null
echo "$deb"
