#!/usr/bin/env bash
# Writes the seed corpus: corpus/http_request/* and corpus/http_response/*.
# Each seed is a header (see src/lib.rs: buffer size, cuts, write sizes, [flags]) then the
# stream, written here as printf escapes so the seeds stay readable. Re-run after editing;
# files are overwritten, never removed.
set -euo pipefail
cd "$(dirname "$0")"

# seed TARGET NAME HEADER STREAM
#   HEADER: printf escapes for the header bytes, e.g. '\xf2\x00' (16 KiB buffer, one read,
#   whole writes); STREAM: printf escapes for the bytes on the wire.
seed() {
    mkdir -p "corpus/$1"
    printf "$3$4" >"corpus/$1/$2"
}

# Header shorthands. Buffer: \xf2 = 16 KiB, \xf0 = 4 KiB, \x04 = 96 B, \x0e = 256 B.
WHOLE='\xf2\x00'                  # 16 KiB, one read, whole writes
CUT3='\xf2\x33\x04\x13\x27\x01\x07\x40'  # 16 KiB, cuts after 5/25/65, writes 1,7,64
SMALL='\x0e\x22\x10\x30\x05\x00'   # 256 B, two cuts, writes 5 then whole
TINY='\x04\x00'                   # 96 B, one read, whole writes

R=http_request
seed $R get_simple "$WHOLE" 'GET / HTTP/1.1\r\nHost: a.example\r\nUser-Agent: t\r\n\r\n'
seed $R get_hop_by_hop "$CUT3" 'GET /a?b=1 HTTP/1.1\r\nHost: App.Example.com:8080\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nProxy-Connection: x\r\nX-Forwarded-For: 10.0.0.1\r\nForwarded: for=10.0.0.1\r\nX-Request-Id: forged\r\nCookie: a=1; b=2; c\r\n\r\n'
seed $R post_content_length "$CUT3" 'POST /upload HTTP/1.1\r\nHost: a\r\nContent-Type: text/plain\r\nContent-Length: 11\r\n\r\nhello world'
seed $R post_chunked_trailers "$SMALL" 'POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n5\r\nhello\r\n0000a\r\n0123456789\r\n0\r\nX-Sum: 42\r\n\r\n'
seed $R pipelined_three "$CUT3" 'GET /1 HTTP/1.1\r\nHost: a\r\n\r\nPOST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabcGET /3 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\nGET /never HTTP/1.1\r\nHost: a\r\n\r\n'
seed $R chunked_then_pipelined "$SMALL" 'POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\nGET /next HTTP/1.1\r\nHost: b\r\n\r\n'
seed $R upgrade_websocket "$WHOLE" 'GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58'
seed $R expect_100_continue "$CUT3" 'PUT /big HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\nbody'
seed $R head_request "$WHOLE" 'HEAD /index.html HTTP/1.1\r\nHost: a\r\nAccept: */*\r\n\r\nHEAD / HTTP/1.1\r\nHost: a\r\n\r\n'
seed $R http10_no_host "$WHOLE" 'GET / HTTP/1.0\r\n\r\n'
seed $R http10_keep_alive "$SMALL" 'GET /1 HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\nGET /2 HTTP/1.0\r\nHost: a\r\n\r\n'
seed $R absolute_form "$CUT3" 'GET http://a.example:8080/x?y HTTP/1.1\r\nHost: a.example:8080\r\n\r\n'
seed $R options_star "$WHOLE" 'OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n'
seed $R host_late_cookies_apart "$WHOLE" 'GET / HTTP/1.1\r\nUser-Agent: t\r\nCookie: a=1\r\nAccept: */*\r\nCookie: b=2; c=3\r\nHost: a\r\n\r\n'
seed $R smuggle_cl_te "$WHOLE" 'POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /admin HTTP/1.1\r\nHost: a\r\n\r\n'
seed $R smuggle_te_cl "$WHOLE" 'POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n8\r\nSMUGGLED\r\n0\r\n\r\n'
seed $R smuggle_two_cl "$WHOLE" 'POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nContent-Length: 40\r\n\r\nabcd'
seed $R smuggle_cl_list_sign "$WHOLE" 'POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4, 4\r\n\r\nabcdPOST / HTTP/1.1\r\nHost: a\r\nContent-Length: +4\r\n\r\nabcd'
seed $R smuggle_te_variants "$WHOLE" 'POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\nPOST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\nPOST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\tchunked\r\nTransfer-Encoding: x\r\n\r\n'
seed $R smuggle_obs_fold_bare_lf "$WHOLE" 'GET / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n\r\nGET / HTTP/1.1\nHost: a\n\n'
seed $R two_hosts "$WHOLE" 'GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n'
seed $R absolute_host_mismatch "$WHOLE" 'GET http://evil.example/ HTTP/1.1\r\nHost: good.example\r\n\r\n'
seed $R bad_chunk_sizes "$SMALL" 'POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n4 \r\nabcd\r\n0\r\n\r\n'
seed $R chunk_size_overflow "$WHOLE" 'POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffff\r\nx'
seed $R connect_method "$WHOLE" 'CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\n'
seed $R long_uri_414 "$TINY" 'GET /aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa HTTP/1.1\r\nHost: a\r\n\r\n'
seed $R big_header_431 "$TINY" 'GET / HTTP/1.1\r\nHost: a\r\nX-Big: bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb\r\n\r\n'
seed $R truncated_body "$CUT3" 'POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\nonly a few bytes'
# Issue 12: framing headers named in Connection, TE on HTTP/1.0, hosts that are not hosts,
# paths that need normalizing, heads at and over the field and crumb caps.
seed $R connection_names_content_length "$WHOLE" 'POST /pub HTTP/1.1\r\nHost: a\r\nConnection: content-length\r\nContent-Length: 29\r\n\r\nGET /admin HTTP/1.1\r\nHost: a\r\n\r\n'
seed $R connection_names_transfer_encoding "$CUT3" 'POST /pub HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Transfer-Encoding\r\nTransfer-Encoding: chunked\r\n\r\n1d\r\nGET /admin HTTP/1.1\r\nHost: a\r\n\r\n\r\n0\r\n\r\n'
seed $R connection_names_host_te "$WHOLE" 'GET / HTTP/1.1\r\nHost: a\r\nConnection: host, te, x-a\r\nTE: trailers\r\nX-A: 1\r\n\r\n'
seed $R te_on_http10 "$WHOLE" 'POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n'
seed $R host_not_a_host "$WHOLE" 'GET / HTTP/1.1\r\nHost: x,for=127.0.0.9\r\n\r\nGET / HTTP/1.1\r\nHost: [::1]:8080\r\nForwarded: for="x\r\n\r\n'
seed $R dot_segments "$SMALL" 'GET /pub/%2e%2e/admin?q=/../x HTTP/1.1\r\nHost: a\r\n\r\nGET /pub/./a/../%7Eb%2fc HTTP/1.1\r\nHost: a\r\n\r\nGET /../up HTTP/1.1\r\nHost: a\r\n\r\n'
seed $R many_fields "$WHOLE" "GET / HTTP/1.1\r\nHost: a\r\n$(printf 'a:\\r\\n%.0s' $(seq 100))\r\n"
seed $R many_crumbs "$WHOLE" "GET / HTTP/1.1\r\nHost: a\r\nCookie: $(printf 'a;%.0s' $(seq 130))\r\n\r\n"

S=http_response
# Flags byte after the header: 1 HEAD, 2 upgrade asked, 4 HTTP/1.0 request, 8 client closes.
seed $S ok_content_length "$WHOLE" '\x00HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello'
seed $S ok_chunked_trailers "$CUT3" '\x00HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\nX-Sum: 42\r\n\r\n'
seed $S close_delimited "$SMALL" '\x00HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nthe body ends when the backend closes'
seed $S no_content_204 "$WHOLE" '\x00HTTP/1.1 204 No Content\r\nETag: "x"\r\n\r\n'
seed $S not_modified_304 "$CUT3" '\x00HTTP/1.1 304 Not Modified\r\nContent-Length: 1000\r\nETag: "x"\r\n\r\n'
seed $S head_response "$WHOLE" '\x01HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n'
seed $S head_chunked "$WHOLE" '\x01HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n'
seed $S continue_then_ok "\xf2\x01\x18" '\x00HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok'
seed $S early_hints_then_ok "\xf2\x01\x38" '\x00HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok'
seed $S two_interims "\xf2\x02\x18\x1a" '\x00HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n'
seed $S switching_101 "$CUT3" '\x02HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n\x81\x05hello\x88\x00'
seed $S unsolicited_101 "$WHOLE" '\x00HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n'
seed $S upgrade_declined "$WHOLE" '\x02HTTP/1.1 426 Upgrade Required\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nContent-Length: 0\r\n\r\n'
seed $S http10_keep_alive "$WHOLE" '\x04HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok'
seed $S http10_close_delimited "$SMALL" '\x04HTTP/1.0 200 OK\r\nContent-Type: text/html\r\n\r\n<html>until close</html>'
seed $S connection_close "$WHOLE" '\x08HTTP/1.1 500 Internal Server Error\r\nConnection: close\r\nContent-Length: 5\r\n\r\noops!'
seed $S hop_by_hop "$CUT3" '\x00HTTP/1.1 200 OK\r\nConnection: X-Private, keep-alive\r\nKeep-Alive: timeout=5\r\nProxy-Connection: x\r\nTE: trailers\r\nUpgrade: h2c\r\nX-Private: 1\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\nContent-Length: 0\r\n\r\n'
seed $S two_content_lengths "$WHOLE" '\x00HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab'
seed $S cl_and_te "$WHOLE" '\x00HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n'
seed $S te_gzip_only "$WHOLE" '\x00HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n\x1f\x8b\x08\x00'
seed $S bad_status_line "$WHOLE" '\x00HTTP/1.1 2x0 OK\r\n\r\n'
seed $S bad_chunk "$SMALL" '\x00HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n'
seed $S big_head_small_buffer "$TINY" '\x00HTTP/1.1 200 OK\r\nX-Big: bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb\r\nContent-Length: 0\r\n\r\n'
seed $S truncated_body "$CUT3" '\x00HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort'
seed $S empty_reason "$WHOLE" '\x00HTTP/1.1 200 \r\nContent-Length: 0\r\n\r\n'
