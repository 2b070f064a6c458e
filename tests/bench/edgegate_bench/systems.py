"""The systems under test: EdgeGate (on each of its TLS streams), HAProxy and
nginx started as the benchmark's own processes, or a remote gateway."""

import os
import shutil
import signal
import subprocess
import time

from .host import children, first_line, free_port, log, stop_proc, wait_port
from .prom import metric_sum, scrape


SYSTEM_NAMES = ("edgegate", "edgegate-lean", "haproxy", "nginx")


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
    # The listener's `tls_stream` (docs/config.md).
    tls_stream = "rustls"

    def start(self):
        svc_port, admin_port = free_port(), free_port()
        self.admin = f"http://127.0.0.1:{admin_port}"
        cert, key, _ = self.cert
        config = os.path.join(self.work, "edgegate.toml")
        self.settings = {"worker_threads": self.workers, "max_clients": 19500, "handshake_permits": "0 (16 per worker)",
                         "links": 2, "heartbeat": "ping 30 s, timeout 75 s", "backlog": 4096,
                         "tls_stream": self.tls_stream}
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
tls_stream = "{self.tls_stream}"

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


class EdgeGateLean(EdgeGate):
    """EdgeGate with `tls_stream = "lean"`: its own TLS stream, no buffer
    held while a client is idle."""
    name = "edgegate-lean"
    tls_stream = "lean"


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
