#!/usr/bin/env python3
"""CI smoke of the benchmark against real systems, at a tiny scale:

1. a few hundred idle clients, then a few seconds of echo, against a gateway:
   the clients connected, echo round trips came back, every output line
   parsed as JSON;
2. fan-out (scenario 4) to a few dozen subscribers on every fan-out system:
   EdgeGate `run` and `demo`, the write floor, and nginx + nchan (installed
   with apt-get when missing and this runs as root; otherwise skipped, with a
   line saying so): every publish reached every subscriber, the figures the
   report needs are there, the storm brought everyone back, the table renders.

Prints one line per check and ends with `N passed, M failed`.

Usage: tests/bench/smoke.py [--profile debug|release]   (binaries already built)
It checks that the machinery works; it never judges the numbers.
"""

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import edgegate_bench as bench  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="debug", choices=["debug", "release"])
    ap.add_argument("--clients", type=int, default=300)
    opts = ap.parse_args()
    args = bench.parse_args(["--profile", opts.profile, "--no-build", "--systems", "edgegate",
                             "--echo-clients", "50", "--echo-rate", "200", "--echo-secs", "3",
                             "--concurrency", "50", "--workers", "1",
                             "--source-pool", "127.0.1.200-254"])
    passed, failed = [], []

    def check(name, ok, detail=""):
        (passed if ok else failed).append(name)
        print(f"{'ok  ' if ok else 'FAIL'} {name}{': ' + str(detail) if detail else ''}", flush=True)

    b = bench.Bench(args)
    work = tempfile.mkdtemp(prefix="edgegate-smoke-")
    cert = bench.make_cert(work)
    gw = bench.EdgeGate(work, b.bins, cert, 1)
    try:
        gw.start()
        check("gateway starts and its links come up", True)
        procs, connected, failed_n = b.load.group(gw.target, "/echo", opts.clients, "idle",
                                                  ["--concurrency", "50"], timeout=120)
        check("idle clients connected", connected == opts.clients and failed_n == 0,
              f"{connected}/{opts.clients}, {failed_n} failed")
        procs[0].send("stats")
        stats = procs[0].wait("stats", 10)
        check("stats line parses as JSON with live clients", stats.get("live") == connected, stats)
        echo = b.echo(gw, "/echo")
        check("echo round trips returned", echo["received"] > 0 and echo["p50_ms"] is not None,
              f"{echo['received']}/{echo['sent']}, p50 {echo['p50_ms']} ms")
        check("no echo lost", echo["lost"] == 0, echo["lost"])
        b.load.stop(procs)
    except Exception as e:  # noqa: BLE001 - every failure is a failed check
        check("smoke ran to the end", False, f"{type(e).__name__}: {e}")
    finally:
        b.load.stop()
        gw.stop()
    try:
        fanout(opts, work, cert, check)
    except Exception as e:  # noqa: BLE001 - every failure is a failed check
        check("fan-out smoke ran to the end", False, f"{type(e).__name__}: {e}")
    print(f"{len(passed)} passed, {len(failed)} failed")
    sys.exit(1 if failed else 0)


def nchan_or_skip():
    """True when nginx + nchan can run here, installing them with apt-get as
    the benchmark does when root; otherwise says why it is skipped."""
    if bench.nchan_available():
        return True
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        print("skip nchan: libnginx-mod-nchan is not installed and this is not root with apt-get "
              "(tests/bench/bench.py installs it)", flush=True)
        return False
    try:
        bench.ensure_proxies(["nchan"])
    except Exception as e:  # noqa: BLE001 - no package source is a skip, not a failure of EdgeGate
        print(f"skip nchan: apt-get install libnginx-mod-nchan failed: {e}", flush=True)
        return False
    return bench.nchan_available()


def fanout(opts, work, cert, check):
    systems = ["edgegate", "edgegate-demo", "floor"] + (["nchan"] if nchan_or_skip() else [])
    subscribers, publishes = 40, 3
    args = bench.parse_args(["--profile", opts.profile, "--no-build", "--scenarios", "fanout",
                             "--systems", ",".join(systems), "--subscribers", str(subscribers),
                             "--publishes", str(publishes), "--publish-interval-ms", "100",
                             "--witnesses", "4", "--witness-rate", "40", "--settle", "0.5",
                             "--concurrency", "20", "--fanout-workers", "1",
                             "--source-pool", "127.0.1.100-199"])
    b = bench.Bench(args)
    fp = bench.run_fanout(b, systems, work, cert)
    rows = {r["system"]: r for r in fp["runs"]}
    for name in systems:
        r = rows.get(name, {})
        if "error" in r or not r:
            check(f"fan-out {name} ran", False, r.get("error", "no row"))
            continue
        check(f"fan-out {name}: every subscriber connected",
              r["connected_subscribers"] == subscribers and r["failed_connects"] == 0,
              f"{r['connected_subscribers']}/{subscribers}, {r['failed_connects']} failed")
        check(f"fan-out {name}: every publish reached every subscriber (lost 0)",
              r["lost"] == 0 and r["extra"] == 0 and r["publishes_complete"] == publishes,
              f"{r['deliveries']}/{r['expected_deliveries']}, per publish {r['per_publish_deliveries']}")
        check(f"fan-out {name}: p99, time to last delivery, CPU and RSS per subscriber measured",
              all(v is not None for v in (r["p99_ms"], r["last_delivery_ms"]["median"],
                                          r["cpu_us_per_delivery"], r["rss_per_subscriber_bytes"])),
              f"p99 {r['p99_ms']} ms, last {r['last_delivery_ms']['median']} ms, "
              f"{r['cpu_us_per_delivery']} us/delivery, {r['rss_per_subscriber_bytes']} B/subscriber")
        if name.startswith("edgegate"):
            pd, st = r.get("poll_delay_publish") or {}, r.get("storm") or {}
            check(f"fan-out {name}: poll delay and witness echo during the publishes",
                  isinstance(pd.get("p99_ms"), (int, float)) and (r.get("witness_publish") or {}).get("received"),
                  f"poll p99 {pd.get('p99_ms')} ms, witness {r.get('witness_publish')}")
            # A 40-client storm may be over before the gateway polls a task:
            # the poll delay was read (polls counted), its p99 may be None.
            check(f"fan-out {name}: storm: all back, poll delay and witness echo read during it",
                  st.get("all_back") and st.get("back") == subscribers + 1
                  and "polls" in (st.get("poll_delay") or {}) and st.get("witness") is not None,
                  st)
        elif name == "nchan":
            st = r.get("storm") or {}
            check("fan-out nchan: storm: all back", st.get("all_back") and st.get("back") == subscribers + 1, st)
    md = "\n".join(bench.fanout_tables(fp))
    check("fan-out table renders a row per system", all(f"| {subscribers:,} | {n} |" in md for n in systems), md)


if __name__ == "__main__":
    time.sleep(0)
    main()
