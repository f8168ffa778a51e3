"""backend/thread_transport.py: one httpx client shared by many threads, a keep-alive connection pool per
thread. With one shared pool (httpcore 1.0) a thread's pass over the pool can close a connection another
thread has just started a request on: `[Errno 9] Bad file descriptor` under 64 pre-labelling threads.
The race itself needs thousands of requests to show; what rules it out is checked here: no connection is
ever handed from one thread to another."""
from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from backend.thread_transport import PerThreadTransport
from tests.e2e.conftest import wait_for


class PortEcho(BaseHTTPRequestHandler):
    """Answers each request with the client's port, over keep-alive."""

    protocol_version = "HTTP/1.1"

    def setup(self):
        super().setup()
        self.server.count_connection(+1)

    def finish(self):
        super().finish()
        self.server.count_connection(-1)

    def do_GET(self):
        body = str(self.client_address[1]).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), PortEcho)
        self.open_connections, self._lock = 0, threading.Lock()
        self.url = f"http://127.0.0.1:{self.server_address[1]}/"

    def count_connection(self, change: int) -> None:
        with self._lock:
            self.open_connections += change

    def __enter__(self) -> "Server":
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        super().__exit__(*exc)  # server_close()


@pytest.fixture
def server():
    with Server() as server:
        yield server


def port_in_thread(client: httpx.Client, url: str) -> str:
    ports = []
    thread = threading.Thread(target=lambda: ports.append(client.get(url).text))
    thread.start()
    thread.join()
    return ports[0]


def test_each_thread_keeps_its_own_connections(server):
    with httpx.Client(transport=PerThreadTransport()) as client:
        mine = client.get(server.url).text
        assert client.get(server.url).text == mine  # kept alive for this thread
        other = port_in_thread(client, server.url)  # this thread's connection is idle: a shared pool would hand it over
        assert other != mine and client.get(server.url).text == mine


def test_a_finished_threads_connections_are_closed_when_the_next_thread_connects(server):
    with httpx.Client(transport=PerThreadTransport()) as client:
        port_in_thread(client, server.url)
        assert wait_for(lambda: server.open_connections == 1, timeout=5)
        port_in_thread(client, server.url)
        assert wait_for(lambda: server.open_connections == 1, timeout=5)  # not 2: the dead thread's pool was closed
    assert wait_for(lambda: server.open_connections == 0, timeout=5)
