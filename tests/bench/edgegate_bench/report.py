"""The report: slopes, number formatting and the markdown table of the results."""

from .systems import FANOUT_SYSTEMS, SYSTEM_NAMES


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
    if names:
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
    out += fanout_tables(results.get("fanout_peers"))
    f, st, pd = results.get("fanout"), results.get("storm"), results.get("poll_delay") or {}
    if f or st or pd:
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
    if f or st or pd:
        out.append("")
    fp = results.get("fanout_peers") or {}
    fanout_settings = {}
    for row in fp.get("runs", []):
        fanout_settings.setdefault(row["system"], row.get("settings"))
    if fanout_settings:
        out.append("Fan-out settings: " + "; ".join(
            f"**{n}** " + ", ".join(f"{k}={v}" for k, v in (cfg or {}).items())
            for n, cfg in fanout_settings.items()))
        out.append("")
    if names:
        out.append("Settings: " + "; ".join(f"**{n}** " + ", ".join(f"{k}={v}" for k, v in s[n].get("settings", {}).items())
                                           for n in names))
    errors = [f"{n}: {s[n]['error']}" for n in names if "error" in s[n]]
    if errors:
        out.append("")
        out.append("Errors: " + "; ".join(errors))
    return "\n".join(out) + "\n"


def spread(cell, field, unit="", nd=1, scale=1.0):
    """`median (min–max)` of a summary field, or just the value for one round."""
    v = (cell or {}).get(field)
    if not v:
        return "n/a"
    f = lambda x: fmt(round(x * scale, nd) if nd else round(x * scale))
    if v["min"] == v["max"]:
        return f(v["median"]) + unit
    return f"{f(v['median'])} ({f(v['min'])}–{f(v['max'])}){unit}"


def fanout_tables(fp):
    """Scenario 4's tables: the p99 side by side, then every figure."""
    if not fp:
        return []
    summary = fp["summary"]
    systems = [n for n in FANOUT_SYSTEMS if n in summary]
    counts = fp["subscribers"]
    rounds = fp["rounds"]
    out = [f"Fan-out: {fp['publishes']} publishes {fp['interval_ms']} ms apart, each delivery timed from the "
           f"publish's send timestamp; {fp['workers']} worker(s) (EdgeGate `worker_threads` = nginx "
           f"`worker_processes`; the floor is one thread); "
           + (f"median (min–max) of {rounds} rounds." if rounds > 1 else "one round."), ""]
    out.append("| subscribers | " + " | ".join(f"{n} p99" for n in systems)
               + " | " + " | ".join(f"{n} last delivery" for n in systems) + " |")
    out.append("|---:|" + "---:|" * (2 * len(systems)))
    for n in counts:
        cells = [spread(summary[s].get(str(n)), "p99_ms", " ms", 0) for s in systems]
        cells += [spread(summary[s].get(str(n)), "last_delivery_ms", " ms", 0) for s in systems]
        out.append(f"| {n:,} | " + " | ".join(cells) + " |")
    out.append("")
    out.append("| subscribers | system | p50 / p99 / max | last delivery (median of publishes) | lost | "
               "CPU per delivery (gateway alone) | RSS per subscriber (gateway alone) | poll delay p99: publish / storm | "
               "witness echo p99: calm / publish / storm | storm: all back in | load average after |")
    out.append("|---:|---|---|---:|---:|---:|---:|---|---|---:|---|")
    for n in counts:
        for s in systems:
            c = summary[s].get(str(n))
            if not c:
                continue
            if c.get("errors") and "p99_ms" not in c:
                out.append(f"| {n:,} | {s} | error: {c['errors'][0]} |||||||||")
                continue
            cpu = spread(c, "cpu_us_per_delivery", " µs", 1)
            if c.get("main_cpu_us_per_delivery"):
                cpu += f" ({spread(c, 'main_cpu_us_per_delivery', ' µs', 1)})"
            rss = spread(c, "rss_per_subscriber_bytes", " KiB", 1, 1 / 1024)
            if c.get("main_rss_per_subscriber_bytes"):
                rss += f" ({spread(c, 'main_rss_per_subscriber_bytes', ' KiB', 1, 1 / 1024)})"
            lost = c.get("lost")
            out.append(
                f"| {n:,} | {s} | {spread(c, 'p50_ms', '', 0)} / {spread(c, 'p99_ms', '', 0)} / "
                f"{spread(c, 'max_ms', ' ms', 0)} | {spread(c, 'last_delivery_ms', ' ms', 0)} | "
                f"{fmt(lost['max']) if lost else 'n/a'} | {cpu} | {rss} | "
                f"{spread(c, 'poll_delay_publish_p99_ms', '', 2)} / {spread(c, 'storm_poll_delay_p99_ms', ' ms', 2)} | "
                f"{spread(c, 'witness_calm_p99_ms', '', 1)} / {spread(c, 'witness_publish_p99_ms', '', 1)} / "
                f"{spread(c, 'storm_witness_p99_ms', ' ms', 1)} | {spread(c, 'storm_back_secs', ' s', 2)} | "
                f"{', '.join(str(x) for x in c.get('loadavg', []))} |")
    out.append("")
    return out
