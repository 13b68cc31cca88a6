"""A fault-injecting proxy in front of the local S3 server
(``qvl_batch.tooling.s3local.MotoServer``).

Tests reach the server through the same s3fs path users take (``storage.endpoint_url``).
The proxy forwards requests on loopback and, by a seeded draw per request, answers 503
SlowDown, drops the connection after the server answered, delays past the client's read
timeout, or denies a matching request with 403 AccessDenied; it counts what it did.
"""

from __future__ import annotations

import http.client
import random
import re
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade"}


@dataclass
class Faults:
    """What the proxy does to each request (probabilities are per request, seeded)."""

    slowdown: float = 0.0  # answer 503 SlowDown without forwarding
    drop: float = 0.0  # forward, then close the connection instead of answering
    stall: float = 0.0  # hold the request for stall_s (past the client's timeout), then drop it
    stall_s: float = 0.0
    deny: str | None = None  # regex over "METHOD /path": answer 403 AccessDenied
    seed: int = 0
    counts: Counter = field(default_factory=Counter)


S3_ERROR = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
    "<Message>{message}</Message><RequestId>qvl-proxy</RequestId></Error>"
)


class FaultProxy:
    """A threaded HTTP proxy on loopback in front of ``upstream`` (host, port)."""

    def __init__(self, upstream_port: int, faults: Faults):
        self.faults = faults
        self._rng = random.Random(faults.seed)
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _handle(self):
                proxy._serve(self, upstream_port)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def _draw(self, request_line: str) -> str | None:
        f = self.faults
        with self._lock:
            f.counts["requests"] += 1
            if f.deny and re.search(f.deny, request_line):
                f.counts["denied"] += 1
                return "deny"
            r = self._rng.random()
            for kind, p in (("slowdown", f.slowdown), ("drop", f.drop), ("stall", f.stall)):
                if r < p:
                    f.counts[kind] += 1
                    return kind
                r -= p
        return None

    @property
    def injected(self) -> int:
        """Faults a client had to retry: 503s, dropped answers and stalls past its timeout."""
        c = self.faults.counts
        return c["slowdown"] + c["drop"] + c["stall"]

    def _serve(self, h: BaseHTTPRequestHandler, upstream_port: int) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        fault = self._draw(f"{h.command} {h.path}")
        if fault == "deny":
            return self._error(h, 403, "AccessDenied", "Access Denied")
        if fault == "slowdown":
            return self._error(h, 503, "SlowDown", "Please reduce your request rate.")
        if fault == "stall":  # a request lost on the way: the server never sees it
            time.sleep(self.faults.stall_s)
            h.close_connection = True
            return
        conn = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=60)
        try:
            headers = {k: v for k, v in h.headers.items() if k.lower() not in HOP_BY_HOP}
            conn.request(h.command, h.path, body=body, headers=headers)
            resp = conn.getresponse()
            payload = resp.read()
            if fault == "drop":  # the server did the work; the client never hears of it
                h.close_connection = True
                h.connection.shutdown(socket.SHUT_RDWR)
                return
            h.send_response(resp.status, resp.reason)
            for k, v in resp.getheaders():
                if k.lower() in HOP_BY_HOP or (
                    k.lower() == "content-length" and h.command != "HEAD"
                ):
                    continue
                h.send_header(k, v)
            if h.command != "HEAD":
                h.send_header("Content-Length", str(len(payload)))
            h.end_headers()
            if h.command != "HEAD":
                h.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            h.close_connection = True  # the client went away
        finally:
            conn.close()

    @staticmethod
    def _error(h: BaseHTTPRequestHandler, status: int, code: str, message: str) -> None:
        payload = S3_ERROR.format(code=code, message=message).encode()
        try:
            h.send_response(status)
            h.send_header("Content-Type", "application/xml")
            h.send_header("Content-Length", str(0 if h.command == "HEAD" else len(payload)))
            h.end_headers()
            if h.command != "HEAD":
                h.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            h.close_connection = True

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
