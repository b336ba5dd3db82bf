#!/usr/bin/python3
"""An HTTP/2 client for kakehi's end-to-end tests (tests/http2.rs), on Debian's python3-h2.

Run with /usr/bin/python3 (the h2 module is Debian's python3-h2). Usage:

    h2client.py [--tls --sni NAME] HOST PORT SCENARIO [ARGS...]

Every scenario opens one connection (h2c prior knowledge, or TLS with ALPN h2 only), does
what it says, and prints one JSON object on stdout describing what the client saw; the Rust
test asserts on it. Every wait is bounded: socket reads time out, and each scenario has an
overall deadline after which the script fails (exit 1, the reason on stderr).

Scenarios:

    concurrent N AUTHORITY PREFIX [BASE] N GETs of PREFIX{BASE+i} (BASE 0 by default), all sent
                                         on N streams before any response is read, then every
                                         response read. With PREFIX /bytes/ each body is checked
                                         against the origin's pattern ("pattern_ok").
    sequence AUTHORITY PATH [AUTHORITY PATH...]
                                         one GET after the other on the same connection, each
                                         waited for before the next.
    reset AUTHORITY                      RST_STREAM(CANCEL) of a large download after its first
                                         DATA, and of a slow response before its head; then a
                                         GET on the same connection.
    upload AUTHORITY LEN CL              POST /digest with LEN pattern bytes in DATA frames,
                                         respecting flow control; CL=1 sends content-length.

The JSON object: {"alpn": ..., "streams": [{"id", "path", "authority", "status", "headers",
"body_len", "body_text" (first 4 KiB, lossy), "pattern_ok", "ended", "reset"}], "goaway":
null or {"error_code", "last_stream_id"}, "closed": bool, plus scenario-specific keys}.
"""

import json
import socket
import ssl
import sys
import time

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

PERIOD = 251
IO_TIMEOUT = 10.0
DEADLINE = 45.0


def pattern(length, offset=0):
    """`length` bytes of the origin's /bytes/N pattern from `offset`: byte i is i % 251."""
    block = bytes(range(PERIOD))
    start = offset % PERIOD
    reps = (start + length) // PERIOD + 1
    return (block * reps)[start:start + length]


def fail(msg):
    sys.stderr.write("h2client: " + msg + "\n")
    sys.exit(1)


class Stream:
    def __init__(self, sid, authority, path):
        self.id = sid
        self.authority = authority
        self.path = path
        self.status = None
        self.headers = []
        self.body = bytearray()
        self.body_len = 0
        self.keep_body = True
        self.ended = False
        self.reset = None
        self.data_after_reset = 0

    def report(self):
        expected = None
        if self.path.startswith("/bytes/"):
            try:
                expected = int(self.path[len("/bytes/"):])
            except ValueError:
                expected = None
        pattern_ok = None
        if expected is not None and self.keep_body:
            pattern_ok = self.body_len == expected and bytes(self.body) == pattern(expected)
        return {
            "id": self.id,
            "authority": self.authority,
            "path": self.path,
            "status": self.status,
            "headers": self.headers,
            "body_len": self.body_len,
            "body_text": bytes(self.body[:4096]).decode("utf-8", "replace"),
            "pattern_ok": pattern_ok,
            "ended": self.ended,
            "reset": self.reset,
            "data_after_reset": self.data_after_reset,
        }


class Client:
    def __init__(self, host, port, tls, sni):
        self.deadline = time.monotonic() + DEADLINE
        sock = socket.create_connection((host, port), timeout=IO_TIMEOUT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.alpn = None
        if tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            ctx.set_alpn_protocols(["h2"])
            sock = ctx.wrap_socket(sock, server_hostname=sni)
            self.alpn = sock.selected_alpn_protocol()
            if self.alpn != "h2":
                fail("the server did not select ALPN h2 (selected: %r)" % (self.alpn,))
        self.sock = sock
        config = h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        self.conn = h2.connection.H2Connection(config=config)
        self.conn.initiate_connection()
        self.flush()
        self.streams = {}
        self.order = []
        self.goaway = None
        self.closed = False
        self.server_settings = None
        # The server's connection preface (its SETTINGS) first: then the h2 module knows the
        # server's limits (SETTINGS_MAX_CONCURRENT_STREAMS) before any request is sent.
        self.wait(lambda: self.server_settings is not None, "waiting for the server's SETTINGS")

    def flush(self):
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def check_deadline(self, what):
        if time.monotonic() > self.deadline:
            fail("deadline of %ss passed while %s; state: %s"
                 % (DEADLINE, what, json.dumps(self.report())))

    def request(self, method, authority, path, end_stream=True, extra=()):
        sid = self.conn.get_next_available_stream_id()
        scheme = "https" if self.alpn else "http"
        headers = [(":method", method), (":scheme", scheme), (":authority", authority),
                   (":path", path), ("user-agent", "kakehi-h2-test")]
        headers.extend(extra)
        self.conn.send_headers(sid, headers, end_stream=end_stream)
        self.flush()
        stream = Stream(sid, authority, path)
        self.streams[sid] = stream
        self.order.append(sid)
        return stream

    def send_body(self, sid, data):
        """Sends `data` on stream `sid` within the flow-control windows, then END_STREAM."""
        off = 0
        while off < len(data):
            window = self.conn.local_flow_control_window(sid)
            size = min(window, self.conn.max_outbound_frame_size, len(data) - off)
            if size <= 0:
                self.read_once("waiting for a WINDOW_UPDATE to send the request body")
                if self.closed or self.streams[sid].ended or self.streams[sid].reset:
                    return off
                continue
            self.conn.send_data(sid, data[off:off + size])
            self.flush()
            off += size
        self.conn.end_stream(sid)
        self.flush()
        return off

    def read_once(self, what):
        self.check_deadline(what)
        if self.closed:
            fail("the connection closed while " + what)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            fail("no byte from the server for %ss while %s; state: %s"
                 % (IO_TIMEOUT, what, json.dumps(self.report())))
        except (ConnectionResetError, ssl.SSLError, OSError) as e:
            self.closed = True
            self.close_error = str(e)
            return
        if not data:
            self.closed = True
            return
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as e:
            fail("protocol error from the server while %s: %r" % (what, e))
        for ev in events:
            self.handle(ev)
        self.flush()

    def handle(self, ev):
        if isinstance(ev, h2.events.ResponseReceived):
            s = self.streams[ev.stream_id]
            for name, value in ev.headers:
                if name == ":status":
                    s.status = int(value)
                else:
                    s.headers.append([name, value])
        elif isinstance(ev, h2.events.TrailersReceived):
            self.streams[ev.stream_id].headers.extend([n, v] for n, v in ev.headers)
        elif isinstance(ev, h2.events.DataReceived):
            s = self.streams.get(ev.stream_id)
            if s is not None:
                if s.reset is not None:
                    s.data_after_reset += len(ev.data)
                else:
                    s.body_len += len(ev.data)
                    if s.keep_body:
                        s.body.extend(ev.data)
            # Give the window back (stream and connection) as the bytes are consumed.
            try:
                self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            except h2.exceptions.StreamClosedError:
                pass
        elif isinstance(ev, h2.events.StreamEnded):
            self.streams[ev.stream_id].ended = True
        elif isinstance(ev, h2.events.StreamReset):
            s = self.streams.get(ev.stream_id)
            if s is not None and s.reset is None:
                s.reset = {"by": "server", "error_code": int(ev.error_code)}
        elif isinstance(ev, h2.events.RemoteSettingsChanged):
            if self.server_settings is None:
                self.server_settings = {}
            for code, change in ev.changed_settings.items():
                try:
                    name = h2.settings.SettingCodes(code).name
                except ValueError:
                    name = str(int(code))
                self.server_settings[name] = change.new_value
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self.goaway = {"error_code": int(ev.error_code),
                           "last_stream_id": ev.last_stream_id,
                           "additional_data": (ev.additional_data or b"").decode("utf-8", "replace")}

    def wait(self, cond, what):
        while not cond():
            if self.closed:
                fail("the connection closed while %s; state: %s" % (what, json.dumps(self.report())))
            self.read_once(what)

    def done(self, s):
        return s.ended or s.reset is not None

    def cancel(self, s):
        self.conn.reset_stream(s.id, error_code=h2.errors.ErrorCodes.CANCEL)
        self.flush()
        s.reset = {"by": "client", "error_code": int(h2.errors.ErrorCodes.CANCEL)}

    def report(self):
        return {
            "alpn": self.alpn,
            "streams": [self.streams[i].report() for i in self.order],
            "goaway": self.goaway,
            "closed": self.closed,
            "server_settings": self.server_settings,
        }

    def finish(self, extra=None):
        out = self.report()
        if extra:
            out.update(extra)
        # A polite close: GOAWAY(NO_ERROR), then FIN.
        try:
            self.conn.close_connection()
            self.flush()
            self.sock.close()
        except OSError:
            pass
        sys.stdout.write(json.dumps(out) + "\n")


def scenario_concurrent(c, args):
    n, authority, prefix = int(args[0]), args[1], args[2]
    base = int(args[3]) if len(args) > 3 else 0
    streams = [c.request("GET", authority, "%s%d" % (prefix, base + i)) for i in range(n)]
    c.wait(lambda: all(c.done(s) for s in streams), "reading %d concurrent responses" % n)
    # The most streams in flight the server allowed.
    c.finish()


def scenario_sequence(c, args):
    if len(args) % 2:
        fail("sequence takes AUTHORITY PATH pairs")
    for authority, path in zip(args[0::2], args[1::2]):
        s = c.request("GET", authority, path)
        c.wait(lambda: c.done(s), "reading the response to GET %s %s" % (authority, path))
    c.finish()


def scenario_reset(c, args):
    authority = args[0]
    # A download far larger than any buffer on the way: cancelled after its first DATA.
    big = c.request("GET", authority, "/bytes/268435456")
    big.keep_body = False
    c.wait(lambda: big.body_len > 0 or c.done(big), "waiting for the first DATA of the download")
    received_before_reset = big.body_len
    if not c.done(big):
        c.cancel(big)
    # A response the origin holds for 3 s: cancelled before its head arrives.
    slow = c.request("GET", authority, "/sleep/3000")
    c.cancel(slow)
    # The connection goes on: a GET answered well before the slow response would have been.
    t0 = time.monotonic()
    after = c.request("GET", authority, "/after-reset")
    c.wait(lambda: c.done(after), "reading the GET sent after the resets")
    after_secs = time.monotonic() - t0
    # And once more, after the data in flight for the cancelled download has drained.
    again = c.request("GET", authority, "/again")
    c.wait(lambda: c.done(again), "reading the second GET after the resets")
    c.finish({"received_before_reset": received_before_reset, "after_secs": after_secs})


def scenario_upload(c, args):
    authority, length, with_cl = args[0], int(args[1]), args[2] == "1"
    extra = [("content-type", "application/octet-stream")]
    if with_cl:
        extra.append(("content-length", str(length)))
    s = c.request("POST", authority, "/digest", end_stream=False, extra=extra)
    sent = c.send_body(s.id, pattern(length))
    c.wait(lambda: c.done(s), "reading the response to the upload")
    c.finish({"sent": sent})


SCENARIOS = {
    "concurrent": scenario_concurrent,
    "sequence": scenario_sequence,
    "reset": scenario_reset,
    "upload": scenario_upload,
}


def main(argv):
    tls, sni = False, None
    args = list(argv)
    while args and args[0].startswith("--"):
        flag = args.pop(0)
        if flag == "--tls":
            tls = True
        elif flag == "--sni":
            sni = args.pop(0)
        else:
            fail("unknown flag " + flag)
    if len(args) < 3 or args[2] not in SCENARIOS:
        fail(__doc__)
    host, port, name = args[0], int(args[1]), args[2]
    c = Client(host, port, tls, sni)
    SCENARIOS[name](c, args[3:])


if __name__ == "__main__":
    main(sys.argv[1:])
