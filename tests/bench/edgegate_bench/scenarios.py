"""The scenarios (idle-memory, handshake, echo, storm, poll-delay) and the
run of them against one system; fan-out, side by side over systems and
subscriber counts, is in fanout.py."""

import os
import shutil
import time

from .host import PAGE_KIB, ROOT, cpu_secs, loadavg, log, meminfo_kib, rss_kib, tcp_mem_pages
from .load import Load, SourcePool, merge_reports
from .prom import PollDelay, metric_sum, scrape
from .report import fit_slope
from .systems import EdgeGate, EdgeGateDemo, EdgeGateLean, Floor, HAProxy, Nchan, Nginx, Remote


SCENARIOS = ("idle-memory", "handshake", "echo", "fanout", "storm", "poll-delay")


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
            "edgegate-write-floor": os.path.join(target_dir, "edgegate-write-floor"),
            "example_service": os.path.join(target_dir, "examples", "example_service"),
        }
        self.load = Load(self.bins["edgegate-load"], self.pool, args.per_process)

    def system(self, name, work, cert, workers=None):
        if self.args.target:
            return Remote(self.args.target, self.args.admin)
        cls = {"edgegate": EdgeGate, "edgegate-lean": EdgeGateLean, "edgegate-demo": EdgeGateDemo,
               "haproxy": HAProxy, "nginx": Nginx, "nchan": Nchan, "floor": Floor}[name]
        return cls(work, self.bins, cert, self.args.workers if workers is None else workers)

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
                    poll = PollDelay(sys_.admin) if name.startswith("edgegate") and sys_.admin else None
                    entry["echo"] = self.echo(sys_, sys_.echo_path, poll)
                self.load.stop()
            if name == "edgegate":
                if "storm" in want:
                    time.sleep(2)
                    results["storm"] = self.storm(sys_)
                if "poll-delay" in want:
                    results["poll_delay"] = {
                        "echo": entry.get("echo", {}).get("poll_delay"),
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
