#!/usr/bin/env python3
"""Steady TLS connects to the gateway on this host, for the lab's upgrade step.

    connects.py PORT RATE OUT

Opens one TLS connection to 127.0.0.1:PORT every 1/RATE s (one at a time),
sends a plain HTTP request (the gateway answers a request that is not a
WebSocket upgrade) and reads the first byte of the answer. Counts each
attempt as ok, refused, reset, timeout or other, and writes the counts as
one JSON object to OUT (by rename) after every attempt and at SIGTERM, with
the last failures under "failures": when (wall clock, s), what, and the
phase it failed in (connect, tls, answer), so a failure can be placed
against the upgrade's own timeline.
Runs inside the guest: through QEMU's user network a refused connection
would look accepted and then closed.
"""
import json
import os
import signal
import socket
import ssl
import sys
import time

# Any one attempt (the guest's CPU is emulated, 15-19x slower than the host).
TIMEOUT_SECS = 10


def main():
    port, rate, out = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    counts = {"attempted": 0, "ok": 0, "refused": 0, "reset": 0, "timeout": 0, "other": 0, "errors": [], "failures": []}
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))

    def write():
        tmp = out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(counts, f)
        os.replace(tmp, out)

    period = 1.0 / rate
    due = time.monotonic()
    def failed(kind, phase, started, e=None):
        counts[kind] += 1
        if e is not None:
            counts["errors"] = (counts["errors"] + [repr(e)])[-5:]
        failure = {"t": round(started, 1), "kind": kind, "phase": phase}
        counts["failures"] = (counts["failures"] + [failure])[-20:]

    while not stopping:
        counts["attempted"] += 1
        started, phase = time.time(), "connect"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_SECS) as raw:
                phase = "tls"
                with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                    phase = "answer"
                    tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                    if not tls.recv(1):
                        raise ConnectionResetError("closed without an answer")
            counts["ok"] += 1
        except ConnectionRefusedError:
            failed("refused", phase, started)
        except (ConnectionResetError, BrokenPipeError, ssl.SSLEOFError, ssl.SSLZeroReturnError) as e:
            failed("reset", phase, started, e)
        except socket.timeout:
            failed("timeout", phase, started)
        except Exception as e:  # noqa: BLE001 - every other failure is counted, not hidden
            failed("other", phase, started, e)
        write()
        due += period
        time.sleep(max(0.0, due - time.monotonic()))
    write()


if __name__ == "__main__":
    main()
