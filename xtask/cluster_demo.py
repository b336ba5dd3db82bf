#!/usr/bin/python3
"""`cargo xtask cluster-demo`: three kakehi appliances behind one BGP router, on one machine.

Network namespaces, all created here and removed at the end:

    client (10.10.0.2, sources 10.20.0.1-200) -- router (bird2, ECMP) -- a1, a2, a3 (lbd + bird2)
                                                       |
                                    backends (five lb-origins, etcd) 10.40.0.2

Each appliance runs lbd with the same file: a listener on the VIP 192.0.2.10:80, one cluster
of five backends with Maglev on the source address, health checks, `[sync]` through the one
etcd, and `[bgp]` announcing the VIP to the router, which installs the three paths as one
ECMP route (bird's `merge paths`, `fib_multipath_hash_policy = 1`: the flow's addresses and
ports choose the path).

What it checks and reports (exit status 1 if a check fails):
1. 1,000 connections from 200 source addresses: each source always reaches the same backend,
   whichever appliance took the flow (the appliances' request counters show they all did);
2. appliance a2 stops: BGP withdraws its path; new flows go to a1 and a3; keep-alive
   connections opened before on a1 and a3 still answer (counted), and the flows that moved
   are reported;
3. `lbctl backend remove` on a1 is applied on a3 within 1 s (measured; `--deadline`);
4. a backend killed is seen down by the remaining appliances, and Maglev moves only its
   sources;
5. etcd stopped for 10 s: requests go on being served, a change made meanwhile on a1 reaches
   a3 after etcd is back.

Every process started here is stopped by pid; every namespace is removed.
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

VIP = "192.0.2.10"
SOURCES = 200
APPLIANCES = 3
BACKENDS = 5
ETCD = "10.40.0.2:2379"
PREFIX = f"cd{os.getpid()}"
RESULTS = {}
FAILED = []
# How soon a change on one appliance must be applied on another (the 1 s; the CI test,
# on debug builds beside the whole suite, allows more and reports the figure).
DEADLINE = 1.0


def sh(*args, check=True, **kw):
    r = subprocess.run(list(args), capture_output=True, text=True, **kw)
    if check and r.returncode != 0:
        raise SystemExit(f"cluster-demo: {' '.join(args)}: {r.stderr.strip()}")
    return r.stdout


def ns(name):
    return f"{PREFIX}-{name}"


def in_ns(name, *args, **kw):
    return sh("ip", "netns", "exec", ns(name), *args, **kw)


def check(ok, what):
    print(f"cluster-demo: {'ok  ' if ok else 'FAIL'} {what}", flush=True)
    if not ok:
        FAILED.append(what)


class Demo:
    def __init__(self, bins, workdir):
        self.bins = bins
        self.dir = workdir
        self.procs = {}
        self.namespaces = []
        self.links = 0

    # --- topology ---------------------------------------------------------------------
    def netns(self, name):
        sh("ip", "netns", "add", ns(name))
        self.namespaces.append(ns(name))
        in_ns(name, "ip", "link", "set", "lo", "up")

    def link(self, a, a_addr, b, b_addr):
        self.links += 1
        va, vb = f"{PREFIX[:6]}{self.links}a", f"{PREFIX[:6]}{self.links}b"
        sh("ip", "link", "add", va, "type", "veth", "peer", "name", vb)
        sh("ip", "link", "set", va, "netns", ns(a))
        sh("ip", "link", "set", vb, "netns", ns(b))
        in_ns(a, "ip", "addr", "add", a_addr, "dev", va)
        in_ns(b, "ip", "addr", "add", b_addr, "dev", vb)
        in_ns(a, "ip", "link", "set", va, "up")
        in_ns(b, "ip", "link", "set", vb, "up")

    def build(self):
        for n in ["client", "router", "backends"] + [f"a{i}" for i in range(1, APPLIANCES + 1)]:
            self.netns(n)
        self.link("router", "10.10.0.1/24", "client", "10.10.0.2/24")
        self.link("router", "10.40.0.1/24", "backends", "10.40.0.2/24")
        for i in range(1, APPLIANCES + 1):
            self.link("router", f"10.30.{i}.1/24", f"a{i}", f"10.30.{i}.2/24")
            in_ns(f"a{i}", "ip", "route", "add", "default", "via", f"10.30.{i}.1")
            # The VIP is the appliance's own address: lbd listens on it.
            in_ns(f"a{i}", "ip", "addr", "add", f"{VIP}/32", "dev", "lo")
        in_ns("client", "ip", "route", "add", "default", "via", "10.10.0.1")
        in_ns("backends", "ip", "route", "add", "default", "via", "10.40.0.1")
        for s in range(1, SOURCES + 1):
            in_ns("client", "ip", "addr", "add", f"10.20.0.{s}/32", "dev", "lo")
        in_ns("router", "ip", "route", "add", "10.20.0.0/24", "via", "10.10.0.2")
        in_ns("router", "sysctl", "-qw", "net.ipv4.ip_forward=1")
        in_ns("router", "sysctl", "-qw", "net.ipv4.fib_multipath_hash_policy=1")

    # --- processes --------------------------------------------------------------------
    def start(self, name, where, argv):
        log = open(os.path.join(self.dir, f"{name}.log"), "w")
        p = subprocess.Popen(
            ["ip", "netns", "exec", ns(where)] + argv, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        self.procs[name] = p
        return p

    def stop(self, name, sig=signal.SIGTERM, wait=30):
        p = self.procs.pop(name, None)
        if p and p.poll() is None:
            p.send_signal(sig)
            try:
                p.wait(wait)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def bird(self, name, where, conf):
        path = os.path.join(self.dir, f"{name}.conf")
        with open(path, "w") as f:
            f.write(conf)
        ctl = os.path.join(self.dir, f"{name}.ctl")
        self.start(f"bird-{name}", where, ["bird", "-f", "-c", path, "-s", ctl])
        return path, ctl

    def etcd(self):
        self.start(
            "etcd", "backends",
            ["etcd", "--name", "demo", "--data-dir", os.path.join(self.dir, "etcd"),
             f"--listen-client-urls=http://{ETCD}", f"--advertise-client-urls=http://{ETCD}",
             "--listen-peer-urls=http://127.0.0.1:2380",
             "--initial-advertise-peer-urls=http://127.0.0.1:2380",
             "--initial-cluster=demo=http://127.0.0.1:2380"],
        )

    def backend(self, k):
        self.start(f"b{k}", "backends",
                   [self.bins["lb-origin"], "--name", f"b{k}", "--listen", f"10.40.0.2:900{k}"])

    def appliance(self, i):
        # The appliance's bird starts on a stub: lbd writes its configuration.
        conf_path, ctl = self.bird(f"a{i}", f"a{i}", "router id 10.30.%d.2;\nprotocol device {}\n" % i)
        backends = ", ".join(f'{{ address = "10.40.0.2:900{k}" }}' for k in range(1, BACKENDS + 1))
        lbd_conf = os.path.join(self.dir, f"lbd-a{i}.toml")
        with open(lbd_conf, "w") as f:
            f.write(f"""workers = 2
command_socket = "{self.dir}/a{i}.sock"

[metrics]
address = "10.30.{i}.2:9100"

[[listeners]]
address = "{VIP}:80"

[clusters.app]
load_balancing = "maglev"
frontends = [ {{ address = "{VIP}:80" }} ]
backends = [ {backends} ]
health_check = {{ interval = "200ms", timeout = "150ms", rise = 2, fall = 2 }}

[sync]
etcd = ["http://{ETCD}"]
prefix = "/kakehi/{PREFIX}"
name = "a{i}"

[bgp]
vip = "{VIP}"
local_as = 65001
router_id = "10.30.{i}.2"
peers = [ {{ address = "10.30.{i}.1", as = 65000 }} ]
bird_socket = "{ctl}"
bird_config = "{conf_path}"
""")
        self.start(f"lbd-a{i}", f"a{i}", [self.bins["lbd"], "--config", lbd_conf])

    def lbctl(self, i, *args):
        return sh(self.bins["lbctl"], "--socket", f"{self.dir}/a{i}.sock", *args)

    def router(self):
        peers = "".join(
            f"""
protocol bgp a{i} {{
  local 10.30.{i}.1 as 65000;
  neighbor 10.30.{i}.2 as 65001;
  hold time 9; keepalive time 3;
  connect delay time 1; connect retry time 2; error wait time 1, 10;
  ipv4 {{ import all; export none; }};
}}
"""
            for i in range(1, APPLIANCES + 1)
        )
        self.bird("router", "router", f"""router id 10.10.0.1;
protocol device {{ scan time 1; }}
protocol kernel {{ ipv4 {{ export all; }}; merge paths on; }}
{peers}""")

    def cleanup(self):
        for name in list(self.procs):
            self.stop(name, wait=10)
        for n in self.namespaces:
            subprocess.run(["ip", "netns", "del", n], capture_output=True)


# --- traffic ----------------------------------------------------------------------------
CLIENT_SCRIPT = r"""
import json, socket, sys
def get(s):
    s.sendall(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        c = s.recv(65536)
        if not c:
            return None
        data += c
    head, _, body = data.partition(b"\r\n\r\n")
    n = 0
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            n = int(v)
    while len(body) < n:
        c = s.recv(65536)
        if not c:
            break
        body += c
    text = body.decode(errors="replace")
    if not text.startswith("origin "):
        return "status " + head.split(b" ")[1].decode()
    return text.split()[1].rstrip(":")
out = []
for line in sys.stdin:
    src, count = line.split()
    for _ in range(int(count)):
        try:
            s = socket.create_connection(("%s", 80), timeout=3, source_address=(src, 0))
            out.append([src, get(s)])
            s.close()
        except OSError as e:
            out.append([src, "error " + str(e)])
print(json.dumps(out))
""" % VIP


def round_of(demo, per_source):
    """`per_source` new connections from every source; source -> list of backends."""
    stdin = "".join(f"10.20.0.{s} {per_source}\n" for s in range(1, SOURCES + 1))
    out = in_ns("client", "/usr/bin/python3", "-c", CLIENT_SCRIPT, input=stdin)
    seen = {}
    for src, backend in json.loads(out):
        seen.setdefault(src, []).append(backend)
    return seen


def metric(demo, i, name):
    """The sum of `name`'s samples on appliance i (scraped from the router's namespace)."""
    text = in_ns("router", "curl", "-s", "-m", "2", f"http://10.30.{i}.2:9100/metrics", check=False)
    return int(sum(float(l.split()[-1]) for l in text.splitlines() if l.startswith(name + "{")))


def served_by_appliance(demo, i):
    return metric(demo, i, "kakehi_listener_requests_total")


def wait(what, cond, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return False


def router_paths(demo):
    text = in_ns("router", "ip", "route", "show", VIP)
    return sorted(line.split("via ")[1].split()[0] for line in text.splitlines() if "via " in line)


def run(demo):
    demo.build()
    demo.etcd()
    for k in range(1, BACKENDS + 1):
        demo.backend(k)
    demo.router()
    for i in range(1, APPLIANCES + 1):
        demo.appliance(i)
    ok = wait("three paths", lambda: len(router_paths(demo)) == APPLIANCES, 60)
    check(ok, f"the router has an ECMP route to {VIP} over the {APPLIANCES} appliances: {router_paths(demo)}")
    if not ok:
        return

    # 1. Same source, same backend, whichever appliance.
    seen = round_of(demo, 5)
    stable = sum(1 for b in seen.values() if len(set(b)) == 1 and not b[0].startswith(("error", "status")))
    RESULTS["sources_stable"] = stable
    spread = {f"a{i}": served_by_appliance(demo, i) for i in range(1, APPLIANCES + 1)}
    RESULTS["requests_per_appliance"] = spread
    check(stable == SOURCES, f"1,000 connections from {SOURCES} sources: {stable} sources always reached the same backend; requests per appliance {spread}")
    check(all(v > 0 for v in spread.values()), "every appliance took flows")
    first = {src: b[0] for src, b in seen.items()}

    # 2. Stop a2: withdrawn, new flows on a1/a3, their established connections untouched.
    # Keep-alive connections from the client namespace, held by a helper process.
    holder = subprocess.Popen(
        ["ip", "netns", "exec", ns("client"), "/usr/bin/python3", "-c", HOLDER], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True,
    )
    before = json.loads(holder.stdout.readline())
    on_others = sum(metric(demo, i, "kakehi_listener_connections_active") for i in (1, 3))
    demo.lbctl(2, "shutdown")
    gone = wait("a2 withdrawn", lambda: len(router_paths(demo)) == APPLIANCES - 1, 15)
    check(gone, f"a2 stopped: the router withdraws its path ({router_paths(demo)})")
    time.sleep(1)
    holder.stdin.write("go\n")
    holder.stdin.flush()
    after = json.loads(holder.stdout.readline())
    holder.wait(10)
    alive = sum(1 for a in after if a)
    RESULTS["held_connections"] = {"opened": len(before), "on_a1_a3": on_others, "answering_after": alive}
    check(alive == on_others, f"keep-alive connections on a1 and a3 untouched by a2's stop: {alive} of {on_others} answer")
    seen2 = round_of(demo, 1)
    errors = sum(1 for b in seen2.values() if b[0].startswith(("error", "status")))
    moved = sum(1 for src, b in seen2.items() if b[0] != first[src])
    RESULTS["after_a2_stopped"] = {"new_flow_errors": errors, "sources_on_another_backend": moved}
    check(errors == 0, f"new flows after a2 stopped: {errors} errors of {SOURCES}")
    check(moved == 0, f"new flows after a2 stopped: {moved} sources reached another backend")
    print(f"cluster-demo: {len(before) - on_others} of the {len(before)} held connections were on a2 and closed with its drain")

    # 3. A change on a1 reaches a3 within 1 s.
    started = time.monotonic()
    demo.lbctl(1, "backend", "remove", "--cluster", "app", "--address", "10.40.0.2:9005")
    reached = wait("a3 applies", lambda: "10.40.0.2:9005" not in demo.lbctl(3, "state", "dump"), 5)
    took = time.monotonic() - started
    RESULTS["change_a1_to_a3_seconds"] = round(took, 3)
    check(reached and took <= DEADLINE, f"lbctl backend remove on a1 applied on a3 after {took:.2f} s (within {DEADLINE} s)")

    # 4. A backend killed: down on a1 and a3, only its sources move.
    seen3 = round_of(demo, 1)
    base = {src: b[0] for src, b in seen3.items()}
    victim = "b1"
    demo.stop(victim)
    downs = lambda: all(
        any("10.40.0.2:9001" in l and " down " in l for l in demo.lbctl(i, "status").splitlines())
        for i in (1, 3)
    )
    check(wait("b1 down", downs, 10), "backend b1 killed: down on a1 and a3")
    time.sleep(0.5)
    seen4 = round_of(demo, 1)
    moved_others = sum(1 for src, b in seen4.items() if base[src] != victim and b[0] != base[src])
    moved_own = sum(1 for src, b in seen4.items() if base[src] == victim and b[0] != victim)
    own = sum(1 for b in base.values() if b == victim)
    RESULTS["backend_killed"] = {"its_sources": own, "its_sources_moved": moved_own, "other_sources_moved": moved_others}
    check(moved_own == own and moved_others == 0, f"b1 killed: {moved_own} of its {own} sources moved, {moved_others} others did")

    # 5. etcd away for 10 s.
    demo.stop("etcd")
    time.sleep(1)
    demo.lbctl(1, "backend", "add", "--cluster", "app", "--address", "10.40.0.2:9005")
    seen5 = round_of(demo, 1)
    errors = sum(1 for b in seen5.values() if b[0].startswith(("error", "status")))
    check(errors == 0, f"etcd stopped: {errors} errors of {SOURCES} new flows")
    time.sleep(9)
    in_a3 = "10.40.0.2:9005" in demo.lbctl(3, "state", "dump")
    check(not in_a3, "the change made on a1 without etcd has not reached a3 yet")
    demo.etcd()
    back = wait("a3 catches up", lambda: "10.40.0.2:9005" in demo.lbctl(3, "state", "dump"), 20)
    check(back, "etcd back: the change made on a1 meanwhile reaches a3")


HOLDER = r"""
import json, socket, sys
conns = []
for s in range(1, 61):
    try:
        c = socket.create_connection(("%s", 80), timeout=3, source_address=("10.20.0.%%d" %% s, 0))
        c.sendall(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n")
        c.recv(65536)
        conns.append(c)
    except OSError:
        pass
print(json.dumps([True] * len(conns)), flush=True)
sys.stdin.readline()
out = []
for c in conns:
    try:
        c.settimeout(2)
        c.sendall(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n")
        out.append(bool(c.recv(65536)))
    except OSError:
        out.append(False)
print(json.dumps(out), flush=True)
""" % VIP


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--deadline", type=float, default=1.0, help="seconds for a change to reach another appliance")
    args = ap.parse_args()
    global DEADLINE
    DEADLINE = args.deadline
    bins = {b: os.path.join(args.bin, b) for b in ["lbd", "lbctl", "lb-origin"]}
    with tempfile.TemporaryDirectory(prefix="kakehi-cluster-demo.") as d:
        os.chmod(d, 0o755)
        demo = Demo(bins, d)
        try:
            run(demo)
        finally:
            demo.cleanup()
    print(json.dumps(RESULTS, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": RESULTS, "failed": FAILED}, f, indent=1)
    if FAILED:
        print(f"cluster-demo: {len(FAILED)} check(s) failed", file=sys.stderr)
        return 1
    print("cluster-demo: every check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
