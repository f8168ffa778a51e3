"""Throughput of /predict versus the same requests sent straight to the engine, and versus a
transformers `generate` baseline (how Label Studio's own Hugging Face example backend works).

Prints one JSON object. Everything runs in this process's machine: a tiny random model is built
unless --model is given, the real vLLM engine is started unless --engine-url is given, and the
backend runs under granian exactly as `dataengine serve` runs it.

    .venv/bin/python bench/predict.py [--tasks 16] [--repeats 5] [--candidates 4]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from backend.engine_client import EngineClient  # noqa: E402
from backend.label_config import compile_label_config  # noqa: E402
from backend.prompts import build_choice_messages, build_messages, option_answer  # noqa: E402
from backend.settings import Settings  # noqa: E402
from bench.common import sample_texts, start_engine  # noqa: E402
from tests.conftest import run_backend  # noqa: E402

WORKLOADS = ("sentiment", "topics")  # exhaustive scoring path, sampling path


def time_interleaved(fns: dict, repeats: int) -> dict[str, list[float]]:
    """Alternate the paths within each repeat so machine noise hits them alike (shared 2-core hosts)."""
    for fn in fns.values():
        fn()  # warm-up (grammar compilation, connection pools, per-worker config cache)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def via_backend(url: str, xml: str, tasks: list[dict]):
    # One persistent client, as Label Studio keeps: a new httpx client per call costs ~30 ms (SSL context).
    client = httpx.Client(timeout=300)

    def run():
        response = client.post(url + "/predict", json={"tasks": tasks, "label_config": xml, "project": "1.1"}, timeout=300)
        response.raise_for_status()
        return response.json()["results"]
    return run


def via_engine(engine: EngineClient, xml: str, tasks: list[dict], candidates: int, settings: Settings):
    """The same engine requests /predict makes, sent directly (no HTTP backend, no parsing)."""
    config = compile_label_config(xml, settings=settings)
    control = config.enumerable_control(settings.enumerate_max)
    pool = ThreadPoolExecutor(max_workers=settings.predict_concurrency)

    def one(task):
        texts = config.read_task(task, settings.max_text_chars)
        if control is not None:
            labels = [control.describe_option(o) for o in control.options()]
            answers = [option_answer(o) for o in control.options()]
            return engine.score_options(build_choice_messages(config, texts, control, labels), answers)
        return engine.sample(build_messages(config, texts), config.schema(texts), n=candidates, temperature=1.0,
                             max_tokens=min(settings.max_new_tokens, config.max_answer_chars(texts) + 8))

    return lambda: list(pool.map(one, tasks))


def via_transformers(model_dir: str, xml: str, tasks: list[dict], candidates: int, settings: Settings):
    """Label Studio's HF example style: chat template + model.generate(num_return_sequences=N), unconstrained."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    config = compile_label_config(xml, settings=settings)

    def run():
        for task in tasks:
            texts = config.read_task(task, settings.max_text_chars)
            ids = tokenizer.apply_chat_template(build_messages(config, texts), add_generation_prompt=True, return_tensors="pt", return_dict=True)
            with torch.no_grad():
                model.generate(**ids, do_sample=True, num_return_sequences=candidates,
                               max_new_tokens=min(64, config.max_answer_chars(texts) + 8), pad_token_id=tokenizer.pad_token_id)
    return run


def summarize(times: list[float], tasks: int, candidates_per_task: float) -> dict:
    median = statistics.median(times)
    return {"median_s": round(median, 4), "tasks_per_s": round(tasks / median, 2),
            "candidates_per_s": round(tasks * candidates_per_task / median, 2), "runs": len(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--model", help="model directory (default: build a tiny random one)")
    parser.add_argument("--engine-url", help="use a running engine serving --model as --model-name")
    parser.add_argument("--model-name", default="tiny")
    parser.add_argument("--skip-transformers", action="store_true")
    args = parser.parse_args()
    if args.engine_url and not args.model and not args.skip_transformers:
        parser.error("--engine-url needs --model (the model it serves) for the transformers baseline, or --skip-transformers")

    workdir = Path(tempfile.mkdtemp(prefix="dataengine-bench-"))
    bench_engine = start_engine(workdir, engine_url=args.engine_url, model=args.model, model_name=args.model_name)
    engine_url, model_dir = bench_engine.url, bench_engine.model
    settings = Settings(candidates=args.candidates)  # what /predict's settings would be: limits, concurrency
    backend_env = {"DATAENGINE_SERVED_MODEL_NAME": args.model_name, "DATAENGINE_CANDIDATES": str(args.candidates),
                   "DATAENGINE_LOG_LEVEL": "WARNING"}
    backend = run_backend(engine_url, workdir / "model_dir", workdir / "backend.log", backend_env)
    backend_url, _ = backend.__enter__()
    engine = EngineClient(engine_url, args.model_name, timeout=300)
    texts = sample_texts(args.tasks)
    report = {"tasks_per_request": args.tasks, "candidates": args.candidates, "repeats": args.repeats, "workloads": {}}
    try:
        for name in WORKLOADS:
            xml = (REPO / "label_config" / f"{name}.xml").read_text()
            tasks = [{"id": i, "data": {"text": text}} for i, text in enumerate(texts)]
            results = via_backend(backend_url, xml, tasks)()
            per_task = sum(len(r) for r in results) / len(results)
            times = time_interleaved(
                {"predict": via_backend(backend_url, xml, tasks), "engine": via_engine(engine, xml, tasks, args.candidates, settings)},
                args.repeats,
            )
            backend_times, engine_times = times["predict"], times["engine"]
            entry = {
                "predict": summarize(backend_times, len(tasks), per_task),
                "engine_direct": summarize(engine_times, len(tasks), per_task),
            }
            entry["overhead_vs_engine_pct"] = round(100 * (statistics.median(backend_times) / statistics.median(engine_times) - 1), 1)
            if not args.skip_transformers:
                hf_times = time_interleaved({"hf": via_transformers(model_dir, xml, tasks, args.candidates, settings)}, max(1, args.repeats // 3))["hf"]
                entry["transformers_generate"] = summarize(hf_times, len(tasks), args.candidates)
                entry["speedup_vs_transformers"] = round(statistics.median(hf_times) / statistics.median(backend_times), 2)
            report["workloads"][name] = entry
    finally:
        backend.__exit__(None, None, None)
        bench_engine.stop()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
