"""A gRPC server and client nobody at meshfed wrote (grpcio, from PyPI), for the e2e test
of `protocol: grpc` ports. No generated code: methods take and return raw bytes.

  grpc_peer.py serve SITE           prints the port it listens on, then serves:
      /echo.Echo/Say     unary: answers b"SITE:" + request, trailing metadata x-site=SITE;
                         a request b"missing" is aborted with NOT_FOUND "no such thing"
      /echo.Echo/Chat    bidirectional stream: answers each message as it arrives
  grpc_peer.py call HOST:PORT       runs the calls through HOST:PORT, prints one line per
                                    check, and exits 0 when every check held
"""

import sys
from concurrent import futures

import grpc


def serve(site):
    def say(request, context):
        if request == b"missing":
            context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
        context.set_trailing_metadata((("x-site", site),))
        return site.encode() + b":" + request

    def chat(requests, context):
        for r in requests:
            yield site.encode() + b":" + r

    handler = grpc.method_handlers_generic_handler(
        "echo.Echo",
        {
            "Say": grpc.unary_unary_rpc_method_handler(say),
            "Chat": grpc.stream_stream_rpc_method_handler(chat),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    server.wait_for_termination()


def call(target):
    ok = True

    def check(name, cond, detail=""):
        nonlocal ok
        ok = ok and cond
        print(("ok " if cond else "FAILED ") + name + (": " + detail if detail else ""), flush=True)

    with grpc.insecure_channel(target) as ch:
        say = ch.unary_unary("/echo.Echo/Say")
        resp, rpc = say.with_call(b"hello", timeout=10)
        trailers = dict(rpc.trailing_metadata())
        check("unary", resp.endswith(b":hello"), repr(resp))
        check("trailing metadata", trailers.get("x-site") == resp.split(b":")[0].decode(), repr(trailers))
        try:
            say(b"missing", timeout=10)
            check("status", False, "no error")
        except grpc.RpcError as e:
            check(
                "status",
                e.code() == grpc.StatusCode.NOT_FOUND and e.details() == "no such thing",
                f"{e.code()} {e.details()!r}",
            )
        chat = ch.stream_stream("/echo.Echo/Chat")
        msgs = [f"m{i}".encode() for i in range(50)]
        got = list(chat(iter(msgs), timeout=10))
        check("bidirectional stream", [g.split(b":", 1)[1] for g in got] == msgs, f"{len(got)} answers")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2])
    else:
        call(sys.argv[2])
