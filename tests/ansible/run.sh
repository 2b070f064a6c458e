#!/usr/bin/env bash
# Tests for ansible/: lint, syntax, and the playbook applied to a real
# Debian 12 root through the community.general.chroot connection.
#
#   sudo tests/ansible/run.sh                                       current Ansible
#   sudo EDGEGATE_ANSIBLE_CONTROLLER=debian12 tests/ansible/run.sh   Debian 12's own
#
# The roles support two controllers, and this suite runs with either:
#   current   ansible 11.13.0 (core 2.18) and ansible-lint 25.12.2, pinned,
#             from PyPI into a venv (the default);
#   debian12  Debian 12's own packages from apt: ansible 7.7 (core 2.14) and
#             ansible-lint 6.13, run from /usr/bin with Debian's Python.
# tests/run-all.sh runs it once with each (suites ansible and ansible-debian12).
#
# Needs root (debootstrap, chroot, mount), Python 3.11 with venv/pip and the
# Rust toolchain (to build the .deb when target/debian has none). Installs
# the rest itself: the controller (above), debootstrap from apt. Caches under
# $EDGEGATE_CI_CACHE (default /var/cache/edgegate-ci) and works without the
# cache.
#
# Environment:
#   EDGEGATE_ANSIBLE_CONTROLLER=current|debian12   which Ansible (default current)
#   EDGEGATE_DEB=path       use this .deb instead of target/debian/edgegate_*.deb
#   EDGEGATE_REBUILD_DEB=1  build the .deb even when one exists
#   EDGEGATE_CI_CACHE=dir   cache directory (venv, root tarball)
#   KEEP=1                  keep the work directory (the root) for inspection
#
# Prints `N passed, M failed` last; exits non-zero on any failure.
set -uo pipefail

# Versions that work together on Python 3.11: the `ansible` package bundles
# community.general (the chroot connection) so nothing comes from Galaxy.
ANSIBLE_VERSION=11.13.0       # ansible-core 2.18
ANSIBLE_LINT_VERSION=25.12.2
# Debian 12's: the `ansible` package (7.7, with community.general) depends on
# ansible-core 2.14; python3-cryptography makes the test certificate.
DEBIAN12_PACKAGES=(ansible ansible-core ansible-lint python3-cryptography)
CONTROLLER=${EDGEGATE_ANSIBLE_CONTROLLER:-current}
SUITE=bookworm
# python3: Ansible's modules; python3-apt: the apt module; systemd and
# ssl-cert: the package's dependencies (the playbook runs offline in the root).
ROOT_PACKAGES=python3,python3-apt,systemd,ssl-cert

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
ANSIBLE_DIR=$REPO/ansible
CACHE=${EDGEGATE_CI_CACHE:-/var/cache/edgegate-ci}
# shellcheck source=tests/tools/checks.sh
source "$REPO/tests/tools/checks.sh"
# shellcheck source=tests/tools/debian.sh
source "$REPO/tests/tools/debian.sh"

if [ "$(id -u)" -ne 0 ]; then
    fail "runs as root (debootstrap, chroot and mount need it)"
    finish
fi

if ! mkdir -p "$CACHE" 2>/dev/null || ! [ -w "$CACHE" ]; then
    CACHE=/tmp/edgegate-ci-cache
    mkdir -p "$CACHE"
fi
WORK=$(mktemp -d /tmp/edgegate-ansible.XXXXXX)
ROOT=$WORK/root
mkdir -p "$ROOT"
CHECKS_LOG=$WORK/checks.log
# Tools drop caches (.ansible/) into the current directory: keep them out of the repo.
cd "$WORK" || exit 1

cleanup() {
    cd /
    debian_unmount_all
    if [ "${KEEP:-0}" = 1 ]; then
        echo "kept $WORK"
    else
        debian_remove_root "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------------------
step "tools"
# ansible, ansible-playbook, ansible-lint and the Python with cryptography
# come from $BIN: the venv's bin or /usr/bin.
case $CONTROLLER in
current)
    VENV=$CACHE/venv-ansible-$ANSIBLE_VERSION-lint-$ANSIBLE_LINT_VERSION
    BIN=$VENV/bin
    install_venv() {
        rm -rf "$VENV"
        python3 -m venv "$VENV" &&
            "$VENV/bin/pip" install --quiet --disable-pip-version-check \
                "ansible==$ANSIBLE_VERSION" "ansible-lint==$ANSIBLE_LINT_VERSION"
    }
    venv_works() {
        "$BIN/ansible-playbook" --version >/dev/null 2>&1 &&
            "$BIN/ansible-lint" --version >/dev/null 2>&1 &&
            "$BIN/ansible-doc" -t connection community.general.chroot >/dev/null 2>&1
    }
    venv_works || install_venv >"$WORK/pip.log" 2>&1 || tail -20 "$WORK/pip.log"
    need "ansible $ANSIBLE_VERSION and ansible-lint $ANSIBLE_LINT_VERSION in a venv, with community.general.chroot" venv_works
    ;;
debian12)
    BIN=/usr/bin
    need "Debian 12's ${DEBIAN12_PACKAGES[*]} installed from apt" \
        debian_install "$WORK/apt-ansible.log" "${DEBIAN12_PACKAGES[@]}"
    # Debian 12's versions, not newer ones from elsewhere (backports, pip).
    debian12_versions() {
        "$BIN/ansible-playbook" --version | tee /dev/stderr | grep '^ansible-playbook \[core 2\.14\.' >/dev/null &&
            NO_COLOR=1 "$BIN/ansible-lint" --nocolor --version | tee /dev/stderr | grep '^ansible-lint 6\.13\.' >/dev/null &&
            "$BIN/ansible-doc" -t connection community.general.chroot >/dev/null
    }
    need "controller is Debian 12's: ansible-core 2.14, ansible-lint 6.13, community.general.chroot" debian12_versions
    ;;
*)
    fail "EDGEGATE_ANSIBLE_CONTROLLER is current or debian12, not '$CONTROLLER'"
    finish
    ;;
esac
echo "controller: $CONTROLLER ($("$BIN/ansible-playbook" --version | sed -n 1p); python $("$BIN/python3" -c 'import sys; print(sys.version.split()[0])'))"
export PATH=$BIN:$PATH

need "debootstrap is installed" debian_install "$WORK/apt.log" debootstrap

# ---------------------------------------------------------------------------
step "lint and syntax"
export ANSIBLE_CONFIG=$ANSIBLE_DIR/ansible.cfg
export ANSIBLE_NOCOLOR=1 ANSIBLE_FORCE_COLOR=0 NO_COLOR=1
lint() {
    (cd "$ANSIBLE_DIR" && ansible-lint --offline --profile production --nocolor --project-dir .) >"$WORK/lint.log" 2>&1
    local rc=$?
    grep -v '^WARNING: PATH altered' "$WORK/lint.log" | tail -30
    return $rc
}
check "ansible-lint is clean with the production profile" lint
syntax() {
    (cd "$ANSIBLE_DIR" && ansible-playbook -i inventory/example/hosts.yml --syntax-check site.yml)
}
check "ansible-playbook --syntax-check site.yml" syntax

# ---------------------------------------------------------------------------
step "package"
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
newest_deb() { ls -t "$TARGET_DIR"/debian/edgegate_*.deb 2>/dev/null | head -n 1; }
build_deb() {
    command -v cargo-deb >/dev/null || cargo install cargo-deb --locked --quiet || return 1
    "$REPO/packaging/build-deb.sh" >"$WORK/cargo-deb.log" 2>&1 || { tail -30 "$WORK/cargo-deb.log"; return 1; }
}
DEB=${EDGEGATE_DEB:-}
if [ -z "$DEB" ]; then
    DEB=$(newest_deb)
    if [ -z "$DEB" ] || [ "${EDGEGATE_REBUILD_DEB:-0}" = 1 ]; then
        echo "building the package: packaging/build-deb.sh"
        build_deb
        DEB=$(newest_deb)
    fi
fi
need "edgegate .deb is available (${DEB:-none})" test -f "${DEB:-/nonexistent}"
DEB_VERSION=$(dpkg-deb --field "$DEB" Version)

# edgegate reads every EDGEGATE_* variable as a config override, and the
# chroot connection hands this environment to `edgegate check-config` (the
# template's validate:). Ours are read above; none may reach the root.
while read -r name; do unset "$name"; done < <(compgen -e | grep '^EDGEGATE_')

# ---------------------------------------------------------------------------
step "Debian 12 root"
MIRROR=$(debian_mirror "$SUITE")
TARBALL=$CACHE/root-$SUITE-minbase-$(echo "$ROOT_PACKAGES" | md5sum | cut -c1-8).tar.gz
need "Debian 12 minbase root with python3 (debootstrap or cache)" \
    debian_root "$ROOT" "$TARBALL" "$WORK/debootstrap.log" "$SUITE" "$MIRROR" --include="$ROOT_PACKAGES"
need "root is Debian 12" grep -q '^12' "$ROOT/etc/debian_version"

# Facts need /proc. /proc/sys stays read-only so nothing in the root (the
# package's postinst runs systemd-sysctl) can change this machine's kernel.
# In this shell: cleanup unmounts what debian_mount remembered.
need_here "/proc mounted in the root (/proc/sys read-only)" debian_mount_proc "$ROOT"

# ---------------------------------------------------------------------------
step "inventory"
# A test certificate for the role to install (cryptography comes with ansible).
"$BIN/python3" - "$WORK" <<'PY' || fail "test certificate generated"
import datetime, sys
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
key = ec.generate_private_key(ec.SECP256R1())
name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edge.test")])
now = datetime.datetime.now(datetime.timezone.utc)
cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("edge.test")]), critical=False)
        .sign(key, hashes.SHA256()))
open(f"{sys.argv[1]}/edge.crt", "wb").write(cert.public_bytes(serialization.Encoding.PEM))
open(f"{sys.argv[1]}/edge.key", "wb").write(key.private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
PY

# 1.2 M clients at 4 KiB + 1 GiB reserved (about 5.7 GiB): LimitNOFILE and
# nr_open come out above the 1048576 floor, so the arithmetic shows.
MAX_CLIENTS=1200000
FD_HEADROOM=65536
CLIENT_BYTES=4096
DRAIN_SECS=45
GRACE_SECS=10   # the role's default edgegate_lb_grace_secs
STOP_SECS=$((GRACE_SECS + DRAIN_SECS + 60))
RUNBOOK_URL=https://wiki.example.net/edgegate/runbook
# A Prometheus rules directory, as Prometheus's own role would create it.
mkdir -p "$ROOT/etc/prometheus/rules"
INVENTORY=$WORK/inventory.yml
cat >"$INVENTORY" <<EOF
all:
  children:
    edgegate:
      hosts:
        debian12-root:
          ansible_connection: community.general.chroot
          ansible_host: $ROOT
          ansible_python_interpreter: /usr/bin/python3
      vars:
        edgegate_package_source: deb
        edgegate_deb_src: $DEB
        edgegate_max_clients: $MAX_CLIENTS
        edgegate_fd_headroom: $FD_HEADROOM
        edgegate_host_client_memory_bytes: $CLIENT_BYTES
        edgegate_host_reserved_memory_mb: 1024
        edgegate_drain_window_secs: $DRAIN_SECS
        edgegate_runbook_url: $RUNBOOK_URL
        edgegate_alert_rules_path: /etc/prometheus/rules/edgegate.yml
        edgegate_tls_certificates:
          - name: edge
            cert_src: $WORK/edge.crt
            key_src: $WORK/edge.key
        edgegate_listeners:
          - name: public
            bind: "0.0.0.0:8443"
          - name: devices
            bind: "0.0.0.0:8883"
            protocol: framed
            backlog: 1024
        edgegate_routes:
          - {listener: public, path: /echo, service: example}
          - {listener: devices, path: /, service: example}
EOF

# playbook LOG [ansible-playbook args...]: run site.yml against the root.
playbook() {
    local out=$1
    shift
    (cd "$ANSIBLE_DIR" && ansible-playbook -i "$INVENTORY" site.yml "$@") >"$out" 2>&1
}
recap() { grep -A1 '^PLAY RECAP' "$1" | tail -n 1; }
in_root() { chroot "$ROOT" "$@"; }

# ---------------------------------------------------------------------------
step "preflight refuses a host that cannot carry the client budget"
playbook "$WORK/preflight.log" --tags preflight -e edgegate_max_clients=100000000
rc=$?
check "preflight fails for 100 M clients on this host" test "$rc" -ne 0
check "preflight says why: not enough memory" grep -q 'Not enough memory' "$WORK/preflight.log"
grep -o 'Not enough memory[^"]*' "$WORK/preflight.log" | head -n 1 | sed 's/^/    /'
check "preflight changed nothing in the root" test ! -e "$ROOT/etc/sysctl.d/70-edgegate-host.conf"

# ---------------------------------------------------------------------------
step "first run"
HOST_NR_OPEN=$(cat /proc/sys/fs/nr_open)
playbook "$WORK/run1.log"
rc=$?
check "site.yml applies to the root (rc $rc): $(recap "$WORK/run1.log")" test "$rc" -eq 0
[ "$rc" -eq 0 ] || tail -40 "$WORK/run1.log"
echo "skipped in the chroot, as the run said:"
grep -o 'In a chroot:[^"]*' "$WORK/run1.log" | sort -u | sed 's/^/    /'
check "run says service start, reload and sysctl apply are skipped in the chroot" \
    bash -c "grep -q 'In a chroot: edgegate enabled at boot; start skipped' '$WORK/run1.log' &&
             grep -q 'written but not applied' '$WORK/run1.log' &&
             grep -q 'is not checked' '$WORK/run1.log'"

# Package
status=$(in_root dpkg-query --show --showformat='${Status} ${Version}' edgegate 2>/dev/null)
check "package edgegate $DEB_VERSION installed ($status)" test "$status" = "install ok installed $DEB_VERSION"
check "no policy-rc.d left behind" test ! -e "$ROOT/usr/sbin/policy-rc.d"
check "package file kept in /var/cache/edgegate" test -f "$ROOT/var/cache/edgegate/$(basename "$DEB")"

# Certificates
# Owner and group as the root names them.
mode_of() { in_root stat -c '%a %U:%G' "${1#"$ROOT"}" 2>/dev/null; }
check "certificate installed 0640 root:edgegate" test "$(mode_of "$ROOT/etc/edgegate/tls/edge.crt")" = "640 root:edgegate"
check "key installed 0640 root:edgegate" test "$(mode_of "$ROOT/etc/edgegate/tls/edge.key")" = "640 root:edgegate"
check "key is the one given" cmp -s "$WORK/edge.key" "$ROOT/etc/edgegate/tls/edge.key"

# Configuration
CONFIG=$ROOT/etc/edgegate/edgegate.toml
check "config is templated (Ansible managed)" grep -q 'Ansible managed' "$CONFIG"
check "config is 0640 root:edgegate" test "$(mode_of "$CONFIG")" = "640 root:edgegate"
check "config has max_clients = $MAX_CLIENTS" grep -qx "max_clients = $MAX_CLIENTS" "$CONFIG"
check "config has drain_window_secs = $DRAIN_SECS" grep -qx "drain_window_secs = $DRAIN_SECS" "$CONFIG"
check "config has lb_grace_secs = $GRACE_SECS" grep -qx "lb_grace_secs = $GRACE_SECS" "$CONFIG"
check "config has both listeners on the installed certificate" \
    test "$(grep -c '^tls_cert_path = "/etc/edgegate/tls/edge.crt"' "$CONFIG")" -eq 2
check "config passes edgegate check-config in the root" \
    in_root /usr/bin/edgegate check-config --config /etc/edgegate/edgegate.toml
check "template declares validate: edgegate check-config" \
    grep -q 'validate: /usr/bin/edgegate check-config --config %s' "$ANSIBLE_DIR/roles/edgegate/tasks/config.yml"

# Kernel settings, recomputed here from the root's facts.
"$BIN/ansible" all -i "$INVENTORY" -m ansible.builtin.setup -a 'filter=ansible_memtotal_mb' \
    >"$WORK/facts.log" 2>&1
MEM_MB=$(grep -o '"ansible_memtotal_mb": [0-9]*' "$WORK/facts.log" | grep -o '[0-9]*$')
PAGE=$(in_root getconf PAGESIZE)
check "facts of the root read (MemTotal ${MEM_MB:-?} MiB, page ${PAGE:-?} B)" test -n "$MEM_MB" -a -n "$PAGE"
MEM_MB=${MEM_MB:-0}
PAGE=${PAGE:-4096}
MEM_BYTES=$((MEM_MB * 1048576))
NOFILE=$((MAX_CLIENTS + FD_HEADROOM))
NR_OPEN=$((NOFILE > 1048576 ? NOFILE : 1048576))
TCP_MEM="$((MEM_BYTES * 20 / 100 / PAGE)) $((MEM_BYTES * 30 / 100 / PAGE)) $((MEM_BYTES * 40 / 100 / PAGE))"
FILE_MAX=$((2 * NOFILE > MEM_MB * 1024 / 10 ? 2 * NOFILE : MEM_MB * 1024 / 10))
CT_MAX=$((MAX_CLIENTS + MAX_CLIENTS / 4))
SYSCTL=$ROOT/etc/sysctl.d/70-edgegate-host.conf
value_of() { sed -n "s/^-\{0,1\}$1 = //p" "$SYSCTL"; }
check "sysctl file written" test -f "$SYSCTL"
check "fs.nr_open = max($MAX_CLIENTS + $FD_HEADROOM, 1048576) = $NR_OPEN ($(value_of fs.nr_open))" \
    test "$(value_of fs.nr_open)" = "$NR_OPEN"
check "net.ipv4.tcp_mem = 20/30/40 % of $MEM_MB MiB in $PAGE-byte pages = $TCP_MEM ($(value_of net.ipv4.tcp_mem))" \
    test "$(value_of net.ipv4.tcp_mem)" = "$TCP_MEM"
check "fs.file-max = $FILE_MAX ($(value_of fs.file-max))" test "$(value_of fs.file-max)" = "$FILE_MAX"
check "net.netfilter.nf_conntrack_max = clients * 1.25 = $CT_MAX" \
    test "$(value_of net.netfilter.nf_conntrack_max)" = "$CT_MAX"
check "tcp_max_tw_buckets covers a full drain ($MAX_CLIENTS)" \
    test "$(value_of net.ipv4.tcp_max_tw_buckets)" = "$MAX_CLIENTS"
check "sysctl file sorts after the package's /usr/lib/sysctl.d file" \
    bash -c "ls '$ROOT/usr/lib/sysctl.d/' | grep -q edgegate &&
             [ \"\$( (ls '$ROOT/usr/lib/sysctl.d/' | grep edgegate; echo 70-edgegate-host.conf) | sort | tail -n 1)\" = 70-edgegate-host.conf ]"
check "conntrack loaded at boot and hash table sized (buckets $((CT_MAX / 4)))" \
    bash -c "grep -qx nf_conntrack '$ROOT/etc/modules-load.d/edgegate-conntrack.conf' &&
             grep -qx 'options nf_conntrack hashsize=$((CT_MAX / 4))' '$ROOT/etc/modprobe.d/edgegate-conntrack.conf'"
check "this machine's kernel was not touched (fs.nr_open still $HOST_NR_OPEN)" \
    test "$(cat /proc/sys/fs/nr_open)" = "$HOST_NR_OPEN"

# systemd
DROPIN=$ROOT/etc/systemd/system/edgegate.service.d/override.conf
check "drop-in in place" test -f "$DROPIN"
check "drop-in LimitNOFILE = clients + headroom = $NOFILE" grep -qx "LimitNOFILE=$NOFILE" "$DROPIN"
check "drop-in TimeoutStopSec ($STOP_SECS) outlasts the LB grace and the drain window ($GRACE_SECS + $DRAIN_SECS)" \
    grep -qx "TimeoutStopSec=$STOP_SECS" "$DROPIN"
check "edgegate.service enabled at boot" test -L "$ROOT/etc/systemd/system/multi-user.target.wants/edgegate.service"

# Alert rules for a Prometheus on the host, linking the runbook under edgegate_runbook_url.
RULES=$ROOT/etc/prometheus/rules/edgegate.yml
rules_linked() {
    local all ours
    all=$(grep -c '^ *runbook_url:' "$RULES") || return 1
    ours=$(grep -c "^ *runbook_url: \"$RUNBOOK_URL#edgegate" "$RULES")
    echo "$ours of $all runbook links under $RUNBOOK_URL"
    [ "$all" -gt 0 ] && [ "$ours" = "$all" ] &&
        cmp -s <(sed -e "s|$RUNBOOK_URL#|file:///usr/share/doc/edgegate/runbook.md#|" -e '$a\' "$RULES") \
            <(sed -e '$a\' "$ROOT/usr/share/edgegate/monitoring/alerts.yml")
}
check "alert rules written with every runbook_url under edgegate_runbook_url, otherwise the package's" rules_linked

# ---------------------------------------------------------------------------
step "second run: idempotence"
playbook "$WORK/run2.log"
rc=$?
RECAP2=$(recap "$WORK/run2.log")
check "second run succeeds: $RECAP2" test "$rc" -eq 0
check "second run changes nothing (changed=0, failed=0)" bash -c "grep -q 'changed=0 .*failed=0 ' <<<'$RECAP2'"
if ! grep -q 'changed=0 ' <<<"$RECAP2"; then grep -B1 -A3 '^changed:' "$WORK/run2.log" | head -40; fi

# ---------------------------------------------------------------------------
step "a config that edgegate rejects never replaces the good one"
before=$(md5sum <"$CONFIG" 2>/dev/null || echo missing)
playbook "$WORK/bad.log" --tags config -e '{"edgegate_heartbeat": {"ping_interval_secs": 30, "no_such_key": 1}}'
rc=$?
check "run with an unknown config key fails" test "$rc" -ne 0
check "failure comes from validate (check-config)" grep -q 'failed to validate' "$WORK/bad.log"
grep -o 'no_such_key[^"]*' "$WORK/bad.log" | head -n 1 | cut -c1-200 | sed 's/^/    check-config: /'
check "config on the host is unchanged" test "$(md5sum <"$CONFIG" 2>/dev/null || echo gone)" = "$before"

# ---------------------------------------------------------------------------
step "reloadable change: config"
playbook "$WORK/reload.log" -e edgegate_drain_window_secs=40 --tags config
rc=$?
check "config-only change applies: $(recap "$WORK/reload.log")" test "$rc" -eq 0
check "config now has drain_window_secs = 40" grep -qx 'drain_window_secs = 40' "$CONFIG"
check "reload is skipped in the chroot and said so" grep -q 'In a chroot: configuration or certificates changed; reload skipped' "$WORK/reload.log"
playbook "$WORK/reload2.log" >/dev/null
check "back to the inventory's config: $(recap "$WORK/reload2.log")" grep -qx "drain_window_secs = $DRAIN_SECS" "$CONFIG"

# ---------------------------------------------------------------------------
step "upgrade"
# The same package with a higher version, as a new release would be.
repack() {
    local version=$1 dir=$WORK/repack
    rm -rf "$dir" && dpkg-deb -R "$DEB" "$dir" &&
        sed -i "s/^Version: .*/Version: $version/" "$dir/DEBIAN/control" &&
        dpkg-deb -b -Zgzip "$dir" "$WORK/edgegate_$version.deb" >/dev/null &&
        rm -rf "$dir"
}
version_in_root() { in_root dpkg-query --show --showformat='${Version}' edgegate 2>/dev/null; }
V1=${DEB_VERSION}+ci1
V2=${DEB_VERSION}+ci2
if repack "$V1" && repack "$V2"; then
    playbook "$WORK/upgrade.log" -e "edgegate_deb_src=$WORK/edgegate_$V1.deb"
    rc=$?
    check "upgrade run succeeds: $(recap "$WORK/upgrade.log")" test "$rc" -eq 0
    check "package upgraded to $V1 ($(version_in_root))" test "$(version_in_root)" = "$V1"
    check "upgrade was recognised as one" grep -q "target $V1: upgrade" "$WORK/upgrade.log"
    check "no drain where nothing runs (chroot)" bash -c "! grep -q 'Draining ' '$WORK/upgrade.log'"
    check "no policy-rc.d left behind after the upgrade" test ! -e "$ROOT/usr/sbin/policy-rc.d"
    check "config kept across the upgrade" grep -q 'Ansible managed' "$CONFIG"
    check "no handover where nothing runs" bash -c "! grep -q 'handover skipped' '$WORK/upgrade.log'"

    # Nothing runs in a chroot, so this pretends edgegate runs
    # (edgegate_running=true) to follow the role's decisions on a live host.
    # Outside a rollout too (edgegate_rollout_drain=false): a handover
    # disconnects nobody for good, so the role does not refuse it.
    step "upgrade of a running edgegate is a handover, not a restart"
    playbook "$WORK/handover.log" -e "edgegate_deb_src=$WORK/edgegate_$V2.deb" \
        -e edgegate_running=true -e edgegate_rollout_drain=false
    rc=$?
    check "upgrade of a running edgegate succeeds outside a rollout: $(recap "$WORK/handover.log")" test "$rc" -eq 0
    [ "$rc" -eq 0 ] || grep -A5 'fatal:' "$WORK/handover.log" | head -20
    check "the role hands over (skipped in the chroot, as it says)" \
        grep -q "In a chroot: upgrade $V1 -> $V2; handover skipped" "$WORK/handover.log"
    check "no drain, no stop, no refusal" \
        bash -c "! grep -qE 'Draining |needs a restart' '$WORK/handover.log'"
    order() { # install, then configuration, then the handover
        local install config handover
        install=$(grep -n 'TASK \[edgegate : Install edgegate from the package file' "$WORK/handover.log" | head -n 1 | cut -d: -f1)
        config=$(grep -n 'TASK \[edgegate : Write edgegate.toml' "$WORK/handover.log" | head -n 1 | cut -d: -f1)
        handover=$(grep -n 'TASK \[edgegate : Hand edgegate over to the new version' "$WORK/handover.log" | head -n 1 | cut -d: -f1)
        [ -n "$install" ] && [ -n "$config" ] && [ -n "$handover" ] && [ "$install" -lt "$config" ] && [ "$config" -lt "$handover" ]
    }
    check "the handover comes after the package and the configuration" order
    check "package upgraded to $V2 ($(version_in_root))" test "$(version_in_root)" = "$V2"

    step "upgrade from an apt repository"
    # A flat repository inside the root, as a file: source; unsigned, so trusted.
    V3=${DEB_VERSION}+ci3
    flat_repo() {
        local repo=$ROOT/srv/edgegate-apt f=edgegate_$V3.deb
        mkdir -p "$repo" && repack "$V3" && mv "$WORK/$f" "$repo/" &&
            { dpkg-deb --field "$repo/$f" | sed '/^$/d'
              echo "Filename: ./$f"
              echo "Size: $(stat -c %s "$repo/$f")"
              echo "SHA256: $(sha256sum "$repo/$f" | cut -d' ' -f1)"
              echo; } >"$repo/Packages"
    }
    APT_VARS='{"edgegate_package_source": "apt", "edgegate_apt_uri": "file:/srv/edgegate-apt",
               "edgegate_apt_suites": ["./"], "edgegate_apt_components": [], "edgegate_apt_trusted": true}'
    if flat_repo; then
        playbook "$WORK/apt.log" -e "$APT_VARS"
        rc=$?
        check "apt run succeeds: $(recap "$WORK/apt.log")" test "$rc" -eq 0
        [ "$rc" -eq 0 ] || grep -A5 'fatal:' "$WORK/apt.log" | head -20
        check "apt source written" grep -qx 'URIs: file:/srv/edgegate-apt' "$ROOT/etc/apt/sources.list.d/edgegate.sources"
        check "repository's candidate $V3 installed ($(version_in_root))" test "$(version_in_root)" = "$V3"
        playbook "$WORK/apt2.log" -e "$APT_VARS"
        check "second apt run changes nothing: $(recap "$WORK/apt2.log")" \
            bash -c "grep -q 'changed=0 .*failed=0 ' <<<'$(recap "$WORK/apt2.log")'"
    else
        fail "flat apt repository built"
    fi
else
    fail "repack the package with higher versions"
fi

check "this machine's kernel was still not touched after every run (fs.nr_open $HOST_NR_OPEN)" \
    test "$(cat /proc/sys/fs/nr_open)" = "$HOST_NR_OPEN"

finish
