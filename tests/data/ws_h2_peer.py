"""A WebSocket client over HTTP/2 (RFC 8441, "extended CONNECT") built from libraries
nobody at meshfed wrote: PyPI `h2` for the HTTP/2 connection and `wsproto` for the
WebSocket frames (its `Connection` is the frame layer without the HTTP/1.1 handshake,
meant for RFC 8441).

usage: ws_h2_peer.py HOST PORT PATH

Against a `ws_peer.py serve` endpoint behind the import, with prior knowledge (h2c):
  - checks that the server's SETTINGS enable the extended CONNECT;
  - opens a WebSocket on one stream (`:method CONNECT`, `:protocol websocket`,
    offering subprotocol chat.v1), reads the endpoint's hello, sends 20 text messages
    and binary ones of 1 B and 48 KiB, checks each echo, and closes with 1000;
  - while that WebSocket is open, sends a plain GET on the same connection;
  - asks for an extended CONNECT of another protocol (`connect-udp`).

Prints one JSON line: {"connect_protocol", "status", "subprotocol", "hello", "echoed",
"close_code", "plain_status", "other": {"status", "error"}}.
"""

import json
import os
import socket
import sys

import h2.config
import h2.connection
import h2.events
import h2.settings
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, TextMessage
from wsproto.frame_protocol import CloseReason


class Client:
    def __init__(self, host, port):
        self.sock = socket.create_connection((host, port), timeout=10)
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.conn.initiate_connection()
        self.flush()
        self.events = []

    def flush(self):
        out = self.conn.data_to_send()
        if out:
            self.sock.sendall(out)

    def pump(self):
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("the server closed the connection")
        for ev in self.conn.receive_data(data):
            if isinstance(ev, h2.events.DataReceived):
                self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            self.events.append(ev)
        self.flush()

    def wait(self, stream_id, kind):
        while True:
            for i, ev in enumerate(self.events):
                if getattr(ev, "stream_id", None) != stream_id:
                    continue
                if isinstance(ev, kind):
                    return self.events.pop(i)
                if isinstance(ev, h2.events.StreamReset):
                    raise RuntimeError("stream %d reset: %s" % (stream_id, ev.error_code))
            self.pump()

    def send(self, stream_id, data):
        while data:
            room = min(self.conn.local_flow_control_window(stream_id),
                       self.conn.max_outbound_frame_size)
            if room <= 0:
                self.pump()
                continue
            self.conn.send_data(stream_id, data[:room])
            data = data[room:]
            self.flush()


def main():
    host, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    c = Client(host, port)
    # The server's SETTINGS come first, before its acknowledgement of ours.
    settled = (h2.events.RemoteSettingsChanged, h2.events.SettingsAcknowledged)
    while not any(isinstance(e, settled) for e in c.events):
        c.pump()
    out = {"connect_protocol": bool(
        c.conn.remote_settings.get(h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL, 0))}

    sid = c.conn.get_next_available_stream_id()
    c.conn.send_headers(sid, [
        (":method", "CONNECT"), (":protocol", "websocket"), (":scheme", "http"),
        (":path", path), (":authority", "chat.demo"),
        ("sec-websocket-version", "13"), ("sec-websocket-protocol", "chat.v1"),
    ])
    c.flush()
    resp = dict(c.wait(sid, h2.events.ResponseReceived).headers)
    out["status"] = int(resp[":status"])
    out["subprotocol"] = resp.get("sec-websocket-protocol")
    ws = Connection(ConnectionType.CLIENT)
    pending = []
    # A message may come in pieces, over several DATA frames.
    partial = {"text": "", "data": b""}

    def message():
        while not pending:
            ev = c.wait(sid, h2.events.DataReceived)
            ws.receive_data(ev.data)
            for e in ws.events():
                if isinstance(e, TextMessage):
                    partial["text"] += e.data
                    if e.message_finished:
                        pending.append(partial["text"])
                        partial["text"] = ""
                elif isinstance(e, BytesMessage):
                    partial["data"] += e.data
                    if e.message_finished:
                        pending.append(partial["data"])
                        partial["data"] = b""
                elif isinstance(e, CloseConnection):
                    pending.append(e)
        return pending.pop(0)

    out["hello"] = json.loads(message())
    out["echoed"] = 0
    for i in range(20):
        c.send(sid, ws.send(TextMessage(data="m%d" % i)))
        got = message()
        assert got == out["hello"]["site"] + ":m%d" % i, got
        out["echoed"] += 1

    # A plain request beside the open WebSocket, on the same connection.
    plain = c.conn.get_next_available_stream_id()
    c.conn.send_headers(plain, [
        (":method", "GET"), (":scheme", "http"), (":path", path),
        (":authority", "chat.demo"),
    ], end_stream=True)
    c.flush()
    out["plain_status"] = int(dict(c.wait(plain, h2.events.ResponseReceived).headers)[":status"])

    for n in (1, 48 * 1024):
        b = os.urandom(n)
        c.send(sid, ws.send(BytesMessage(data=b)))
        got = message()
        assert got == b, "binary message of %d bytes came back as %d" % (n, len(got))
        out["echoed"] += 1
    c.send(sid, ws.send(CloseConnection(code=CloseReason.NORMAL_CLOSURE)))
    closed = message()
    out["close_code"] = int(closed.code) if isinstance(closed, CloseConnection) else None

    other = c.conn.get_next_available_stream_id()
    c.conn.send_headers(other, [
        (":method", "CONNECT"), (":protocol", "connect-udp"), (":scheme", "http"),
        (":path", "/.well-known/masque/udp/127.0.0.1/53/"), (":authority", "chat.demo"),
    ])
    c.flush()
    h = dict(c.wait(other, h2.events.ResponseReceived).headers)
    out["other"] = {"status": int(h[":status"]), "error": h.get("meshfed-error")}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
