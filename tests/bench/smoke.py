#!/usr/bin/env python3
"""CI smoke of the load generator against a real gateway: a few hundred idle
clients, then a few seconds of echo. Checks that the clients connected, that
echo round trips came back, and that every output line parsed as JSON.
Prints one line per check and ends with `N passed, M failed`.

Usage: tests/bench/smoke.py [--profile debug|release]   (binaries already built)
It checks that the machinery works; it never judges the numbers.
"""

import argparse
import os
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
    print(f"{len(passed)} passed, {len(failed)} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    time.sleep(0)
    main()
