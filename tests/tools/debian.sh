# shellcheck shell=bash
# The Debian side of the shell suites: packages on the build machine, its
# mirror, and a debootstrapped root with the mounts a chroot needs. Used by
# tests/appliance/run.sh and tests/ansible/run.sh (a root each) and
# tests/lab/lab.sh (the build machine's packages). Sourced.
#
#   debian_missing PKG...          prints the PKGs this machine has not installed
#   debian_install [-t RELEASE] LOG PKG...
#                                  installs the missing PKGs (apt-get update
#                                  first), from RELEASE if given (apt's
#                                  --target-release); apt's output goes to LOG
#   debian_mirror SUITE            this machine's mirror for SUITE
#   debian_root DIR TARBALL LOG SUITE MIRROR [DEBOOTSTRAP_OPTION...]
#                                  a minbase root in DIR, unpacked from TARBALL
#                                  or debootstrapped and saved as TARBALL
#   debian_mount MOUNT_ARG... TARGET
#                                  mount, and remember TARGET for debian_unmount_all
#   debian_mount_proc DIR          /proc in the root DIR, /proc/sys read-only
#   debian_unmount_all             unmounts what debian_mount mounted, last first
#   debian_remove_root DIR         rm -rf DIR, refused while anything is mounted in it
#
# A second source is a no-op: it must not forget what is mounted.

[ -z "${DEBIAN_SH_LOADED:-}" ] || return 0
DEBIAN_SH_LOADED=1

DEBIAN_MOUNTS=()

debian_missing() {
    local p
    for p in "$@"; do
        # shellcheck disable=SC2016  # a dpkg-query format
        case $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null) in
            *"install ok installed"*) ;;
            *) echo "$p" ;;
        esac
    done
}

debian_install() {
    local release=() log absent
    if [ "$1" = -t ]; then
        release=(-t "$2")
        shift 2
    fi
    log=$1
    shift
    mapfile -t absent < <(debian_missing "$@")
    [ ${#absent[@]} -gt 0 ] || return 0
    echo "installing: ${absent[*]}${release[1]:+ (from ${release[1]})}"
    {
        DEBIAN_FRONTEND=noninteractive apt-get update -q &&
            DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -q \
                --no-install-recommends "${release[@]}" "${absent[@]}"
    } >"$log" 2>&1 || {
        tail -n 20 "$log"
        return 1
    }
}

# The first URI serving SUITE's main archive (not -security or -updates) in
# sources.list, the one-line .list files, then the deb822 .sources files;
# http://deb.debian.org/debian when there is none.
debian_mirror() {
    local suite=$1 f uri=
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -z "$uri" ] || break
        [ -f "$f" ] && uri=$(awk -v s="$suite" '$1 == "deb" && $0 !~ /security/ {
                for (i = 2; i < NF; i++) if ($i ~ /^(https?|file):/ && $(i + 1) == s) { print $i; exit } }' "$f")
    done
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -z "$uri" ] || break
        [ -f "$f" ] && uri=$(awk -v s="$suite" 'BEGIN { RS = ""; FS = "\n" }
            { uri = ""; ok = 0
              for (i = 1; i <= NF; i++) {
                if ($i ~ /^URIs:/) { split($i, a, " "); uri = a[2] }
                if ($i ~ /^Suites:/) { n = split($i, b, " "); for (j = 2; j <= n; j++) if (b[j] == s) ok = 1 }
              }
              if (ok && uri != "" && uri !~ /security/) { print uri; exit } }' "$f")
    done
    echo "${uri:-http://deb.debian.org/debian}"
}

# The tarball keeps owners by number: the root's users are not this machine's.
# Saving it is best effort; a run without a writable cache still gets a root.
debian_root() {
    local root=$1 tarball=$2 log=$3 suite=$4 mirror=$5
    shift 5
    mkdir -p "$root"
    if [ -s "$tarball" ] && tar -C "$root" --numeric-owner -xpzf "$tarball" 2>/dev/null; then
        echo "root from cache: $tarball"
        return 0
    fi
    rm -rf "$root" && mkdir -p "$root" || return 1
    echo "debootstrap --variant=minbase $* $suite from $mirror"
    debootstrap --variant=minbase "$@" "$suite" "$root" "$mirror" >"$log" 2>&1 || {
        tail -n 20 "$log"
        return 1
    }
    chroot "$root" apt-get clean
    if ! { tar -C "$root" --numeric-owner -czf "$tarball.tmp" . 2>/dev/null && mv "$tarball.tmp" "$tarball"; }; then
        rm -f "$tarball.tmp"
    fi
}

debian_mount() {
    local target=${*: -1}
    mount "$@" && DEBIAN_MOUNTS+=("$target")
}

# The host kernel is shared with the root: nothing in it (a postinst's
# systemd-sysctl, say) may change this machine's settings.
debian_mount_proc() {
    debian_mount -t proc proc "$1/proc" &&
        debian_mount --bind "$1/proc/sys" "$1/proc/sys" &&
        mount -o remount,bind,ro "$1/proc/sys"
}

debian_unmount_all() {
    local i
    for ((i = ${#DEBIAN_MOUNTS[@]} - 1; i >= 0; i--)); do
        umount "${DEBIAN_MOUNTS[i]}" 2>/dev/null || umount -l "${DEBIAN_MOUNTS[i]}" 2>/dev/null || true
    done
    DEBIAN_MOUNTS=()
}

# Never rm -rf a tree that still has the host's /dev or /sys mounted in it.
debian_remove_root() {
    local root=${1%/}
    if awk -v r="$root" '$2 == r || index($2, r "/") == 1 { found = 1 } END { exit !found }' /proc/mounts; then
        echo "mounts left under $root; not deleting it" >&2
        return 1
    fi
    rm -rf --one-file-system "$root"
}
