"""Shared fixtures: a tiny random model built at test time and ONE real vLLM engine server per session.

Set DATAENGINE_TEST_ENGINE_URL to reuse an engine you already started (it must serve the tiny model
under the name "tiny"); otherwise the session starts one with the same code `dataengine serve` uses.
"""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from backend.settings import Settings

REPO = Path(__file__).resolve().parents[1]
LABEL_CONFIGS = REPO / "label_config"
TINY_NAME = "tiny"
# The Redis server tests use (each test file owns one database on it). Point it elsewhere to run two
# checkouts' suites side by side: DATAENGINE_TEST_REDIS=redis://127.0.0.1:6380
TEST_REDIS = os.environ.get("DATAENGINE_TEST_REDIS", "redis://127.0.0.1:6379").rstrip("/")


def redis_db(number: int) -> str:
    """The URL of test Redis database `number`."""
    return f"{TEST_REDIS}/{number}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from training.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tiny_rm_base(tmp_path_factory) -> Path:
    """A tiny random BERT encoder with MiniLM's tokenizer: a reward-model base that trains in seconds, for tests
    where the reward model's quality does not matter (what it learns is tested in tests/test_reward_model.py)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from training.reward_model import minilm_path

    out = tmp_path_factory.mktemp("models") / "tiny-rm"
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=512)
    BertModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def engine_url(tiny_model_dir, tmp_path_factory) -> str:
    external = os.environ.get("DATAENGINE_TEST_ENGINE_URL")
    if external:
        yield external
        return
    from backend.engine_process import EngineProcess

    settings = Settings(
        model=str(tiny_model_dir),
        served_model_name=TINY_NAME,
        engine_port=free_port(),
        engine_max_model_len=4096,
        model_dir=tmp_path_factory.mktemp("engine"),
        engine_start_timeout=300,
    )
    engine = EngineProcess(settings)
    engine.start()
    yield engine.url
    engine.stop()


@pytest.fixture
def fresh_settings():
    """For tests that set environment variables and then run code that reads `get_settings()` (the CLI): the
    cached settings of earlier tests must not leak in, nor these out."""
    from backend.settings import get_settings

    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def make_settings(model_dir: Path, engine_url: str = "", **overrides) -> Settings:
    values = dict(
        model="tiny-model-dir",
        served_model_name=TINY_NAME,
        engine_url=engine_url,
        model_dir=model_dir,
        label_studio_url="",
        label_studio_api_key="",
        basic_auth_user="",
        basic_auth_pass="",
        redis_url=redis_db(0),  # the suite's shared database; a file that reads what it wrote owns another
    )
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def settings(tmp_path, engine_url) -> Settings:
    return make_settings(tmp_path / "model_dir", engine_url)


@pytest.fixture
def app(settings):
    from backend.app import create_app

    app = create_app(settings)
    yield app
    app.extensions["dataengine"].predictor.close()


@pytest.fixture
def client(app):
    return app.test_client()


@contextlib.contextmanager
def flushed_redis(url: str):
    """A connection to the real Redis database `url`, emptied before and after use (each test file owns one)."""
    from redis import Redis

    connection = Redis.from_url(url)
    connection.flushdb()
    try:
        yield connection
    finally:
        connection.flushdb()


def shipped_configs(images: bool = False) -> list[str]:
    """Shipped text configs; `images=True`: the ones over <Image>, which need a vision-language engine.
    Ranking configs (<Ranker>/<Pairwise>, candidates written into the tasks) are `ranking_configs()`."""
    return sorted(
        p.stem for p in LABEL_CONFIGS.glob("*.xml") if ("<Image" in p.read_text()) == images and p.stem not in ranking_configs()
    )


def ranking_configs() -> list[str]:
    """Shipped configs whose candidates the backend writes into the tasks (<Ranker> or <Pairwise>)."""
    return sorted(p.stem for p in LABEL_CONFIGS.glob("*.xml") if "<Ranker" in p.read_text() or "<Pairwise" in p.read_text())


def load_config(name: str) -> tuple[str, list[dict]]:
    import json

    xml = (LABEL_CONFIGS / f"{name}.xml").read_text()
    tasks = json.loads((LABEL_CONFIGS / f"{name}.tasks.json").read_text())
    return xml, [{"id": i + 1, **task} for i, task in enumerate(tasks)]


@contextlib.contextmanager
def run_backend(
    engine_url: str, model_dir: Path, log_path: Path, extra_env: dict[str, str] | None = None, startup_timeout: float = 90.0
) -> Iterator[tuple[str, subprocess.Popen]]:
    """`dataengine serve` (python -m dataengine serve) under granian, attached to `engine_url`.

    Yields (url, process); the log (stdout + stderr) goes to `log_path`. `extra_env` adds or overrides
    environment variables (e.g. LABEL_STUDIO_URL); the RQ worker is off unless DATAENGINE_RUN_WORKER=1.
    """
    import httpx

    port = free_port()
    env = {
        **os.environ,
        "DATAENGINE_ENGINE_URL": engine_url,
        "DATAENGINE_SERVED_MODEL_NAME": TINY_NAME,
        "DATAENGINE_PORT": str(port),
        "DATAENGINE_HOST": "127.0.0.1",
        "DATAENGINE_WORKERS": "2",
        "MODEL_DIR": str(model_dir),
        "DATAENGINE_RUN_WORKER": "0",
        **(extra_env or {}),
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    log_path = Path(log_path)
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dataengine", "serve"], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + startup_timeout
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"dataengine serve exited with code {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"dataengine serve did not come up in {startup_timeout:.0f} s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url, proc
    finally:
        stop_process(proc)


def stop_process(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM, then SIGKILL after `timeout` s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
