"""The engine's throughput in float32 and in bfloat16 on this host, driven the same way: what
DATAENGINE_ENGINE_DTYPE=auto decides (bfloat16 only where the host runs it natively, `backend/hardware.py`).

Each dtype gets its own engine on the embedded SmolLM2-135M-Instruct (or --model), one after the other. After a
warm-up, each repeat scores `--tasks` review sentences as a closed label set (Positive/Negative, the option
scoring /predict does) with `--concurrency` requests in flight. Prints one JSON object: tasks/s per dtype
(median and spread over the repeats) and the median ratio bfloat16 over float32, with the host's bf16 support.

    .venv/bin/python bench/engine_dtype.py                  # the figures the README quotes
    .venv/bin/python bench/engine_dtype.py --model tiny --tasks 16 --repeats 2   # quick check
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from backend.engine_client import EngineClient  # noqa: E402
from backend.engine_process import EngineProcess  # noqa: E402
from backend.hardware import native_bf16  # noqa: E402
from backend.label_config import compile_label_config  # noqa: E402
from backend.prompts import build_choice_messages, option_answer  # noqa: E402
from backend.settings import Settings  # noqa: E402
from bench.common import SENTIMENT_CONFIG, resolve_model, sample_texts  # noqa: E402
from tests.conftest import free_port  # noqa: E402

DTYPES = ("float32", "bfloat16")
CONFIG = compile_label_config(SENTIMENT_CONFIG)
CONTROL = CONFIG.enumerable_control(16)
OPTIONS = CONTROL.options()


def messages(text: str) -> list[dict]:
    """The prompt /predict scores a closed set with."""
    return build_choice_messages(CONFIG, {CONTROL.target.name: text}, CONTROL, [CONTROL.describe_option(o) for o in OPTIONS])


def measure(model: str, name: str, dtype: str, texts: list[str], repeats: int, concurrency: int, workdir: Path) -> dict:
    process = EngineProcess(Settings(model=model, served_model_name=name, engine_port=free_port(), engine_dtype=dtype,
                                     engine_max_model_len=4096, model_dir=workdir / dtype))
    started = time.monotonic()
    url = process.start()
    start_seconds = time.monotonic() - started
    client = EngineClient.from_settings(Settings(model=model, served_model_name=name, engine_url=url), batch=True)
    score = lambda text: client.score_options(messages(text), [option_answer(o) for o in OPTIONS])  # noqa: E731
    rates = []
    try:
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(score, texts[:concurrency]))  # warm-up
            for repeat in range(repeats):
                batch = texts[(repeat + 1) * len(texts) // (repeats + 1):][:len(texts) // (repeats + 1)] or texts
                began = time.monotonic()
                list(pool.map(score, batch))
                rates.append(len(batch) / (time.monotonic() - began))
                print(f"  {dtype} repeat {repeat + 1}: {rates[-1]:.2f} tasks/s", file=sys.stderr, flush=True)
    finally:
        client.close()
        process.stop()
    return {"start_seconds": round(start_seconds, 1), "tasks_per_s_median": round(statistics.median(rates), 3),
            "tasks_per_s": [round(r, 3) for r in rates]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model directory, or `tiny` (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--tasks", type=int, default=64, help="tasks per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="dataengine-dtype-"))
    model, name = resolve_model(args.model, None, workdir)
    texts = sample_texts(args.tasks * (args.repeats + 1))
    results = {dtype: measure(model, name, dtype, texts, args.repeats, args.concurrency, workdir) for dtype in DTYPES}
    ratio = results["bfloat16"]["tasks_per_s_median"] / results["float32"]["tasks_per_s_median"]
    print(json.dumps({"model": name, "native_bf16": native_bf16(), "auto_picks": "bfloat16" if native_bf16() else "float32",
                      "tasks": args.tasks, "repeats": args.repeats, "concurrency": args.concurrency, "dtypes": results,
                      "ratio_bfloat16_over_float32": round(ratio, 3)}, indent=2))


if __name__ == "__main__":
    main()
