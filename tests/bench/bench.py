#!/usr/bin/env python3
"""EdgeGate benchmark driver: runs the scenarios, side by side with HAProxy and
nginx (proxying) and with nginx + nchan and the write floor (fan-out).

Python 3 standard library only. It builds the release binaries, starts the
systems under test as its own processes (config files in a temp dir, never
system services), runs many `edgegate-load` processes so a scenario can go past
one process's descriptor limit, and writes:

  tests/bench/results/latest.json   every number, with the machine and its load
  tests/bench/results/latest.md     the table
  tests/bench/results/latest.png    the plot (edgegate-bench-plot)

Scenarios (see docs/benchmark.md for what each one measures and why):

  1 idle-memory  RSS per idle TLS WebSocket client at each step (slope), kernel Slab per connection
  2 handshake    CPU seconds (utime+stime) per 1000 TLS + WebSocket handshakes
  3 echo         round trip at a fixed rate while the idle clients are held
  4 fanout       20 publishes to 3k/9k/15k subscribers: p50/p99/max, time to last delivery,
                 lost (must be 0), CPU per delivery, RSS per subscriber, poll delay and
                 witness echo during the publishes and a reconnect storm of the subscribers
  5 storm        N clients reconnect at once: time to all back, failures, witness p99   (edgegate)
  6 poll-delay   the gateway's scheduler poll delay p99 during 3 and 5                (edgegate)

1-3 run against edgegate, edgegate-lean, haproxy and nginx with the same load
generator; 4 against edgegate (`run`), edgegate-lean, edgegate-demo (`demo`),
nchan and floor (tests/src/bin/edgegate-write-floor.rs).

Usage:
  tests/bench/bench.py                       # everything, release build (~15 min on 2 cores)
  tests/bench/bench.py --systems edgegate --scenarios idle-memory,echo
  tests/bench/bench.py --scenarios fanout --systems edgegate,edgegate-demo,nchan,floor --rounds 3
  tests/bench/bench.py --target 10.0.0.5:8443 --admin http://10.0.0.5:7611 \\
      --source-pool 10.0.1.1-254 --steps 100000,1000000 ...   # remote gateway

It reports; it never passes or fails on the numbers. The code is the
package beside this file, edgegate_bench/:

  host.py       /proc readings, the machine, ports, process control
  load.py       the load driver (edgegate-load processes, source addresses)
  prom.py       Prometheus text: sums, histogram buckets and quantiles
  systems.py    the systems under test (EdgeGate run/demo, HAProxy, nginx, nchan, floor, remote)
  scenarios.py  the scenarios 1-3, 5, 6, run against one system
  fanout.py     scenario 4, every fan-out system at every subscriber count
  report.py     slopes, formatting, the markdown table
  cli.py        arguments and the run that writes the results

Unit tests of the parsing and report pieces:
  python3 -m unittest discover -s tests/bench
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from edgegate_bench.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
