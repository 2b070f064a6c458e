# shellcheck shell=bash
# The VM lab: real Debian 12 machines (Debian's own 6.1 kernel, systemd as
# PID 1, journald, sshd) under QEMU, for tests that need what a chroot cannot
# give. Sourced by tests/lab/run.sh and tests/bench/lab_scale.sh.
#
#   lab_tools                      install qemu (bookworm-backports), debootstrap, ...
#   lab_image                      build the disk image once, cached on its inputs
#   lab_boot NAME MEM_MIB CPUS [GUEST_PORT...]
#                                  boot a VM; each guest TCP port is forwarded
#                                  from 127.0.0.1:<free port>, see lab_port
#   lab_port NAME GUEST_PORT       the host port that reaches GUEST_PORT
#   lab_ssh NAME COMMAND...        run a command in the guest as root
#   lab_put NAME SRC... DEST       copy files into the guest
#   lab_get NAME SRC DEST          copy a file out of the guest
#   lab_shutdown NAME              power the VM off (ACPI, then kill)
#   lab_cleanup                    kill every VM this shell started (by PID)
#
# Why TCG and not KVM: this host's /dev/kvm is PVM, which emulates a stock
# Debian kernel ~300x slower than QEMU's TCG. Under TCG the guest CPU is
# 15-19x slower than the host: memory figures from the lab are real, CPU and
# latency figures are not.
#
# Network: user-mode only (-netdev user,restrict=on: the guest reaches
# nothing outside), with hostfwd bound to 127.0.0.1. The guest has no
# mirror, so everything it needs is in the image or copied in.
#
# Environment:
#   EDGEGATE_LAB_CACHE   image cache (default /var/cache/edgegate-lab)
#   EDGEGATE_CI_MIRROR   Debian mirror for debootstrap (default deb.debian.org)
#   EDGEGATE_LAB_KEEP=1  leave the VMs' run directories for inspection

# free_port, stop_pids; debian_missing, debian_install.
# shellcheck source=tests/tools/checks.sh
source "$(dirname "${BASH_SOURCE[0]}")/../tools/checks.sh"
# shellcheck source=tests/tools/debian.sh
source "$(dirname "${BASH_SOURCE[0]}")/../tools/debian.sh"

LAB_SUITE=bookworm
LAB_CACHE=${EDGEGATE_LAB_CACHE:-/var/cache/edgegate-lab}
LAB_MIRROR=${EDGEGATE_CI_MIRROR:-http://deb.debian.org/debian}
# What a small Debian 12 server has, plus python3 (the test clients) and
# curl. adduser, debconf and openssl are ssl-cert's dependencies: the guest
# has no mirror, so edgegate's dependency ssl-cert comes from the lab's own
# repository and its dependencies must be here.
LAB_PACKAGES=systemd,systemd-sysv,udev,dbus,kmod,linux-image-amd64,initramfs-tools,openssh-server,python3,curl,iproute2,procps,ca-certificates,openssl,adduser,less,man-db
LAB_RUN=${LAB_RUN:-$(mktemp -d /var/tmp/edgegate-lab.XXXXXX)}
LAB_PIDS=()
declare -A LAB_SSH_PORT=()
declare -A LAB_FWD=()

lab_log() { echo "lab: $*" >&2; }

# Installs what the lab needs on the build machine. bookworm's
# qemu-system-x86 cannot install beside the backports qemu-utils this image
# carries, so qemu comes from bookworm-backports (a source file is added if
# the machine has none).
lab_tools() {
    local tools=(qemu-system-x86 debootstrap e2fsprogs openssh-client apt-utils gnupg qemu-utils debian-archive-keyring)
    [ -n "$(debian_missing "${tools[@]}")" ] || return 0
    if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
            "$LAB_MIRROR" >/etc/apt/sources.list.d/edgegate-lab-backports.sources
    fi
    debian_install -t bookworm-backports "$LAB_RUN/apt-tools.log" "${tools[@]}" >&2
}

# The image's inputs: a change to any of them builds a new image.
lab_image_key() {
    { echo "$LAB_SUITE $LAB_MIRROR $LAB_PACKAGES"; declare -f lab_build_root; } | sha256sum | cut -c1-16
}

# Fills directory $1 with the guest's root: Debian 12 from debootstrap,
# systemd-networkd on DHCP (QEMU's user network), sshd with the lab's key,
# a serial console.
lab_build_root() {
    local root=$1 key=$2
    debootstrap --variant=minbase --include="$LAB_PACKAGES" "$LAB_SUITE" "$root" "$LAB_MIRROR" || return 1
    echo edgegate-lab >"$root/etc/hostname"
    printf '127.0.0.1 localhost\n127.0.1.1 edgegate-lab\n' >"$root/etc/hosts"
    printf '/dev/vda / ext4 rw,errors=remount-ro 0 1\n' >"$root/etc/fstab"
    printf '[Match]\nName=eth0\n\n[Network]\nDHCP=ipv4\n' >"$root/etc/systemd/network/10-eth0.network"
    chroot "$root" systemctl enable systemd-networkd.service ssh.service >/dev/null 2>&1 || return 1
    # Nothing in the guest waits for a network that is not there.
    chroot "$root" systemctl mask systemd-networkd-wait-online.service apt-daily.timer \
        apt-daily-upgrade.timer man-db.timer e2scrub_all.timer fstrim.timer >/dev/null 2>&1
    mkdir -p -m 700 "$root/root/.ssh"
    cp "$key.pub" "$root/root/.ssh/authorized_keys"
    chmod 600 "$root/root/.ssh/authorized_keys"
    printf 'UseDNS no\n' >"$root/etc/ssh/sshd_config.d/lab.conf"
    # No mirror in the guest: apt only knows the lab's own repository.
    : >"$root/etc/apt/sources.list"
    rm -f "$root"/var/cache/apt/archives/*.deb
}

# Sets LAB_IMAGE_DIR to a directory with root.raw, vmlinuz, initrd.img and
# the ssh key id_ed25519, building it when the cache has none for these inputs.
lab_image() {
    local key dir tmp
    key=$(lab_image_key)
    dir=$LAB_CACHE/image-$key
    LAB_IMAGE_DIR=$dir
    if [ -s "$dir/root.raw" ] && [ -s "$dir/vmlinuz" ] && [ -s "$dir/initrd.img" ] && [ -s "$dir/id_ed25519" ]; then
        lab_log "image from cache: $dir"
        return 0
    fi
    mkdir -p "$LAB_CACHE"
    tmp=$(mktemp -d "$LAB_CACHE/build.XXXXXX")
    lab_log "building image $key (debootstrap $LAB_SUITE: a few minutes)"
    ssh-keygen -q -t ed25519 -N '' -C edgegate-lab -f "$tmp/id_ed25519" || return 1
    if ! lab_build_root "$tmp/root" "$tmp/id_ed25519" >"$tmp/build.log" 2>&1; then
        tail -n 30 "$tmp/build.log" >&2
        return 1
    fi
    cp -L "$tmp/root/vmlinuz" "$tmp/vmlinuz" && cp -L "$tmp/root/initrd.img" "$tmp/initrd.img" || return 1
    # ext4 filled from the directory (mke2fs -d): no loop device, no mount.
    mkfs.ext4 -q -F -L root -d "$tmp/root" "$tmp/root.raw" 6G || return 1
    rm -rf "$tmp/root"
    # Older images of other inputs are stale.
    find "$LAB_CACHE" -maxdepth 1 -name 'image-*' -type d ! -name "image-$key" -exec rm -rf {} +
    rm -rf "$dir" && mv "$tmp" "$dir"
    lab_log "image ready: $dir ($(du -sh "$dir" | cut -f1) on disk)"
}

lab_ssh_opts() {
    echo "-i $LAB_IMAGE_DIR/id_ed25519 -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o BatchMode=yes -o ConnectTimeout=10 -o ServerAliveInterval=15"
}

lab_ssh() {
    local name=$1
    shift
    # shellcheck disable=SC2046  # the options are words on purpose
    ssh $(lab_ssh_opts) -p "${LAB_SSH_PORT[$name]}" root@127.0.0.1 "$@"
}

lab_put() {
    local name=$1
    shift
    # shellcheck disable=SC2046
    scp -q $(lab_ssh_opts) -P "${LAB_SSH_PORT[$name]}" "${@:1:$#-1}" "root@127.0.0.1:${*: -1}"
}

lab_get() {
    # shellcheck disable=SC2046
    scp -q $(lab_ssh_opts) -P "${LAB_SSH_PORT[$1]}" "root@127.0.0.1:$2" "$3"
}

lab_port() { echo "${LAB_FWD[$1:$2]}"; }

# Boots VM NAME from a copy-on-write overlay of the cached image and waits
# until ssh answers (at most LAB_BOOT_TIMEOUT s, default 240).
lab_boot() {
    local name=$1 mem=$2 cpus=$3
    shift 3
    local dir=$LAB_RUN/$name fwd gp hp started
    mkdir -p "$dir"
    qemu-img create -q -f qcow2 -F raw -b "$LAB_IMAGE_DIR/root.raw" "$dir/disk.qcow2" || return 1
    LAB_SSH_PORT[$name]=$(free_port)
    fwd="hostfwd=tcp:127.0.0.1:${LAB_SSH_PORT[$name]}-:22"
    for gp in "$@"; do
        hp=$(free_port)
        LAB_FWD[$name:$gp]=$hp
        fwd="$fwd,hostfwd=tcp:127.0.0.1:$hp-:$gp"
    done
    started=$(date +%s)
    qemu-system-x86_64 -name "edgegate-lab-$name" -accel tcg,thread=multi -cpu max \
        -smp "$cpus" -m "$mem" -display none -monitor none -serial "file:$dir/console.log" \
        -kernel "$LAB_IMAGE_DIR/vmlinuz" -initrd "$LAB_IMAGE_DIR/initrd.img" \
        -append "root=/dev/vda rw console=ttyS0 net.ifnames=0 quiet" \
        -drive "file=$dir/disk.qcow2,if=virtio,format=qcow2,cache=unsafe" \
        -netdev "user,id=n0,restrict=on,$fwd" -device virtio-net-pci,netdev=n0 \
        -device virtio-rng-pci >"$dir/qemu.log" 2>&1 &
    local pid=$!
    LAB_PIDS+=("$pid")
    echo "$pid" >"$dir/qemu.pid"
    lab_log "$name: qemu pid $pid, ${mem} MiB, $cpus vCPUs, ssh 127.0.0.1:${LAB_SSH_PORT[$name]}"
    local deadline=$((started + ${LAB_BOOT_TIMEOUT:-240}))
    until lab_ssh "$name" true 2>/dev/null; do
        if ! kill -0 "$pid" 2>/dev/null; then
            lab_log "$name: qemu exited: $(tail -n 5 "$dir/qemu.log")"
            return 1
        fi
        if [ "$(date +%s)" -ge "$deadline" ]; then
            lab_log "$name: no ssh after ${LAB_BOOT_TIMEOUT:-240} s; console:"
            tail -n 30 "$dir/console.log" >&2
            return 1
        fi
        sleep 2
    done
    LAB_BOOT_SECS=$(($(date +%s) - started))
    lab_log "$name: ssh up after $LAB_BOOT_SECS s"
}

lab_shutdown() {
    local name=$1 pid i
    pid=$(cat "$LAB_RUN/$name/qemu.pid" 2>/dev/null) || return 0
    lab_ssh "$name" systemctl poweroff >/dev/null 2>&1 || true
    for ((i = 0; i < 60; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 1
    done
    kill "$pid" 2>/dev/null
}

lab_cleanup() {
    stop_pids "${LAB_PIDS[@]}"
    if [ "${EDGEGATE_LAB_KEEP:-0}" = 1 ]; then
        lab_log "kept $LAB_RUN"
    else
        rm -f "$LAB_RUN"/*/disk.qcow2
    fi
}

# lab_repo DIR KEYRING DEB...: a flat apt repository in DIR signed with a
# throwaway ed25519 key (GNUPGHOME must be a fresh directory), holding the
# .debs given and ssl-cert (edgegate's dependency: the guest has no mirror).
# KEYRING receives the public key for the guest's Signed-By.
lab_repo() {
    local repo=$1 keyring=$2
    shift 2
    mkdir -p "$repo" && cp "$@" "$repo/" || return 1
    (cd "$repo" && apt-get download -q ssl-cert) || return 1
    gpg --batch --list-secret-keys 2>/dev/null | grep edgegate-lab >/dev/null ||
        gpg --batch --passphrase '' --quick-gen-key 'EdgeGate lab repository <lab@edgegate.invalid>' ed25519 sign 1d || return 1
    gpg --batch --export >"$keyring" && lab_repo_index "$repo"
}

# lab_repo_index DIR: (re)writes Packages, Release and the signed InRelease.
lab_repo_index() {
    (cd "$1" && apt-ftparchive packages . >Packages && gzip -9kf Packages &&
        apt-ftparchive -o APT::FTPArchive::Release::Origin=edgegate-lab \
            -o APT::FTPArchive::Release::Label=edgegate-lab \
            -o APT::FTPArchive::Release::Suite=lab -o APT::FTPArchive::Release::Codename=lab \
            release . >Release &&
        rm -f InRelease && gpg --batch --yes --clearsign -o InRelease Release &&
        gpg --batch --verify InRelease 2>/dev/null)
}

# lab_use_repo NAME DIR KEYRING: copies the repository into the guest as its
# only apt source.
lab_use_repo() {
    local name=$1 repo=$2 keyring=$3
    lab_put "$name" "$keyring" /usr/share/keyrings/edgegate-lab.gpg &&
        lab_ssh "$name" mkdir -p /srv/edgegate-repo &&
        lab_put "$name" "$repo"/* /srv/edgegate-repo/ &&
        lab_ssh "$name" "chmod -R a+rX /srv/edgegate-repo && printf 'Types: deb\nURIs: file:/srv/edgegate-repo\nSuites: ./\nSigned-By: /usr/share/keyrings/edgegate-lab.gpg\n' >/etc/apt/sources.list.d/edgegate-lab.sources"
}
