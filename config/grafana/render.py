#!/usr/bin/python3
"""Renders config/grafana/kakehi.json as a picture, fed by a real run.

`cargo xtask dashboard` runs this inside a fresh network namespace (it steers with eBPF and
refuses connections in the kernel). It starts three lb-origins, lbd with two workers and
eBPF steering, and Debian's Prometheus scraping lbd every second, then plays a bounded script
of traffic against lbd:

- wrk, keep-alive, all the time: the app (200) and, one request in 50, an unknown host (404);
- new HTTP connections and TLS handshakes every 20 ms, an api request every 20 ms (under its
  rate limit), one to a cluster whose backend never listens every 100 ms (502), and a few
  bytes of plain text to the TLS port every second (failed handshakes);
- backend 127.0.0.1:9002 killed at 30 s and restarted at 55 s (health checks, connect errors,
  retries);
- from 127.0.0.2, connections opened and held at 40-60 s, 10 more tried every 100 ms,
  against `max_connections_per_ip = 20`;
- from 127.0.0.3, a request flood at 65-80 s against the api's `rate_limit` (429s);
- from 127.0.0.4, 1,000 connections per second at 70-85 s against
  `max_connection_rate_per_ip = "500/s"`.

Then each panel's queries go to Prometheus' query_range API as Grafana would send them
($__rate_interval is 4 s: four scrape intervals), and matplotlib draws the panels where the
dashboard's gridPos puts them, in Grafana's dark theme. Grafana itself is not packaged for
Debian 12 (nor on PyPI or npm), so this stands in for its renderer; the queries, titles,
legends and units are the dashboard's own.

Every process started here is stopped by pid at the end, whatever happens.
"""

import argparse
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DASHBOARD = os.path.join(ROOT, "config", "grafana", "kakehi.json")
CERTS = os.path.join(ROOT, "config", "examples", "certs")
HTTP = ("127.0.0.1", 8080)
HTTPS = ("127.0.0.1", 8443)
METRICS = "127.0.0.1:9100"
PROMETHEUS = "127.0.0.1:9090"
RATE_INTERVAL = "4s"

CONFIG = """
workers = 2
steering = "ebpf"
steering_policy = "least-connections"
command_socket = "{dir}/lbd.sock"

[metrics]
address = "{metrics}"

[[listeners]]
address = "127.0.0.1:8080"
max_connections_per_ip = 20
max_connection_rate_per_ip = "500/s"

[[listeners]]
address = "127.0.0.1:8443"
protocol = "https"
certificates = [ {{ certificate = "{certs}/site.pem", key = "{certs}/site.key" }} ]

[clusters.app]
frontends = [
  {{ address = "127.0.0.1:8080", hostname = "localhost" }},
  {{ address = "127.0.0.1:8443" }},
]
backends = [ {{ address = "127.0.0.1:9001" }}, {{ address = "127.0.0.1:9002" }} ]
health_check = {{ path = "/health", interval = "1s", timeout = "500ms", rise = 2, fall = 2 }}

[clusters.api]
frontends = [ {{ address = "127.0.0.1:8080", hostname = "localhost", path = "/api", rate_limit = "100/s" }} ]
backends = [ {{ address = "127.0.0.1:9003" }} ]

[clusters.gone]
frontends = [ {{ address = "127.0.0.1:8080", hostname = "gone.test" }} ]
backends = [ {{ address = "127.0.0.1:9009" }} ]
"""

WRK_SCRIPT = """
local n = 0
request = function()
  n = n + 1
  if n % 50 == 0 then
    return wrk.format("GET", "/", { Host = "nobody.test" })
  end
  return wrk.format("GET", "/", { Host = "localhost" })
end
"""

PROMETHEUS_CONFIG = """
global:
  scrape_interval: 1s
  scrape_timeout: 900ms
scrape_configs:
  - job_name: kakehi
    static_configs:
      - targets: ["{metrics}"]
"""


class Procs:
    """Every process started here, stopped by pid."""

    def __init__(self):
        self.procs = {}

    def start(self, name, argv, **kw):
        log = open(os.path.join(self.dir, name + ".log"), "w")
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, **kw)
        self.procs[name] = p
        return p

    def stop(self, name):
        p = self.procs.pop(name, None)
        if p and p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def stop_all(self):
        for name in list(self.procs):
            self.stop(name)


def wait_http(url, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"render.py: {url} did not answer within {timeout}s")


def connect(addr, source=None, timeout=1.0):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    if source:
        s.bind((source, 0))
    s.connect(addr)
    return s


def get(s, path="/", host="localhost"):
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            length = int(v)
    while len(body) < length:
        chunk = s.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(head.split(b" ")[1])


def during(start, stop, t0, every, action, stopping):
    """Calls `action` every `every` seconds from t0+start to t0+stop; errors are part of
    the traffic (refusals), not failures of this script."""
    while not stopping.is_set() and time.monotonic() < t0 + start:
        time.sleep(0.05)
    while not stopping.is_set() and time.monotonic() < t0 + stop:
        began = time.monotonic()
        try:
            action()
        except OSError:
            pass
        time.sleep(max(0.0, every - (time.monotonic() - began)))


def traffic(procs, bins, seconds, t0, stopping):
    tls = ssl.create_default_context()
    tls.check_hostname = False
    tls.verify_mode = ssl.CERT_NONE

    def new_http():
        with connect(HTTP) as s:
            get(s)

    def new_tls():
        with connect(HTTPS) as raw, tls.wrap_socket(raw, server_hostname="localhost") as s:
            get(s)

    def api():
        with connect(HTTP) as s:
            get(s, "/api/items")

    def gone():
        with connect(HTTP) as s:
            get(s, host="gone.test")

    def bad_tls():
        with connect(HTTPS) as s:
            s.sendall(b"GET / HTTP/1.1\r\n\r\n")
            s.recv(100)

    held = []

    def hold():
        # The kernel lets 20 be open at once and refuses the others.
        for _ in range(10):
            try:
                held.append(connect(HTTP, source="127.0.0.2"))
            except OSError:
                pass
        for s in list(held):
            try:
                if get(s) is None:
                    held.remove(s)
            except OSError:
                held.remove(s)

    flood = {}

    def flood_api():
        s = flood.get("s")
        if s is None:
            s = flood["s"] = connect(HTTP, source="127.0.0.3")
        try:
            for _ in range(20):
                get(s, "/api/items")
        except OSError:
            flood.pop("s", None)

    def rate_burst():
        for _ in range(20):
            try:
                connect(HTTP, source="127.0.0.4", timeout=0.2).close()
            except OSError:
                pass

    def kill_b():
        procs.stop("origin-b")

    def restart_b():
        procs.start("origin-b", [bins["lb-origin"], "--name", "b", "--listen", "127.0.0.1:9002"])

    plan = [
        (0, seconds, 0.02, new_http),
        (0, seconds, 0.05, new_tls),
        (0, seconds, 0.02, api),
        (0, seconds, 0.1, gone),
        (0, seconds, 1.0, bad_tls),
        (40, 60, 0.1, hold),
        (65, 80, 0.05, flood_api),
        (70, 85, 0.02, rate_burst),
    ]
    threads = [
        threading.Thread(target=during, args=(a, b, t0, every, f, stopping), daemon=True)
        for a, b, every, f in plan
    ]
    for start, action in [(30, kill_b), (55, restart_b)]:
        threads.append(
            threading.Thread(
                target=during, args=(start, start + 0.5, t0, 10, action, stopping), daemon=True
            )
        )
    for t in threads:
        t.start()
    return threads, held


def query_range(expr, start, end):
    q = urllib.parse.urlencode(
        {"query": expr.replace("$__rate_interval", RATE_INTERVAL), "start": start, "end": end, "step": 1}
    )
    with urllib.request.urlopen(f"http://{PROMETHEUS}/api/v1/query_range?{q}", timeout=10) as r:
        answer = json.load(r)
    if answer.get("status") != "success":
        raise SystemExit(f"render.py: Prometheus refused {expr!r}: {answer}")
    return answer["data"]["result"]


def legend(fmt, labels):
    out = fmt or "{{__name__}}"
    for k, v in labels.items():
        out = out.replace("{{" + k + "}}", v)
    return out


def draw(panels, start, end, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    bg, panel_bg, text, grid = "#111217", "#181b1f", "#ccccdc", "#2c3235"
    colors = ["#73bf69", "#f2cc0c", "#5794f2", "#ff9830", "#f2495c", "#b877d9", "#8ab8ff", "#fade2a"]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p, _ in panels)
    unit_w, unit_h = 0.78, 0.42
    fig = plt.figure(figsize=(24 * unit_w, rows * unit_h + 0.8), facecolor=bg)
    fig.suptitle(
        "kakehi (config/grafana/kakehi.json), fed by a real run: lbd with 2 workers, eBPF steering; "
        "Prometheus 2.42 scraping every 1 s",
        color=text,
        fontsize=12,
        x=0.01,
        ha="left",
    )
    total_h = rows * unit_h + 0.8

    def fmt_unit(unit):
        def f(v, _):
            if unit == "s":
                return f"{v * 1000:.0f} ms" if v < 1 else f"{v:.1f} s"
            suffix = {"reqps": " req/s", "cps": " c/s", "ops": " ops/s"}.get(unit, "")
            if abs(v) >= 1000:
                return f"{v / 1000:.1f}k{suffix}"
            return f"{v:.0f}{suffix}" if v == int(v) else f"{v:.1f}{suffix}"

        return FuncFormatter(f)

    for p, series in panels:
        g = p["gridPos"]
        left = g["x"] / 24 + 0.035 * (1 if g["x"] == 0 else 0.6)
        width = g["w"] / 24 - 0.05
        top = (g["y"] * unit_h + 0.8 + 0.35) / total_h
        height = (g["h"] * unit_h - 0.75) / total_h
        ax = fig.add_axes([left, 1 - top - height, width, height], facecolor=panel_bg)
        ax.set_title(p["title"], color=text, fontsize=11, loc="left")
        for side in ax.spines.values():
            side.set_color(grid)
        ax.tick_params(colors=text, labelsize=8)
        ax.grid(color=grid, linewidth=0.6)
        unit = p.get("fieldConfig", {}).get("defaults", {}).get("unit", "short")
        if p["type"] == "state-timeline":
            names = [name for name, _, _ in series]
            for i, (name, ts, vs) in enumerate(series):
                for t, v, nxt in zip(ts, vs, ts[1:] + [ts[-1] + 1]):
                    ax.barh(i, nxt - t, left=t, height=0.6, color="#73bf69" if v >= 1 else "#f2495c")
            ax.set_yticks(range(len(names)))
            ax.set_yticklabels(names, color=text, fontsize=8)
            ax.grid(False)
            ax.set_xlim(0, end - start)
            ax.set_xlabel("up (green), down (red)", color=text, fontsize=8)
        else:
            for i, (name, ts, vs) in enumerate(series):
                ax.plot(ts, vs, color=colors[i % len(colors)], linewidth=1.3, label=name)
            ax.yaxis.set_major_formatter(fmt_unit(unit))
            ax.set_xlim(0, end - start)
            ax.set_ylim(bottom=0)
            if series:
                ax.legend(
                    loc="upper left", fontsize=7, facecolor=panel_bg, edgecolor=grid, labelcolor=text,
                    ncol=2 if len(series) > 4 else 1,
                )
            else:
                ax.text(0.5, 0.5, "No data", color=text, ha="center", va="center", transform=ax.transAxes)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0f} s"))
    fig.savefig(out, dpi=80, facecolor=bg)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True, help="directory holding lbd and lb-origin")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seconds", type=int, default=100)
    args = ap.parse_args()
    bins = {b: os.path.join(args.bin, b) for b in ["lbd", "lb-origin"]}
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    dashboard = json.load(open(DASHBOARD))

    procs = Procs()
    stopping = threading.Event()
    with tempfile.TemporaryDirectory(prefix="kakehi-dashboard.") as d:
        os.chmod(d, 0o755)
        procs.dir = d
        try:
            for name, port in [("a", 9001), ("b", 9002), ("c", 9003)]:
                procs.start(f"origin-{name}", [bins["lb-origin"], "--name", name, "--listen", f"127.0.0.1:{port}"])
            config = os.path.join(d, "lbd.toml")
            with open(config, "w") as f:
                f.write(CONFIG.format(dir=d, metrics=METRICS, certs=CERTS))
            procs.start("lbd", [bins["lbd"], "--config", config])
            wait_http(f"http://{METRICS}/metrics", 20)
            prom = os.path.join(d, "prometheus.yml")
            with open(prom, "w") as f:
                f.write(PROMETHEUS_CONFIG.format(metrics=METRICS))
            procs.start(
                "prometheus",
                [
                    "/usr/bin/prometheus",
                    f"--config.file={prom}",
                    f"--storage.tsdb.path={d}/tsdb",
                    f"--web.listen-address={PROMETHEUS}",
                ],
            )
            wait_http(f"http://{PROMETHEUS}/-/ready", 30)
            with open(os.path.join(d, "load.lua"), "w") as f:
                f.write(WRK_SCRIPT)
            start = time.time()
            t0 = time.monotonic()
            print(f"render.py: playing {args.seconds}s of traffic", flush=True)
            procs.start(
                "wrk",
                ["wrk", "-t1", "-c4", f"-d{args.seconds}s", "-s", os.path.join(d, "load.lua"), "http://127.0.0.1:8080/"],
            )
            threads, held = traffic(procs, bins, args.seconds, t0, stopping)
            time.sleep(max(0.0, t0 + args.seconds + 3 - time.monotonic()))
            stopping.set()
            for t in threads:
                t.join(5)
            for s in held:
                s.close()
            end = time.time()
            panels = []
            for p in dashboard["panels"]:
                series = []
                for t in p["targets"]:
                    for r in query_range(t["expr"], start, end):
                        ts = [float(x) - start for x, _ in r["values"]]
                        vs = [float(v) if v not in ("NaN", "+Inf", "-Inf") else float("nan") for _, v in r["values"]]
                        series.append((legend(t.get("legendFormat"), r["metric"]), ts, vs))
                series.sort(key=lambda s: s[0])
                panels.append((p, series))
                print(f"render.py: {p['title']}: {len(series)} series", flush=True)
            draw(panels, start, end, args.out)
            print(f"render.py: wrote {args.out}", flush=True)
        finally:
            stopping.set()
            procs.stop_all()


if __name__ == "__main__":
    sys.exit(main())
