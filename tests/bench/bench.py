#!/usr/bin/env python3
"""EdgeGate benchmark driver: runs the scenarios, side by side with HAProxy and nginx.

Python 3 standard library only. It builds the release binaries, starts the
systems under test as its own processes (config files in a temp dir, never
system services), runs many `edgegate-load` processes so a scenario can go past
one process's descriptor limit, and writes:

  tests/bench/results/latest.json   every number, with the machine and its load
  tests/bench/results/latest.md     the table
  tests/bench/results/latest.png    the plot (edgegate-bench-plot)

Scenarios (see docs/benchmark.md for what each one measures and why):

  1 idle-memory  RSS per idle TLS WebSocket client at each step (slope), kernel Slab per connection
  2 handshake    CPU seconds (utime+stime) per 1000 TLS + WebSocket handshakes
  3 echo         round trip at a fixed rate while the idle clients are held
  4 fanout       one publish to N subscribers: delivery p50/p99/max, CPU per delivery   (edgegate)
  5 storm        N clients reconnect at once: time to all back, failures, witness p99   (edgegate)
  6 poll-delay   the gateway's scheduler poll delay p99 during 3, 4 and 5             (edgegate)

1-3 run against edgegate, haproxy and nginx with the same load generator.

Usage:
  tests/bench/bench.py                       # everything, release build (~15 min on 2 cores)
  tests/bench/bench.py --systems edgegate --scenarios idle-memory,echo
  tests/bench/bench.py --target 10.0.0.5:8443 --admin http://10.0.0.5:9090 \\
      --source-pool 10.0.1.1-254 --steps 100000,1000000 ...   # remote gateway

It reports; it never passes or fails on the numbers.
"""

import argparse
import datetime
import ipaddress
import json
import os
import platform
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULTS = os.path.join(ROOT, "tests", "bench", "results")
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


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
POLL_DELAY_METRIC = "edgegate_runtime_poll_delay_seconds"
SYSTEM_NAMES = ("edgegate", "haproxy", "nginx")
SCENARIOS = ("idle-memory", "handshake", "echo", "fanout", "storm", "poll-delay")


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the host --

def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def meminfo_kib(key):
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def tcp_mem_pages():
    """Pages of TCP socket buffers (/proc/net/sockstat `TCP: ... mem N`)."""
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                parts = line.split()
                return int(parts[parts.index("mem") + 1])
    return 0


def rss_kib(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total


def cpu_secs(pids):
    """utime + stime of the processes (all their threads), in seconds."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except FileNotFoundError:
            pass
    return total / CLK_TCK


def children(pid):
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(d))
            except (FileNotFoundError, ProcessLookupError):
                pass
    return out


def machine():
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    nofile = "unknown"
    try:
        import resource
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    except Exception:
        pass
    return {"host": platform.node(), "kernel": platform.release(), "cpu": cpu,
            "cores": os.cpu_count(), "mem_gib": round(meminfo_kib("MemTotal") / 1048576, 1),
            "nofile_hard": nofile, "os": os_release()}


def os_release():
    try:
        with open("/etc/os-release") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    return line.split("=", 1)[1].strip().strip('"')
    except FileNotFoundError:
        pass
    return platform.system()


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(host, port, timeout=30.0, proc=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before listening on {port}")
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{host}:{port} not listening after {timeout}s")


def stop_proc(p, sig=signal.SIGTERM, timeout=20):
    if p is None or p.poll() is not None:
        return
    try:
        p.send_signal(sig)
        p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


# ------------------------------------------------------- source addresses --

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


# ----------------------------------------------------------- load processes --

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


# ------------------------------------------------------------ admin metrics --

def scrape(url):
    if not url:
        return None
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/metrics", timeout=5) as r:
            return r.read().decode()
    except OSError as e:
        log(f"cannot scrape {url}: {e}")
        return None


def metric_sum(text, name, labels=""):
    if not text:
        return None
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        series, _, value = line.rpartition(" ")
        n, _, rest = series.partition("{")
        if n == name and labels in rest:
            try:
                total += float(value)
                found = True
            except ValueError:
                pass
    return total if found else None


def histogram_buckets(text, name):
    """{le: cumulative count} of a Prometheus histogram (all label sets summed)."""
    out = {}
    if not text:
        return out
    for line in text.splitlines():
        if not line.startswith(name + "_bucket"):
            continue
        series, _, value = line.rpartition(" ")
        le = series.split('le="', 1)[1].split('"', 1)[0]
        le = float("inf") if le in ("+Inf", "Inf") else float(le)
        out[le] = out.get(le, 0.0) + float(value)
    return out


def histogram_quantile(before, after, quantile):
    """Quantile of the observations between two scrapes (Prometheus-style
    linear interpolation inside the bucket). None if the histogram is absent."""
    if not after:
        return None
    les = sorted(after)
    counts = [after[le] - (before or {}).get(le, 0.0) for le in les]
    total = counts[-1]
    if total <= 0:
        return {"count": 0, "value_ms": None}
    rank = quantile * total
    prev_le, prev_c = 0.0, 0.0
    for le, c in zip(les, counts):
        if c >= rank:
            if le == float("inf"):
                return {"count": int(total), "value_ms": round(prev_le * 1000, 3), "note": "above the top bucket"}
            width = c - prev_c
            frac = (rank - prev_c) / width if width > 0 else 1.0
            return {"count": int(total), "value_ms": round((prev_le + (le - prev_le) * frac) * 1000, 3)}
        prev_le, prev_c = le, c
    return {"count": int(total), "value_ms": None}


class PollDelay:
    """p50/p99 of a gateway histogram (by default the scheduler poll delay)
    between `start()` and `stop()`, from the admin /metrics."""

    def __init__(self, admin, metric=POLL_DELAY_METRIC):
        self.admin = admin
        self.metric = metric
        self.before = None

    def start(self):
        self.before = histogram_buckets(scrape(self.admin), self.metric)

    def stop(self):
        after = histogram_buckets(scrape(self.admin), self.metric)
        if not after:
            return {"p99_ms": "n/a", "note": f"{self.metric} not exported"}
        p99 = histogram_quantile(self.before, after, 0.99)
        p50 = histogram_quantile(self.before, after, 0.5)
        return {"p99_ms": p99["value_ms"], "p50_ms": p50["value_ms"], "polls": p99["count"]}


# ---------------------------------------------------------------- systems --

def make_cert(work):
    cert, key = os.path.join(work, "cert.pem"), os.path.join(work, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    combined = os.path.join(work, "combined.pem")
    with open(combined, "w") as f:
        f.write(open(cert).read() + open(key).read())
    return cert, key, combined


class System:
    """A system under test on this host: `target`, `pids()`, `echo_path`, `admin`."""
    name = "?"
    echo_path = "/echo"
    admin = None
    settings = {}

    def __init__(self, work, bins, cert, workers):
        self.work, self.bins, self.cert, self.workers = work, bins, cert, workers
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.procs = []

    def spawn(self, args, log_name):
        p = subprocess.Popen(args, stdout=subprocess.DEVNULL,
                             stderr=open(os.path.join(self.work, log_name), "w"),
                             stdin=subprocess.DEVNULL)
        self.procs.append(p)
        return p

    def stop(self):
        for p in reversed(self.procs):
            stop_proc(p, signal.SIGINT if p.args[0].endswith("example_service") else signal.SIGTERM)
        self.procs = []


class EdgeGate(System):
    name = "edgegate"

    def start(self):
        svc_port, admin_port = free_port(), free_port()
        self.admin = f"http://127.0.0.1:{admin_port}"
        cert, key, _ = self.cert
        config = os.path.join(self.work, "edgegate.toml")
        self.settings = {"worker_threads": self.workers, "max_clients": 19500, "handshake_permits": "0 (16 per worker)",
                         "links": 2, "heartbeat": "ping 30 s, timeout 75 s", "backlog": 4096}
        with open(config, "w") as f:
            f.write(f"""[runtime]
worker_threads = {self.workers}

[admin]
bind = "127.0.0.1:{admin_port}"

[[listener]]
name = "bench"
bind = "127.0.0.1:{self.port}"
backlog = 4096
tls_cert_path = "{cert}"
tls_key_path = "{key}"

[[route]]
listener = "bench"
path = "/echo"
service = "example"

[[route]]
listener = "bench"
path = "/chat"
service = "example"

[[service]]
name = "example"
addresses = ["127.0.0.1:{svc_port}"]
links = 2

[limits]
max_clients = 19500
handshake_permits = 0

[heartbeat]
ping_interval_secs = 30
ping_timeout_secs = 75

[drain]
drain_window_secs = 1
""")
        svc = self.spawn([self.bins["example_service"], "--listen", f"127.0.0.1:{svc_port}"], "service.log")
        wait_port("127.0.0.1", svc_port, proc=svc)
        self.gw = self.spawn([self.bins["edgegate"], "run", "--config", config], "gateway.log")
        wait_port("127.0.0.1", self.port, proc=self.gw)
        wait_port("127.0.0.1", admin_port, proc=self.gw)
        # Links up before the first client.
        for _ in range(100):
            up = metric_sum(scrape(self.admin), "edgegate_links_up")
            if up is not None and up >= 2:
                break
            time.sleep(0.1)

    def pids(self):
        return [self.gw.pid]


class HAProxy(System):
    """HAProxy terminating TLS and proxying WebSocket to ws-echo-backend.

    A proxied client costs HAProxy two descriptors (client + backend), so one
    process under the 20000 hard limit holds < 10k clients: `workers` separate
    processes (nbthread 1 each) share the port with SO_REUSEPORT (HAProxy's
    default), as `workers` threads would if the limit allowed one process."""
    name = "haproxy"

    def start(self):
        self.backend_port = free_port()
        _, _, combined = self.cert
        maxconn = 9900
        self.settings = {"processes": self.workers, "nbthread": 1, "maxconn_per_process": maxconn,
                         "ulimit-n": 20000, "tune.bufsize": "16384 (default)",
                         "timeouts": "client/server/tunnel 1h", "mode": "http, WebSocket upgrade",
                         "version": first_line(["haproxy", "-v"])}
        config = os.path.join(self.work, "haproxy.cfg")
        with open(config, "w") as f:
            f.write(f"""global
    maxconn {maxconn}
    ulimit-n 20000
    nbthread 1
    ssl-server-verify none

defaults
    mode http
    timeout connect 5s
    timeout client 1h
    timeout server 1h
    timeout tunnel 1h
    timeout http-request 10s

frontend bench
    bind 127.0.0.1:{self.port} ssl crt {combined} alpn http/1.1
    default_backend echo

backend echo
    server echo 127.0.0.1:{self.backend_port}
""")
        b = self.spawn([self.bins["ws-echo-backend"], "--listen", f"127.0.0.1:{self.backend_port}"], "backend.log")
        wait_port("127.0.0.1", self.backend_port, proc=b)
        self.hap = []
        for i in range(self.workers):
            p = self.spawn(["haproxy", "-db", "-f", config], f"haproxy{i}.log")
            self.hap.append(p)
            time.sleep(0.3)
        wait_port("127.0.0.1", self.port, proc=self.hap[0])

    def pids(self):
        return [p.pid for p in self.hap]


class Nginx(System):
    """nginx terminating TLS and proxying WebSocket to ws-echo-backend."""
    name = "nginx"

    def start(self):
        self.backend_port = free_port()
        cert, key, _ = self.cert
        wc = 19900
        self.settings = {"worker_processes": self.workers, "worker_connections": wc,
                         "worker_rlimit_nofile": 20000, "listen": "reuseport",
                         "ssl_buffer_size": "4k", "proxy_buffer_size": "4k",
                         "timeouts": "proxy_read/send 1h", "version": first_line(["nginx", "-v"])}
        for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            os.makedirs(os.path.join(self.work, "nginx-tmp", d), exist_ok=True)
        t = os.path.join(self.work, "nginx-tmp")
        config = os.path.join(self.work, "nginx.conf")
        with open(config, "w") as f:
            f.write(f"""worker_processes {self.workers};
worker_rlimit_nofile 20000;
daemon off;
pid {self.work}/nginx.pid;
error_log {self.work}/nginx-error.log warn;

events {{
    worker_connections {wc};
    multi_accept on;
}}

http {{
    access_log off;
    client_body_temp_path {t}/client_body;
    proxy_temp_path {t}/proxy;
    fastcgi_temp_path {t}/fastcgi;
    uwsgi_temp_path {t}/uwsgi;
    scgi_temp_path {t}/scgi;

    map $http_upgrade $connection_upgrade {{
        default upgrade;
        ''      close;
    }}

    upstream echo {{
        server 127.0.0.1:{self.backend_port};
    }}

    server {{
        listen 127.0.0.1:{self.port} ssl reuseport;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_buffer_size 4k;

        location / {{
            proxy_pass http://echo;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_buffer_size 4k;
            proxy_read_timeout 1h;
            proxy_send_timeout 1h;
        }}
    }}
}}
""")
        b = self.spawn([self.bins["ws-echo-backend"], "--listen", f"127.0.0.1:{self.backend_port}"], "backend.log")
        wait_port("127.0.0.1", self.backend_port, proc=b)
        self.master = self.spawn(["nginx", "-e", f"{self.work}/nginx-error.log", "-p", self.work, "-c", config],
                                 "nginx.log")
        wait_port("127.0.0.1", self.port, proc=self.master)

    def pids(self):
        return [self.master.pid] + children(self.master.pid)


class Remote(System):
    """A gateway somewhere else: only what its admin /metrics tells."""
    name = "edgegate"

    def __init__(self, target, admin):
        self.target, self.admin, self.procs = target, admin, []
        self.settings = {"target": target, "admin": admin}

    def start(self):
        pass

    def pids(self):
        return []


def first_line(cmd):
    try:
        r = subprocess.run(cmd, capture_output=True, text=True)
        return (r.stdout + r.stderr).strip().splitlines()[0]
    except (OSError, IndexError):
        return "unknown"


def ensure_proxies(systems):
    """apt-get installs HAProxy and nginx if missing; their services are not
    started or used (the benchmark runs its own processes)."""
    need = [pkg for pkg, binary in (("haproxy", "haproxy"), ("nginx-light", "nginx"))
            if binary in systems and shutil.which(binary) is None]
    if not need:
        return
    log(f"installing {' '.join(need)} with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends"] + need, check=True, env=env)
    # The packages may have started system services: this benchmark does not use them.
    for svc in ("haproxy", "nginx"):
        subprocess.run(["service", svc, "stop"], capture_output=True)


# -------------------------------------------------------------- scenarios --

class Bench:
    def __init__(self, args):
        self.args = args
        self.pool = SourcePool(args.source_pool)
        target_dir = os.path.join(ROOT, "target", args.profile)
        self.bins = {
            "edgegate": os.path.join(target_dir, "edgegate"),
            "edgegate-load": os.path.join(target_dir, "edgegate-load"),
            "ws-echo-backend": os.path.join(target_dir, "ws-echo-backend"),
            "edgegate-bench-plot": os.path.join(target_dir, "edgegate-bench-plot"),
            "example_service": os.path.join(target_dir, "examples", "example_service"),
        }
        self.load = Load(self.bins["edgegate-load"], self.pool, args.per_process)

    def system(self, name, work, cert):
        if self.args.target:
            return Remote(self.args.target, self.args.admin)
        cls = {"edgegate": EdgeGate, "haproxy": HAProxy, "nginx": Nginx}[name]
        return cls(work, self.bins, cert, self.args.workers)

    def idle_memory_and_handshakes(self, sys_, path):
        """Scenarios 1 and 2: add idle clients in steps; RSS and Slab after each
        step settles, CPU while each step's clients connect. The clients stay."""
        a = self.args
        pids = sys_.pids
        time.sleep(1.0)
        remote = not pids()
        base_rss = self.remote_rss(sys_) if remote else rss_kib(pids())
        base_slab, base_tcp = meminfo_kib("Slab"), tcp_mem_pages()
        steps, hs = [], []
        total = 0
        for step in a.steps:
            need = step - total
            if need <= 0:
                continue
            cpu0, t0 = (cpu_secs(pids()) if not remote else None), time.time()
            _, connected, failed = self.load.group(sys_.target, path, need, "idle",
                                                   ["--concurrency", str(a.concurrency)])
            wall = time.time() - t0
            cpu1 = cpu_secs(pids()) if not remote else None
            total += connected
            if failed:
                log(f"{sys_.name}: {failed} of {need} clients failed to connect")
            if cpu0 is not None and connected:
                hs.append({"handshakes": connected, "cpu_secs": round(cpu1 - cpu0, 3),
                           "wall_secs": round(wall, 2), "failed": failed})
            time.sleep(a.settle)
            rss = self.remote_rss(sys_) if remote else rss_kib(pids())
            slab, tcp = meminfo_kib("Slab"), tcp_mem_pages()
            row = {"clients": total, "failed": failed, "rss_kib": rss,
                   "rss_per_client_bytes": round((rss - base_rss) * 1024 / total) if rss is not None and total else None,
                   "slab_kib": slab, "slab_per_client_bytes": round((slab - base_slab) * 1024 / total) if total else None,
                   "tcp_mem_per_client_bytes": round((tcp - base_tcp) * PAGE_KIB * 1024 / total) if total else None,
                   "loadavg": loadavg()}
            steps.append(row)
            log(f"{sys_.name}: {total} idle clients, RSS {rss} KiB, "
                f"{row['rss_per_client_bytes']} B/client, slab {row['slab_per_client_bytes']} B/client, load {row['loadavg']}")
        for prev, cur in zip(steps, steps[1:]):
            if cur["rss_kib"] is not None and prev["rss_kib"] is not None and cur["clients"] > prev["clients"]:
                cur["slope_bytes_per_client"] = round((cur["rss_kib"] - prev["rss_kib"]) * 1024 /
                                                      (cur["clients"] - prev["clients"]))
        memory = {"base_rss_kib": base_rss, "steps": steps,
                  "slope_bytes_per_client": fit_slope([(s["clients"], s["rss_kib"] * 1024) for s in steps
                                                       if s["rss_kib"] is not None]),
                  "slab_slope_bytes_per_client": fit_slope([(s["clients"], s["slab_kib"] * 1024) for s in steps]),
                  "tcp_mem_slope_bytes_per_client": fit_slope([(s["clients"], s["tcp_mem_per_client_bytes"] * s["clients"])
                                                               for s in steps if s["tcp_mem_per_client_bytes"] is not None]),
                  "load_generator_rss_per_client_bytes": self.load_rss_per_client(total),
                  "note": "slab is host-wide: both ends of every loopback connection "
                          "(client and proxy sockets; for haproxy/nginx also their backend connections)"}
        handshake = None
        if hs:
            n = sum(h["handshakes"] for h in hs)
            cpu = sum(h["cpu_secs"] for h in hs)
            handshake = {"handshakes": n, "cpu_secs": round(cpu, 3),
                         "cpu_secs_per_1000": round(cpu * 1000 / n, 4) if n else None,
                         "steps": hs, "loadavg": loadavg()}
        return memory, handshake, total

    def load_rss_per_client(self, clients):
        """RSS of the load processes holding the idle clients, per client."""
        pids = [p.p.pid for p in self.load.procs if p.p.poll() is None]
        return round(rss_kib(pids) * 1024 / clients) if clients and pids else None

    def remote_rss(self, sys_):
        v = metric_sum(scrape(sys_.admin), "edgegate_process_resident_memory_bytes")
        return round(v / 1024) if v is not None else None

    def echo(self, sys_, path, poll=None):
        """Scenario 3: `echo_clients` clients sending `echo_rate` messages/s in
        all, for `echo_secs`, on top of whatever is held."""
        a = self.args
        procs, connected, failed = self.load.group(
            sys_.target, path, a.echo_clients, "echo",
            ["--active", str(a.echo_clients), "--rate", str(a.echo_rate / max(1, -(-a.echo_clients // a.per_process))),
             "--payload-bytes", str(a.payload_bytes)])
        for p in procs:
            p.send("report")
        for p in procs:
            p.wait("report", 30)
        time.sleep(1)
        if poll:
            poll.start()
        cpu0 = cpu_secs(sys_.pids())
        for p in procs:
            p.send("start")
        time.sleep(a.echo_secs)
        for p in procs:
            p.send("pause")
        time.sleep(1.0)  # the last round trips come back
        cpu1 = cpu_secs(sys_.pids())
        for p in procs:
            p.send("report")
        out = merge_reports([p.wait("report", 30) for p in procs])
        out.update({"clients": connected, "failed": failed, "rate_per_sec": a.echo_rate, "secs": a.echo_secs,
                    "payload_bytes": a.payload_bytes, "lost": out["sent"] - out["received"],
                    "cpu_secs": round(cpu1 - cpu0, 3), "loadavg": loadavg()})
        if poll:
            out["poll_delay"] = poll.stop()
        self.load.stop(procs)
        log(f"{sys_.name}: echo p50 {out['p50_ms']} ms p99 {out['p99_ms']} ms p999 {out['p999_ms']} ms "
            f"({out['received']}/{out['sent']}), load {out['loadavg']}")
        return out

    def fanout(self, sys_):
        """Scenario 4: `subscribers` clients on /chat; one publishes
        `publishes` messages; every subscriber times each delivery."""
        a = self.args
        procs, connected, failed = self.load.group(sys_.target, "/chat", a.subscribers, "subscribe",
                                                   ["--concurrency", str(a.concurrency),
                                                    "--payload-bytes", str(a.payload_bytes)],
                                                   publisher=True)
        time.sleep(a.settle)  # subscriptions reach the gateway
        for p in procs:
            p.send("report")
        for p in procs:
            p.wait("report", 30)
        poll = PollDelay(sys_.admin)
        poll.start()
        queued = PollDelay(sys_.admin, "edgegate_publish_delivery_seconds")
        queued.start()
        cpu0 = cpu_secs(sys_.pids())
        procs[0].send(f"publish {a.publishes} {a.publish_interval_ms}")
        procs[0].wait("published", 60 + a.publishes * a.publish_interval_ms / 1000)
        time.sleep(2.0)
        cpu1 = cpu_secs(sys_.pids())
        pd = poll.stop()
        gateway_queue = queued.stop()
        for p in procs:
            p.send("report")
        out = merge_reports([p.wait("report", 30) for p in procs])
        out["gateway_queue_all_subscribers"] = gateway_queue
        expected = a.publishes * connected
        deliveries = out["received"]
        out.update({"subscribers": connected, "failed": failed, "publishes": a.publishes,
                    "interval_ms": a.publish_interval_ms, "expected_deliveries": expected,
                    "deliveries": deliveries, "cpu_secs": round(cpu1 - cpu0, 3),
                    "cpu_us_per_delivery": round((cpu1 - cpu0) * 1e6 / deliveries, 3) if deliveries and sys_.pids() else None,
                    "poll_delay": pd, "loadavg": loadavg()})
        self.load.stop(procs)
        log(f"fanout: {deliveries}/{expected} deliveries, p50 {out['p50_ms']} p99 {out['p99_ms']} "
            f"max {out['max_ms']} ms, {out['cpu_us_per_delivery']} us CPU/delivery, poll p99 {pd.get('p99_ms')}")
        return out

    def storm(self, sys_):
        """Scenario 5: `storm_clients` idle clients drop and reconnect at once
        while `witnesses` already-connected clients keep timing echoes."""
        a = self.args
        before = scrape(sys_.admin)
        idle, connected, failed = self.load.group(sys_.target, "/echo", a.storm_clients, "storm",
                                                  ["--concurrency", str(a.concurrency)])
        wit, wconnected, _ = self.load.group(sys_.target, "/echo", a.witnesses, "echo",
                                             ["--active", str(a.witnesses), "--rate", str(a.witness_rate),
                                              "--payload-bytes", str(a.payload_bytes)])
        w = wit[0]
        w.send("start")
        time.sleep(3.0)
        w.send("report")
        calm = merge_reports([w.wait("report", 30)])
        poll = PollDelay(sys_.admin)
        poll.start()
        mid = scrape(sys_.admin)
        cpu0 = cpu_secs(sys_.pids())
        t0 = time.time()
        for p in idle:
            p.send("storm")
        results = [p.wait("storm", 240) for p in idle]
        wall = time.time() - t0
        cpu1 = cpu_secs(sys_.pids())
        w.send("report")
        during = merge_reports([w.wait("report", 30)])
        pd = poll.stop()
        after = scrape(sys_.admin)
        w.send("pause")
        out = {"clients": connected, "failed_first_connect": failed, "witnesses": wconnected,
               "all_back": all(r["all_back"] for r in results),
               "back": sum(r["back"] for r in results),
               "back_secs": max(r["back_secs"] for r in results),
               "half_back_secs": max((r["half_back_secs"] or 0) for r in results),
               "reconnect_failures": sum(r["reconnect_failures"] for r in results),
               "storm_wall_secs": round(wall, 3),
               "cpu_secs": round(cpu1 - cpu0, 3),
               "witness_calm": calm, "witness_during": during,
               "poll_delay": pd, "loadavg": loadavg()}
        refused = metric_sum(after, "edgegate_clients_refused_total")
        if refused is not None:
            out["gateway_refused"] = refused - (metric_sum(mid, "edgegate_clients_refused_total") or 0)
        hf = metric_sum(after, "edgegate_handshake_failures_total")
        if hf is not None:
            out["gateway_handshake_failures"] = hf - (metric_sum(mid, "edgegate_handshake_failures_total") or 0)
        for key, metric in (("listen_overflows", "edgegate_listen_overflows_total"),
                            ("listen_drops", "edgegate_listen_drops_total")):
            v = metric_sum(after, metric)
            if v is not None:
                out["host_" + key] = v - (metric_sum(mid, metric) or 0)
        del before
        self.load.stop(wit + idle)
        log(f"storm: {out['back']}/{connected} back in {out['back_secs']} s, {out['reconnect_failures']} failures, "
            f"witness p99 {during['p99_ms']} ms (calm {calm['p99_ms']}), poll p99 {pd.get('p99_ms')}")
        return out

    def run_system(self, name, work, cert, results):
        a = self.args
        sys_ = self.system(name, work, cert)
        entry = results["systems"].setdefault(name, {})
        log(f"--- {name} ---")
        try:
            sys_.start()
            entry["settings"] = sys_.settings
            entry["loadavg_start"] = loadavg()
            want = set(a.scenarios)
            if want & {"idle-memory", "handshake", "echo"}:
                memory, handshake, _held = self.idle_memory_and_handshakes(sys_, sys_.echo_path)
                if "idle-memory" in want:
                    entry["idle_memory"] = memory
                if "handshake" in want and handshake:
                    entry["handshake"] = handshake
                if "echo" in want:
                    poll = PollDelay(sys_.admin) if name == "edgegate" and sys_.admin else None
                    entry["echo"] = self.echo(sys_, sys_.echo_path, poll)
                self.load.stop()
            if name == "edgegate":
                if "fanout" in want:
                    time.sleep(2)
                    results["fanout"] = self.fanout(sys_)
                if "storm" in want:
                    time.sleep(2)
                    results["storm"] = self.storm(sys_)
                if "poll-delay" in want:
                    results["poll_delay"] = {
                        "echo": entry.get("echo", {}).get("poll_delay"),
                        "fanout": results.get("fanout", {}).get("poll_delay"),
                        "storm": results.get("storm", {}).get("poll_delay")}
        except Exception as e:  # a failed system is reported, the others still run
            log(f"{name}: {type(e).__name__}: {e}")
            entry["error"] = f"{type(e).__name__}: {e}"
        finally:
            self.load.stop()
            sys_.stop()
            entry["loadavg_end"] = loadavg()
            logs = [f for f in os.listdir(work) if f.endswith(".log")]
            for f in logs:
                shutil.copy(os.path.join(work, f), os.path.join(work, f"{name}-{f}"))


def fit_slope(points):
    """Least-squares slope of (x, y): bytes per client across all steps."""
    points = [p for p in points if p[1] is not None]
    if len(points) < 2:
        return None
    n = len(points)
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    sxx = sum((p[0] - mx) ** 2 for p in points)
    if sxx == 0:
        return None
    return round(sum((p[0] - mx) * (p[1] - my) for p in points) / sxx)


# ----------------------------------------------------------------- report --

def fmt(v, unit="", nd=2):
    if v is None or v == "n/a":
        return "n/a"
    if isinstance(v, float):
        v = round(v, nd)
    return f"{v}{unit}"


def kib(b):
    return None if b is None else round(b / 1024, 1)


def markdown(results):
    s = results["systems"]
    names = [n for n in SYSTEM_NAMES if n in s]
    m = results["machine"]
    out = [f"Benchmark run {results['started']} on {m['cpu']} ({m['cores']} cores, {m['mem_gib']} GiB, "
           f"{m['os']}, kernel {m['kernel']}); load average at start {results['loadavg_start']}, "
           f"at end {results['loadavg_end']}. Release build; "
           f"{results['params']['workers']} worker(s) per system.", ""]
    out.append("| scenario | " + " | ".join(names) + " |")
    out.append("|---|" + "---|" * len(names))

    def row(label, fn):
        cells = []
        for n in names:
            try:
                cells.append(fn(s[n]))
            except (KeyError, TypeError):
                cells.append("n/a")
        out.append(f"| {label} | " + " | ".join(cells) + " |")

    steps = results["params"]["steps"]
    k = lambda x: f"{x // 1000}k" if x % 1000 == 0 else str(x)
    row("1. RSS per idle client, slope over " + "/".join(k(x) for x in steps),
        lambda e: fmt(kib(e["idle_memory"]["slope_bytes_per_client"]), " KiB"))
    for i, st in enumerate(steps):
        row(f"1. RSS per client at {k(st)} (incl. fixed cost)",
            lambda e, i=i: fmt(kib(e["idle_memory"]["steps"][i]["rss_per_client_bytes"]), " KiB"))
    row("1. kernel Slab per connection (host-wide slope)",
        lambda e: fmt(kib(e["idle_memory"]["slab_slope_bytes_per_client"]), " KiB"))
    row("1. load generator RSS per client (for scale)",
        lambda e: fmt(kib(e["idle_memory"]["load_generator_rss_per_client_bytes"]), " KiB"))
    row("2. CPU per 1000 TLS+WS handshakes",
        lambda e: fmt(e["handshake"]["cpu_secs_per_1000"], " s", 3))
    p = results["params"]
    for key, label in (("p50_ms", "p50"), ("p99_ms", "p99"), ("p999_ms", "p99.9")):
        row(f"3. echo {label} ({p['echo_clients']} clients, {p['echo_rate']:g}/s, {k(p['steps'][-1])} idle held)",
            lambda e, key=key: fmt(e["echo"][key], " ms", 3))
    row("3. echo lost / sent", lambda e: f"{e['echo']['lost']} / {e['echo']['sent']}")
    out.append("")
    f, st, pd = results.get("fanout"), results.get("storm"), results.get("poll_delay") or {}
    out.append("| edgegate scenario | result |")
    out.append("|---|---|")
    if f:
        out.append(f"| 4. fan-out: {f['publishes']} publishes to {f['subscribers']} subscribers | "
                   f"p50 {fmt(f['p50_ms'], ' ms', 3)}, p99 {fmt(f['p99_ms'], ' ms', 3)}, max {fmt(f['max_ms'], ' ms', 3)}; "
                   f"{f['deliveries']}/{f['expected_deliveries']} delivered; "
                   f"{fmt(f['cpu_us_per_delivery'], ' µs', 2)} gateway CPU per delivery; gateway's own time to queue "
                   f"a publish to every subscriber p99 {fmt(f.get('gateway_queue_all_subscribers', {}).get('p99_ms'), ' ms', 3)} |")
    if st:
        out.append(f"| 5. storm: {st['clients']} clients reconnect at once | "
                   f"{st['back']}/{st['clients']} back in {st['back_secs']} s (half in {st['half_back_secs']} s), "
                   f"{st['reconnect_failures']} failed attempts, gateway refused {fmt(st.get('gateway_refused'))}, "
                   f"accept-queue overflows {fmt(st.get('host_listen_overflows'))}, "
                   f"handshake failures {fmt(st.get('gateway_handshake_failures'))}; witness echo p99 "
                   f"{fmt(st['witness_during']['p99_ms'], ' ms', 3)} during (calm {fmt(st['witness_calm']['p99_ms'], ' ms', 3)}) |")
    for k, label in (("echo", "3 (echo)"), ("fanout", "4 (fan-out)"), ("storm", "5 (storm)")):
        v = pd.get(k)
        if v is not None:
            out.append(f"| 6. scheduler poll delay p99 during {label} | {fmt(v.get('p99_ms'), ' ms', 3)} |")
    out.append("")
    out.append("Settings: " + "; ".join(f"**{n}** " + ", ".join(f"{k}={v}" for k, v in s[n].get("settings", {}).items())
                                       for n in names))
    errors = [f"{n}: {s[n]['error']}" for n in names if "error" in s[n]]
    if errors:
        out.append("")
        out.append("Errors: " + "; ".join(errors))
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------- main --

def build(profile):
    cmd = ["cargo", "build", "-p", "edgegate", "-p", "edgegate-link", "-p", "edgegate-tests", "--bins", "--examples"]
    if profile == "release":
        cmd.insert(2, "--release")
    log(" ".join(cmd))
    subprocess.run(cmd, cwd=ROOT, check=True)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--systems", default=",".join(SYSTEM_NAMES), help="comma list of edgegate,haproxy,nginx")
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
    ap.add_argument("--subscribers", type=int, default=15000)
    ap.add_argument("--publishes", type=int, default=20)
    ap.add_argument("--publish-interval-ms", type=int, default=250)
    ap.add_argument("--storm-clients", type=int, default=15000)
    ap.add_argument("--witnesses", type=int, default=100)
    ap.add_argument("--witness-rate", type=float, default=200.0)
    ap.add_argument("--source-pool", default="127.0.1.1-254,127.0.2.1-254,127.0.3.1-254,127.0.4.1-254",
                    help="source addresses for load processes (each gets its own 4)")
    ap.add_argument("--target", help="a remote gateway HOST:PORT (no local systems are started)")
    ap.add_argument("--admin", help="the remote gateway's admin URL, e.g. http://10.0.0.5:9090")
    ap.add_argument("--server-name", default="localhost", help="TLS server name for a remote gateway")
    ap.add_argument("--profile", default="release", choices=["release", "debug"])
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--out", default=os.path.join(RESULTS, "latest"), help="output path without extension")
    args = ap.parse_args(argv)
    args.steps = [int(x) for x in args.steps.split(",") if x]
    args.systems = [x for x in args.systems.split(",") if x]
    args.scenarios = [x for x in args.scenarios.split(",") if x]
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
        for name in args.systems:
            work = os.path.join(work_root, name)
            os.makedirs(work, exist_ok=True)
            bench.run_system(name, work, cert, results)
            time.sleep(3)  # sockets of the last system close before the next measures Slab
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


if __name__ == "__main__":
    main()
