"""The EdgeGate benchmark (tests/bench/bench.py is its command line).

The names the smoke test and other drivers use, from the modules that hold
them.
"""

from .cli import build, main, parse_args
from .fanout import Deliveries, run_fanout, summarize
from .load import Load, merge_reports, percentiles
from .prom import histogram_buckets, histogram_quantile, metric_sum, scrape
from .report import fanout_tables, fit_slope, markdown
from .scenarios import Bench
from .systems import (EdgeGate, EdgeGateDemo, Floor, HAProxy, Nchan, Nginx, Remote, ensure_proxies, make_cert,
                      nchan_available)

__all__ = [
    "Bench", "Deliveries", "EdgeGate", "EdgeGateDemo", "Floor", "HAProxy", "Load", "Nchan", "Nginx", "Remote",
    "build", "ensure_proxies", "fanout_tables", "fit_slope", "histogram_buckets", "histogram_quantile", "main",
    "make_cert", "markdown", "merge_reports", "metric_sum", "nchan_available", "parse_args", "percentiles",
    "run_fanout", "scrape", "summarize",
]
