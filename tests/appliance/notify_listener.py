#!/usr/bin/env python3
"""Stand-in for systemd's notification socket (stdlib only).

    notify_listener.py SOCKET_PATH LOG_PATH

Binds a unix datagram socket at SOCKET_PATH (world-writable, so the gateway
running as user edgegate can send) and appends every sd_notify message to
LOG_PATH, one assignment per line (READY=1, WATCHDOG=1, STOPPING=1, ...).
Runs until killed.
"""
import os
import socket
import sys


def main():
    path, log_path = sys.argv[1], sys.argv[2]
    if os.path.exists(path):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    os.chmod(path, 0o777)
    with open(log_path, "a", buffering=1, encoding="utf-8") as log:
        while True:
            data = sock.recv(4096)
            for line in data.decode("utf-8", "replace").splitlines():
                log.write(line + "\n")


if __name__ == "__main__":
    main()
