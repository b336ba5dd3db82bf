#!/usr/bin/python3
"""HTTP/2 clients for kakehi's drain and upgrade tests (tests/http2_upgrade.rs).

Run with /usr/bin/python3 (Debian's python3-h2). Usage:

    upgrade_client.py HOST PORT SCENARIO [ARGS...]

The test and the script take turns: at each step the script prints one JSON line
{"event": "pause", "name": NAME, ...} on stdout and waits for a line on stdin ("go") before it
goes on, so the test can act on lbd (lbctl upgrade, backend add...) at a known point. The last
line is {"event": "report", ...}. Every wait is bounded; on a broken expectation the script
exits 1 with the reason on stderr.

Scenarios:

    drain SLOW_MS           5 GETs of /sleep/SLOW_MS?n=I on one connection; pause "opened";
                            then read until GOAWAY comes; open one more stream on that
                            connection (/after-goaway); read until the 5 streams are done and
                            the connection closes. Then a new connection: GET /new-conn; pause
                            "new" (with the connection's local port, so the test can see which
                            worker holds it); GET /new-conn-again on it; report.
    config                  5 GETs of /sleep/1500?step=inflight-I; pause "opened"; read them;
                            10 GETs of /added-I; pause "added"... (see scenario_config).
    load CONNS STREAMS SECS PATH
                            CONNS connections, each keeping STREAMS GETs of PATH?r=N in flight,
                            for SECS seconds, as RFC 9113 says a client does: on GOAWAY no new
                            stream on that connection, the streams above its last_stream_id and
                            those reset with REFUSED_STREAM retried on a new connection (they
                            were not processed, §8.7); the connection replaced. Everything
                            else that is not a 200 with its whole body counts as lost.

python3-h2 4.1 moves the connection to CLOSED when GOAWAY arrives and then refuses the frames of
the streams still in flight, which RFC 9113 §6.8 says go on: this client feeds h2 one frame at a
time and puts the connection back in CLIENT_OPEN after a GOAWAY, so the in-flight streams are
read to their end (and, in "drain", one more stream can be sent to see what the server does).
"""

import json
import select
import socket
import sys
import time

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions

IO_TIMEOUT = 10.0
DEADLINE = 60.0
REFUSED = int(h2.errors.ErrorCodes.REFUSED_STREAM)
START = time.monotonic()
# When the test said "go" at each pause (after its change to lbd was applied).
RESUMED = {}


MAX_STREAM_ID = 2**31 - 1


def now():
    return round(time.monotonic() - START, 3)


def fail(msg):
    sys.stderr.write("upgrade_client: " + msg + "\n")
    sys.stderr.flush()
    sys.exit(1)


def emit(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def pause(name, **extra):
    """Tells the test where the script is, and waits for its "go"."""
    obj = {"event": "pause", "name": name}
    obj.update(extra)
    emit(obj)
    ready, _, _ = select.select([sys.stdin], [], [], DEADLINE)
    if not ready:
        fail("no word from the test within %ss at pause %r" % (DEADLINE, name))
    line = sys.stdin.readline()
    if line.strip() != "go":
        fail("the test said %r at pause %r" % (line, name))
    RESUMED[name] = now()


class Stream:
    def __init__(self, sid, path, tag=None):
        self.id = sid
        self.path = path
        self.tag = tag
        self.status = None
        self.body = bytearray()
        self.ended = False
        self.reset = None
        self.opened_at = now()
        self.done_at = None

    def done(self):
        return self.ended or self.reset is not None

    def report(self):
        return {
            "id": self.id,
            "path": self.path,
            "status": self.status,
            "body_len": len(self.body),
            "body_text": bytes(self.body[:4096]).decode("utf-8", "replace"),
            "ended": self.ended,
            "reset": self.reset,
            "opened_at": self.opened_at,
            "done_at": self.done_at,
        }


class Conn:
    """One h2c connection, fed one frame at a time so that it survives a GOAWAY."""

    def __init__(self, host, port, blocking=True):
        sock = socket.create_connection((host, port), timeout=IO_TIMEOUT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.local_port = sock.getsockname()[1]
        config = h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        self.conn = h2.connection.H2Connection(config=config)
        self.conn.initiate_connection()
        self.streams = {}
        self.order = []
        self.goaway = None
        self.final_goaway = False
        self.goaway_at = None
        self.closed = False
        self.closed_at = None
        self.pending = b""
        self.settings_seen = False
        self.flush()
        if not blocking:
            sock.setblocking(False)

    def flush(self):
        data = self.conn.data_to_send()
        if data and not self.closed:
            try:
                self.sock.sendall(data)
            except OSError:
                self.mark_closed()

    def mark_closed(self):
        if not self.closed:
            self.closed = True
            self.closed_at = now()

    def request(self, path, tag=None):
        sid = self.conn.get_next_available_stream_id()
        headers = [(":method", "GET"), (":scheme", "http"), (":authority", "localhost"),
                   (":path", path), ("user-agent", "kakehi-h2-upgrade-test")]
        self.conn.send_headers(sid, headers, end_stream=True)
        s = Stream(sid, path, tag)
        self.streams[sid] = s
        self.order.append(sid)
        self.flush()
        return s

    def on_bytes(self, data):
        """Feeds h2 the complete frames of `data` one by one; returns h2's events."""
        self.pending += data
        events = []
        while len(self.pending) >= 9:
            length = int.from_bytes(self.pending[:3], "big")
            if len(self.pending) < 9 + length:
                break
            frame, self.pending = self.pending[:9 + length], self.pending[9 + length:]
            try:
                got = self.conn.receive_data(frame)
            except h2.exceptions.ProtocolError as e:
                fail("protocol error from the server: %r; state: %s" % (e, json.dumps(self.report())))
            for ev in got:
                self.handle(ev)
            events.extend(got)
        self.flush()
        return events

    def handle(self, ev):
        if isinstance(ev, h2.events.ResponseReceived):
            s = self.streams[ev.stream_id]
            for name, value in ev.headers:
                if name == ":status":
                    s.status = int(value)
        elif isinstance(ev, h2.events.DataReceived):
            s = self.streams.get(ev.stream_id)
            if s is not None:
                s.body.extend(ev.data)
            try:
                self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                pass
        elif isinstance(ev, h2.events.StreamEnded):
            s = self.streams.get(ev.stream_id)
            if s is not None:
                s.ended = True
                s.done_at = now()
        elif isinstance(ev, h2.events.StreamReset):
            s = self.streams.get(ev.stream_id)
            if s is not None and s.reset is None:
                s.reset = {"by": "server", "error_code": int(ev.error_code)}
                s.done_at = now()
        elif isinstance(ev, h2.events.RemoteSettingsChanged):
            self.settings_seen = True
        elif isinstance(ev, h2.events.ConnectionTerminated):
            # A graceful shutdown (RFC 9113 §6.8) may come in two GOAWAYs: the first names
            # 2^31-1, the final one the last stream the server took. `goaway` keeps the first
            # one's time and the streams done by then, with the final one's id and code.
            if self.goaway is None:
                self.goaway_at = now()
                self.goaway = {
                    "error_code": int(ev.error_code),
                    "last_stream_id": ev.last_stream_id,
                    "streams_done_before": sum(1 for s in self.streams.values() if s.done()),
                    "count": 1,
                }
            else:
                self.goaway["again"] = {"error_code": int(ev.error_code),
                                        "last_stream_id": ev.last_stream_id}
                self.goaway["count"] += 1
                if ev.last_stream_id <= self.goaway["last_stream_id"]:
                    self.goaway["last_stream_id"] = ev.last_stream_id
                    self.goaway["error_code"] = int(ev.error_code)
            if ev.last_stream_id < MAX_STREAM_ID:
                self.final_goaway = True
            # RFC 9113 §6.8: the streams at or below last_stream_id go on. h2 would refuse
            # their frames from now on (and this client's own frames); undo that.
            self.conn.state_machine.state = h2.connection.ConnectionState.CLIENT_OPEN

    def read_once(self, what, deadline):
        """One blocking read (IO_TIMEOUT at most)."""
        if time.monotonic() > deadline:
            fail("deadline passed while %s; state: %s" % (what, json.dumps(self.report())))
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            fail("no byte for %ss while %s; state: %s" % (IO_TIMEOUT, what, json.dumps(self.report())))
        except OSError as e:
            self.close_error = str(e)
            self.mark_closed()
            return
        if not data:
            self.mark_closed()
            return
        self.on_bytes(data)

    def wait(self, cond, what, allow_close=False):
        deadline = time.monotonic() + DEADLINE
        while not cond():
            if self.closed:
                if allow_close:
                    return
                fail("the connection closed while %s; state: %s" % (what, json.dumps(self.report())))
            self.read_once(what, deadline)

    def report(self):
        return {
            "local_port": self.local_port,
            "streams": [self.streams[i].report() for i in self.order],
            "goaway": self.goaway,
            "goaway_at": self.goaway_at,
            "closed": self.closed,
            "closed_at": self.closed_at,
        }

    def close(self):
        try:
            self.conn.close_connection()
            self.flush()
            self.sock.close()
        except OSError:
            pass


def scenario_drain(host, port, args):
    slow = int(args[0])
    c = Conn(host, port)
    # The server's SETTINGS first (its limits known before the streams go).
    c.wait(lambda: c.settings_seen, "waiting for the server's SETTINGS")
    slow_streams = [c.request("/sleep/%d?n=%d" % (slow, i)) for i in range(5)]
    pause("opened", ids=[s.id for s in slow_streams], at=now())
    # The final GOAWAY (the first may name 2^31-1 while the server waits a round trip).
    c.wait(lambda: c.final_goaway, "waiting for the final GOAWAY", allow_close=True)
    after = None
    if c.goaway is not None and not c.closed:
        # One more stream on the connection that said GOAWAY: it must not be served.
        after = c.request("/after-goaway")
    c.wait(lambda: all(s.done() for s in slow_streams) and (after is None or after.done()),
           "reading the streams in flight across the drain", allow_close=True)
    # The server closes the connection once its streams are done.
    c.wait(lambda: False, "waiting for the server to close the drained connection",
           allow_close=True)
    old = c.report()
    c.sock.close()

    n = Conn(host, port)
    first = n.request("/new-conn")
    n.wait(first.done, "reading GET /new-conn on a new connection")
    pause("new", local_port=n.local_port)
    again = n.request("/new-conn-again")
    n.wait(again.done, "reading GET /new-conn-again")
    new = n.report()
    n.close()
    emit({"event": "report", "old": old, "new": new, "after_goaway": after is not None})


def scenario_config(host, port, args):
    c = Conn(host, port)
    c.wait(lambda: c.settings_seen, "waiting for the server's SETTINGS")
    steps = {}

    def batch(name, paths):
        streams = [c.request(p) for p in paths]
        steps[name] = streams
        return streams

    def read(name):
        c.wait(lambda: all(s.done() for s in steps[name]), "reading the %s streams" % name)

    # In flight at A while a backend is added.
    batch("inflight", ["/sleep/1500?step=inflight-%d" % i for i in range(5)])
    pause("opened", at=now())
    read("inflight")
    batch("added", ["/added-%d" % i for i in range(10)])
    read("added")
    # In flight (at A and B) while A is drained.
    batch("draining", ["/sleep/1500?step=draining-%d" % i for i in range(6)])
    pause("opened2", at=now())
    read("draining")
    batch("drained", ["/drained-%d" % i for i in range(10)])
    read("drained")
    pause("before-remove")
    batch("removed", ["/removed-%d" % i for i in range(10)])
    read("removed")
    out = c.report()
    out["steps"] = {k: [s.id for s in v] for k, v in steps.items()}
    out["resumed"] = RESUMED
    c.close()
    out["event"] = "report"
    emit(out)


def scenario_load(host, port, args):
    conns, per_conn, secs, path = int(args[0]), int(args[1]), float(args[2]), args[3]
    end = time.monotonic() + secs
    hard_end = end + DEADLINE
    queue = []  # tags to (re)send
    next_tag = [0]
    stats = {"sent": 0, "ok": 0, "refused_rst": 0, "above_goaway": 0, "above_goaway_how": {},
             "lost": [],
             "goaways": [], "connections": 0, "statuses": {}}
    live = []

    def tag():
        if queue:
            return queue.pop(0)
        if time.monotonic() >= end:
            return None
        next_tag[0] += 1
        return next_tag[0]

    def connect():
        try:
            c = Conn(host, port)
        except OSError as e:
            stats["lost"].append({"why": "connect failed: %s" % e})
            return None
        stats["connections"] += 1
        c.owned = {}
        return c

    def fill(c):
        while not c.closed and c.goaway is None and len(c.owned) < per_conn:
            t = tag()
            if t is None:
                return
            try:
                s = c.request("%s?r=%d" % (path, t), t)
            except h2.exceptions.TooManyStreamsError:
                queue.insert(0, t)
                return
            c.owned[s.id] = s
            stats["sent"] += 1

    def settle(c):
        """Accounts for the streams of `c` that are done; after GOAWAY and close, for all."""
        for sid, s in list(c.owned.items()):
            last = c.goaway["last_stream_id"] if c.goaway else None
            if s.ended and s.reset is None:
                stats["statuses"][str(s.status)] = stats["statuses"].get(str(s.status), 0) + 1
                if s.status == 200:
                    stats["ok"] += 1
                else:
                    stats["lost"].append({"why": "status %s" % s.status, "tag": s.tag,
                                          "body": bytes(s.body[:200]).decode("utf-8", "replace")})
            elif s.reset is not None and s.reset["error_code"] == REFUSED:
                stats["refused_rst"] += 1
                queue.append(s.tag)
            elif last is not None and sid > last and (s.reset is not None or c.closed):
                # Above GOAWAY's last_stream_id: not processed, safe to retry (§6.8).
                stats["above_goaway"] += 1
                how = "reset %d" % s.reset["error_code"] if s.reset else "closed unanswered"
                stats["above_goaway_how"][how] = stats["above_goaway_how"].get(how, 0) + 1
                queue.append(s.tag)
            elif s.reset is not None:
                stats["lost"].append({"why": "reset %d" % s.reset["error_code"], "tag": s.tag,
                                      "stream": sid, "goaway": c.goaway})
            elif c.closed:
                stats["lost"].append({"why": "connection closed before the response ended",
                                      "tag": s.tag, "stream": sid, "status": s.status,
                                      "body_len": len(s.body), "goaway": c.goaway})
            else:
                continue
            del c.owned[sid]

    for _ in range(conns):
        c = connect()
        if c is not None:
            live.append(c)
    while live or queue or time.monotonic() < end:
        if time.monotonic() > hard_end:
            fail("the load did not end within %ss; %s" % (DEADLINE, json.dumps(stats)[:4000]))
        # Replace the connections that said GOAWAY (once their streams are done) or closed.
        for c in list(live):
            if c.closed or (c.goaway is not None and not c.owned):
                settle(c)
                if c.goaway is not None:
                    stats["goaways"].append({"at": c.goaway_at, "code": c.goaway["error_code"],
                                             "last": c.goaway["last_stream_id"],
                                             "done_before": c.goaway["streams_done_before"]})
                if c.owned:
                    continue
                live.remove(c)
                try:
                    c.sock.close()
                except OSError:
                    pass
                if time.monotonic() < end or queue:
                    n = connect()
                    if n is not None:
                        live.append(n)
        for c in live:
            fill(c)
        if not live:
            if queue or time.monotonic() < end:
                n = connect()
                if n is not None:
                    live.append(n)
                else:
                    time.sleep(0.05)
            continue
        if all(not c.owned for c in live) and time.monotonic() >= end and not queue:
            break
        ready, _, _ = select.select([c.sock for c in live], [], [], 1.0)
        for c in live:
            if c.sock not in ready:
                continue
            try:
                data = c.sock.recv(262144)
            except BlockingIOError:
                continue
            except OSError:
                c.mark_closed()
                settle(c)
                continue
            if not data:
                c.mark_closed()
            else:
                c.on_bytes(data)
            settle(c)
    for c in live:
        c.close()
    stats["event"] = "report"
    stats["last_tag"] = next_tag[0]
    emit(stats)


SCENARIOS = {
    "drain": scenario_drain,
    "config": scenario_config,
    "load": scenario_load,
}


def main(argv):
    if len(argv) < 3 or argv[2] not in SCENARIOS:
        fail(__doc__)
    SCENARIOS[argv[2]](argv[0], int(argv[1]), argv[3:])


if __name__ == "__main__":
    main(sys.argv[1:])
