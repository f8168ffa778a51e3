"""One external HTTP client for both legs of bench/predict.py, and what it needs to drive the engine with
exactly the requests /predict makes.

* `RecordingProxy`: a pass-through HTTP proxy in front of the vLLM engine that keeps every chat completion
  body the backend sends, byte for byte (used only while recording, never while timing).
* `run_units`: a work list of units (one task's requests, sent one after another, as the backend sends them)
  driven by `concurrency` workers over one pooled keep-alive async client. Both legs go through it.
* `EngineCounters`: vLLM's own Prometheus counters (requests, prompt and generated tokens, prefix-cache
  hits), read before and after a leg, to show both legs gave the engine the same work.
* `cpu_seconds`: CPU time of a process tree (the backend's granian workers): on a CPU-only host every CPU
  second the backend spends is one the engine does not get.
"""
from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import psutil  # installed with accelerate
from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class Request:
    url: str
    body: bytes  # JSON, sent as recorded


Unit = list[Request]  # one task's requests, in order (option scoring: the first answer decides the follow-ups)


class RecordingProxy:
    """`url` forwards everything to `upstream` and records (path, body) of each POST /v1/chat/completions."""

    def __init__(self, upstream: str):
        self.upstream = upstream.rstrip("/")
        self.recorded: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self._client = httpx.Client(timeout=600)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def on_post(self, path: str, body: bytes) -> None:
        """Called with each POST before it is forwarded: records it."""
        with self._lock:
            self.recorded.append((path, body))

    def take(self) -> list[bytes]:
        """The chat completion bodies recorded since the last call, in the order they arrived."""
        with self._lock:
            taken, self.recorded = self.recorded, []
        return [body for path, body in taken if path == "/v1/chat/completions"]

    def __enter__(self) -> "RecordingProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._client.close()

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                self._forward(b"")

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                proxy.on_post(self.path, body)
                self._forward(body)

            def _forward(self, body: bytes) -> None:
                headers = {"Content-Type": self.headers.get("Content-Type", "application/json")}
                answer = proxy._client.request(self.command, proxy.upstream + self.path, content=body or None, headers=headers)
                self.send_response(answer.status_code)
                self.send_header("Content-Type", answer.headers.get("content-type", "application/json"))
                self.send_header("Content-Length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content)

        return Handler


async def _drive(units: list[Unit], concurrency: int, timeout: float) -> None:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"Content-Type": "application/json"}
    pending = iter(units)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:

        async def worker() -> None:
            for unit in pending:  # shared iterator: each unit is taken by exactly one worker
                for request in unit:
                    response = await client.post(request.url, content=request.body, headers=headers)
                    if response.status_code != 200:
                        raise RuntimeError(f"{request.url} answered {response.status_code}: {response.text[:300]}")

        await asyncio.gather(*(worker() for _ in range(concurrency)))


def run_units(units: list[Unit], concurrency: int, timeout: float = 600.0) -> float:
    """Seconds to send every unit, `concurrency` units in flight, each unit's requests one after another."""
    loop = asyncio.new_event_loop()
    try:
        started = loop.time()
        loop.run_until_complete(_drive(units, concurrency, timeout))
        return loop.time() - started
    finally:
        loop.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its live descendants."""
    total = 0.0
    root = psutil.Process(pid)
    for process in [root, *root.children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


VLLM_COUNTERS = {
    "vllm:request_success": "sequences",  # n samples of one request count n times
    "vllm:prompt_tokens": "prompt_tokens",
    "vllm:generation_tokens": "generation_tokens",
    "vllm:prefix_cache_queries": "prefix_cache_queries",
    "vllm:prefix_cache_hits": "prefix_cache_hits",
}


@dataclass
class EngineCounters:
    """vLLM's own counters, summed over label sets (finish reasons, engines)."""

    values: dict[str, float] = field(default_factory=dict)

    @classmethod
    def read(cls, engine_url: str) -> "EngineCounters":
        text = httpx.get(engine_url.rstrip("/") + "/metrics", timeout=30).text
        values = dict.fromkeys(VLLM_COUNTERS.values(), 0.0)
        for family in text_string_to_metric_families(text):
            name = VLLM_COUNTERS.get(family.name)
            if name:
                values[name] += sum(s.value for s in family.samples if s.name.endswith("_total"))
        return cls(values)

    def since(self, earlier: "EngineCounters", tasks: int) -> dict[str, float]:
        """Per task, what the engine did between `earlier` and this reading, and its prefix-cache hit rate."""
        delta = {name: self.values[name] - earlier.values[name] for name in self.values}
        out = {f"{name}_per_task": round(delta[name] / tasks, 2) for name in ("sequences", "prompt_tokens", "generation_tokens")}
        queries = delta["prefix_cache_queries"]
        out["prefix_cache_hit_rate"] = round(delta["prefix_cache_hits"] / queries, 3) if queries else None
        return out


def reset_prefix_cache(engine_url: str) -> bool:
    """Empty vLLM's prefix cache (needs VLLM_SERVER_DEV_MODE=1 on the engine): each leg starts cold, as a
    project's fresh tasks do. False when the engine does not offer it."""
    try:
        return httpx.post(engine_url.rstrip("/") + "/reset_prefix_cache", timeout=30).status_code == 200
    except httpx.HTTPError:
        return False
