"""HAProxy (the Debian/Ubuntu package `haproxy`) as the load balancer in front of engine replicas in tests.

`with HAProxy({"a": url_a, "b": url_b}) as proxy:` balances HTTP requests round-robin, one by one (also on a
kept-alive client connection), and logs each as `<server> <method> <path> <status>`; `proxy.requests()` reads
them back. `HAPROXY_MISSING` says why a test must skip when the binary is not installed.
"""
from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from tests.conftest import free_port, stop_process

HAPROXY = shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").is_file() else None)
HAPROXY_MISSING = (
    None if HAPROXY else "haproxy is not installed: `apt-get install haproxy` (scripts/setup.sh test-tools does it in CI)"
)

CONFIG = """global
    log stdout format raw local0
defaults
    mode http
    log global
    log-format "%s %HM %HP %ST"
    option http-server-close
    timeout connect 5s
    timeout client 300s
    timeout server 300s
frontend engines
    bind 127.0.0.1:{port}
    default_backend replicas
backend replicas
    balance roundrobin
{servers}
"""


@dataclass(frozen=True)
class Logged:
    server: str
    method: str
    path: str
    status: int


class HAProxy:
    def __init__(self, servers: dict[str, str], workdir: Path):
        self.servers = servers
        self.workdir = Path(workdir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.workdir / "haproxy.log"
        self.process: subprocess.Popen | None = None

    def config(self) -> str:
        lines = [f"    server {name} {urlsplit(url).netloc}" for name, url in self.servers.items()]
        return CONFIG.format(port=self.port, servers="\n".join(lines))

    def __enter__(self) -> "HAProxy":
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "haproxy.cfg"
        config.write_text(self.config())
        check = subprocess.run([HAPROXY, "-c", "-f", str(config)], capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stdout + check.stderr
        with open(self.log_path, "wb") as out:
            self.process = subprocess.Popen([HAPROXY, "-db", "-f", str(config)], stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                httpx.get(self.url + "/health", timeout=2)
                return self
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError(f"haproxy did not listen on {self.url}:\n{self.log_path.read_text()}")

    def __exit__(self, *exc) -> None:
        if self.process is not None:
            stop_process(self.process)

    def requests(self) -> list[Logged]:
        logged = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            parts = line.split()
            if len(parts) == 4 and parts[0] in self.servers and parts[3].isdigit():
                logged.append(Logged(parts[0], parts[1], parts[2], int(parts[3])))
        return logged
