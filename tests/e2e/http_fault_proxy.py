"""A loopback HTTP proxy in front of the real Label Studio that can answer 502 after it forwarded a request
(the proxy error that follows a write which did happen) or hold requests back. Everything behind it is the
real server; tests/e2e/tcp_proxy.py is the TCP-level counterpart (outages, slow connections)."""
from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

import httpx

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection", "host",
              "content-length", "content-encoding"}


class HttpFaultProxy(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, target: str):
        super().__init__(("127.0.0.1", 0), _Forward)
        self.target = target.rstrip("/")
        self.client = httpx.Client(timeout=120)
        self.fail_after_forward: Callable[[str, str], bool] = lambda method, path: False
        self.delay: Callable[[str, str], float] = lambda method, path: 0.0
        self.seen: list[tuple[str, str, int]] = []  # (method, path, status answered)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self.client.close()


class _Forward(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _handle(self):
        proxy: HttpFaultProxy = self.server
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        time.sleep(proxy.delay(self.command, self.path))
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        upstream = proxy.client.request(self.command, proxy.target + self.path, headers=headers, content=body)
        status, content = upstream.status_code, upstream.content
        if proxy.fail_after_forward(self.command, self.path):
            status, content = 502, b'{"detail": "bad gateway (injected after forwarding)"}'
        proxy.seen.append((self.command, self.path, status))
        self.send_response(status)
        for name, value in upstream.headers.items():
            if name.lower() not in HOP_BY_HOP:
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        self.wfile.write(content)

    do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _handle
