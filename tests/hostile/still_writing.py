"""A client that is still writing when the gateway closes it.

Connects to wss://HOST:PORT/PATH with the `websockets` library (a real
third-party client), sends one message of SIZE bytes in FRAGMENTS fragments
(over the gateway's max_message_bytes), and reports the close code it
received from the gateway, or "none" when the connection died without one
(the defect of issue 28: the gateway dropped the socket with unread data, the
kernel sent RST, the client discarded the close frame).

    python still_writing.py HOST PORT PATH CA_PEM TRIES [SIZE] [FRAGMENTS]

Prints one line per try ("try N: 1009") and a last line "received K of N".
"""

import asyncio
import ssl
import sys

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed


async def one_try(uri, ctx, size, fragments):
    chunk = b"x" * (size // fragments)
    try:
        async with connect(uri, ssl=ctx, max_size=None, open_timeout=10,
                           close_timeout=5) as ws:
            try:
                await ws.send(chunk for _ in range(fragments))
                # The whole message went out before the gateway closed: wait
                # for its close.
                await asyncio.wait_for(ws.recv(), 10)
            except ConnectionClosed as e:
                return e.rcvd.code if e.rcvd else None
    except ConnectionClosed as e:
        return e.rcvd.code if e.rcvd else None
    except OSError:
        return None
    return None


async def main():
    host, port, path, ca, tries = sys.argv[1:6]
    size = int(sys.argv[6]) if len(sys.argv) > 6 else 1 << 20
    fragments = int(sys.argv[7]) if len(sys.argv) > 7 else 100
    ctx = ssl.create_default_context(cafile=ca)
    ctx.check_hostname = False
    uri = f"wss://{host}:{port}{path}"
    got = 0
    codes = []
    for n in range(int(tries)):
        code = await one_try(uri, ctx, size, fragments)
        codes.append(code)
        print(f"try {n + 1}: {code if code is not None else 'none'}", flush=True)
    got = sum(1 for c in codes if c is not None)
    print(f"received {got} of {tries}", flush=True)


asyncio.run(main())
