#!/usr/bin/env bash
# Writes the seed corpus of the parser targets that have readable seeds: corpus/proxy_protocol/*,
# corpus/control_frames/*, corpus/worker_answers/* and corpus/upgrade_handoff/*. The binary
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
