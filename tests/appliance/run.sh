#!/usr/bin/env bash
# Appliance test: build the edgegate .deb, lint it, install it into a fresh
# Debian 12 root and check that it turns into a working gateway there.
#
#   sudo tests/appliance/run.sh
#
# Runs as root on a Debian 12 machine that has only the Rust toolchain,
# Python 3, gcc and git; it installs the rest itself (apt, cargo-deb, and
# cargo-about for the copyright check: packaging/copyright.sh).
# Ends with "N passed, M failed" and exits non-zero if any check failed.
#
# Safety on the build machine: the host kernel is shared with the chroot, so
# the chroot's /proc/sys and /sys are mounted read-only (the package's
# postinst must tolerate that) and the host's sysctls are compared before and
# after. Nothing here runs sysctl -w or widens a port range on the host.
#
# Environment:
#   EDGEGATE_CI_CACHE   cache directory (default /var/cache/edgegate-ci): a
#                       tarball of the debootstrapped root per day, and the
#                       .debs apt downloaded into it. Optional.
#   EDGEGATE_CI_MIRROR  Debian mirror; default: the one in /etc/apt/sources.list*.
#   EDGEGATE_CI_KEEP=1  keep the work directory for inspection.
#   EDGEGATE_CI_DEB     test this prebuilt edgegate_*.deb instead of building one.
#
# shellcheck disable=SC2317  # functions run through check/trap look unreachable
# shellcheck disable=SC2016  # dpkg-query formats (${Status}) are literal on purpose
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HERE=$REPO/tests/appliance
SUITE=bookworm
CACHE_DIR=${EDGEGATE_CI_CACHE:-/var/cache/edgegate-ci}
# shellcheck source=tests/tools/checks.sh
source "$REPO/tests/tools/checks.sh"
# shellcheck source=tests/tools/debian.sh
source "$REPO/tests/tools/debian.sh"
CHECKS_POLL_SECS=0.2

if [ "$(id -u)" -ne 0 ]; then
    echo "run.sh: must run as root (debootstrap, chroot, mounts)" >&2
    exit 2
fi

WORK=$(mktemp -d /var/tmp/edgegate-appliance.XXXXXX)
ROOT=$WORK/root
CHECKS_LOG=$WORK/checks.log
CHECKS_NOTE="Logs: $WORK"
PIDS=() # background processes we started

cleanup() {
    stop_pids "${PIDS[@]}"
    debian_unmount_all
    # Keep the logs and the .deb; drop the root and the large -dbgsym
    # (debian_remove_root refuses while anything is still mounted in it).
    if [ "${EDGEGATE_CI_KEEP:-0}" != 1 ] && debian_remove_root "$ROOT"; then
        rm -f "$WORK"/out/*.ddeb
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# In the test root. `in_root_as_edgegate` runs as the package's system user
# with the supplementary groups it has in the root's /etc/group.
in_root() {
    chroot "$ROOT" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8 "$@"
}
in_root_as_edgegate() {
    chroot --userspec="$EG_UID:$EG_GID" --groups="$EG_GROUPS" "$ROOT" \
        /usr/bin/env -i PATH=/usr/bin:/bin LC_ALL=C.UTF-8 "$@"
}

host_sysctls() {
    cat /proc/sys/fs/nr_open /proc/sys/fs/file-max /proc/sys/net/ipv4/ip_local_port_range \
        /proc/sys/net/core/somaxconn /proc/sys/vm/max_map_count /proc/sys/net/ipv4/tcp_rmem 2>/dev/null
}
HOST_SYSCTLS_BEFORE=$(host_sysctls)

tcp_open() {
    python3 -c 'import socket, sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=1).close()' "$1" 2>/dev/null
}

# ---------------------------------------------------------------------------
step "Tools on the build machine"
# ---------------------------------------------------------------------------
export DEBIAN_FRONTEND=noninteractive
# binutils: objcopy/strip for cargo-deb; dpkg-dev: dpkg-shlibdeps for $auto.
need_pkgs=(lintian debootstrap debian-archive-keyring systemd dpkg-dev binutils ca-certificates)
debian_install "$WORK/apt-host.log" "${need_pkgs[@]}"
check "build tools installed (${need_pkgs[*]})" \
    dpkg-query -W -f='${Status}\n' "${need_pkgs[@]}"
if ! command -v cargo-deb >/dev/null; then
    echo "installing cargo-deb"
    cargo install cargo-deb --locked >"$WORK/cargo-install.log" 2>&1
fi
check "cargo-deb available" cargo deb --version
if ! command -v lintian >/dev/null || ! command -v debootstrap >/dev/null || ! command -v cargo-deb >/dev/null; then
    finish
fi

# ---------------------------------------------------------------------------
step "Build the package (packaging/build-deb.sh: cargo deb -p edgegate, md5sums)"
# ---------------------------------------------------------------------------
mkdir -p "$WORK/out"
if [ -n "${EDGEGATE_CI_DEB:-}" ]; then
    cp "$EDGEGATE_CI_DEB" "$WORK/out/" && echo "using prebuilt $EDGEGATE_CI_DEB (EDGEGATE_CI_DEB)"
elif "$REPO/packaging/build-deb.sh" --output "$WORK/out/" >"$WORK/cargo-deb.log" 2>&1; then
    pass "packaging/build-deb.sh builds the package"
else
    fail "packaging/build-deb.sh builds the package" "see $WORK/cargo-deb.log"
    tail -n 30 "$WORK/cargo-deb.log"
    finish
fi
DEB=$(find "$WORK/out" -maxdepth 1 -name 'edgegate_*.deb' | head -n 1)
echo "package: $DEB ($(du -h "$DEB" | cut -f1))"
VERSION=$(dpkg-deb -f "$DEB" Version)
UPSTREAM_VERSION=${VERSION%-*}
dpkg-deb -c "$DEB" >"$WORK/contents.txt"
dpkg-deb -e "$DEB" "$WORK/control"

deb_has() { grep -qE " \./$1\$" "$WORK/contents.txt"; }
for f in usr/bin/edgegate usr/lib/systemd/system/edgegate.service \
    usr/lib/sysctl.d/60-edgegate.conf usr/lib/sysusers.d/edgegate.conf \
    etc/edgegate/edgegate.toml usr/share/man/man1/edgegate.1.gz \
    usr/share/doc/edgegate/copyright usr/share/doc/edgegate/changelog.Debian.gz \
    usr/share/doc/edgegate/runbook.md usr/share/edgegate/monitoring/alerts.yml \
    usr/share/lintian/overrides/edgegate usr/lib/edgegate/edgegate-example \
    usr/lib/edgegate/certbot-deploy-hook usr/lib/systemd/system/edgegate-example.service; do
    check "package contains /$f" deb_has "$f"
done
check "/etc/edgegate/edgegate.toml is a conffile" grep -qx /etc/edgegate/edgegate.toml "$WORK/control/conffiles"
# md5sums: every regular file of the package but the conffiles, each sum right.
md5sums_verify() {
    local data=$WORK/data listed files
    rm -rf "$data" && mkdir -p "$data" && dpkg-deb -x "$DEB" "$data" || return 1
    (cd "$data" && md5sum --quiet -c "$WORK/control/md5sums") || return 1
    listed=$(awk '{print $2}' "$WORK/control/md5sums" | LC_ALL=C sort)
    files=$(cd "$data" && find . -type f -printf '%P\n' | LC_ALL=C sort |
        grep -vxF -f <(sed 's#^/##' "$WORK/control/conffiles"))
    diff <(echo "$listed") <(echo "$files") || return 1
    echo "$(wc -l <"$WORK/control/md5sums") files listed and verified"
}
check "control has md5sums" test -s "$WORK/control/md5sums"
check "md5sums lists every file but the conffiles, each sum matches" md5sums_verify
# The copyright file covers every crate the binary links: it is generated
# from Cargo.lock by cargo-about (pinned; installed into the CI cache on
# first use) and must be current.
check "packaging/copyright is current (packaging/copyright.sh --check: cargo-about on Cargo.lock)" \
    "$REPO/packaging/copyright.sh" --check
check "shipped copyright is packaging/copyright" \
    bash -c "dpkg-deb --fsys-tarfile '$DEB' | tar -xOf - ./usr/share/doc/edgegate/copyright | cmp - '$REPO/packaging/copyright'"
check "Depends on systemd and ssl-cert" \
    bash -c "dpkg-deb -f '$DEB' Depends | tr ',' '\n' | grep -qw ssl-cert && dpkg-deb -f '$DEB' Depends | tr ',' '\n' | grep -qw systemd"
check "shipped config is a copy of gateway/config/edgegate.toml" \
    bash -c "dpkg-deb --fsys-tarfile '$DEB' | tar -xOf - ./etc/edgegate/edgegate.toml | cmp - '$REPO/gateway/config/edgegate.toml'"
check "changelog's latest entry is the package version ($VERSION)" \
    bash -c "head -n 1 '$REPO/packaging/changelog' | grep -qF '($VERSION)'"
# The upgrade policy lives in the maintainer scripts: postinst hands a running
# gateway over (edgegate upgrade --wait) after the generated fragments and
# restarts only one that cannot hand over (exit 69); prerm stops the unit only
# on remove.
postinst_hands_over() {
    local p=$WORK/control/postinst
    grep -Eq '^ +edgegate upgrade --wait \|\| rc=' "$p" &&
        [ "$(grep -Ec 'deb-systemd-invoke (restart|try-restart)' "$p")" = 1 ] &&
        grep -B2 'deb-systemd-invoke restart' "$p" | grep -q '69)' &&
        # The call comes after the fragments (daemon-reload first).
        [ "$(grep -n 'daemon-reload' "$p" | tail -n 1 | cut -d: -f1)" -lt "$(grep -n '^    upgrade_running "\$2"' "$p" | cut -d: -f1)" ]
}
check "postinst hands a running gateway over after daemon-reload, restarting only one that cannot (exit 69)" \
    postinst_hands_over
check "prerm stops the service only on remove, not on upgrade" \
    bash -c "grep -q 'deb-systemd-invoke stop' '$WORK/control/prerm' && grep -q '\"\$1\" = remove' '$WORK/control/prerm'"
check "postinst applies sysctl and creates the user with systemd-sysusers" \
    bash -c "grep -q systemd-sysctl '$WORK/control/postinst' && grep -q 'systemd-sysusers.*edgegate.conf' '$WORK/control/postinst'"

# Every key of the sysctl file must exist in this kernel (read-only check;
# "-" keys may belong to a module that is not loaded).
sysctl_keys_exist() {
    local key bad=0
    while read -r key; do
        case $key in
            -*) continue ;;
        esac
        [ -e "/proc/sys/${key//.//}" ] || { echo "unknown key: $key"; bad=1; }
    done < <(sed -n 's/^\(-\{0,1\}[a-z0-9_.]*\) *=.*/\1/p' "$REPO/sysctl/60-edgegate.conf")
    return "$bad"
}
check "every sysctl key in 60-edgegate.conf exists in the kernel" sysctl_keys_exist

# ---------------------------------------------------------------------------
step "lintian"
# ---------------------------------------------------------------------------
# The verdict: --fail-on error,warning, with the overrides shipped in the
# package (packaging/lintian-overrides) honoured. A second run lists every
# tag for the log: info tags and the overridden ones with their reasons
# (--show-overrides makes lintian count overridden tags, so not for the verdict).
lintian --fail-on error,warning --tag-display-limit 0 "$DEB" >"$WORK/lintian-verdict.txt" 2>&1
lintian_rc=$?
lintian --fail-on none --display-info --show-overrides --tag-display-limit 0 "$DEB" 2>&1 |
    grep -v 'running with root privileges' >"$WORK/lintian.txt"
cat "$WORK/lintian.txt"
LINTIAN_SUMMARY="$(grep -c '^E: ' "$WORK/lintian.txt") errors, $(grep -c '^W: ' "$WORK/lintian.txt") warnings, $(grep -c '^I: ' "$WORK/lintian.txt") info, $(grep -c '^O: ' "$WORK/lintian.txt") overridden"
echo "lintian: $LINTIAN_SUMMARY"
if [ "$lintian_rc" -eq 0 ] && ! grep -qE '^[EW]: ' "$WORK/lintian-verdict.txt"; then
    pass "lintian: no errors, no warnings"
else
    fail "lintian: no errors, no warnings" "$LINTIAN_SUMMARY"
fi

# ---------------------------------------------------------------------------
step "Fresh Debian 12 root (debootstrap --variant=minbase)"
# ---------------------------------------------------------------------------
MIRROR=${EDGEGATE_CI_MIRROR:-$(debian_mirror "$SUITE")}
echo "mirror: $MIRROR"
mkdir -p "$CACHE_DIR/apt-archives/partial"
# A root per day: older ones are stale (security updates).
ROOT_TARBALL=$CACHE_DIR/debian-$SUITE-minbase-$(date +%Y%m%d).tar.gz
need_here "Debian 12 root ready (debootstrap --variant=minbase $SUITE, or today's cache)" \
    debian_root "$ROOT" "$ROOT_TARBALL" "$WORK/debootstrap.log" "$SUITE" "$MIRROR" \
    --cache-dir="$CACHE_DIR/apt-archives"
find "$CACHE_DIR" -maxdepth 1 -name "debian-$SUITE-minbase-*.tar.gz" ! -name "${ROOT_TARBALL##*/}" -delete

# Mounts: /proc with /proc/sys read-only (the host kernel is shared; the
# package must cope with a read-only /proc/sys), /sys read-only, the host's
# /dev, and the apt download cache.
debian_mount_proc "$ROOT" &&
    debian_mount --bind /sys "$ROOT/sys" &&
    mount -o remount,bind,ro "$ROOT/sys" &&
    debian_mount --bind /dev "$ROOT/dev" &&
    debian_mount --bind "$CACHE_DIR/apt-archives" "$ROOT/var/cache/apt/archives"
mounts_rc=$?
check "chroot mounts (proc, read-only /proc/sys and /sys, dev)" \
    bash -c "[ $mounts_rc -eq 0 ] && ! touch '$ROOT/proc/sys/vm/max_map_count' 2>/dev/null"
[ "$mounts_rc" -eq 0 ] || finish

cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
# No service may start inside the chroot (there is no systemd in it anyway).
printf '#!/bin/sh\nexit 101\n' >"$ROOT/usr/sbin/policy-rc.d"
chmod 755 "$ROOT/usr/sbin/policy-rc.d"
printf 'deb %s %s main\ndeb %s %s-updates main\n' "$MIRROR" "$SUITE" "$MIRROR" "$SUITE" >"$ROOT/etc/apt/sources.list"

# ---------------------------------------------------------------------------
step "apt install ./$(basename "$DEB") in the root"
# ---------------------------------------------------------------------------
cp "$DEB" "$ROOT/root/"
DEB_IN_ROOT=/root/$(basename "$DEB")
if in_root apt-get update -q >"$WORK/apt-root.log" 2>&1 &&
    in_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "./${DEB_IN_ROOT#/}" >>"$WORK/apt-root.log" 2>&1 <<<"" ; then
    pass "apt install ./$(basename "$DEB") (with dependencies) succeeds"
else
    fail "apt install ./$(basename "$DEB") (with dependencies) succeeds" "see $WORK/apt-root.log"
    tail -n 30 "$WORK/apt-root.log"
    finish
fi
grep -i 'edgegate' "$WORK/apt-root.log" | grep -v '^Get:\|^Selecting\|^Preparing\|^Unpacking' || true
# What postinst ran: systemd-sysctl must parse every key of the file and
# reach the (read-only) /proc/sys for each, skipping the refused writes.
sysctl_parsed_in_root() {
    local out key bad=0
    out=$(chroot "$ROOT" /usr/bin/env -i SYSTEMD_LOG_LEVEL=debug /usr/lib/systemd/systemd-sysctl 60-edgegate.conf 2>&1) ||
        { echo "systemd-sysctl failed: $out"; return 1; }
    while read -r key; do
        grep -qF "Setting '/proc/sys/${key//.//}'" <<<"$out" || { echo "not applied: $key"; bad=1; }
    done < <(sed -n 's/^\([a-z0-9_.]*\) *=.*/\1/p' "$ROOT/usr/lib/sysctl.d/60-edgegate.conf")
    if grep -Ei 'invalid|failed|unknown|line [0-9]' <<<"$out"; then bad=1; fi
    return "$bad"
}
check "systemd-sysctl parses every key, read-only /proc/sys tolerated" sysctl_parsed_in_root
check "host kernel settings untouched" bash -c "[ \"\$1\" = \"\$2\" ]" _ "$HOST_SYSCTLS_BEFORE" "$(host_sysctls)"
# dpkg keeps the package's md5sums; --verify prints a line per file that differs.
dpkg_verify() {
    local out
    cmp "$WORK/control/md5sums" "$ROOT/var/lib/dpkg/info/edgegate.md5sums" || return 1
    out=$(in_root dpkg --verify edgegate 2>&1) || { echo "$out"; return 1; }
    [ -z "$out" ] || { echo "$out"; return 1; }
}
check "dpkg --verify edgegate: the installed files match the package's md5sums" dpkg_verify
check "package installed (dpkg status)" \
    bash -c "chroot '$ROOT' dpkg-query -W -f='\${Status}' edgegate | grep -qx 'install ok installed'"

# ---------------------------------------------------------------------------
step "Installed files and user"
# ---------------------------------------------------------------------------
PASSWD=$(in_root getent passwd edgegate)
check "user edgegate exists" test -n "$PASSWD"
check "user edgegate: system UID, home /nonexistent, shell nologin" \
    bash -c "IFS=: read -r _ _ uid _ _ home shell <<<\"\$1\"; [ \"\$uid\" -lt 1000 ] && [ \"\$home\" = /nonexistent ] && [ \"\$shell\" = /usr/sbin/nologin ]" _ "$PASSWD"
check "group edgegate exists" in_root getent group edgegate
check "user edgegate is in group ssl-cert" bash -c "chroot '$ROOT' id -nG edgegate | tr ' ' '\n' | grep -qx ssl-cert"
check "no home directory created" test ! -e "$ROOT/nonexistent"
EG_UID=$(in_root id -u edgegate 2>/dev/null)
EG_GID=$(in_root id -g edgegate 2>/dev/null)
EG_GROUPS=$(in_root id -G edgegate 2>/dev/null | tr ' ' ',')
for f in /usr/bin/edgegate /usr/lib/systemd/system/edgegate.service /usr/lib/sysctl.d/60-edgegate.conf \
    /usr/lib/sysusers.d/edgegate.conf /etc/edgegate/edgegate.toml /usr/share/man/man1/edgegate.1.gz \
    /usr/share/doc/edgegate/copyright /usr/share/doc/edgegate/changelog.Debian.gz; do
    check "installed: $f" test -f "$ROOT$f"
done
check "/usr/bin/edgegate is root-owned and 0755" \
    bash -c "[ \"\$(stat -c '%U %a' '$ROOT/usr/bin/edgegate')\" = 'root 755' ]"
check "edgegate.service enabled (multi-user.target.wants)" \
    test -L "$ROOT/etc/systemd/system/multi-user.target.wants/edgegate.service"
# docs/install.md, "See an echo": shipped, started by hand, never at boot.
check "edgegate-example.service installed but not enabled" \
    bash -c "test -f '$ROOT/usr/lib/systemd/system/edgegate-example.service' && ! find '$ROOT/etc/systemd/system' -name edgegate-example.service | grep -q ."
for f in /usr/lib/edgegate/edgegate-example /usr/lib/edgegate/certbot-deploy-hook; do
    check "$f is root-owned and 0755" bash -c "[ \"\$(stat -c '%U %a' '$ROOT$f')\" = 'root 755' ]"
done
check "edgegate --version reports $UPSTREAM_VERSION" \
    bash -c "chroot '$ROOT' /usr/bin/edgegate --version | grep -qF '$UPSTREAM_VERSION'"
check "man edgegate renders" bash -c "zcat '$ROOT/usr/share/man/man1/edgegate.1.gz' | grep -q '^\\.TH EDGEGATE 1'"
check "edgegate check-config accepts the shipped config (as user edgegate)" \
    in_root_as_edgegate /usr/bin/edgegate check-config --config /etc/edgegate/edgegate.toml
mkdir -p "$ROOT/srv/edgegate-test"
printf '[limits]\nmax_clients = "many"\nno_such_key = 1\n' >"$ROOT/srv/edgegate-test/bad.toml"
check_bad_config() {
    local rc=0
    in_root_as_edgegate /usr/bin/edgegate check-config --config /srv/edgegate-test/bad.toml || rc=$?
    echo "exit status $rc"
    [ "$rc" -eq 78 ]
}
check "edgegate check-config rejects a bad config with exit status 78" check_bad_config

# ---------------------------------------------------------------------------
step "systemd-analyze on the installed unit"
# ---------------------------------------------------------------------------
# verify runs `man` for Documentation=man:edgegate(1): man-db is not in minbase.
in_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends man-db >"$WORK/apt-man-db.log" 2>&1 <<<""
verify_unit() {
    local out rc=0
    out=$(in_root systemd-analyze verify "/usr/lib/systemd/system/$1" 2>&1) || rc=$?
    printf '%s\n' "$out"
    [ "$rc" -eq 0 ] && [ -z "$out" ]
}
check "systemd-analyze verify edgegate.service (exit 0, no warnings)" verify_unit edgegate.service
check "systemd-analyze verify edgegate-example.service (exit 0, no warnings)" verify_unit edgegate-example.service
in_root systemd-analyze security --offline=true --no-pager /usr/lib/systemd/system/edgegate.service >"$WORK/security.txt" 2>&1
SECURITY_SCORE=$(sed -n 's/.*Overall exposure level for edgegate.service: \([0-9.]*\).*/\1/p' "$WORK/security.txt")
echo "systemd-analyze security: ${SECURITY_SCORE:-unparsed}"
grep '✗' "$WORK/security.txt" | sed 's/^/    /' || true
check "systemd-analyze security exposure ${SECURITY_SCORE:-?} <= 2.0" \
    awk -v s="$SECURITY_SCORE" 'BEGIN { exit !(s != "" && s + 0 <= 2.0) }'

# ---------------------------------------------------------------------------
step "Run the gateway in the root as user edgegate"
# ---------------------------------------------------------------------------
CLIENT_PORT=$(free_port)
ADMIN_PORT=$(free_port)
SERVICE_PORT=$(free_port)
T=/srv/edgegate-test
TLS=$T/tls
# Two leaf certificates (CA:FALSE, as certbot's are: rustls refuses a CA
# certificate as a server's) for 127.0.0.1/localhost (a, then b for the reload), each in
# a directory laid out as certbot's live/<name>/ and root-only as certbot keeps
# it. The package's certbot deploy hook installs them for the gateway
# (docs/install.md, "Certificates"); EDGEGATE_TLS_DIR keeps them out of
# /etc/edgegate, which the purge below must find empty.
make_lineage() {
    mkdir -p "$ROOT$T/live" && mkdir -m 700 "$ROOT$T/live/$1" &&
        in_root openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
            -subj "/CN=localhost/O=edgegate-appliance-$1" -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
            -addext basicConstraints=critical,CA:FALSE \
            -keyout "$T/live/$1/privkey.pem" -out "$T/live/$1/fullchain.pem"
}
make_lineage a >"$WORK/openssl.log" 2>&1 && make_lineage b >>"$WORK/openssl.log" 2>&1
check "test certificates a and b created (certbot's live/ layout, root-only)" \
    test -s "$ROOT$T/live/a/fullchain.pem" -a -s "$ROOT$T/live/b/fullchain.pem"
run_hook() {
    in_root env RENEWED_LINEAGE="$T/live/$1" EDGEGATE_TLS_DIR="$TLS" /usr/lib/edgegate/certbot-deploy-hook
}
hook_installs() { # LINEAGE: installed with the documented owners and modes
    local out rc=0 modes
    out=$(run_hook "$1" 2>&1) || rc=$?
    echo "$out"
    modes=$(in_root stat -c '%n %U:%G %a' "$TLS" "$TLS/fullchain.pem" "$TLS/privkey.pem")
    echo "$modes"
    [ "$rc" = 0 ] && grep -q 'not running' <<<"$out" &&
        [ "$modes" = "$TLS root:root 755
$TLS/fullchain.pem root:root 644
$TLS/privkey.pem root:edgegate 640" ] &&
        in_root cmp "$T/live/$1/fullchain.pem" "$TLS/fullchain.pem" &&
        in_root cmp "$T/live/$1/privkey.pem" "$TLS/privkey.pem"
}
check "certbot deploy hook installs certificate a: fullchain.pem root:root 0644, privkey.pem root:edgegate 0640; no systemd here, so no reload" \
    hook_installs a
# The test config is the shipped one with loopback ports, the test
# certificate, one worker, a small client cap and a 2 s drain window.
awk -v client="127.0.0.1:$CLIENT_PORT" -v admin="127.0.0.1:$ADMIN_PORT" \
    -v service="127.0.0.1:$SERVICE_PORT" -v cert="$TLS/fullchain.pem" -v key="$TLS/privkey.pem" '
    /^\[/ { section = $0 }
    section == "[admin]" && /^bind *=/ { print "bind = \"" admin "\""; next }
    section == "[[listener]]" && /^bind *=/ { print "bind = \"" client "\""; next }
    section == "[[listener]]" && /^tls_cert_path *=/ { print "tls_cert_path = \"" cert "\""; next }
    section == "[[listener]]" && /^tls_key_path *=/ { print "tls_key_path = \"" key "\""; next }
    section == "[[service]]" && /^addresses *=/ { print "addresses = [\"" service "\"]"; next }
    section == "[runtime]" && /^worker_threads *=/ { print "worker_threads = 1"; next }
    section == "[limits]" && /^max_clients *=/ { print "max_clients = 1000"; next }
    section == "[drain]" && /^drain_window_secs *=/ { print "drain_window_secs = 2"; next }
    section == "[drain]" && /^lb_grace_secs *=/ { print "lb_grace_secs = 0"; next }
    { print }' "$ROOT/etc/edgegate/edgegate.toml" >"$ROOT$T/edgegate.toml"
# As docs/install.md says to check: as the service's user, through runuser.
check "runuser -u edgegate -- edgegate check-config accepts the test config (the user reads the hook's files)" \
    in_root runuser -u edgegate -- /usr/bin/edgegate check-config --config $T/edgegate.toml

# The package's example service (what edgegate-example.service runs), as
# nobody, so /echo echoes.
chroot --userspec=65534:65534 "$ROOT" /usr/bin/env -i PATH=/usr/bin:/bin LC_ALL=C.UTF-8 \
    /usr/lib/edgegate/edgegate-example service --listen "127.0.0.1:$SERVICE_PORT" >"$WORK/example-service.log" 2>&1 &
PIDS+=($!)
SERVICE_UP=0
wait_for 20 tcp_open "$SERVICE_PORT" && SERVICE_UP=1
check "the packaged example service listens on 127.0.0.1:$SERVICE_PORT (edgegate-example service)" test "$SERVICE_UP" = 1

# systemd's side of Type=notify: a datagram socket the gateway reports to.
mkdir -p "$ROOT/run/edgegate-test"
chmod 755 "$ROOT/run/edgegate-test"
NOTIFY_LOG=$WORK/notify.log
: >"$NOTIFY_LOG"
python3 "$HERE/notify_listener.py" "$ROOT/run/edgegate-test/notify.sock" "$NOTIFY_LOG" &
PIDS+=($!)
wait_for 5 test -S "$ROOT/run/edgegate-test/notify.sock"

# chroot and env exec, so $! is the gateway itself.
chroot --userspec="$EG_UID:$EG_GID" --groups="$EG_GROUPS" "$ROOT" /usr/bin/env -i \
    PATH=/usr/bin:/bin LC_ALL=C.UTF-8 RUST_LOG=info \
    NOTIFY_SOCKET=/run/edgegate-test/notify.sock WATCHDOG_USEC=2000000 \
    /usr/bin/edgegate run --config $T/edgegate.toml >"$WORK/gateway.log" 2>&1 &
GATEWAY_PID=$!
PIDS+=("$GATEWAY_PID")
echo "gateway pid $GATEWAY_PID on 127.0.0.1:$CLIENT_PORT (admin $ADMIN_PORT, service $SERVICE_PORT)"

check "gateway sends READY=1 (sd_notify)" wait_for 20 grep -qx READY=1 "$NOTIFY_LOG"
check "gateway listens on 127.0.0.1:$CLIENT_PORT" wait_for 5 tcp_open "$CLIENT_PORT"
check "gateway runs as user edgegate" \
    bash -c "[ \"\$(stat -c %u /proc/$GATEWAY_PID)\" = '$EG_UID' ]"

cp "$ROOT$T/live/a/fullchain.pem" "$WORK/test-ca.pem"
ws_session() {
    local out expected
    # With the example service the links need a moment to come up.
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        out=$(python3 "$HERE/ws_client.py" echo 127.0.0.1 "$CLIENT_PORT" /echo "$WORK/test-ca.pem" "hello edgegate")
        echo "$out"
        [ "$out" = "echo hello edgegate" ] && return 0
        [ "$SERVICE_UP" = 1 ] || break
        sleep 1
    done
    expected="close 1013"
    [ "$SERVICE_UP" = 0 ] && [ "$out" = "$expected" ]
}
if [ "$SERVICE_UP" = 1 ]; then
    check "TLS WebSocket client on loopback: 101 upgrade, text echoed by the example service" ws_session
else
    check "TLS WebSocket client on loopback: 101 upgrade, session closed 1013 (no service)" ws_session
fi
# docs/install.md, "See an echo": the packaged client, as an unprivileged
# user, verifying the certificate against the CA it is given.
packaged_echo() {
    local out
    out=$(chroot --userspec=65534:65534 "$ROOT" /usr/bin/env -i PATH=/usr/bin:/bin \
        /usr/lib/edgegate/edgegate-example echo --connect "127.0.0.1:$CLIENT_PORT" --ca "$TLS/fullchain.pem" "hello package")
    echo "$out"
    [ "$out" = "hello package" ]
}
check "the packaged client echoes through the gateway (edgegate-example echo, certificate verified)" packaged_echo
# A renewal: the hook installs certificate b; SIGHUP (what `systemctl reload`
# sends after its check-config) makes new clients get it. Under systemd the
# hook reloads by itself: the VM lab checks that (tests/lab/run.sh, step 5).
cert_served() {
    in_root openssl s_client -connect "127.0.0.1:$CLIENT_PORT" -servername localhost </dev/null 2>/dev/null |
        in_root openssl x509 -noout -subject 2>/dev/null | grep -o 'edgegate-appliance-[a-z]*'
}
serves() { [ "$(cert_served)" = "edgegate-appliance-$1" ]; }
check "before the renewal new clients get certificate a" serves a
check "certbot deploy hook installs the renewal (certificate b) over a" hook_installs b
kill -HUP "$GATEWAY_PID" 2>/dev/null
check "after SIGHUP new clients get certificate b" wait_for 10 serves b
cp "$ROOT$T/live/b/fullchain.pem" "$WORK/test-ca.pem"
# The admin endpoint is checked once the gateway serves it (it is skipped,
# not passed, while nothing listens on the admin port).
if tcp_open "$ADMIN_PORT"; then
    check "admin /healthz answers 200" \
        python3 -c 'import sys, urllib.request; sys.exit(urllib.request.urlopen("http://127.0.0.1:%s/healthz" % sys.argv[1], timeout=5).status != 200)' "$ADMIN_PORT"
else
    echo "SKIP: admin /healthz (nothing listens on 127.0.0.1:$ADMIN_PORT)"
fi
check "gateway pets the watchdog (WATCHDOG=1 with WATCHDOG_USEC=2 s)" wait_for 5 grep -qx WATCHDOG=1 "$NOTIFY_LOG"

# An idle client that must be drained with 1001 on SIGTERM.
python3 "$HERE/ws_client.py" hold 127.0.0.1 "$CLIENT_PORT" /echo "$WORK/test-ca.pem" "$WORK/hold.ready" >"$WORK/hold.out" 2>&1 &
HOLD_PID=$!
PIDS+=("$HOLD_PID")
wait_for 10 test -e "$WORK/hold.ready"

gateway_rc=0
if ! kill -0 "$GATEWAY_PID" 2>/dev/null; then
    gateway_rc="not running before SIGTERM"
fi
kill -TERM "$GATEWAY_PID" 2>/dev/null
stop_deadline=$(($(date +%s) + 30))
while kill -0 "$GATEWAY_PID" 2>/dev/null && [ "$(date +%s)" -lt "$stop_deadline" ]; do
    sleep 0.2
done
if kill -0 "$GATEWAY_PID" 2>/dev/null; then
    gateway_rc=timeout
    kill -KILL "$GATEWAY_PID" 2>/dev/null
fi
wait "$GATEWAY_PID" 2>/dev/null
wait_rc=$?
[ "$gateway_rc" != 0 ] || gateway_rc=$wait_rc
check "SIGTERM: gateway drains and exits with status 0 (got $gateway_rc)" test "$gateway_rc" = 0
check "SIGTERM: gateway sends STOPPING=1" grep -qx STOPPING=1 "$NOTIFY_LOG"
wait "$HOLD_PID" 2>/dev/null
check "SIGTERM: idle client closed with 1001 (going away)" grep -qx "close 1001" "$WORK/hold.out"
echo "--- gateway log (last lines)"
tail -n 15 "$WORK/gateway.log"

# ---------------------------------------------------------------------------
step "Upgrade path (reinstall) and purge"
# ---------------------------------------------------------------------------
if in_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --reinstall "./${DEB_IN_ROOT#/}" >"$WORK/apt-reinstall.log" 2>&1 <<<""; then
    pass "reinstall (postinst configure with an old version) succeeds"
else
    fail "reinstall (postinst configure with an old version) succeeds" "see $WORK/apt-reinstall.log"
fi
# No systemd runs in the root: the postinst touches no service.
check "reinstall in a root without systemd attempts no handover" \
    bash -c "! grep -q 'handing the running gateway over' '$WORK/apt-reinstall.log'"
check "conffile unchanged by reinstall" cmp "$ROOT/etc/edgegate/edgegate.toml" "$REPO/gateway/config/edgegate.toml"

if in_root env DEBIAN_FRONTEND=noninteractive apt-get purge -y -q edgegate >"$WORK/apt-purge.log" 2>&1 <<<""; then
    pass "apt purge edgegate succeeds"
else
    fail "apt purge edgegate succeeds" "see $WORK/apt-purge.log"
fi
purged_status() {
    local status
    status=$(chroot "$ROOT" dpkg-query -W -f='${Status}' edgegate 2>/dev/null)
    echo "dpkg status: ${status:-unknown}"
    [ -z "$status" ] || [ "${status##* }" = not-installed ]
}
check "purged: dpkg no longer knows edgegate (no config-files state)" purged_status
for f in /usr/bin/edgegate /etc/edgegate /usr/lib/systemd/system/edgegate.service \
    /usr/lib/edgegate /usr/lib/systemd/system/edgegate-example.service \
    /usr/lib/sysctl.d/60-edgegate.conf /usr/lib/sysusers.d/edgegate.conf \
    /usr/share/man/man1/edgegate.1.gz /usr/share/doc/edgegate \
    /etc/systemd/system/multi-user.target.wants/edgegate.service; do
    check "purged: $f gone" test ! -e "$ROOT$f" -a ! -L "$ROOT$f"
done
check "purge keeps the system user (documented policy)" in_root getent passwd edgegate

echo
echo "lintian: ${LINTIAN_SUMMARY:-not run}; systemd-analyze security: ${SECURITY_SCORE:-n/a}"
finish
