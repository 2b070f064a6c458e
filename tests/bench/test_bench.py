"""Unit tests of the benchmark's parsing and report pieces (no processes,
no network):

    python3 -m unittest discover -s tests/bench
"""

import json
import os
import unittest

from edgegate_bench import (Deliveries, fanout_tables, fit_slope, histogram_buckets, histogram_quantile,
                            markdown, merge_reports, metric_sum, percentiles, summarize)
from edgegate_bench.report import fmt, kib

HERE = os.path.dirname(os.path.abspath(__file__))

SCRAPE = """\
# HELP edgegate_clients_closed_total Clients closed, by reason.
# TYPE edgegate_clients_closed_total counter
edgegate_clients_closed_total{reason="client"} 3
edgegate_clients_closed_total{reason="shutdown"} 2
edgegate_clients_closed_total_created 1.7e9
edgegate_connections 5
edgegate_bad_line{a="b"} not-a-number
# TYPE edgegate_runtime_poll_delay_seconds histogram
edgegate_runtime_poll_delay_seconds_bucket{worker="0",le="0.001"} 6
edgegate_runtime_poll_delay_seconds_bucket{worker="0",le="0.01"} 9
edgegate_runtime_poll_delay_seconds_bucket{worker="0",le="+Inf"} 10
edgegate_runtime_poll_delay_seconds_bucket{worker="1",le="0.001"} 4
edgegate_runtime_poll_delay_seconds_bucket{worker="1",le="0.01"} 9
edgegate_runtime_poll_delay_seconds_bucket{worker="1",le="+Inf"} 10
edgegate_runtime_poll_delay_seconds_sum{worker="0"} 0.02
edgegate_runtime_poll_delay_seconds_count{worker="0"} 10
"""


class Prometheus(unittest.TestCase):
    def test_metric_sum_adds_every_label_set_that_matches(self):
        self.assertEqual(metric_sum(SCRAPE, "edgegate_clients_closed_total"), 5.0)
        self.assertEqual(metric_sum(SCRAPE, "edgegate_clients_closed_total", 'reason="shutdown"'), 2.0)
        self.assertEqual(metric_sum(SCRAPE, "edgegate_connections"), 5.0)

    def test_metric_sum_is_none_when_absent_or_unparsable(self):
        self.assertIsNone(metric_sum(SCRAPE, "edgegate_missing"))
        self.assertIsNone(metric_sum(SCRAPE, "edgegate_bad_line"))
        self.assertIsNone(metric_sum(None, "edgegate_connections"))

    def test_histogram_buckets_sum_label_sets_and_read_inf(self):
        b = histogram_buckets(SCRAPE, "edgegate_runtime_poll_delay_seconds")
        self.assertEqual(b, {0.001: 10.0, 0.01: 18.0, float("inf"): 20.0})
        self.assertEqual(histogram_buckets("", "x"), {})

    def test_quantile_interpolates_inside_the_bucket_between_two_scrapes(self):
        before = {0.001: 10.0, 0.01: 10.0, float("inf"): 10.0}
        after = {0.001: 10.0, 0.01: 20.0, float("inf"): 20.0}
        # 10 new observations, all in (1 ms, 10 ms]: p50 is half way.
        self.assertEqual(histogram_quantile(before, after, 0.5), {"count": 10, "value_ms": 5.5})
        self.assertEqual(histogram_quantile(None, after, 0.25), {"count": 20, "value_ms": 0.5})

    def test_quantile_above_the_top_bucket_says_so(self):
        r = histogram_quantile({}, {0.001: 0.0, float("inf"): 4.0}, 0.99)
        self.assertEqual(r["value_ms"], 1.0)
        self.assertEqual(r["note"], "above the top bucket")

    def test_quantile_of_nothing(self):
        self.assertIsNone(histogram_quantile({}, {}, 0.5))
        self.assertEqual(histogram_quantile({1.0: 3.0}, {1.0: 3.0}, 0.5), {"count": 0, "value_ms": None})


class LoadReports(unittest.TestCase):
    def test_percentiles_of_microsecond_buckets_in_ms(self):
        p = percentiles({1000: 98, 5000: 1, 20000: 1})
        self.assertEqual((p["count"], p["p50_ms"], p["p99_ms"], p["max_ms"]), (100, 1.0, 5.0, 20.0))

    def test_percentiles_of_nothing_are_none(self):
        self.assertEqual(percentiles({})["p99_ms"], None)

    def test_merge_reports_adds_counts_and_buckets(self):
        r = merge_reports([
            {"sent": 5, "received": 4, "latency": {"buckets": [[1000, 4]]}},
            {"sent": 5, "received": 5, "latency": {"buckets": [[1000, 1], [3000, 4]]}},
        ])
        self.assertEqual((r["sent"], r["received"], r["count"]), (10, 9, 9))
        self.assertEqual((r["p50_ms"], r["max_ms"]), (1.0, 3.0))


def subscriber_report(received, messages, buckets):
    return {"sent": 0, "received": received, "messages": messages, "latency": {"buckets": buckets}}


class Fanout(unittest.TestCase):
    def test_deliveries_merge_processes_per_publish(self):
        d = Deliveries()
        # Two processes, two publishes (send timestamps 100 and 200), 3 subscribers.
        d.add(subscriber_report(3, [[100, 2, 5000], [200, 1, 9000]], [[5000, 3]]))
        d.add(subscriber_report(3, [[100, 1, 7000], [200, 2, 4000]], [[7000, 3]]))
        s = d.summary(subscribers=3, publishes=2)
        self.assertEqual((s["deliveries"], s["expected_deliveries"], s["lost"], s["extra"]), (6, 6, 0, 0))
        self.assertEqual((s["publishes_seen"], s["publishes_complete"]), (2, 2))
        self.assertEqual(s["last_delivery_ms"], {"median": 8.0, "max": 9.0, "per_publish": [7.0, 9.0]})

    def test_a_missing_delivery_is_lost_and_its_publish_incomplete(self):
        d = Deliveries()
        d.add(subscriber_report(3, [[100, 2, 5000], [200, 1, 9000]], [[5000, 3]]))
        s = d.summary(subscribers=2, publishes=2)
        self.assertEqual((s["lost"], s["publishes_complete"], s["per_publish_deliveries"]), (1, 1, [2, 1]))
        self.assertEqual(Deliveries().summary(2, 3)["lost"], 6)

    def test_summary_is_the_median_over_rounds_and_the_table_shows_the_range(self):
        rows = [{"system": "nchan", "subscribers": 3000, "p99_ms": v, "lost": 0, "loadavg_end": "4.0 3.0 2.0",
                 "last_delivery_ms": {"median": v + 1}} for v in (60.0, 70.0, 90.0)]
        rows.append({"system": "floor", "subscribers": 3000, "error": "RuntimeError: boom", "loadavg_end": "1 1 1"})
        s = summarize(rows)
        self.assertEqual(s["nchan"]["3000"]["p99_ms"], {"median": 70.0, "min": 60.0, "max": 90.0})
        self.assertEqual(s["nchan"]["3000"]["rounds"], 3)
        self.assertEqual(s["floor"]["3000"]["errors"], ["RuntimeError: boom"])
        md = "\n".join(fanout_tables({"summary": s, "subscribers": [3000], "rounds": 3, "publishes": 20,
                                       "interval_ms": 250, "workers": 1, "runs": rows}))
        self.assertIn("| 3,000 | 70 (60–90) ms |", md)
        self.assertIn("| 3,000 | floor | error: RuntimeError: boom |", md)


class Report(unittest.TestCase):
    def test_fit_slope_is_bytes_per_client(self):
        self.assertEqual(fit_slope([(1000, 10_000), (2000, 12_000), (3000, None), (4000, 16_000)]), 2)
        self.assertIsNone(fit_slope([(1, 1)]))
        self.assertIsNone(fit_slope([(5, 1), (5, 2)]))

    def test_formatting(self):
        self.assertEqual(fmt(None), "n/a")
        self.assertEqual(fmt("n/a"), "n/a")
        self.assertEqual(fmt(1.23456, " ms", 3), "1.235 ms")
        self.assertEqual(fmt(7, " s"), "7 s")
        self.assertEqual(kib(2048), 2.0)
        self.assertIsNone(kib(None))

    def test_markdown_of_the_checked_in_results_is_the_checked_in_table(self):
        with open(os.path.join(HERE, "results", "latest.json")) as f:
            results = json.load(f)
        with open(os.path.join(HERE, "results", "latest.md")) as f:
            self.assertEqual(markdown(results), f.read())


if __name__ == "__main__":
    unittest.main()
