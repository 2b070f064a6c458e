"""The command line: build, arguments, and the run that writes
results/latest.{json,md,png}."""

import argparse
import datetime
import json
import os
import subprocess
import tempfile
import time

from .fanout import run_fanout
from .host import RESULTS, ROOT, loadavg, log, machine
from .load import PER_PROCESS_MAX
from .report import markdown
from .scenarios import Bench, SCENARIOS
from .systems import FANOUT_SYSTEMS, PROXY_SYSTEMS, SYSTEM_NAMES, ensure_proxies, make_cert


def build(profile):
    cmd = ["cargo", "build", "-p", "edgegate", "-p", "edgegate-link", "-p", "edgegate-tests", "--bins", "--examples"]
    if profile == "release":
        cmd.insert(2, "--release")
    log(" ".join(cmd))
    subprocess.run(cmd, cwd=ROOT, check=True)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--systems", default=",".join(SYSTEM_NAMES),
                    help=f"comma list of {','.join(SYSTEM_NAMES)}: scenarios 1-3 run on {','.join(PROXY_SYSTEMS)}, "
                         f"4 (fanout) on {','.join(FANOUT_SYSTEMS)}, 5-6 on edgegate")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--steps", default="1000,5000,10000,15000", help="idle client counts (cumulative)")
    ap.add_argument("--settle", type=float, default=5.0, help="seconds after each step before reading memory")
    ap.add_argument("--concurrency", type=int, default=200, help="first connects in flight per load process")
    ap.add_argument("--per-process", type=int, default=9000,
                    help=f"clients per load process (max {PER_PROCESS_MAX} under a 20000 fd limit)")
    ap.add_argument("--workers", type=int, default=2,
                    help="edgegate worker_threads = haproxy processes = nginx worker_processes")
    ap.add_argument("--echo-clients", type=int, default=200)
    ap.add_argument("--echo-rate", type=float, default=1000.0, help="echo messages per second, all clients")
    ap.add_argument("--echo-secs", type=float, default=15.0)
    ap.add_argument("--payload-bytes", type=int, default=64)
    ap.add_argument("--subscribers", default="3000,9000,15000", help="fan-out subscriber counts, one round each")
    ap.add_argument("--rounds", type=int, default=1, help="fan-out rounds (the report gives the median and range)")
    ap.add_argument("--fanout-workers", type=int, default=0,
                    help="fan-out: edgegate worker_threads = nginx worker_processes (0: EdgeGate's default, cores - 1)")
    ap.add_argument("--no-fanout-storm", dest="fanout_storm", action="store_false",
                    help="fan-out: skip the reconnect storm of the subscribers after the publishes")
    ap.add_argument("--publishes", type=int, default=20)
    ap.add_argument("--publish-interval-ms", type=int, default=250)
    ap.add_argument("--storm-clients", type=int, default=15000)
    ap.add_argument("--witnesses", type=int, default=100)
    ap.add_argument("--witness-rate", type=float, default=200.0)
    ap.add_argument("--source-pool", default="127.0.1.1-254,127.0.2.1-254,127.0.3.1-254,127.0.4.1-254",
                    help="source addresses for load processes (each gets its own 4)")
    ap.add_argument("--target", help="a remote gateway HOST:PORT (no local systems are started)")
    ap.add_argument("--admin", help="the remote gateway's admin URL, e.g. http://10.0.0.5:7611")
    ap.add_argument("--server-name", default="localhost", help="TLS server name for a remote gateway")
    ap.add_argument("--profile", default="release", choices=["release", "debug"])
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--out", default=os.path.join(RESULTS, "latest"), help="output path without extension")
    args = ap.parse_args(argv)
    args.steps = [int(x) for x in args.steps.split(",") if x]
    args.subscribers = [int(x) for x in args.subscribers.split(",") if x]
    if args.fanout_workers <= 0:
        args.fanout_workers = max(1, (os.cpu_count() or 2) - 1)
    args.systems = [x for x in args.systems.split(",") if x]
    args.scenarios = [x for x in args.scenarios.split(",") if x]
    unknown = [n for n in args.systems if n not in SYSTEM_NAMES]
    if unknown:
        ap.error(f"unknown system(s) {','.join(unknown)}; known: {','.join(SYSTEM_NAMES)}")
    if args.target:
        args.systems = ["edgegate"]
    if args.per_process > PER_PROCESS_MAX:
        ap.error(f"--per-process above {PER_PROCESS_MAX} does not fit this host's RLIMIT_NOFILE")
    return args


def main(argv=None):
    args = parse_args(argv)
    if not args.no_build:
        build(args.profile)
    if not args.target:
        ensure_proxies(args.systems)
    bench = Bench(args)
    bench.load.server_name = args.server_name
    results = {"started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
               "machine": machine(), "loadavg_start": loadavg(),
               "params": {k: v for k, v in vars(args).items() if k not in ("no_build", "out")},
               "systems": {}}
    work_root = tempfile.mkdtemp(prefix="edgegate-bench-")
    try:
        cert = make_cert(work_root) if not args.target else None
        per_system = set(args.scenarios) - {"fanout"}
        for name in args.systems:
            if not per_system or (name not in PROXY_SYSTEMS and not args.target):
                continue
            work = os.path.join(work_root, name)
            os.makedirs(work, exist_ok=True)
            bench.run_system(name, work, cert, results)
            time.sleep(3)  # sockets of the last system close before the next measures Slab
        fanout_systems = [n for n in args.systems if n in FANOUT_SYSTEMS]
        if "fanout" in args.scenarios and fanout_systems:
            results["fanout_peers"] = run_fanout(bench, fanout_systems, work_root, cert)
    finally:
        bench.load.stop()
    results["loadavg_end"] = loadavg()
    results["work_dir"] = work_root
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(results, f, indent=2)
    md = markdown(results)
    with open(args.out + ".md", "w") as f:
        f.write(md)
    print(md)
    plot = bench.bins["edgegate-bench-plot"]
    if os.path.exists(plot):
        r = subprocess.run([plot, "--input", args.out + ".json", "--output", args.out + ".png"])
        if r.returncode == 0:
            log(f"plot: {args.out}.png")
    log(f"results: {args.out}.json, {args.out}.md (logs in {work_root})")
