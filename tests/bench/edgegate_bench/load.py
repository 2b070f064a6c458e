"""The load driver: many `edgegate-load` processes, each on its own source
addresses, driven over their stdin/stdout JSON lines."""

import ipaddress
import json
import queue
import subprocess
import threading
import time

from .host import log


def _per_process_max():
    """Most clients one load process can hold: the hard RLIMIT_NOFILE (which
    it raises its soft limit to) less room for its own descriptors. 19000
    under a 20000 limit; far more on a host tuned for millions."""
    import resource
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    return max(100, hard - 1000)


PER_PROCESS_MAX = _per_process_max()


# Source addresses per load process: 28k ephemeral ports each (32768-60999)
# is far more than a process's clients, but spreading keeps every address's
# ports (and TIME_WAIT after a storm) well clear of the range.
SOURCES_PER_PROCESS = 4


class SourcePool:
    """Hands out disjoint groups of source addresses, never reusing one in a run."""

    def __init__(self, spec):
        self.addrs = []
        for part in spec.split(","):
            part = part.strip()
            if "-" in part:
                base, last = part.rsplit("-", 1)
                first = ipaddress.IPv4Address(base)
                o = first.packed
                self.addrs += [str(ipaddress.IPv4Address(bytes(o[:3]) + bytes([x])))
                               for x in range(o[3], int(last) + 1)]
            elif part:
                self.addrs.append(part)
        self.next = 0

    def take(self, n):
        if self.next + n > len(self.addrs):
            log("source pool exhausted: reusing addresses from the start")
            self.next = 0
        group = self.addrs[self.next:self.next + n]
        self.next += n
        return ",".join(group)


class LoadProc:
    """One `edgegate-load` process: commands on stdin, JSON lines from stdout."""

    def __init__(self, binary, args):
        self.args = args
        self.p = subprocess.Popen([binary] + args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  text=True, bufsize=1)
        self.events = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.p.stdout:
            line = line.strip()
            if not line:
                continue
            try:
                self.events.put(json.loads(line))
            except json.JSONDecodeError:
                log(f"load: not JSON: {line!r}")
        self.events.put({"event": "exit"})

    def send(self, command):
        if self.p.poll() is None:
            self.p.stdin.write(command + "\n")
            self.p.stdin.flush()

    def wait(self, event, timeout):
        deadline = time.time() + timeout
        while True:
            left = deadline - time.time()
            if left <= 0:
                raise TimeoutError(f"no {event!r} from edgegate-load within {timeout}s")
            try:
                e = self.events.get(timeout=left)
            except queue.Empty:
                continue
            if e.get("event") == event:
                return e
            if e.get("event") == "exit":
                raise RuntimeError(f"edgegate-load exited ({self.p.poll()}) waiting for {event!r}")

    def stop(self):
        if self.p.poll() is None:
            try:
                self.send("stop")
                self.p.wait(timeout=15)
            except (subprocess.TimeoutExpired, BrokenPipeError, OSError):
                self.p.kill()
                self.p.wait()


class Load:
    """Starts and talks to groups of load processes."""

    def __init__(self, binary, pool, per_process, server_name="localhost"):
        self.binary = binary
        self.pool = pool
        self.per_process = per_process
        self.server_name = server_name
        self.procs = []

    def group(self, target, path, clients, mode="idle", extra=(), timeout=300, publisher=False):
        """Starts enough processes for `clients`, waits until all connected.
        Returns (processes, connected, failed)."""
        sizes = []
        left = clients
        nproc = max(1, -(-clients // self.per_process))
        for i in range(nproc):
            n = -(-left // (nproc - i))
            sizes.append(n)
            left -= n
        procs = []
        for i, n in enumerate(sizes):
            args = ["--target", target, "--path", path, "--clients", str(n), "--mode", mode,
                    "--server-name", self.server_name,
                    "--sources", self.pool.take(SOURCES_PER_PROCESS)] + list(extra)
            if publisher and i == 0:
                args.append("--publisher")
            procs.append(LoadProc(self.binary, args))
        self.procs += procs
        connected = failed = 0
        for p in procs:
            e = p.wait("connected", timeout)
            connected += e["connected"]
            failed += e["failed"]
        return procs, connected, failed

    def stop(self, procs=None):
        procs = self.procs if procs is None else procs
        for p in procs:
            if p.p.poll() is None:
                try:
                    p.send("stop")
                except (BrokenPipeError, OSError):
                    pass
        for p in procs:
            p.stop()
        self.procs = [p for p in self.procs if p not in procs]


def merge_reports(reports):
    """Merges latency buckets of several `report` events into percentiles (ms)."""
    buckets = {}
    sent = received = 0
    for r in reports:
        sent += r["sent"]
        received += r["received"]
        for value, count in r["latency"]["buckets"]:
            buckets[value] = buckets.get(value, 0) + count
    out = {"sent": sent, "received": received}
    out.update(percentiles(buckets))
    return out


def percentiles(buckets):
    total = sum(buckets.values())
    if not total:
        return {"count": 0, "p50_ms": None, "p90_ms": None, "p99_ms": None, "p999_ms": None, "max_ms": None}
    values = sorted(buckets)

    def q(quantile):
        need = max(1, int(round(quantile * total + 0.4999)))
        seen = 0
        for v in values:
            seen += buckets[v]
            if seen >= need:
                return v
        return values[-1]

    ms = lambda us: round(us / 1000.0, 3)
    return {"count": total, "p50_ms": ms(q(0.5)), "p90_ms": ms(q(0.9)), "p99_ms": ms(q(0.99)),
            "p999_ms": ms(q(0.999)), "max_ms": ms(values[-1])}
