"""An HTTPS origin for tests/backend_tls.rs: python's http.server behind the ssl module,
HTTP/1.1 with keep-alive, the TLS handshake made in each connection's own thread.

Arguments: CERT KEY NAME. Prints the port it listens on (127.0.0.1), then serves until it is
killed or its stdin closes.

GET /big   -> 2 MiB of a fixed pattern (byte i is i * 7 % 251)
GET /...   -> "NAME sni=SNI path=PATH handshakes=N\\n": the server name the client sent and
              the TLS handshakes completed so far
POST /...  -> the request body, back
"""

import http.server
import ssl
import sys
import threading

CERT, KEY, NAME = sys.argv[1:4]
BIG = bytes(i * 7 % 251 for i in range(2 << 20))

lock = threading.Lock()
handshakes = 0
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(CERT, KEY)


def remember_sni(sock, server_name, _context):
    sock.sni = server_name


context.sni_callback = remember_sni


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def answer(self, body):
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/big":
            self.answer(BIG)
            return
        sni = getattr(self.connection, "sni", None)
        with lock:
            seen = handshakes
        self.answer(f"{NAME} sni={sni} path={self.path} handshakes={seen}\n".encode())

    def do_POST(self):
        length = int(self.headers.get("Content-Length", "0"))
        self.answer(self.rfile.read(length))


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def finish_request(self, request, client_address):
        global handshakes
        try:
            tls = context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            return
        with lock:
            handshakes += 1
        self.RequestHandlerClass(tls, client_address, self)


server = Server(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
threading.Thread(target=server.serve_forever, daemon=True).start()
sys.stdin.read()
