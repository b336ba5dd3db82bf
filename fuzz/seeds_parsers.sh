#!/usr/bin/env bash
# Writes the seed corpus of the parser targets that have readable seeds: corpus/proxy_protocol/*,
# corpus/control_frames/*, corpus/worker_answers/*, corpus/upgrade_handoff/*, and with python3-h2
# corpus/h2_frames/* and corpus/h2_conn/*. The binary
# ClientHellos of corpus/sni/ were captured from `openssl s_client` (see README.md) and
# corpus/config/ is copied from config/examples/, so neither is written here. Kept apart from
# seeds.sh (the HTTP targets' seeds) so that each can change without the other.
# Re-run after editing; files are overwritten, never removed.
set -euo pipefail
cd "$(dirname "$0")"

# seed TARGET NAME BYTES (printf escapes)
seed() {
    mkdir -p "corpus/$1"
    printf "$3" >"corpus/$1/$2"
}

P=proxy_protocol
SIG='\r\n\r\n\0\r\nQUIT\n'
seed $P v1_tcp4 'PROXY TCP4 192.0.2.1 198.51.100.7 56324 443\r\nGET / HTTP/1.1\r\n\r\n'
seed $P v1_tcp6 'PROXY TCP6 2001:db8::1 ::1 65535 80\r\n\x16\x03\x01'
seed $P v1_unknown 'PROXY UNKNOWN\r\n'
seed $P v1_unknown_with_addresses 'PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n'
seed $P v1_longest 'PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n'
seed $P v1_partial 'PROXY TCP4 10.0.0.1 10.0'
seed $P v2_tcp4 "${SIG}"'\x21\x11\x00\x0c\xc0\x00\x02\x01\xc6\x33\x64\x07\xdc\x04\x01\xbbpayload'
seed $P v2_tcp6 "${SIG}"'\x21\x21\x00\x24\x20\x01\x0d\xb8\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x01\x00\x01\x00\x50'
seed $P v2_local "${SIG}"'\x20\x00\x00\x00'
seed $P v2_udp4 "${SIG}"'\x21\x12\x00\x0c\x7f\x00\x00\x01\x7f\x00\x00\x02\x00\x35\x00\x35'
seed $P v2_unix "${SIG}"'\x21\x31\x00\xd8'"$(printf '\\x00%.0s' $(seq 216))"
seed $P v2_tcp4_tlvs "${SIG}"'\x21\x11\x00\x1d\x0a\x00\x00\x01\x0a\x00\x00\x02\x30\x39\x00\x50\x02\x00\x0bexample.com\x04\x00\x00'
seed $P v2_short_block "${SIG}"'\x21\x11\x00\x04\x01\x02\x03\x04'
seed $P v2_partial "${SIG}"'\x21\x11\x00\x0c\x0a\x00'

# frame BODY: a channel frame (u32 big-endian length, then BODY given as printf escapes).
frame() {
    local n
    n=$(printf "$1" | wc -c)
    printf "\\x$(printf %02x $((n >> 24 & 255)))\\x$(printf %02x $((n >> 16 & 255)))"
    printf "\\x$(printf %02x $((n >> 8 & 255)))\\x$(printf %02x $((n & 255)))"
    printf "$1"
}
# seed_stream TARGET NAME: the file's bytes from stdin.
seed_stream() {
    mkdir -p "corpus/$1"
    cat >"corpus/$1/$2"
}

# msg JSON: a worker channel frame (version byte 2, lb_config::protocol::channel::VERSION, then
# the JSON given as printf escapes).
msg() {
    frame "\\x02$1"
}

# Worker channel, supervisor -> worker (control_frames: byte 0 is the read size). The base
# config the target's worker starts from is control_frames.rs's BASE; these change it. The
# messages are lb_config::protocol::channel's Request, in JSON after the version byte; a
# configuration travels as the checked Config main sends, written by lb-config's
# channel_request example from a TOML file.
C=control_frames
# A fixed directory, so that the seeds (which name their source file) are the same each run.
CONFIGS=/tmp/kakehi-fuzz-seeds
mkdir -p "$CONFIGS"
cat >"$CONFIGS/more.toml" <<'TOML'
workers = 1
steering = "kernel"
access_log = { target = "off" }

[[listeners]]
address = "127.0.0.1:18080"

[clusters.app]
frontends = [ { address = "127.0.0.1:18080", hostname = "a.example" } ]
backends = [ { address = "127.0.0.1:19001" }, { address = "127.0.0.1:19003", weight = 3 } ]
load_balancing = "least-connections"
TOML
cat >"$CONFIGS/tcp.toml" <<'TOML'
workers = 1
steering = "kernel"
access_log = { target = "off" }

[[listeners]]
address = "127.0.0.1:18080"
protocol = "tcp"
TOML
# configure ID FILE: the whole frame of a Configure request for FILE.
configure() {
    cargo run -q --manifest-path ../Cargo.toml -p lb-config --example channel_request -- "$1" "$2"
}
{ printf '\xff'; msg '{"id":1,"order":{"health":{"down":[["app","127.0.0.1:19001"]]}}}'; msg '{"id":2,"order":"ejected"}'; } | seed_stream $C health_then_ejected
{ printf '\x01'; msg '{"id":1,"order":"metrics"}'; } | seed_stream $C metrics_byte_by_byte
{ printf '\x07'; msg '{"id":1,"order":{"log_level":{"level":"debug"}}}'; msg '{"id":2,"order":{"log_level":{"level":"nonsense"}}}'; msg '{"id":3,"order":{"log_level":{"level":"info"}}}'; } | seed_stream $C log_levels
{ printf '\x40'; msg '{"id":4,"order":"reboot"}'; frame '\0metrics'; frame '\x01{"id":5,"order":"metrics"}'; msg '{"id":6,"order":"metrics","extra":1}'; msg '{'; frame ''; } | seed_stream $C unknown_and_empty
{ printf '\xff'; configure 1 "$CONFIGS/more.toml"; msg '{"id":2,"order":"metrics"}'; } | seed_stream $C config_update
{ printf '\x10'; configure 7 "$CONFIGS/tcp.toml"; } | seed_stream $C config_listener_changed
{ printf '\xff'; msg '{"id":1,"order":{"configure":{"config":"workers = 1"}}}'; msg '{"id":2,"order":{"configure":{"config":{"workers":0}}}}'; } | seed_stream $C config_refused
{ printf '\xff'; msg '{"id":1,"order":{"health":{"down":[["app","127.0.0.1:19002"],["nope","[::1]:1"]]}}}'; configure 2 "$CONFIGS/more.toml"; msg '{"id":3,"order":"ejected"}'; msg '{"id":4,"order":{"health":{"down":[]}}}'; msg '{"id":5,"order":"metrics"}'; } | seed_stream $C pipelined
{ printf '\xff'; msg '{"id":1,"order":"metrics"}'; printf '\xff\xff\xff\xff'; } | seed_stream $C too_large

# Worker channel, worker -> main (worker_answers: a stream of answer frames; main waits for
# the answer to request 3, any other id is late).
W=worker_answers
SAMPLES='[{"name":"kakehi_worker_connections","value":3},{"name":"kakehi_requests_total","labels":{"cluster":"app","status":"2xx"},"value":10},{"name":"kakehi_request_duration_seconds_bucket","labels":{"cluster":"app","le":"0.005"},"value":4},{"name":"kakehi_request_duration_seconds_bucket","labels":{"cluster":"app","le":"+Inf"},"value":10},{"name":"kakehi_request_duration_seconds_sum","labels":{"cluster":"app"},"value":0.125},{"name":"kakehi_request_duration_seconds_count","labels":{"cluster":"app"},"value":10}]'
{ msg '{"id":3,"reply":"done"}'; msg '{"id":3,"reply":{"refused":{"error":"the listeners changed"}}}'; } | seed_stream $W verdicts
{ msg "{\"id\":3,\"reply\":{\"metrics\":{\"samples\":$SAMPLES}}}"; } | seed_stream $W metrics
{ msg '{"id":1,"reply":{"ejected":{"backends":[["app","127.0.0.1:9001"]]}}}'; msg '{"id":2,"reply":"done"}'; msg "{\"id\":3,\"reply\":{\"metrics\":{\"samples\":$SAMPLES}}}"; } | seed_stream $W late_then_metrics
{ msg '{"id":3,"reply":{"metrics":{"samples":[{"name":"x\\ny 1\\n# TYPE z","value":1},{"name":"ok_total","labels":{"a":"q\\"uote\\\\back\\nline","b c":"1"},"value":2}]}}}'; } | seed_stream $W forged_names
{ msg '{"id":3,"reply":{"metrics":{"samples":[{"name":"a","value":1e308},{"name":"a","value":1e308},{"name":"b","value":-0.0}]}}}'; } | seed_stream $W big_values
{ frame 'ok'; frame 'metrics []'; msg '{"id":3}'; frame '\xff\xfe'; printf '\x01\x00\x00\x01'; } | seed_stream $W unexpected_and_too_large

# The upgrade handoff message (upgrade_handoff: the JSON frame body, as the old main sends it).
H=upgrade_handoff
STATE_KERNEL='workers = 2\nsteering = \"kernel\"\ncommand_socket = \"/run/kakehi/lbd.sock\"\n\n[[listeners]]\naddress = \"127.0.0.1:8080\"\n\n[clusters.app]\nfrontends = [{ address = \"127.0.0.1:8080\", hostname = \"a.example\" }]\nbackends = [{ address = \"127.0.0.1:9001\" }, { address = \"127.0.0.1:9002\" }]\n'
STATE_EBPF='workers = 1\n\n[[listeners]]\naddress = \"0.0.0.0:443\"\nprotocol = \"tcp\"\n\n[clusters.db]\nprotocol = \"tcp\"\nfrontends = [{ address = \"0.0.0.0:443\" }]\nbackends = [{ address = \"10.0.0.1:5432\" }]\n'
seed_stream $H kernel_two_workers <<JSON
{"version":1,"from_version":"0.1.0 (binary 1234abcd)","from_pid":4242,"generation":3,"source":"/etc/kakehi/config.toml","state":"$STATE_KERNEL","log_level":"info","down":[["app","127.0.0.1:9002"]],"fds":[{"kind":"command_socket"},{"kind":"listener","listener":0,"worker":0,"address":"127.0.0.1:8080"},{"kind":"listener","listener":0,"worker":1,"address":"127.0.0.1:8080"}]}
JSON
seed_stream $H ebpf_tcp <<JSON
{"version":1,"from_version":"0.1.0 (binary 1234abcd)","from_pid":7,"generation":0,"source":"/etc/kakehi/config.toml","state":"$STATE_EBPF","log_level":"debug","fds":[{"kind":"command_socket"},{"kind":"listener","listener":0,"worker":0,"address":"0.0.0.0:443"},{"kind":"steering_program","listener":0},{"kind":"steering_map","listener":0,"map":"SOCKETS"},{"kind":"steering_map","listener":0,"map":"WORKERS"},{"kind":"steering_map","listener":0,"map":"CONTROL"},{"kind":"steering_map","listener":0,"map":"COUNTERS"}]}
JSON
seed_stream $H older_lbd_without_steering <<JSON
{"version":1,"from_version":"0.0.9","from_pid":7,"generation":9,"source":"/etc/kakehi/config.toml","state":"[[listeners]]\naddress = \"127.0.0.1:80\"\n","log_level":"warn","fds":[{"kind":"command_socket"},{"kind":"listener","listener":0,"worker":0,"address":"127.0.0.1:80"}]}
JSON
seed_stream $H future_version <<JSON
{"version":2,"from_version":"9.0.0","from_pid":1,"generation":1,"source":"/x.toml","state":"","log_level":"info","fds":[],"new_field":true}
JSON
seed_stream $H roles_twice <<JSON
{"version":1,"from_version":"0.1.0","from_pid":1,"generation":1,"source":"/etc/kakehi/config.toml","state":"$STATE_KERNEL","log_level":"info","fds":[{"kind":"command_socket"},{"kind":"listener","listener":0,"worker":0,"address":"127.0.0.1:8080"},{"kind":"listener","listener":0,"worker":0,"address":"127.0.0.1:8080"}]}
JSON

# HTTP/2 (h2_frames: byte 0 is the control byte, see fuzz_targets/h2_frames.rs; the rest is a
# client's bytes). Written by Debian's python3-h2 (apt-get install python3-h2), an
# implementation that shares nothing with kakehi's: its own HPACK encoder, which Huffman-codes
# and indexes. Skipped, with a message, where it is missing.
if /usr/bin/python3 -c 'import h2' 2>/dev/null; then
    mkdir -p corpus/h2_frames
    /usr/bin/python3 - corpus/h2_frames <<'PY'
import os, sys
import h2.connection, h2.config, h2.settings
out = sys.argv[1]

def client():
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    c.initiate_connection()
    return c

req = [(":method", "GET"), (":scheme", "https"), (":authority", "example.com"), (":path", "/index.html"),
       ("user-agent", "python-h2"), ("accept", "*/*"), ("cookie", "a=1"), ("cookie", "b=2")]

def write(name, control, data):
    with open(os.path.join(out, name), "wb") as f:
        f.write(bytes([control]) + data)

# A whole conversation: requests, prioritised HEADERS, padded DATA, trailers, a field split
# over CONTINUATION, window updates, PING, RST_STREAM, SETTINGS, GOAWAY.
c = client()
c.send_headers(1, req, end_stream=True)
c.send_headers(3, [(":method", "POST"), (":scheme", "https"), (":authority", "example.com"), (":path", "/upload"),
                   ("content-type", "application/grpc"), ("te", "trailers")],
               priority_weight=32, priority_depends_on=1, priority_exclusive=True)
c.send_data(3, b"hello ", pad_length=10)
c.send_data(3, b"world")
c.send_headers(3, [("grpc-status", "0"), ("x-trailer", "t")], end_stream=True)
c.send_headers(5, req[:4] + [("x-big", "b" * 30000)], end_stream=True)
c.increment_flow_control_window(1000)
c.increment_flow_control_window(500, stream_id=5)
c.ping(b"12345678")
c.reset_stream(5, error_code=8)
c.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1 << 20, h2.settings.SettingCodes.MAX_FRAME_SIZE: 32768})
c.close_connection(error_code=0, additional_data=b"bye", last_stream_id=0)
conversation = c.data_to_send()
write("conversation", 0x00, conversation)
write("conversation_cut_by_7_small_limits", 0x46, conversation)
write("conversation_cut_by_64_big_frames", 0xbf, conversation)

# Many requests on one connection: the dynamic table fills, entries get evicted.
c = client()
for i in range(40):
    c.send_headers(1 + 2 * i, req[:4] + [("x-request-id", "%032d" % i), ("referer", "https://example.com/%d" % i)],
                   end_stream=True)
write("forty_requests", 0x00, c.data_to_send())

# One HEADERS block alone, as the whole input (the target also decodes it as one block).
c = client()
c.data_to_send()
c.send_headers(1, req, end_stream=True)
frame = c.data_to_send()
write("hpack_block_alone", 0x00, frame[9:])
PY
    # Hand-written frames python3-h2 will not send. RFC 7541 C.4.1 in a HEADERS; a HEADERS
    # without END_HEADERS followed by empty CONTINUATION frames (the flood); a PUSH_PROMISE;
    # a SETTINGS with ENABLE_PUSH 2; a HEADERS depending on itself.
    seed h2_frames rfc7541_c4_headers '\x00\x00\x00\x11\x01\x05\x00\x00\x00\x01\x82\x86\x84\x41\x8c\xf1\xe3\xc2\xe5\xf2\x3a\x6b\xa0\xab\x90\xf4\xff'
    seed h2_frames continuation_flood '\x00\x00\x00\x01\x01\x00\x00\x00\x00\x01\x82'"$(printf '\\x00\\x00\\x00\\x09\\x00\\x00\\x00\\x00\\x01%.0s' $(seq 12))"
    seed h2_frames push_promise '\x00\x00\x00\x05\x05\x04\x00\x00\x00\x01\x00\x00\x00\x02\x82'
    seed h2_frames enable_push_2 '\x00\x00\x00\x06\x04\x00\x00\x00\x00\x00\x00\x02\x00\x00\x00\x02'
    seed h2_frames headers_on_itself '\x00\x00\x00\x08\x01\x25\x00\x00\x00\x03\x00\x00\x00\x03\x10\x82\x86\x84'

    # h2_conn: byte 0 the read size, byte 1 the plan (see fuzz_targets/h2_conn.rs), then a
    # client's whole conversation, written by python3-h2 (preface and SETTINGS included).
    mkdir -p corpus/h2_conn
    /usr/bin/python3 - corpus/h2_conn <<'PY'
import os, sys
import h2.connection, h2.config, h2.settings
out = sys.argv[1]
S = h2.settings.SettingCodes

def client(settings=None):
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    c.initiate_connection()
    if settings:
        c.update_settings(settings)
    return c

def head(method, path, authority="example.com", extra=()):
    return [(":method", method), (":scheme", "http"), (":authority", authority), (":path", path)] + list(extra)

def write(name, read, plan, c):
    with open(os.path.join(out, name), "wb") as f:
        f.write(bytes([read, plan]) + c.data_to_send())

# One GET: kakehi's 404, whole reads and writes; the same a byte at a time read and written 9
# bytes a turn.
c = client()
c.send_headers(1, head("GET", "/index.html", extra=[("user-agent", "python-h2"), ("accept", "*/*")]), end_stream=True)
data = c.data_to_send()
for name, read, plan in [("get", 0xff, 0x00), ("get_bytewise_slow_reader", 0x00, 0x01)]:
    with open(os.path.join(out, name), "wb") as f:
        f.write(bytes([read, plan]) + data)

# A redirect to https (kakehi's 301, the host and path in location), by host and by path.
c = client()
c.send_headers(1, head("GET", "/a/b?c=d", authority="secure.example"), end_stream=True)
c.send_headers(3, head("GET", "/secure/x", extra=[("cookie", "a=1"), ("cookie", "b=2")]), end_stream=True)
write("redirects", 0xff, 0x00, c)

# A POST with a body over DATA frames (padded too) and trailers; a HEAD.
c = client()
c.send_headers(1, head("POST", "/upload", extra=[("content-type", "application/grpc"), ("te", "trailers")]))
c.send_data(1, b"hello ", pad_length=10)
c.send_data(1, b"world" * 2000)
c.send_headers(1, [("grpc-status", "0"), ("x-trailer", "t")], end_stream=True)
c.send_headers(3, head("POST", "/form", extra=[("content-length", "11")]))
c.send_data(3, b"hello world", end_stream=True)
c.send_headers(5, head("HEAD", "/"), end_stream=True)
write("post_body_trailers", 0x3f, 0x00, c)

# Many streams at once, with a pool of 6 buffers (most are refused), and with 200.
c = client()
for i in range(40):
    c.send_headers(1 + 2 * i, head("GET", "/%d" % i, extra=[("x-request-id", "%032d" % i)]), end_stream=True)
data = c.data_to_send()
for name, read, plan in [("forty_streams_small_pool", 0xff, 0x08), ("forty_streams", 0xc3, 0x0c)]:
    with open(os.path.join(out, name), "wb") as f:
        f.write(bytes([read, plan]) + data)

# The client resets streams (one answered, one mid-request), PINGs, changes SETTINGS,
# gives window, then goes away.
c = client()
c.send_headers(1, head("GET", "/"), end_stream=True)
c.send_headers(3, head("POST", "/slow", extra=[("content-length", "100")]))
c.send_data(3, b"x" * 10)
c.reset_stream(3, error_code=8)
c.reset_stream(1, error_code=0)
c.ping(b"12345678")
c.ping(b"abcdefgh")
c.update_settings({S.INITIAL_WINDOW_SIZE: 1 << 20, S.MAX_FRAME_SIZE: 32768, S.HEADER_TABLE_SIZE: 0})
c.increment_flow_control_window(1 << 20)
c.send_headers(5, head("GET", "/after"), end_stream=True)
c.close_connection(error_code=0, last_stream_id=0)
write("reset_ping_settings_goaway", 0x10, 0x00, c)

# A client with no window: the response waits (stalled) until the timeout resets it; then a
# client granting it a few bytes at a time.
c = client({S.INITIAL_WINDOW_SIZE: 0})
c.send_headers(1, head("GET", "/stalled"), end_stream=True)
write("zero_window_stalled", 0xff, 0x00, c)
c = client({S.INITIAL_WINDOW_SIZE: 10})
c.send_headers(1, head("GET", "/drip"), end_stream=True)
for _ in range(20):
    c.increment_flow_control_window(10, stream_id=1)
write("window_drip", 0x08, 0x02, c)

# A draining worker (GOAWAY NO_ERROR, then the requests in flight answered) with 16 KiB
# buffers.
c = client()
c.send_headers(1, head("GET", "/"), end_stream=True)
c.send_headers(3, head("GET", "/second"), end_stream=True)
write("draining", 0x20, 0x30, c)
PY
    # No preface: the target puts one and an empty SETTINGS first. A GET (RFC 7541 C.4.1's
    # HEADERS), then a PING.
    seed h2_conn no_preface_get '\xff\x00\x00\x00\x11\x01\x05\x00\x00\x00\x01\x82\x86\x84\x41\x8c\xf1\xe3\xc2\xe5\xf2\x3a\x6b\xa0\xab\x90\xf4\xff\x00\x00\x08\x06\x00\x00\x00\x00\x00PINGPING'
else
    echo "seeds_parsers.sh: no python3-h2 (apt-get install python3-h2): corpus/h2_frames and corpus/h2_conn not written" >&2
fi
