#!/usr/bin/env python3
"""Minimal TLS WebSocket client for tests/appliance/run.sh (stdlib only).

A real TLS connection (certificate verified against the test CA) and a real
RFC 6455 upgrade, so the check proves the gateway's whole client path.

    ws_client.py echo HOST PORT PATH CAFILE MESSAGE
        Upgrade, send MESSAGE as one masked text frame, print
        "echo <text>" when the same text comes back, or "close <code>" when
        the gateway closes the session instead (1013 = no service link up).
    ws_client.py hold HOST PORT PATH CAFILE READYFILE
        Upgrade, create READYFILE, then wait for the server to close the
        session and print "close <code>" (1001 = drained on shutdown).

Exit status 0 when a WebSocket session ran (101 then a frame), 1 otherwise.
"""
import base64
import hashlib
import os
import socket
import ssl
import struct
import sys

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
TIMEOUT_SECS = 20


def connect(host, port, path, cafile):
    ctx = ssl.create_default_context(cafile=cafile)
    raw = socket.create_connection((host, int(port)), timeout=TIMEOUT_SECS)
    tls = ctx.wrap_socket(raw, server_hostname="localhost")
    key = base64.b64encode(os.urandom(16))
    request = (
        f"GET {path} HTTP/1.1\r\n"
        f"Host: localhost:{port}\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key.decode()}\r\n"
        "Sec-WebSocket-Version: 13\r\n"
        "\r\n"
    )
    tls.sendall(request.encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = tls.recv(1)
        if not chunk:
            raise RuntimeError(f"connection closed during upgrade: {head!r}")
        head += chunk
    lines = head.decode("latin-1").split("\r\n")
    if " 101 " not in lines[0] + " ":
        raise RuntimeError(f"expected 101, got: {lines[0]}")
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    expected = base64.b64encode(hashlib.sha1(key + GUID).digest()).decode()
    if headers.get("sec-websocket-accept") != expected:
        raise RuntimeError("bad Sec-WebSocket-Accept")
    print(f"upgrade {lines[0]} ({tls.version()})", file=sys.stderr)
    return tls


def recv_exact(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise RuntimeError("connection closed mid-frame")
        data += chunk
    return data


def send_frame(sock, opcode, payload):
    """Client frames are always masked (RFC 6455 section 5.3)."""
    mask = os.urandom(4)
    header = bytes([0x80 | opcode])
    n = len(payload)
    if n < 126:
        header += bytes([0x80 | n])
    elif n < 65536:
        header += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        header += bytes([0x80 | 127]) + struct.pack("!Q", n)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    sock.sendall(header + mask + masked)


def recv_frame(sock):
    b0, b1 = recv_exact(sock, 2)
    opcode = b0 & 0x0F
    n = b1 & 0x7F
    if n == 126:
        n = struct.unpack("!H", recv_exact(sock, 2))[0]
    elif n == 127:
        n = struct.unpack("!Q", recv_exact(sock, 8))[0]
    mask = recv_exact(sock, 4) if b1 & 0x80 else None
    payload = recv_exact(sock, n)
    if mask:
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return opcode, payload


def next_message(sock):
    """Return ("text", str) or ("close", code); answers pings on the way."""
    while True:
        opcode, payload = recv_frame(sock)
        if opcode == 0x9:  # ping
            send_frame(sock, 0xA, payload)
        elif opcode == 0x8:  # close
            code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
            try:
                send_frame(sock, 0x8, payload[:2])
            except OSError:
                pass
            return "close", code
        elif opcode in (0x1, 0x2):
            return "text", payload.decode("utf-8", "replace")


def main():
    mode, host, port, path, cafile, arg = sys.argv[1:7]
    try:
        sock = connect(host, port, path, cafile)
        if mode == "echo":
            send_frame(sock, 0x1, arg.encode())
            kind, value = next_message(sock)
            print(f"{'echo' if kind == 'text' else 'close'} {value}")
        elif mode == "hold":
            sock.settimeout(120)
            with open(arg, "w", encoding="utf-8"):
                pass
            kind, value = next_message(sock)
            print(f"{'message' if kind == 'text' else 'close'} {value}")
        else:
            raise SystemExit(f"unknown mode {mode}")
    except (OSError, RuntimeError, ssl.SSLError) as error:
        print(f"error {error}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
