#!/usr/bin/env bash
# Scale in one process (a benchmark, not CI): idle TLS WebSocket clients
# stepped up to 250,000 or more in ONE gateway process, inside a Debian 12 VM
# (tests/lab/lab.sh), where the build host's 20000-descriptor cap does not
# apply. The gateway is the real package under systemd; the load generators
# run inside the guest on its loopback, from many source addresses.
#
#   sudo tests/bench/lab_scale.sh                 # 50k steps to 250k, 14 GiB VM
#   STEPS=50000,100000 MEM_MIB=8192 sudo tests/bench/lab_scale.sh
#
# Prints one line per step and a markdown table (also written to
# tests/bench/results/lab-scale.md). Memory figures are valid under TCG;
# CPU and latency figures are not (the guest CPU is 15-19x slower).
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
WORK=$(mktemp -d /var/tmp/edgegate-labscale.XXXXXX)
LAB_RUN=$WORK/vms
mkdir -p "$LAB_RUN"
# shellcheck source=tests/lab/lab.sh
source "$REPO/tests/lab/lab.sh"
trap lab_cleanup EXIT
trap 'exit 130' INT TERM

STEPS=${STEPS:-50000,100000,150000,200000,250000}
MEM_MIB=${MEM_MIB:-14336}
CPUS=${CPUS:-2}
PER_PROCESS=${PER_PROCESS:-50000}
VM=scale
die() {
    echo "lab_scale: $*" >&2
    exit 1
}
g() { lab_ssh "$VM" "$@"; }

lab_tools || die "lab tools"
lab_image || die "image"
command -v cargo-deb >/dev/null || cargo install cargo-deb --locked >"$WORK/cargo-install.log" 2>&1
"$REPO/packaging/build-deb.sh" --output "$WORK/out/" >"$WORK/cargo-deb.log" 2>&1 || die "packaging/build-deb.sh (see $WORK/cargo-deb.log)"
# The example service comes with the package (edgegate-example.service).
(cd "$REPO" && cargo build -q --release -p edgegate-tests --bin edgegate-load) || die "build"
TARGET_DIR=$(cd "$REPO" && cargo metadata --format-version 1 --no-deps | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
export GNUPGHOME=$WORK/gnupg
mkdir -p -m 700 "$GNUPGHOME"
lab_repo "$WORK/repo" "$WORK/lab.gpg" "$WORK"/out/edgegate_*.deb >"$WORK/repo.log" 2>&1 || die "repository"

lab_boot "$VM" "$MEM_MIB" "$CPUS" || die "boot"
BOOT_SECS=$LAB_BOOT_SECS
lab_use_repo "$VM" "$WORK/repo" "$WORK/lab.gpg" || die "repository in the guest"
g "apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q edgegate" >"$WORK/apt.log" 2>&1 || die "apt install"
lab_put "$VM" "$TARGET_DIR/release/edgegate-load" /usr/local/bin/edgegate-load
MAX=$(tr ',' '\n' <<<"$STEPS" | sort -n | tail -n 1)
# The operator's settings for this host: tcp_mem for its memory, room for
# the clients, every vCPU a worker, a 60 s drain, no LB grace.
g "edgegate tune --write >/dev/null && systemctl restart systemd-sysctl &&
   sed -i -e 's|^max_clients = .*|max_clients = $((MAX + 10000))|' -e 's|^worker_threads = .*|worker_threads = $CPUS|' \
       -e 's|^drain_window_secs = .*|drain_window_secs = 60|' -e 's|^lb_grace_secs = .*|lb_grace_secs = 0|' /etc/edgegate/edgegate.toml &&
   systemctl start edgegate-example.service && systemctl restart edgegate" ||
    die "configure"
for _ in $(seq 60); do g curl -fsS http://127.0.0.1:7611/readyz >/dev/null 2>&1 && break; sleep 2; done
g curl -fsS http://127.0.0.1:7611/readyz >/dev/null || die "gateway not ready"
GW_PID=$(g systemctl show -p MainPID --value edgegate)

rss_kib() { g "awk '/^VmRSS:/ {print \$2}' /proc/$GW_PID/status"; }
slab_kib() { g "awk '/^Slab:/ {print \$2}' /proc/meminfo"; }
summary() { g "journalctl -u edgegate -o cat --no-pager -n 200 | grep '^summary' | tail -n 1"; }
field() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<<"$2"; }

BASE_RSS=$(rss_kib)
BASE_SLAB=$(slab_kib)
echo "boot $BOOT_SECS s; gateway pid $GW_PID; base RSS $BASE_RSS KiB, Slab $BASE_SLAB KiB"
TABLE="| clients | connect time for the step (s) | gateway RSS (MiB) | RSS per client (KiB) | Slab per connection (KiB) | poll delay p99 while holding (ms) |
|---:|---:|---:|---:|---:|---:|"
held=0
proc=0
for step in ${STEPS//,/ }; do
    started=$(date +%s)
    # New load processes of at most PER_PROCESS clients each, 16 source
    # addresses per process (each gives ~28k ports towards one listener).
    while [ "$held" -lt "$step" ]; do
        n=$((step - held < PER_PROCESS ? step - held : PER_PROCESS))
        g "systemd-run --quiet --unit=lab-load-$proc -p LimitNOFILE=1048576 sh -c 'sleep infinity | /usr/local/bin/edgegate-load --target 127.0.0.1:8443 --mode idle --clients $n --concurrency 64 --threads 1 --sources 127.1.$proc.1-16 >/run/load-$proc.jsonl 2>/run/load-$proc.err'" ||
            die "load process $proc"
        for _ in $(seq 3600); do
            g "grep -q '\"event\":\"connected\"' /run/load-$proc.jsonl" 2>/dev/null && break
            sleep 5
        done
        line=$(g cat "/run/load-$proc.jsonl" | grep '"connected"')
        echo "  load $proc: $line"
        held=$((held + $(python3 -c 'import json, sys; print(json.loads(sys.argv[1])["connected"])' "$line")))
        proc=$((proc + 1))
    done
    took=$(($(date +%s) - started))
    sleep 25 # two summary lines while holding
    rss=$(rss_kib) slab=$(slab_kib) s=$(summary)
    per_client=$(python3 -c "print(f'{($rss - $BASE_RSS) / $held:.2f}')")
    # Both ends of every connection are in this guest: two sockets per client.
    slab_per=$(python3 -c "print(f'{($slab - $BASE_SLAB) / $held / 2:.2f}')")
    p99=$(field poll_delay_p99_ms "$s")
    echo "step $step: held $held, connect ${took} s, RSS $((rss >> 10)) MiB, $per_client KiB/client, Slab $slab_per KiB/connection, poll p99 $p99 ms"
    TABLE="$TABLE
| $held | $took | $((rss >> 10)) | $per_client | $slab_per | $p99 |"
done

# The top step: systemctl stop drains every client with 1001.
stop_started=$(date +%s.%N)
g systemctl stop edgegate
STOP_SECS=$(python3 -c "import time; print(round(time.time() - $stop_started, 1))")
sleep 5
# SIGTERM makes each load process print its counters ("done") and exit.
for ((i = 0; i < proc; i++)); do g "systemctl kill -s TERM lab-load-$i" >/dev/null 2>&1; done
sleep 5
codes=$(for ((i = 0; i < proc; i++)); do g "cat /run/load-$i.jsonl"; done | grep '"done"')
got_1001=$(python3 -c '
import json, sys
print(sum(json.loads(l).get("close_codes", {}).get("1001", 0) for l in sys.argv[1].splitlines() if l.strip()))' "$codes")
echo "stop with $held clients: $STOP_SECS s; $got_1001 got 1001"

mkdir -p "$REPO/tests/bench/results"
{
    echo "# Scale in one gateway process (lab VM, $(date -u +%Y-%m-%d))"
    echo
    echo "VM: Debian 12, kernel $(g uname -r), ${MEM_MIB} MiB, $CPUS vCPUs under TCG (boot to ssh $BOOT_SECS s)."
    echo "Gateway: the package under systemd, worker_threads = $CPUS; load generators in the guest, ${PER_PROCESS} clients per process."
    echo "Memory figures are valid under TCG; CPU, connect time and latency are not (the guest CPU is 15-19x slower)."
    echo
    echo "$TABLE"
    echo
    echo "systemctl stop at $held clients (drain_window_secs = 60): $STOP_SECS s; $got_1001 of $held clients got close code 1001."
} | tee "$REPO/tests/bench/results/lab-scale.md"
lab_shutdown "$VM"
