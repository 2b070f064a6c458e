"""Scenario 4, fan-out, side by side: EdgeGate (`run` and `demo`), nginx +
nchan and the write floor, each at every subscriber count, with the same
subscribers (TLS WebSocket, `edgegate-load --mode subscribe`) and the same
publisher.

One round of one system at one count (`FanoutRound.run`):

1. start the system fresh (so RSS per subscriber has a clean base);
2. witnesses (EdgeGate only: clients echoing on /echo at a fixed rate) connect
   and start timing, then N subscribers and one publisher connect, spread
   over several load processes and source addresses;
3. the publisher sends `publishes` messages `interval_ms` apart; every
   subscriber times every delivery from the message's send timestamp and
   counts deliveries per publish, so the driver checks that each publish
   reached all N (deliveries lost = 0) and when the last one got it;
4. all subscribers drop and reconnect at once (a storm), with the witnesses
   still timing (EdgeGate and nchan; the floor is not a server);
5. poll delay (EdgeGate's /metrics) and witness echo are read during 3 and 4.

Rounds interleave systems (round r: every count, every system) so a change
in the host's load hits all of them alike; the summary is the median over
rounds with the range."""

import os
import statistics
import time

from .host import cpu_secs, loadavg, log, rss_kib
from .load import merge_reports
from .prom import PollDelay


# How long deliveries may keep arriving after the last publish was sent.
DELIVERY_DEADLINE_SECS = 60.0
# No new delivery for this long: the rest are lost.
DELIVERY_STALL_SECS = 5.0
# How often the driver collects reports while waiting for deliveries.
COLLECT_EVERY_SECS = 0.5


class Deliveries:
    """Reports of the subscriber processes, merged: the latency buckets and,
    per publish (its send timestamp), deliveries and the last one's latency."""

    def __init__(self):
        self.reports = []
        self.messages = {}

    def add(self, report):
        self.reports.append(report)
        for sent, count, max_us in report.get("messages", []):
            m = self.messages.setdefault(sent, [0, 0])
            m[0] += count
            m[1] = max(m[1], max_us)

    @property
    def received(self):
        return sum(r["received"] for r in self.reports)

    def summary(self, subscribers, publishes):
        out = merge_reports(self.reports)
        out.pop("sent", None)
        per = [self.messages[k] for k in sorted(self.messages)]
        last = [m[1] / 1000.0 for m in per]
        expected = subscribers * publishes
        got = out.pop("received")
        out.update({
            "expected_deliveries": expected,
            "deliveries": got,
            "lost": max(0, expected - got),
            "extra": max(0, got - expected),
            "publishes_seen": len(per),
            "publishes_complete": sum(1 for m in per if m[0] == subscribers),
            "per_publish_deliveries": [m[0] for m in per],
            "last_delivery_ms": {
                "median": round(statistics.median(last), 3) if last else None,
                "max": round(max(last), 3) if last else None,
                "per_publish": [round(x, 3) for x in last],
            },
        })
        return out


def per_subscriber(before_kib, after_kib, n):
    if not before_kib or not after_kib or not n:
        return None
    return round((after_kib - before_kib) * 1024 / n)


def us_per(cpu, n, local=True):
    """Microseconds per delivery; None without local processes (a remote
    gateway: read its host's monitoring)."""
    return round(cpu * 1e6 / n, 3) if n and local else None


class FanoutRound:
    """One round: one system, one subscriber count. `bench` is the Bench
    (its args and load driver)."""

    def __init__(self, bench, sys_, subscribers):
        self.b, self.a, self.sys = bench, bench.args, sys_
        self.n = subscribers

    def collect(self, procs, deliveries, expected):
        """Reports until every delivery came, none came for a while, or the
        deadline passed."""
        deadline = time.time() + DELIVERY_DEADLINE_SECS
        last_progress, last_count = time.time(), -1
        while True:
            for p in procs:
                p.send("report")
            for p in procs:
                deliveries.add(p.wait("report", 30))
            got = deliveries.received
            if got >= expected:
                return
            now = time.time()
            if got != last_count:
                last_progress, last_count = now, got
            if now - last_progress > DELIVERY_STALL_SECS or now > deadline:
                return
            time.sleep(COLLECT_EVERY_SECS)

    def witness_report(self, wit):
        if not wit:
            return None
        wit[0].send("report")
        r = merge_reports([wit[0].wait("report", 30)])
        return {"p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"], "max_ms": r["max_ms"],
                "sent": r["sent"], "received": r["received"]}

    def run(self):
        a, s, load = self.a, self.sys, self.b.load
        row = {"system": s.name, "subscribers": self.n, "settings": s.settings, "loadavg_start": loadavg()}
        time.sleep(0.5)
        wit = []
        if s.witness_path and a.witnesses:
            wit, _, _ = load.group(s.target, s.witness_path, a.witnesses, "echo",
                                   ["--active", str(a.witnesses), "--rate", str(a.witness_rate),
                                    "--payload-bytes", str(a.payload_bytes)])
        rss0, rss0_all = rss_kib(s.pids()), rss_kib(s.all_pids())
        extra = ["--concurrency", str(a.concurrency), "--payload-bytes", str(a.payload_bytes)]
        if s.publisher_path:
            extra += ["--publisher-path", s.publisher_path]
        t0 = time.time()
        # N subscribers and the publisher (client 0 of the first process).
        subs, connected, failed = load.group(s.target, s.fanout_path, self.n + 1, "subscribe", extra,
                                             publisher=True)
        row["connect_secs"] = round(time.time() - t0, 2)
        subscribers = connected - 1
        row.update({"connected_subscribers": subscribers, "failed_connects": failed})
        time.sleep(a.settle)  # subscriptions reach the server; memory settles
        rss1, rss1_all = rss_kib(s.pids()), rss_kib(s.all_pids())
        row["rss_per_subscriber_bytes"] = per_subscriber(rss0_all, rss1_all, subscribers)
        if s.all_pids() != s.pids():
            row["main_rss_per_subscriber_bytes"] = per_subscriber(rss0, rss1, subscribers)
        for p in subs:  # nothing before the first publish counts
            p.send("report")
        for p in subs:
            p.wait("report", 30)
        if wit:
            wit[0].send("start")
            time.sleep(2.0)
            row["witness_calm"] = self.witness_report(wit)

        # The publishes.
        poll = PollDelay(s.admin) if s.admin else None
        queued = PollDelay(s.admin, "edgegate_publish_delivery_seconds") if s.admin else None
        for h in (poll, queued):
            if h:
                h.start()
        cpu0, cpu0_main = cpu_secs(s.all_pids()), cpu_secs(s.pids())
        subs[0].send(f"publish {a.publishes} {a.publish_interval_ms}")
        subs[0].wait("published", 60 + a.publishes * a.publish_interval_ms / 1000)
        deliveries = Deliveries()
        self.collect(subs, deliveries, subscribers * a.publishes)
        cpu1, cpu1_main = cpu_secs(s.all_pids()), cpu_secs(s.pids())
        row["witness_publish"] = self.witness_report(wit)
        if poll:
            row["poll_delay_publish"] = poll.stop()
            row["gateway_queue_all_subscribers"] = queued.stop()
        d = deliveries.summary(subscribers, a.publishes)
        row.update(d)
        row["cpu_secs"] = round(cpu1 - cpu0, 3)
        row["cpu_us_per_delivery"] = us_per(cpu1 - cpu0, d["deliveries"], bool(s.pids()))
        if s.all_pids() != s.pids():
            row["main_cpu_us_per_delivery"] = us_per(cpu1_main - cpu0_main, d["deliveries"])

        # The storm: every subscriber (and the publisher) reconnects at once.
        if a.fanout_storm and s.storm:
            poll = PollDelay(s.admin) if s.admin else None
            if poll:
                poll.start()
            cpu0 = cpu_secs(s.all_pids())
            t0 = time.time()
            for p in subs:
                p.send("storm")
            results = [p.wait("storm", 240) for p in subs]
            storm = {"clients": sum(r["clients"] for r in results),
                     "back": sum(r["back"] for r in results),
                     "all_back": all(r["all_back"] for r in results),
                     "back_secs": max(r["back_secs"] for r in results),
                     "wall_secs": round(time.time() - t0, 3),
                     "reconnect_failures": sum(r["reconnect_failures"] for r in results),
                     "cpu_secs": round(cpu_secs(s.all_pids()) - cpu0, 3),
                     "witness": self.witness_report(wit)}
            if poll:
                storm["poll_delay"] = poll.stop()
            row["storm"] = storm
        load.stop(subs + wit)
        row["loadavg_end"] = loadavg()
        w = row.get("witness_publish") or {}
        log(f"fanout {s.name} {self.n}: {d['deliveries']}/{d['expected_deliveries']} delivered, "
            f"p50 {d.get('p50_ms')} p99 {d.get('p99_ms')} max {d.get('max_ms')} ms, last delivery median "
            f"{d['last_delivery_ms']['median']} ms, {row['cpu_us_per_delivery']} us CPU/delivery, "
            f"{row['rss_per_subscriber_bytes']} B/subscriber, poll p99 "
            f"{(row.get('poll_delay_publish') or {}).get('p99_ms')} ms, witness p99 {w.get('p99_ms')} ms, "
            f"load {row['loadavg_end']}")
        return row


def run_fanout(bench, systems, work_root, cert):
    """Every round, every count, every system; returns the results entry
    `fanout_peers`: the rows and their summary."""
    a = bench.args
    rows = []
    for r in range(a.rounds):
        for n in a.subscribers:
            for name in systems:
                work = os.path.join(work_root, f"fanout-{name}-{n}-r{r}")
                os.makedirs(work, exist_ok=True)
                sys_ = bench.system(name, work, cert, a.fanout_workers)
                try:
                    sys_.start()
                    row = FanoutRound(bench, sys_, n).run()
                except Exception as e:  # a failed round is reported, the others still run
                    log(f"fanout {name} {n}: {type(e).__name__}: {e}")
                    row = {"system": name, "subscribers": n, "error": f"{type(e).__name__}: {e}",
                           "loadavg_end": loadavg()}
                finally:
                    bench.load.stop()
                    sys_.stop()
                row["round"] = r
                rows.append(row)
                time.sleep(2)  # sockets of the last system close
    return {"workers": a.fanout_workers, "publishes": a.publishes, "interval_ms": a.publish_interval_ms,
            "witnesses": a.witnesses, "witness_rate": a.witness_rate, "rounds": a.rounds,
            "subscribers": a.subscribers, "systems": systems, "runs": rows, "summary": summarize(rows)}


def pick(row, path):
    v = row
    for k in path:
        if not isinstance(v, dict):
            return None
        v = v.get(k)
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


# The figures the summary takes the median (and range) of over rounds.
SUMMARY_FIELDS = {
    "p50_ms": ("p50_ms",),
    "p99_ms": ("p99_ms",),
    "max_ms": ("max_ms",),
    "last_delivery_ms": ("last_delivery_ms", "median"),
    "cpu_us_per_delivery": ("cpu_us_per_delivery",),
    "main_cpu_us_per_delivery": ("main_cpu_us_per_delivery",),
    "rss_per_subscriber_bytes": ("rss_per_subscriber_bytes",),
    "main_rss_per_subscriber_bytes": ("main_rss_per_subscriber_bytes",),
    "poll_delay_publish_p99_ms": ("poll_delay_publish", "p99_ms"),
    "witness_publish_p99_ms": ("witness_publish", "p99_ms"),
    "witness_calm_p99_ms": ("witness_calm", "p99_ms"),
    "storm_back_secs": ("storm", "back_secs"),
    "storm_poll_delay_p99_ms": ("storm", "poll_delay", "p99_ms"),
    "storm_witness_p99_ms": ("storm", "witness", "p99_ms"),
    "lost": ("lost",),
}


def summarize(rows):
    """{system: {subscribers: {field: {"median", "min", "max"}, "rounds", "errors", "loadavg"}}}."""
    out = {}
    for row in rows:
        cell = out.setdefault(row["system"], {}).setdefault(str(row["subscribers"]), {"rows": []})
        cell["rows"].append(row)
    for system in out.values():
        for key, cell in system.items():
            rs = cell.pop("rows")
            cell["rounds"] = len(rs)
            cell["errors"] = [r["error"] for r in rs if "error" in r]
            cell["loadavg"] = [r.get("loadavg_end") for r in rs]
            for field, path in SUMMARY_FIELDS.items():
                vals = [v for v in (pick(r, path) for r in rs) if v is not None]
                if vals:
                    cell[field] = {"median": round(statistics.median(vals), 3), "min": min(vals), "max": max(vals)}
    return out
