"""The Prometheus scrape endpoint of one server: HTTP on its own port, optionally behind a bearer
token and TLS.

    endpoint = MetricsEndpoint(metrics.registry, "127.0.0.1", 0, token="scrape-secret",
                               tls=server_ssl_context(cert_pem, key_pem))
    endpoint.port   # bound port
    endpoint.close()

The endpoint is not covered by the gRPC service's device tokens (a scraper is not a device), so it
has its own protection: it binds loopback unless told otherwise, `token` makes every scrape send
`Authorization: Bearer <token>` (401 otherwise), and `tls` serves HTTPS -- with the gRPC server's
certificate when that one runs TLS, and requiring client certificates when it requires them.
Only GET /metrics (and /) answer; request handling has a socket timeout, so a client that opens a
connection and says nothing ties up one thread for at most `timeout_s`.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import socket
import ssl
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger("paramcast.service")


def server_ssl_context(certificate_chain: bytes, private_key: bytes, client_ca: bytes | None = None) -> ssl.SSLContext:
    """A TLS server context from PEM bytes; with `client_ca`, clients must present a certificate it signed."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # The ssl module loads a certificate and key from files only: a private directory, removed at once.
    with tempfile.TemporaryDirectory(prefix="paramcast-tls-") as folder:
        cert_file, key_file = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
        for path, data in ((cert_file, certificate_chain), (key_file, private_key)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        ctx.load_cert_chain(cert_file, key_file)
    if client_ca is not None:
        ctx.load_verify_locations(cadata=client_ca.decode("ascii"))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class _Handler(BaseHTTPRequestHandler):
    registry: CollectorRegistry
    token_digest: bytes | None
    timeout = 10.0  # seconds a connection may stay silent

    def setup(self) -> None:
        if isinstance(self.request, ssl.SSLSocket):  # TLS: shake hands here, in this request's thread
            self.request.settimeout(self.timeout)
            self.request.do_handshake()
        super().setup()

    def do_GET(self) -> None:  # noqa: N802 (the name http.server dispatches to)
        if self.path.split("?", 1)[0] not in ("/metrics", "/"):
            self._reply(404, b"not found\n")
            return
        if self.token_digest is not None and not self._authorized():
            self._reply(401, b"send 'Authorization: Bearer <metrics token>'\n", {"WWW-Authenticate": "Bearer"})
            return
        self._reply(200, generate_latest(self.registry), {"Content-Type": CONTENT_TYPE_LATEST})

    def _authorized(self) -> bool:
        value = self.headers.get("Authorization", "")
        if not value.startswith("Bearer "):
            return False
        assert self.token_digest is not None
        return hmac.compare_digest(hashlib.sha256(value[len("Bearer "):].encode()).digest(), self.token_digest)

    def _reply(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in {"Content-Type": "text/plain; charset=utf-8", **(headers or {})}.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (http.server's signature)
        log.debug("metrics %s: " + format, self.address_string(), *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        # A scraper that hangs up, fails the TLS handshake or times out: not the server's fault.
        log.debug("metrics request from %s failed", client_address, exc_info=True)


class MetricsEndpoint:
    """A started scrape endpoint (a daemon thread); `port` is the bound port."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int, token: str | None = None,
                 tls: ssl.SSLContext | None = None):
        handler = type("MetricsHandler", (_Handler,), {
            "registry": registry,
            "token_digest": None if token is None else hashlib.sha256(token.encode()).digest(),
        })
        server_class = type("MetricsServer", (_Server,), {
            "address_family": socket.AF_INET6 if ":" in host else socket.AF_INET})
        self.http = server_class((host, port), handler)
        if tls is not None:
            # The handshake runs in the request's thread, on its first read, under the handler's timeout.
            self.http.socket = tls.wrap_socket(self.http.socket, server_side=True, do_handshake_on_connect=False)
        self.port: int = self.http.server_address[1]
        self.scheme = "https" if tls is not None else "http"
        self._thread = threading.Thread(target=self.http.serve_forever, name="paramcast-metrics", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()
        self._thread.join(timeout=5)
