"""A stand-in for the vLLM OpenAI server on a real local HTTP port, for tests that check what the backend
sends (replica fan-out, metrics) without the engine. It answers only what those tests use:
/health, /v1/load_lora_adapter, and option scoring on /v1/chat/completions (each option one token)."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class FakeEngine:
    def __init__(self, already_loaded: set[str] | None = None):
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.already_loaded = set(already_loaded or ())
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def paths(self) -> list[str]:
        return [path for path, _ in self.requests]

    def __enter__(self) -> "FakeEngine":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def answer(self, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        if path == "/v1/load_lora_adapter":
            if body.get("lora_name") in self.already_loaded:
                return 400, {"error": {"message": f"The lora adapter '{body['lora_name']}' has already been loaded."}}
            self.already_loaded.add(body.get("lora_name"))
            return 200, "Success: LoRA adapter loaded"
        if path == "/v1/chat/completions":
            options = (body.get("structured_outputs") or {}).get("choice") or ["A"]
            # Earlier options more likely: the first ranks first, deterministically.
            top = [{"token": option, "logprob": -1.0 - i} for i, option in enumerate(options)]
            content = [{"token": options[0], "logprob": -1.0, "top_logprobs": top}]
            choice = {"message": {"content": options[0]}, "logprobs": {"content": content}, "finish_reason": "stop"}
            return 200, {"choices": [choice]}
        return 404, {"error": f"no route {path}"}

    def _handler(self):
        engine = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                self._reply(200 if self.path == "/health" else 404, {})

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                engine.requests.append((self.path, body))
                self._reply(*engine.answer(self.path, body))

            def _reply(self, status: int, payload: Any) -> None:
                raw = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain" if isinstance(payload, str) else "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *args):  # keep test output clean
                pass

        return Handler
