"""Client for the vLLM OpenAI-compatible engine server.

Plain httpx rather than the `openai` package: what we need is mostly vLLM's own extensions (the
`structured_outputs` constraint, `/tokenize` with chat messages, `echo` over token-id prompts for scoring,
runtime LoRA loading), and one pooled client keeps our per-request overhead small and measurable.
"""
from __future__ import annotations

import itertools
import math
import threading
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Any

import httpx

from .errors import EngineRejected, EngineUnavailable, RequestError
from .thread_transport import PerThreadTransport
from .usage import Usage


TOP_LOGPROBS_MAX = 20  # vLLM's default --max-logprobs
MASKED_LOGPROB = -1000.0  # the constraint masks other tokens with about -9999
SHARED_PREFIX_MIN = 0.05  # a shared option prefix with less probability than this is split evenly, not explored
MAX_SCORING_REQUESTS = 8
MASS_FLOOR = 1e-9


class EngineNotConfigured(RuntimeError):
    """No engine to build a client for: DATAENGINE_ENGINE_URL is empty."""


class UnknownModel(RequestError):
    """The engine does not know the requested model/adapter (e.g. it restarted and lost its adapters)."""

    status = 502


@dataclass(frozen=True)
class Sample:
    """One sampled completion: its text, mean token log-probability and why it stopped."""

    text: str
    mean_logprob: float
    tokens: int
    finish_reason: str


class EngineClient:
    def __init__(self, base_urls: str | list[str], model: str, timeout: float = 90.0):
        urls = [u.strip().rstrip("/") for u in (base_urls.split(",") if isinstance(base_urls, str) else base_urls)]
        self.base_urls = [u for u in urls if u]
        if not self.base_urls:
            raise ValueError("no engine URL configured")
        self.model = model
        self._next_url = itertools.cycle(self.base_urls)
        self._adapters: set[str] = set()
        self._lock = threading.Lock()
        # A connection pool per thread (the predictor's pool threads share this client); keep-alive below the
        # engine's (uvicorn) 5 s idle timeout
        transport = PerThreadTransport(limits=httpx.Limits(keepalive_expiry=4.0))
        self._http = httpx.Client(timeout=httpx.Timeout(timeout, connect=5.0), transport=transport)

    @classmethod
    def from_settings(cls, settings, *, batch: bool = False) -> "EngineClient":
        """The client of the engine(s) `DATAENGINE_ENGINE_URL` names: the one way the backend, the worker and
        pre-labelling build it. `batch`: for work that keeps many requests in flight (the gate, prelabel), whose
        requests wait `DATAENGINE_ENGINE_BATCH_TIMEOUT` instead of the interactive one. Raises
        EngineNotConfigured when the URL is empty."""
        if not settings.engine_url:
            raise EngineNotConfigured("DATAENGINE_ENGINE_URL is not set: point it at the running vLLM engine "
                                      "(`dataengine serve` sets it when it starts the engine, and passes it to its worker)")
        timeout = settings.engine_batch_timeout if batch else settings.engine_request_timeout
        return cls(settings.engine_url, settings.model_name, timeout)

    def _url(self) -> str:
        with self._lock:  # spread requests over engine replicas
            return next(self._next_url)

    def _post(self, path: str, payload: dict[str, Any], base_url: str | None = None) -> dict[str, Any]:
        url = (base_url or self._url()) + path
        try:
            response = self._send(url, payload)
        except httpx.TimeoutException as exc:
            raise EngineUnavailable(f"the engine at {url} did not answer in time ({exc.__class__.__name__})") from exc
        except httpx.HTTPError as exc:
            raise EngineUnavailable(f"the engine at {url} is unreachable: {exc}") from exc
        if response.status_code >= 400:
            raise _engine_error(url, response)
        try:
            return response.json()
        except ValueError:  # e.g. /v1/load_lora_adapter answers plain text
            return {"text": response.text}

    def _chat(self, payload: dict[str, Any], usage: Usage | None) -> dict[str, Any]:
        """One chat completion; its token counts (vLLM's `usage` field) and wall time added to `usage`."""
        started = time.perf_counter()
        body = self._post("/v1/chat/completions", payload)
        if usage is not None:
            usage.add_response(body, time.perf_counter() - started)
        return body

    def _send(self, url: str, payload: dict[str, Any]) -> httpx.Response:
        try:
            return self._http.post(url, json=payload)
        except (httpx.RemoteProtocolError, httpx.ConnectError):
            # The engine (uvicorn) closes idle keep-alive connections after 5 s; a request that raced
            # that close never reached it, so one retry on a fresh connection is safe.
            return self._http.post(url, json=payload)

    # --- health ------------------------------------------------------------------------------------
    def health(self) -> dict[str, bool]:
        states = {}
        for url in self.base_urls:
            try:
                states[url] = self._http.get(url + "/health", timeout=2.0).status_code == 200
            except httpx.HTTPError:
                states[url] = False
        return states

    # --- sampling ----------------------------------------------------------------------------------
    def sample(
        self,
        messages: list[dict[str, Any]],
        schema: dict[str, Any],
        *,
        n: int,
        temperature: float,
        max_tokens: int,
        model: str | None = None,
        usage: Usage | None = None,
    ) -> list[Sample]:
        """n constrained samples in one request (vLLM `structured_outputs` JSON schema); the request's engine
        usage is added to `usage`."""
        payload = {
            "model": model or self.model,
            "messages": messages,
            "n": n,
            "temperature": temperature,
            "max_tokens": max_tokens,
            "logprobs": True,
            "structured_outputs": {"json": schema},
        }
        body = self._chat(payload, usage)
        return [_sample_from_choice(choice) for choice in body.get("choices", [])]

    # --- exhaustive scoring ------------------------------------------------------------------------
    def score_options(
        self, messages: list[dict[str, Any]], options: list[str], *, model: str | None = None, usage: Usage | None = None
    ) -> list[float]:
        """Log-probability of each option string as the whole answer, renormalised over the options.

        Decoding is constrained to the options (a vLLM choice constraint), so the returned top log-probabilities
        are the model's distribution over the tokens that can start an option. A token that starts exactly one
        option settles it: the constraint forces the rest. Where a token is shared (`Ne` for Negative and
        Neutral, `1` for 1 and 10), the next step is read by continuing that assistant prefix
        (`continue_final_message`), depth-first, while the shared prefix still holds at least `SHARED_PREFIX_MIN`
        of the mass; below that, or past `MAX_SCORING_REQUESTS`, its mass is split evenly. (Scoring the option
        strings through prompt log-probabilities would be one request, but it crashes vLLM's CPU LoRA path.)
        Every request's engine usage is added to `usage`.
        """
        mass = [0.0] * len(options)
        pending: list[tuple[str, float, list[int]]] = [("", 1.0, list(range(len(options))))]
        requests = 0
        while pending:
            prefix, weight, members = pending.pop()
            if len(members) == 1:
                mass[members[0]] += weight
                continue
            if weight < SHARED_PREFIX_MIN or requests >= MAX_SCORING_REQUESTS:
                for index in members:
                    mass[index] += weight / len(members)
                continue
            requests += 1
            suffixes = [options[i][len(prefix):] for i in members]
            for token, probability in self._next_token_distribution(messages, prefix, suffixes, model, usage):
                extended = prefix + token
                following = [i for i in members if options[i].startswith(extended) and token]
                if not following:  # the end-of-answer token after an option that is complete at `prefix`
                    following = [i for i in members if options[i] == prefix]
                if following:
                    pending.append((extended, weight * probability, following))
        total = sum(mass)
        if total <= 0:
            raise RequestError("the engine gave no probability to any option", 502)
        return [math.log(m / total) if m > 0 else math.log(MASS_FLOOR) for m in mass]

    def _next_token_distribution(
        self, messages: list[dict[str, Any]], prefix: str, suffixes: list[str], model: str | None, usage: Usage | None
    ) -> list[tuple[str, float]]:
        """(token, probability) of the next token under a choice constraint over `suffixes`, after the assistant
        prefix `prefix`; probabilities renormalised over the returned tokens."""
        payload: dict[str, Any] = {
            "model": model or self.model,
            "messages": messages,
            "n": 1,
            "temperature": 0.0,
            "max_tokens": 1,
            "logprobs": True,
            "top_logprobs": TOP_LOGPROBS_MAX,
            "structured_outputs": {"choice": suffixes},
        }
        if prefix:
            payload["messages"] = [*messages, {"role": "assistant", "content": prefix}]
            payload.update(continue_final_message=True, add_generation_prompt=False)
        body = self._chat(payload, usage)
        try:
            top = body["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        except (KeyError, IndexError, TypeError) as exc:
            raise RequestError(f"the engine returned no log-probabilities for the options: {exc}", 502) from exc
        allowed = [(entry["token"], math.exp(entry["logprob"])) for entry in top if entry.get("logprob", -math.inf) > MASKED_LOGPROB]
        total = sum(p for _, p in allowed)
        return [(token, p / total) for token, p in allowed] if total > 0 else []

    # --- adapters (hot swap) -----------------------------------------------------------------------
    def load_lora_adapter(self, name: str, path: str) -> None:
        """Load an adapter on every engine replica; an already-loaded name is fine."""
        for url in self.base_urls:
            try:
                self._post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": path}, url)
            except RequestError as exc:
                if "already" not in exc.message.lower():
                    raise

    def ensure_adapter(self, name: str, path: str) -> None:
        """Load once per process; `forget_adapter` after an engine restart makes the next call reload. Only for
        engines without the LoRA filesystem resolver: with it, a request naming the adapter loads it."""
        if name in self._adapters:
            return
        if not Path(path).is_dir():
            # Never hand vLLM a missing adapter: loading it fails inside the engine core and kills the engine.
            raise RequestError(f"adapter {name} is missing on disk ({path}); roll the project back or retrain", 500)
        self.load_lora_adapter(name, path)
        self._adapters.add(name)

    def forget_adapter(self, name: str) -> None:
        self._adapters.discard(name)

    def loaded_models(self) -> list[str]:
        return [m["id"] for m in self._models()]

    def served_model_path(self) -> str:
        """Where the engine loaded its base model from (its `--model`, `root` in /v1/models): vLLM's LoRA filesystem
        resolver only loads an adapter whose `base_model_name_or_path` is exactly this."""
        return next((m.get("root") or self.model for m in self._models() if m.get("id") == self.model), self.model)

    def _models(self) -> list[dict[str, Any]]:
        try:
            body = self._http.get(self.base_urls[0] + "/v1/models", timeout=5.0).json()
        except (httpx.HTTPError, ValueError) as exc:
            raise EngineUnavailable(f"cannot list the engine's models: {exc}") from exc
        return body.get("data", [])

    def close(self) -> None:
        self._http.close()


def _sample_from_choice(choice: dict[str, Any]) -> Sample:
    content = (choice.get("logprobs") or {}).get("content") or []
    logprobs = [t["logprob"] for t in content if t.get("logprob") is not None and math.isfinite(t["logprob"])]
    mean = sum(logprobs) / len(logprobs) if logprobs else float("-inf")
    return Sample(
        text=(choice.get("message") or {}).get("content") or "",
        mean_logprob=mean,
        tokens=len(content),
        finish_reason=choice.get("finish_reason") or "",
    )


def _engine_error(url: str, response: httpx.Response) -> RequestError:
    try:
        detail = response.json()
        error = detail.get("error")
        message = detail.get("message") or (error.get("message") if isinstance(error, dict) else error) or str(detail)
    except (ValueError, AttributeError):
        message = response.text[:500]
    if response.status_code == 400 and ("context length" in message or "maximum" in message.lower()):
        return EngineRejected(f"the task is too long for the model: {message}")
    if response.status_code == 400 and any(word in message.lower() for word in ("image", "multimodal", "modality")):
        return EngineRejected(
            f"the engine refused the task's image input: {message} (DATAENGINE_MODEL must be a vision-language model; "
            "more images per task need DATAENGINE_ENGINE_MAX_IMAGES)"
        )
    if response.status_code == 404:
        return UnknownModel(f"the engine at {url} does not serve that model: {message}")
    return RequestError(f"the engine at {url} answered {response.status_code}: {message}", 502)
