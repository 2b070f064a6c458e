"""Prometheus text parsing: counter sums, histogram buckets and quantiles
between two scrapes, and the poll-delay sampler."""

import urllib.request

from .host import log


POLL_DELAY_METRIC = "edgegate_runtime_poll_delay_seconds"


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
