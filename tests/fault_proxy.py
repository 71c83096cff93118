"""A small fault-injecting HTTP proxy on 127.0.0.1 in front of an S3 server (moto has no fault hooks).

Requests are forwarded as they are; every `every`-th GET of an object (not a listing) is answered with a
fault instead, in turn: a 503 SlowDown (S3's "reduce your request rate"), a body cut off halfway and the
connection reset, or a stall longer than the client's read timeout. `faults` counts what was injected.
"""

from __future__ import annotations

import http.client
import itertools
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")


class FaultProxy:
    def __init__(self, target: str, every: int = 4, stall_s: float = 0.0):
        self.target = urlsplit(target)
        self.every, self.stall_s = every, stall_s
        self.faults: dict[str, int] = {"503": 0, "reset": 0, "stall": 0}
        self._count = itertools.count(1)
        self._kinds = itertools.cycle(["503", "reset"] + (["stall"] if stall_s else []))
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _fault_for(self, method: str, path: str) -> str | None:
        """Object GETs only (a key, not a bucket listing), every `every`-th one."""
        if method != "GET" or "?" in path.split("/", 2)[-1] or path.count("/") < 2:
            return None
        with self._lock:
            if next(self._count) % self.every:
                return None
            kind = next(self._kinds)
            self.faults[kind] += 1
            return kind

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                fault = proxy._fault_for(self.command, self.path)
                if fault == "503":
                    self._reply(503, SLOW_DOWN, {"Content-Type": "application/xml"})
                    return
                if fault == "stall":
                    time.sleep(proxy.stall_s)
                upstream = http.client.HTTPConnection(proxy.target.hostname, proxy.target.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                headers["Host"] = proxy.target.netloc
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                payload = response.read()
                upstream.close()
                dropped = ("transfer-encoding", "connection") + (() if self.command == "HEAD" else ("content-length",))
                passed = {k: v for k, v in response.getheaders() if k.lower() not in dropped}
                if fault == "reset" and len(payload) > 1:
                    self.send_response(response.status)
                    for key, value in passed.items():
                        self.send_header(key, value)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload[: len(payload) // 2])
                    self.wfile.flush()
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    self.close_connection = True
                    self.connection.close()
                    return
                self._reply(response.status, payload, passed)

            def _reply(self, status: int, payload: bytes, headers: dict) -> None:
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        return Handler
