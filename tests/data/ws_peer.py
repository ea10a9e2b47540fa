"""A WebSocket server and client nobody at meshfed wrote (`websockets`, from PyPI), for the
e2e tests of WebSockets across sites on an `http` port.

  ws_peer.py serve SITE        prints the port it listens on, then serves:
      any path      subprotocol chat.v1 (when offered), permessage-deflate; first sends
                    a JSON hello {"site", "path", "xfcc"} (the x-forwarded-client-cert the
                    handshake carried), then echoes each message: text as "SITE:" + text,
                    binary as it came
      /forbidden    refuses the handshake with 403
  ws_peer.py call URL [IDLE]   one WebSocket to URL, offering chat.v1: reads the hello,
                    sends 20 text messages and binary ones of 1 B, 64 KiB and 1 MiB, and
                    checks each echo; with IDLE (seconds), then sends nothing and waits up
                    to IDLE for the connection to be closed by the far side. Prints one
                    JSON line: {"hello", "subprotocol", "extensions", "echoed", "closed_after"}
  ws_peer.py refused URL       tries a handshake that must be refused: prints its status
                               and body
"""

import json
import os
import sys
import time

from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect
from websockets.sync.server import serve as ws_serve


def serve(site):
    def process_request(connection, request):
        if request.path == "/forbidden":
            return connection.respond(403, "forbidden\n")
        return None

    def handler(ws):
        ws.send(json.dumps({
            "site": site,
            "path": ws.request.path,
            "xfcc": ws.request.headers.get("x-forwarded-client-cert"),
        }))
        try:
            for msg in ws:
                ws.send(site + ":" + msg if isinstance(msg, str) else msg)
        except ConnectionClosed:
            pass

    with ws_serve(handler, "127.0.0.1", 0, subprotocols=["chat.v1"],
                  process_request=process_request, max_size=2 ** 21) as server:
        print(server.socket.getsockname()[1], flush=True)
        server.serve_forever()


def call(url, idle):
    out = {"echoed": 0}
    with connect(url, subprotocols=["chat.v1"], max_size=2 ** 21, open_timeout=10,
                 ping_interval=None) as ws:
        out["hello"] = json.loads(ws.recv(timeout=10))
        out["subprotocol"] = ws.subprotocol
        out["extensions"] = ws.response.headers.get("sec-websocket-extensions")
        for i in range(20):
            ws.send("m%d" % i)
            got = ws.recv(timeout=10)
            assert got == out["hello"]["site"] + ":m%d" % i, got
            out["echoed"] += 1
        for n in (1, 64 * 1024, 1024 * 1024):
            b = os.urandom(n)
            ws.send(b)
            got = ws.recv(timeout=10)
            assert got == b, "binary message of %d bytes came back as %d" % (n, len(got))
            out["echoed"] += 1
        if idle is not None:
            start = time.monotonic()
            try:
                ws.recv(timeout=idle)
            except ConnectionClosed:
                out["closed_after"] = round(time.monotonic() - start, 2)
            except TimeoutError:
                out["closed_after"] = None
    print(json.dumps(out), flush=True)


def refused(url):
    try:
        with connect(url, open_timeout=10):
            print(json.dumps({"status": 101}))
    except InvalidStatus as e:
        print(json.dumps({"status": e.response.status_code,
                          "body": (e.response.body or b"").decode("utf-8", "replace")}))


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2])
    elif sys.argv[1] == "call":
        call(sys.argv[2], float(sys.argv[3]) if len(sys.argv) > 3 else None)
    elif sys.argv[1] == "refused":
        refused(sys.argv[2])
