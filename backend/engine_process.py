"""Start, health-check and stop a vLLM OpenAI-compatible server from the engine venv."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from .hardware import engine_dtype
from .settings import Settings

log = logging.getLogger(__name__)


class EngineStartError(RuntimeError):
    """The engine could not be started; the message says what to do."""


def resolve_model(model: str) -> str:
    """A local directory as an absolute path, or a hub id that is cached or reachable; else a clear error."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise EngineStartError(f"DATAENGINE_MODEL={model}: the directory has no config.json; is it a model?")
        return str(path.resolve())
    looks_like_path = model.startswith((".", "/", "~")) or model.count("/") != 1
    if looks_like_path:
        raise EngineStartError(
            f"DATAENGINE_MODEL={model}: no such directory. Give a local model directory or a Hugging Face id "
            "(org/name); for an offline smoke run make a tiny one: dataengine make-tiny-model models/tiny"
        )
    if _hub_model_cached(model) or _hub_reachable(model):
        return model
    raise EngineStartError(
        f"DATAENGINE_MODEL={model} is not in the local Hugging Face cache and the hub cannot be reached from "
        "this machine. Set DATAENGINE_MODEL to a local model directory (a downloaded checkpoint, or "
        "`dataengine make-tiny-model models/tiny` for a smoke run)."
    )


def _hub_model_cached(model: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(model, "config.json"), str)
    except Exception:
        return False


def _hub_reachable(model: str) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        return False
    try:
        response = httpx.head(f"https://huggingface.co/{model}/resolve/main/config.json", timeout=5.0, follow_redirects=True)
    except httpx.HTTPError:
        return False
    return response.status_code < 400 or response.status_code == 401  # 401: gated but exists (token needed)


def is_vision_model(model: str) -> bool:
    """True when the model's config.json has a vision tower (`vision_config`): a local directory, or a hub id
    in the local cache. Unknown (not cached yet): False, and vLLM's own defaults apply."""
    path = Path(model) / "config.json"
    if not path.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model, "config.json")
        except Exception:
            return False
        if not isinstance(cached, str):
            return False
        path = Path(cached)
    try:
        return "vision_config" in json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


def image_limit_args(settings: Settings) -> list[str]:
    """vLLM's per-prompt image limit, and the image size its memory profiling assumes (our images are
    scaled to DATAENGINE_IMAGE_MAX_SIDE before they are sent); no video inputs."""
    side = settings.image_max_side
    limits = {"image": {"count": settings.engine_max_images, "width": side, "height": side}, "video": 0}
    return ["--limit-mm-per-prompt", json.dumps(limits)]


def lora_resolver_environment(settings: Settings) -> dict[str, str]:
    """Hot swap without being told: vLLM's own `lora_filesystem_resolver` plugin loads an adapter the first time a
    request names one it does not know, from VLLM_LORA_RESOLVER_CACHE_DIR/<name>/ (MODEL_DIR/adapters, written
    by training/registry.py), so every engine replica behind any load balancer serves every promoted version."""
    return {
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
        "VLLM_PLUGINS": "lora_filesystem_resolver",
        "VLLM_LORA_RESOLVER_CACHE_DIR": str(settings.adapters_dir.resolve()),
    }


@dataclass
class EngineProcess:
    """A supervised `python -m vllm.entrypoints.openai.api_server` child process."""

    settings: Settings
    log_path: Path | None = None
    process: subprocess.Popen | None = field(default=None, init=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.settings.engine_port}"

    def command(self, model_path: str) -> list[str]:
        s = self.settings
        python = s.engine_python
        if not Path(python).exists():
            raise EngineStartError(
                f"engine python {python} not found: run scripts/setup.sh (or set DATAENGINE_ENGINE_PYTHON, or "
                "DATAENGINE_ENGINE_URL to use a running vLLM server)"
            )
        cmd = [
            python, "-m", "vllm.entrypoints.openai.api_server",
            "--model", model_path,
            "--served-model-name", s.model_name,
            "--host", "127.0.0.1",
            "--port", str(s.engine_port),
            "--dtype", engine_dtype(s.engine_dtype),
            "--max-model-len", str(s.engine_max_model_len),
            "--block-size", str(s.engine_block_size),
            "--enable-lora", "--max-lora-rank", str(s.max_lora_rank),
            # Without this a JSON constraint lets a weak model wander in whitespace until max_tokens.
            "--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}',
        ]
        if is_vision_model(model_path):
            cmd += image_limit_args(s)
        return cmd + s.engine_extra_args.split()

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        for name, value in lora_resolver_environment(self.settings).items():
            env.setdefault(name, value)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        env.setdefault("VLLM_NO_USAGE_STATS", "1")
        env.setdefault("DO_NOT_TRACK", "1")
        for name in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"):  # the engine venv is self-contained
            env.pop(name, None)
        return env

    def resolved_model(self) -> str:
        settings = self.settings
        if settings.uses_embedded_model and not (settings.embedded_model_dir / "config.json").is_file():
            raise EngineStartError(
                f"the embedded model {settings.model} is not prepared in {settings.embedded_model_dir}: run "
                "`dataengine fetch-model` (scripts/setup.sh and `dataengine serve` do it), or set DATAENGINE_MODEL "
                "to a local model directory or a Hugging Face id"
            )
        return resolve_model(settings.model_path)

    def start(self) -> str:
        model_path = self.resolved_model()
        cmd = self.command(model_path)
        self.settings.adapters_dir.mkdir(parents=True, exist_ok=True)  # the resolver plugin refuses a missing one
        self.log_path = self.log_path or Path(self.settings.model_dir) / "engine.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log.info("starting engine: %s (log: %s)", " ".join(cmd), self.log_path)
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                cmd, stdout=log_file, stderr=subprocess.STDOUT, env=self.environment(), start_new_session=True
            )
        self.wait_ready()
        return self.url

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.settings.engine_start_timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise EngineStartError(f"the engine exited with code {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2.0).status_code == 200:
                    self._warm_up()
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        self.stop()
        raise EngineStartError(f"the engine was not healthy after {self.settings.engine_start_timeout:.0f}s:\n{self.log_tail()}")

    def _warm_up(self) -> None:
        """The first requests compile kernels (~15 s on CPU); pay that at start-up, not on a user's /predict."""
        # Same request shape as option scoring (never `echo`/prompt logprobs: they crash vLLM's CPU LoRA path).
        payload = {
            "model": self.settings.model_name,
            "messages": [{"role": "user", "content": "warm up"}],
            "max_tokens": 1,
            "logprobs": True,
            "top_logprobs": 2,
            "structured_outputs": {"choice": ["A", "B"]},
        }
        try:
            httpx.post(self.url + "/v1/chat/completions", json=payload, timeout=120.0)
        except httpx.HTTPError as exc:
            log.warning("engine warm-up request failed: %s", exc)

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path or not self.log_path.exists():
            return "(no engine log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 20.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=5)
        except ProcessLookupError:
            pass

    def __enter__(self) -> "EngineProcess":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":  # pragma: no cover - manual use
    logging.basicConfig(level=logging.INFO)
    engine = EngineProcess(Settings())
    try:
        print(engine.start(), flush=True)
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        engine.stop()
        sys.exit(0)
