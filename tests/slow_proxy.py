"""A forwarding HTTP proxy that holds every chat completion for `delay` seconds before passing it on to the real
engine: an engine whose queue is long (many batch requests in flight on 2 CPU cores), made reproducible. Only
the delay is artificial; every answer comes from the real vLLM server behind it."""
from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx


class SlowProxy:
    def __init__(self, upstream: str, delay: float, slow_paths: tuple[str, ...] = ("/v1/chat/completions",)):
        self.upstream = upstream.rstrip("/")
        self.delay = delay
        self.slow_paths = slow_paths
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> "SlowProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _forward(self, method: str) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path in proxy.slow_paths:
                    time.sleep(proxy.delay)
                headers = {"Content-Type": self.headers.get("Content-Type", "application/json")}
                upstream = httpx.request(method, proxy.upstream + self.path, content=body or None, headers=headers, timeout=300)
                self.send_response(upstream.status_code)
                self.send_header("Content-Type", upstream.headers.get("content-type", "application/json"))
                self.send_header("Content-Length", str(len(upstream.content)))
                self.end_headers()
                self.wfile.write(upstream.content)

            def do_GET(self) -> None:
                self._forward("GET")

            def do_POST(self) -> None:
                self._forward("POST")

        return Handler
