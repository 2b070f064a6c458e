"""The systems under test, started as the benchmark's own processes (config
files in a temp dir, never system services), or a remote gateway:

- proxies (scenarios 1-3): EdgeGate on each of its TLS streams, HAProxy and
  nginx in front of ws-echo-backend;
- fan-out (scenario 4): EdgeGate as `run` (example service in its own
  process) and as `demo` (service inside the gateway's process), nginx +
  nchan, and the write floor (edgegate-write-floor: one thread writing the
  message to every socket)."""

import os
import shutil
import signal
import subprocess
import time

from .host import children, first_line, free_port, log, stop_proc, wait_port
from .prom import metric_sum, scrape


SYSTEM_NAMES = ("edgegate", "edgegate-lean", "edgegate-demo", "haproxy", "nginx", "nchan", "floor")

# Systems scenarios 1-3 (idle memory, handshakes, echo through a proxy) run on.
PROXY_SYSTEMS = ("edgegate", "edgegate-lean", "haproxy", "nginx")

# Systems scenario 4 (fan-out) runs on.
FANOUT_SYSTEMS = ("edgegate", "edgegate-lean", "edgegate-demo", "nchan", "floor")

# Where Debian's libnginx-mod-nchan puts the module.
NCHAN_MODULE = "/usr/lib/nginx/modules/ngx_nchan_module.so"


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
    """A system under test on this host: `target`, `pids()`, `echo_path`, `admin`.

    Fan-out: subscribers connect to `fanout_path`, the publisher to
    `publisher_path` (None: the same path; it is then also a subscriber
    the load generator does not count), witnesses echo on `witness_path`
    (None: the system has no echo). `all_pids()` adds helper processes
    (EdgeGate's service) to `pids()`."""
    name = "?"
    echo_path = "/echo"
    fanout_path = "/chat"
    publisher_path = None
    witness_path = None
    storm = True
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

    def all_pids(self):
        return self.pids()


class EdgeGate(System):
    """`edgegate run` with the example service in its own process."""
    name = "edgegate"
    witness_path = "/echo"
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
        self.svc = self.spawn([self.bins["example_service"], "--listen", f"127.0.0.1:{svc_port}"], "service.log")
        wait_port("127.0.0.1", svc_port, proc=self.svc)
        self.gw = self.spawn([self.bins["edgegate"], "run", "--config", config], "gateway.log")
        wait_port("127.0.0.1", self.port, proc=self.gw)
        wait_port("127.0.0.1", admin_port, proc=self.gw)
        self.wait_links()

    def wait_links(self):
        """Links up before the first client."""
        for _ in range(100):
            up = metric_sum(scrape(self.admin), "edgegate_links_up")
            if up is not None and up >= 2:
                break
            time.sleep(0.1)

    def pids(self):
        return [self.gw.pid]

    def all_pids(self):
        return [self.gw.pid, self.svc.pid]


class EdgeGateLean(EdgeGate):
    """EdgeGate with `tls_stream = "lean"`: its own TLS stream, no buffer
    held while a client is idle."""
    name = "edgegate-lean"
    tls_stream = "lean"


class EdgeGateDemo(EdgeGate):
    """`edgegate demo`: the example service runs inside the gateway's process,
    on its worker threads; its own self-signed certificate. The demo's
    config takes `EDGEGATE_` overrides: the same limits and heartbeat as
    `run` here. Its listener keeps the demo's `backlog = 1024`."""
    name = "edgegate-demo"

    def start(self):
        svc_port, admin_port = free_port(), free_port()
        self.admin = f"http://127.0.0.1:{admin_port}"
        env = {"EDGEGATE_RUNTIME__WORKER_THREADS": str(self.workers),
               "EDGEGATE_LIMITS__MAX_CLIENTS": "19500", "EDGEGATE_LIMITS__HANDSHAKE_PERMITS": "0",
               "EDGEGATE_HEARTBEAT__PING_INTERVAL_SECS": "30", "EDGEGATE_HEARTBEAT__PING_TIMEOUT_SECS": "75"}
        self.settings = {"command": "edgegate demo", "worker_threads": self.workers, "max_clients": 19500,
                         "handshake_permits": "0 (16 per worker)", "links": 2, "heartbeat": "ping 30 s, timeout 75 s",
                         "backlog": "1024 (the demo's)", "service": "in the gateway's process"}
        p = subprocess.Popen([self.bins["edgegate"], "demo", "--listen", self.target,
                              "--service", f"127.0.0.1:{svc_port}", "--admin", f"127.0.0.1:{admin_port}"],
                             stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                             stderr=open(os.path.join(self.work, "demo.log"), "w"),
                             env=dict(os.environ, **env))
        self.procs.append(p)
        self.gw = p
        wait_port("127.0.0.1", self.port, proc=p)
        wait_port("127.0.0.1", admin_port, proc=p)
        self.wait_links()

    def all_pids(self):
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


class Nchan(System):
    """nginx + nchan (Debian's libnginx-mod-nchan): subscribers on `/sub`
    (`nchan_subscriber websocket`), the publisher on `/pub`
    (`nchan_publisher websocket`), one channel; TLS terminated by nginx.
    New subscribers get only messages published after they subscribed
    (`nchan_subscriber_first_message newest`), so a reconnect replays nothing."""
    name = "nchan"
    fanout_path = "/sub"
    publisher_path = "/pub"

    def start(self):
        if not os.path.exists(NCHAN_MODULE):
            raise RuntimeError(f"{NCHAN_MODULE} missing: apt-get install libnginx-mod-nchan")
        cert, key, _ = self.cert
        wc = 19900
        self.settings = {"worker_processes": self.workers, "worker_connections": wc,
                         "worker_rlimit_nofile": 20000, "listen": "reuseport", "ssl_buffer_size": "4k",
                         "nchan": "websocket subscriber /sub, websocket publisher /pub, channel room, "
                                  "first_message newest, shared memory 128M (default)",
                         "version": first_line(["nginx", "-v"]),
                         "module": nchan_version()}
        t = os.path.join(self.work, "nginx-tmp")
        os.makedirs(t, exist_ok=True)
        config = os.path.join(self.work, "nchan.conf")
        with open(config, "w") as f:
            f.write(f"""load_module {NCHAN_MODULE};
worker_processes {self.workers};
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
    client_body_temp_path {t};

    server {{
        listen 127.0.0.1:{self.port} ssl reuseport backlog=4096;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_buffer_size 4k;

        location = /sub {{
            nchan_subscriber websocket;
            nchan_channel_id room;
            nchan_subscriber_first_message newest;
        }}
        location = /pub {{
            nchan_publisher websocket;
            nchan_channel_id room;
        }}
    }}
}}
""")
        self.master = self.spawn(["nginx", "-e", f"{self.work}/nginx-error.log", "-p", self.work, "-c", config],
                                 "nginx.log")
        wait_port("127.0.0.1", self.port, proc=self.master)

    def pids(self):
        return [self.master.pid] + children(self.master.pid)


class Floor(System):
    """The write floor (tests/src/bin/edgegate-write-floor.rs): one thread
    writes each published message to every subscriber's TLS socket, with
    nothing else in between. A reference line, not a server: it has no
    reconnect handling worth storming."""
    name = "floor"
    fanout_path = "/sub"
    publisher_path = "/pub"
    storm = False

    def start(self):
        cert, key, _ = self.cert
        self.settings = {"threads": 1, "backlog": 4096, "what": "one pass of write(frame) per subscriber per publish"}
        self.p = self.spawn([self.bins["edgegate-write-floor"], "--listen", self.target, "--cert", cert,
                             "--key", key, "--publish-path", self.publisher_path], "floor.log")
        wait_port("127.0.0.1", self.port, proc=self.p)

    def pids(self):
        return [self.p.pid]


def nchan_version():
    """The installed libnginx-mod-nchan package version, or "unknown"."""
    r = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "libnginx-mod-nchan"], capture_output=True, text=True)
    return f"libnginx-mod-nchan {r.stdout.strip()}" if r.returncode == 0 and r.stdout.strip() else "unknown"


def nchan_available():
    return shutil.which("nginx") is not None and os.path.exists(NCHAN_MODULE)


class Remote(System):
    """A gateway somewhere else: only what its admin /metrics tells."""
    name = "edgegate"
    witness_path = "/echo"

    def __init__(self, target, admin):
        self.target, self.admin, self.procs = target, admin, []
        self.settings = {"target": target, "admin": admin}

    def start(self):
        pass

    def pids(self):
        return []


def ensure_proxies(systems):
    """apt-get installs HAProxy, nginx and nchan if missing; their services
    are not started or used (the benchmark runs its own processes)."""
    need = [pkg for pkg, binary in (("haproxy", "haproxy"), ("nginx-light", "nginx"))
            if binary in systems and shutil.which(binary) is None]
    if "nchan" in systems and not nchan_available():
        need.append("libnginx-mod-nchan")
    if not need:
        return
    log(f"installing {' '.join(need)} with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends"] + need, check=True, env=env)
    # The packages may have started system services: this benchmark does not use them.
    for svc in ("haproxy", "nginx"):
        subprocess.run(["service", svc, "stop"], capture_output=True)
