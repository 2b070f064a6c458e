#!/usr/bin/env python3
"""Resident memory of the gateway's processes across a handover, for the lab's upgrade step.

    overlap.py OUT

Every 100 ms reads the resident memory of every process of the unit
edgegate.service (its cgroup's cgroup.procs, then /proc/PID/statm: a few
small reads, so the sampler costs the slow guest little; the `edgegate
upgrade` client apt runs is not in the unit and not counted) and keeps: the
largest single process, the largest sum while two or more ran at once (the
handover's overlap: the old process draining beside the new one) and how
long they overlapped. Writes them as one JSON object to OUT (by rename)
every second and at SIGTERM. Runs inside the guest, beside the upgrade.
"""
import json
import os
import signal
import sys
import time

PERIOD_SECS = 0.1


UNIT_PROCS = "/sys/fs/cgroup/system.slice/edgegate.service/cgroup.procs"
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


def gateways():
    """{pid: rss_kib} of every process of the unit (that has not exited meanwhile)."""
    out = {}
    try:
        with open(UNIT_PROCS) as f:
            pids = [int(line) for line in f if line.strip()]
    except OSError:  # the unit is not running
        return out
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm") as f:
                out[pid] = int(f.read().split()[1]) * PAGE_KIB
        except OSError:  # gone between the two reads
            continue
    return out


def main():
    out = sys.argv[1]
    stats = {
        "samples": 0,
        "overlap_samples": 0,
        "overlap_secs": 0.0,
        "peak_one_kib": 0,
        "peak_overlap_kib": 0,
        "peak_overlap_pids": {},
        "pids_seen": [],
    }
    seen = set()
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))

    def write():
        stats["pids_seen"] = sorted(seen)
        tmp = out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(stats, f)
        os.replace(tmp, out)

    written = time.monotonic()
    last = None
    while not stopping:
        now = time.monotonic()
        procs = gateways()
        seen.update(procs)
        stats["samples"] += 1
        if procs:
            stats["peak_one_kib"] = max(stats["peak_one_kib"], max(procs.values()))
        if len(procs) >= 2:
            stats["overlap_samples"] += 1
            if last is not None:
                stats["overlap_secs"] = round(stats["overlap_secs"] + now - last, 2)
            total = sum(procs.values())
            if total > stats["peak_overlap_kib"]:
                stats["peak_overlap_kib"] = total
                stats["peak_overlap_pids"] = {str(p): kib for p, kib in procs.items()}
            last = now
        else:
            last = None
        if now - written >= 1.0:
            write()
            written = now
        time.sleep(PERIOD_SECS)
    write()


if __name__ == "__main__":
    main()
