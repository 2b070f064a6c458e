"""The EdgeGate benchmark (tests/bench/bench.py is its command line).

The names the smoke test and other drivers use, from the modules that hold
them.
"""

from .cli import build, main, parse_args
from .load import Load, merge_reports, percentiles
from .prom import histogram_buckets, histogram_quantile, metric_sum, scrape
from .report import fit_slope, markdown
from .scenarios import Bench
from .systems import EdgeGate, HAProxy, Nginx, Remote, make_cert

__all__ = [
    "Bench", "EdgeGate", "HAProxy", "Load", "Nginx", "Remote", "build", "fit_slope",
    "histogram_buckets", "histogram_quantile", "main", "make_cert", "markdown",
    "merge_reports", "metric_sum", "parse_args", "percentiles", "scrape",
]
