#!/usr/bin/python3
"""A gRPC server for kakehi's end-to-end tests (tests/grpc.rs), on Debian's python3-grpcio.

Run with /usr/bin/python3 (the grpc module is Debian's python3-grpcio). Usage:

    server.py PORTFILE [--lifetime SECS]

Serves insecure gRPC (h2c, prior knowledge) on 127.0.0.1 on a port the kernel picks, and
writes that port to PORTFILE (atomically: a temp file renamed) once it is serving. There is
no protoc here: the service is registered with `grpc.method_handlers_generic_handler` and
messages are raw bytes (identity serializers).

Service `kakehi.Test`:

    Echo   unary            the request bytes reversed; trailing metadata `x-trailer: <len>`
                            (the request's length in bytes).
    Count  server streaming the request is an ascii number N: N messages b"0", b"1", ...,
                            b"N-1", DELAY seconds apart (the first one at once).
    Chat   bidi streaming   each message echoed uppercased as soon as it arrives.
    Fail   unary            aborts with PERMISSION_DENIED and details "nope".

The server stops by itself after --lifetime seconds (300 by default), so a test that forgot
it cannot leave it behind forever; the test kills it by pid when done.
"""

import os
import sys
import time
from concurrent import futures

import grpc

SERVICE = "kakehi.Test"
DELAY = 0.1


def identity(b):
    return b


def echo(request, context):
    context.set_trailing_metadata((("x-trailer", str(len(request))),))
    return request[::-1]


def count(request, context):
    n = int(request.decode("ascii"))
    for i in range(n):
        if i > 0:
            time.sleep(DELAY)
        if not context.is_active():
            return
        yield str(i).encode("ascii")


def chat(request_iterator, context):
    for message in request_iterator:
        yield message.upper()


def fail(request, context):
    context.abort(grpc.StatusCode.PERMISSION_DENIED, "nope")


def handlers():
    unary = grpc.unary_unary_rpc_method_handler
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Echo": unary(echo, request_deserializer=identity, response_serializer=identity),
            "Count": grpc.unary_stream_rpc_method_handler(
                count, request_deserializer=identity, response_serializer=identity
            ),
            "Chat": grpc.stream_stream_rpc_method_handler(
                chat, request_deserializer=identity, response_serializer=identity
            ),
            "Fail": unary(fail, request_deserializer=identity, response_serializer=identity),
        },
    )


def main(argv):
    args = argv[1:]
    lifetime = 300.0
    if "--lifetime" in args:
        i = args.index("--lifetime")
        lifetime = float(args[i + 1])
        del args[i : i + 2]
    want = 0
    if "--port" in args:
        i = args.index("--port")
        want = int(args[i + 1])
        del args[i : i + 2]
    if len(args) != 1:
        sys.stderr.write("usage: server.py PORTFILE [--lifetime SECS] [--port PORT]\n")
        return 2
    portfile = args[0]

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=64),
        handlers=[handlers()],
        options=[("grpc.so_reuseport", 0)],
        maximum_concurrent_rpcs=None,
    )
    port = server.add_insecure_port("127.0.0.1:%d" % want)
    if port == 0:
        sys.stderr.write("server.py: cannot bind 127.0.0.1:%d\n" % want)
        return 1
    server.start()
    tmp = portfile + ".tmp"
    with open(tmp, "w") as f:
        f.write("%d\n" % port)
    os.rename(tmp, portfile)
    sys.stderr.write("server.py: serving %s on 127.0.0.1:%d\n" % (SERVICE, port))
    sys.stderr.flush()
    server.wait_for_termination(timeout=lifetime)
    server.stop(grace=None)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
