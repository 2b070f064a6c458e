"""The report: slopes, number formatting and the markdown table of the results."""

from .systems import SYSTEM_NAMES


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
