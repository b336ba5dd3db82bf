#!/usr/bin/python3
"""A gRPC client for kakehi's end-to-end tests (tests/grpc.rs), on Debian's python3-grpcio.

Run with /usr/bin/python3 (the grpc module is Debian's python3-grpcio). Usage:

    client.py ADDR [--tls CAFILE --name NAME] [--calls LIST] [--concurrent N [--size BYTES]]

ADDR is HOST:PORT. Without --tls the channel is `grpc.insecure_channel` (h2c with prior
knowledge); with it, `grpc.secure_channel` trusting CAFILE, NAME being the name checked in the
server's certificate and sent as SNI (`grpc.ssl_target_name_override`). One channel carries
every call of a run. The methods are those of server.py's `kakehi.Test`, with raw bytes as
messages (identity serializers: there is no protoc here).

--calls LIST (comma-separated, default echo,echo_big,count,chat,fail):

    echo      Echo(ECHO): reply and trailing metadata.
    echo_big  Echo of BIG_LEN bytes (several DATA frames, past the 64 KiB initial windows):
              whether the reply is the request reversed, and the trailing metadata.
    count     Count(b"5"): the messages streamed and when each arrived.
    chat      Chat: CHAT's messages sent one at a time, message k only once reply k-1 has
              arrived, so the call completes only if both directions stream through.
    fail      Fail: the status code and details.

--concurrent N instead makes N Echo calls at once on the channel (futures), each with its
own payload (padded with a pattern to BYTES when --size is given), and reports how many came
back right.

Every call has a 10 s timeout, and the whole run a 50 s watchdog (exit 3). The report is one
JSON object on stdout, a key per call; each call's object has "code" (the status code's
name, "OK" on success), "details" and "secs" (its duration), plus what it returned. A failed
call is reported, not raised: the test asserts on the report.
"""

import binascii
import json
import os
import queue
import sys
import threading
import time

import grpc

SERVICE = "/kakehi.Test/"
TIMEOUT = 10.0
WATCHDOG = 50.0
ECHO = b"kakehi \x00\x01\xfe\xff gRPC echo"
BIG_LEN = 300_000
COUNT = 5
CHAT = [b"alpha", b"beta", b"gamma", b"delta", b"epsilon"]


def identity(b):
    return b


def hexs(b):
    return binascii.hexlify(b).decode("ascii")


def metadata(md):
    return {k: (v if isinstance(v, str) else hexs(v)) for k, v in (md or ())}


def status(err, started):
    """The report of a call that ended with an error status."""
    return {
        "code": err.code().name if err.code() is not None else None,
        "details": err.details(),
        "trailing": metadata(err.trailing_metadata()) if hasattr(err, "trailing_metadata") else {},
        "secs": time.monotonic() - started,
    }


def method(channel, kind, name):
    make = getattr(channel, kind)
    return make(SERVICE + name, request_serializer=identity, response_deserializer=identity)


def call_echo(channel, payload):
    started = time.monotonic()
    try:
        reply, call = method(channel, "unary_unary", "Echo").with_call(payload, timeout=TIMEOUT)
    except grpc.RpcError as err:
        return status(err, started), None
    return {
        "code": call.code().name,
        "details": call.details(),
        "trailing": metadata(call.trailing_metadata()),
        "secs": time.monotonic() - started,
    }, reply


def echo(channel):
    report, reply = call_echo(channel, ECHO)
    if reply is not None:
        report["request_hex"] = hexs(ECHO)
        report["reply_hex"] = hexs(reply)
    return report


def echo_big(channel):
    payload = bytes((i * 7 + i // 251) % 256 for i in range(BIG_LEN))
    report, reply = call_echo(channel, payload)
    report["len"] = BIG_LEN
    if reply is not None:
        report["reply_len"] = len(reply)
        report["reversed_ok"] = reply == payload[::-1]
    return report


def count(channel):
    started = time.monotonic()
    messages, arrivals = [], []
    call = method(channel, "unary_stream", "Count")(str(COUNT).encode("ascii"), timeout=TIMEOUT)
    try:
        for m in call:
            arrivals.append(time.monotonic() - started)
            messages.append(m.decode("latin-1"))
    except grpc.RpcError as err:
        report = status(err, started)
    else:
        report = {
            "code": call.code().name,
            "details": call.details(),
            "trailing": metadata(call.trailing_metadata()),
            "secs": time.monotonic() - started,
        }
    report["messages"] = messages
    report["arrivals"] = arrivals
    return report


def chat(channel):
    """Bidi streaming in lock step: message k is sent only after reply k-1 came back."""
    started = time.monotonic()
    go = queue.Queue()
    sent, sent_at, stalled = [], [], []

    def requests():
        for k, m in enumerate(CHAT):
            if k > 0:
                try:
                    go.get(timeout=TIMEOUT)
                except queue.Empty:
                    # Reply k-1 never came: stop sending (the call then ends short).
                    stalled.append(k)
                    return
            sent.append(m.decode("ascii"))
            sent_at.append(time.monotonic() - started)
            yield m

    replies, reply_at = [], []
    call = method(channel, "stream_stream", "Chat")(requests(), timeout=TIMEOUT)
    try:
        for r in call:
            replies.append(r.decode("latin-1"))
            reply_at.append(time.monotonic() - started)
            go.put(None)
    except grpc.RpcError as err:
        report = status(err, started)
    else:
        report = {
            "code": call.code().name,
            "details": call.details(),
            "trailing": metadata(call.trailing_metadata()),
            "secs": time.monotonic() - started,
        }
    report["sent"] = sent
    report["replies"] = replies
    report["sent_at"] = sent_at
    report["reply_at"] = reply_at
    report["stalled_before"] = stalled[0] if stalled else None
    # Each message k > 0 left after reply k-1 arrived: true interleaving, not a batch.
    report["interleaved"] = len(sent) == len(CHAT) and all(
        sent_at[k] >= reply_at[k - 1] for k in range(1, len(sent)) if k - 1 < len(reply_at)
    )
    return report


def fail(channel):
    started = time.monotonic()
    try:
        reply = method(channel, "unary_unary", "Fail")(b"please", timeout=TIMEOUT)
    except grpc.RpcError as err:
        return status(err, started)
    return {"code": "OK", "details": None, "reply_hex": hexs(reply),
            "secs": time.monotonic() - started}


def concurrent(channel, n, size):
    started = time.monotonic()
    stub = method(channel, "unary_unary", "Echo")
    payloads = []
    for i in range(n):
        p = ("call %d of %d|" % (i, n)).encode("ascii")
        payloads.append(p + bytes((i + k * 13) % 256 for k in range(max(0, size - len(p)))))
    calls = [stub.future(p, timeout=TIMEOUT) for p in payloads]
    ok, codes, bad = 0, {}, []
    for i, (p, f) in enumerate(zip(payloads, calls)):
        try:
            reply = f.result()
        except grpc.RpcError as err:
            name = err.code().name if err.code() is not None else "None"
            codes[name] = codes.get(name, 0) + 1
            if len(bad) < 5:
                bad.append({"i": i, "code": name, "details": err.details()})
            continue
        codes["OK"] = codes.get("OK", 0) + 1
        trailer = metadata(f.trailing_metadata()).get("x-trailer")
        if reply == p[::-1] and trailer == str(len(p)):
            ok += 1
        elif len(bad) < 5:
            bad.append({"i": i, "reply": reply[:64].decode("latin-1"), "reply_len": len(reply),
                        "trailer": trailer})
    return {"n": n, "ok": ok, "codes": codes, "bad": bad, "secs": time.monotonic() - started}


CALLS = {"echo": echo, "echo_big": echo_big, "count": count, "chat": chat, "fail": fail}


def main(argv):
    args = argv[1:]

    def option(name, has_value=True):
        if name not in args:
            return None
        i = args.index(name)
        value = args[i + 1] if has_value else True
        del args[i : i + (2 if has_value else 1)]
        return value

    cafile = option("--tls")
    name = option("--name")
    calls = (option("--calls") or "echo,echo_big,count,chat,fail").split(",")
    n = option("--concurrent")
    size = int(option("--size") or 0)
    if len(args) != 1 or (cafile is None) != (name is None) or any(c not in CALLS for c in calls):
        sys.stderr.write(
            "usage: client.py ADDR [--tls CAFILE --name NAME] [--calls LIST]"
            " [--concurrent N [--size BYTES]]\n"
        )
        return 2
    addr = args[0]

    def watchdog():
        sys.stderr.write("client.py: still running after %.0f s: giving up\n" % WATCHDOG)
        sys.stderr.flush()
        os._exit(3)

    timer = threading.Timer(WATCHDOG, watchdog)
    timer.daemon = True
    timer.start()

    options = [("grpc.enable_http_proxy", 0)]
    if cafile is not None:
        with open(cafile, "rb") as f:
            creds = grpc.ssl_channel_credentials(root_certificates=f.read())
        options.append(("grpc.ssl_target_name_override", name))
        channel = grpc.secure_channel(addr, creds, options=options)
    else:
        channel = grpc.insecure_channel(addr, options=options)

    report = {"target": addr, "tls": cafile is not None}
    started = time.monotonic()
    with channel:
        if n is not None:
            report["concurrent"] = concurrent(channel, int(n), size)
        else:
            for c in calls:
                report[c] = CALLS[c](channel)
    report["secs"] = time.monotonic() - started
    timer.cancel()
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
