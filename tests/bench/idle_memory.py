#!/usr/bin/env python3
"""Userspace memory per idle TLS WebSocket client.

Starts the release `edgegate` with a fresh certificate and the example
service, then adds idle clients in steps with `edgegate-load` processes
(each under this machine's per-process descriptor limit, spread over
127.0.1.x source addresses) and reads the gateway's RSS after each step.
Reports RSS per client for each step and the slope between steps (the
slope excludes fixed costs), plus kernel Slab per connection.

Usage: tests/bench/idle_memory.py [--steps 1000,5000,10000] [--json out.json]
It reports; it never passes or fails on the numbers.
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TARGET = os.path.join(ROOT, "target", "release")
PER_PROCESS = 9000  # clients per load process: well under RLIMIT_NOFILE 20000


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def slab_kib():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Slab:"):
                return int(line.split()[1])
    return 0


def wait_port(port, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"port {port} not listening")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", default="1000,5000,10000")
    ap.add_argument("--json")
    ap.add_argument("--settle", type=float, default=5.0)
    ap.add_argument("--no-build", action="store_true")
    args = ap.parse_args()
    steps = [int(x) for x in args.steps.split(",")]

    if not args.no_build:
        subprocess.run(
            ["cargo", "build", "--release", "-p", "edgegate", "-p", "edgegate-tests",
             "-p", "edgegate-link", "--examples", "--bins"],
            cwd=ROOT, check=True)

    work = tempfile.mkdtemp(prefix="edgegate-bench-")
    cert, key = os.path.join(work, "cert.pem"), os.path.join(work, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    gw_port, svc_port = free_port(), free_port()
    config = os.path.join(work, "edgegate.toml")
    with open(config, "w") as f:
        f.write(f"""
[runtime]
worker_threads = 1

[admin]
bind = "127.0.0.1:{free_port()}"

[[listener]]
name = "bench"
bind = "127.0.0.1:{gw_port}"
backlog = 4096
tls_cert_path = "{cert}"
tls_key_path = "{key}"

[[route]]
listener = "bench"
path = "/echo"
service = "example"

[[service]]
name = "example"
addresses = ["127.0.0.1:{svc_port}"]
links = 2

[limits]
max_clients = 19000
handshake_permits = 0

[heartbeat]
ping_interval_secs = 30
ping_timeout_secs = 75
""")
    procs = []
    try:
        svc = subprocess.Popen([os.path.join(TARGET, "examples", "example_service"),
                                "--listen", f"127.0.0.1:{svc_port}"], stdout=subprocess.DEVNULL)
        procs.append(svc)
        wait_port(svc_port)
        gw = subprocess.Popen([os.path.join(TARGET, "edgegate"), "run", "--config", config],
                              stderr=open(os.path.join(work, "gateway.log"), "w"))
        procs.append(gw)
        wait_port(gw_port)
        time.sleep(1.0)
        base_rss, base_slab = rss_kib(gw.pid), slab_kib()
        results = []
        total = 0
        source_block = 1
        for step in steps:
            need = step - total
            while need > 0:
                n = min(need, PER_PROCESS)
                sources = f"127.0.1.{source_block}-{source_block + 3}"
                source_block += 4
                load = subprocess.Popen(
                    [os.path.join(TARGET, "edgegate-load"), "--target", f"127.0.0.1:{gw_port}",
                     "--path", "/echo", "--clients", str(n), "--sources", sources],
                    stdout=subprocess.PIPE, text=True)
                procs.append(load)
                line = json.loads(load.stdout.readline())
                if line["failed"]:
                    print(f"warning: {line['failed']} of {n} clients failed", file=sys.stderr)
                total += line["connected"]
                need -= n
            time.sleep(args.settle)
            rss, slab = rss_kib(gw.pid), slab_kib()
            results.append({"clients": total, "rss_kib": rss, "slab_kib": slab,
                            "rss_per_client_bytes": round((rss - base_rss) * 1024 / total),
                            "slab_per_client_bytes": round((slab - base_slab) * 1024 / total)})
            print(json.dumps(results[-1]), flush=True)
        for a, b in zip(results, results[1:]):
            b["slope_bytes_per_client"] = round((b["rss_kib"] - a["rss_kib"]) * 1024 / (b["clients"] - a["clients"]))
        report = {"system": "edgegate", "base_rss_kib": base_rss, "steps": results}
        print(json.dumps(report, indent=2))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=2)
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=40)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    main()
