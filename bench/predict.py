"""/predict against the raw vLLM engine it drives, and against the transformers `generate` baseline of Label
Studio's own Hugging Face example, on the same work. Real model by default: the embedded SmolLM2-135M-Instruct.

Two comparisons, kept apart in the output:

1. Serving overhead (`ratio_predict_over_engine`). The same external client (bench/replay.py: one pooled
   keep-alive async httpx client, `--concurrency` tasks in flight, each task's requests one after another)
   drives two legs over the same tasks:
     * `predict`: one POST /predict per task to the backend, run as `dataengine serve` runs it (granian);
     * `engine_direct`: straight to the vLLM server, exactly the engine requests /predict made for that task,
       byte for byte, recorded beforehand through a pass-through proxy in front of the engine (a closed label
       set: the choice-constrained 1-token request and the follow-ups for shared option prefixes; an open
       output: the n-sample JSON-schema request).
   Each repeat runs both legs, in alternating order, each from an empty prefix cache. The ratio per repeat is
   /predict's throughput over the engine's (engine leg seconds / predict leg seconds); the JSON gives its
   median and spread. vLLM's own counters (requests, prompt and generated tokens per task) show that both legs
   gave the engine the same work.
2. Speed-up over transformers on the same work (`speedup_vs_transformers`): Label Studio's example backend
   (label-studio-ml-backend examples/huggingface_llm) runs `generate` on one task after another in the
   backend process. Here: the same chat prompts as the recorded engine requests, one task after another,
     * open outputs (`topics`): per engine request of the task (the greedy answer, then the samples),
       `generate(num_return_sequences=n)` with its n, temperature (0: greedy) and max_tokens, versus our
       constrained greedy answer and samples per task;
     * closed label sets (`sentiment`): one greedy `generate` of an answer (max_new_tokens: the longest
       option's tokens + 1), versus our option scoring, which gives every option a probability.
   The ratio is /predict's median tasks/s over transformers' tasks/s.

Prints one JSON object.

    .venv/bin/python bench/predict.py                      # SmolLM2-135M-Instruct: the figures the README quotes
    .venv/bin/python bench/predict.py --model tiny --tasks 16 --repeats 2 --transformers-tasks 4   # quick check
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from backend.settings import Settings  # noqa: E402
from bench.common import resolve_model, sample_texts, start_engine  # noqa: E402
from bench.replay import EngineCounters, RecordingProxy, Request, Unit, cpu_seconds, reset_prefix_cache, run_units  # noqa: E402
from tests.conftest import run_backend  # noqa: E402

WORKLOADS = {
    "sentiment": "closed label set: /predict scores every option (choice-constrained 1-token requests); "
                 "transformers generates one answer greedily",
    "topics": "open output: /predict asks for the JSON-schema-constrained greedy answer, then n-1 constrained samples "
              "(DATAENGINE_GREEDY_CANDIDATE); transformers generates the same, unconstrained",
}
TARGET_RATIO = 0.95
TARGET_SPEEDUP = 5.0


@dataclass(frozen=True)
class Workload:
    name: str
    xml: str
    tasks: list[dict]
    predict_units: list[Unit]
    engine_units: list[Unit]

    @property
    def engine_bodies(self) -> list[list[dict]]:
        return [[json.loads(r.body) for r in unit] for unit in self.engine_units]


def predict_body(xml: str, task: dict) -> bytes:
    return json.dumps({"tasks": [task], "label_config": xml, "project": "1.1"}).encode()


def record_workloads(engine_url: str, names: list[str], texts: list[str], env: dict, workdir: Path) -> dict[str, list[list[bytes]]]:
    """Per workload, per task: the engine requests /predict makes, recorded through a proxy (one task at a time)."""
    recorded: dict[str, list[list[bytes]]] = {}
    with RecordingProxy(engine_url) as proxy:
        with run_backend(proxy.url, workdir / "record_model_dir", workdir / "record_backend.log", env) as (url, _):
            client = httpx.Client(timeout=600)
            for name in names:
                xml = (REPO / "label_config" / f"{name}.xml").read_text()
                recorded[name] = []
                proxy.take()
                for i, text in enumerate(texts):
                    response = client.post(url + "/predict", content=predict_body(xml, task(i, text)),
                                           headers={"Content-Type": "application/json"})
                    response.raise_for_status()
                    assert response.json()["results"][0], f"{name} task {i}: no predictions"
                    recorded[name].append(proxy.take())
    return recorded


def task(i: int, text: str) -> dict:
    return {"id": i + 1, "data": {"text": text}}


def build_workload(name: str, texts: list[str], backend_url: str, engine_url: str, recorded: list[list[bytes]]) -> Workload:
    xml = (REPO / "label_config" / f"{name}.xml").read_text()
    tasks = [task(i, text) for i, text in enumerate(texts)]
    predict_units = [[Request(backend_url + "/predict", predict_body(xml, t))] for t in tasks]
    engine_units = [[Request(engine_url + "/v1/chat/completions", body) for body in bodies] for bodies in recorded]
    return Workload(name, xml, tasks, predict_units, engine_units)


def time_legs(workload: Workload, engine_url: str, backend_pid: int, concurrency: int, repeats: int) -> dict:
    """Both legs per repeat, order alternating, each from an empty prefix cache; per leg vLLM's counters and the
    CPU time of this client and of the backend (on a CPU-only host the backend's CPU is taken from the engine)."""
    legs = {"predict": workload.predict_units, "engine_direct": workload.engine_units}
    for units in legs.values():  # warm-up: grammar compilation, connection pools, the backend's config cache
        run_units(units[: 2 * concurrency], concurrency)
    seconds: dict[str, list[float]] = {name: [] for name in legs}
    counters: dict[str, list[dict]] = {name: [] for name in legs}
    cache_reset = True
    for repeat in range(repeats):
        order = list(legs) if repeat % 2 == 0 else list(reversed(legs))
        for name in order:
            cache_reset &= reset_prefix_cache(engine_url)
            before, client_cpu, backend_cpu = EngineCounters.read(engine_url), time.process_time(), cpu_seconds(backend_pid)
            seconds[name].append(run_units(legs[name], concurrency))
            used = {"client_cpu_ms_per_task": 1000 * (time.process_time() - client_cpu) / len(workload.tasks),
                    "backend_cpu_ms_per_task": 1000 * (cpu_seconds(backend_pid) - backend_cpu) / len(workload.tasks)}
            counters[name].append({**EngineCounters.read(engine_url).since(before, len(workload.tasks)),
                                   **{k: round(v, 2) for k, v in used.items()}})
    return {"seconds": seconds, "counters": counters, "prefix_cache_reset": cache_reset}


def spread(values: list[float], digits: int = 3) -> dict:
    ordered = sorted(values)
    quartiles = statistics.quantiles(ordered, n=4, method="inclusive") if len(ordered) > 1 else [ordered[0]] * 3
    return {"median": round(statistics.median(ordered), digits), "min": round(ordered[0], digits),
            "max": round(ordered[-1], digits), "q1": round(quartiles[0], digits), "q3": round(quartiles[2], digits)}


def leg_summary(seconds: list[float], tasks: int, counters: list[dict]) -> dict:
    return {
        "tasks_per_s": spread([tasks / s for s in seconds], 2),
        "seconds": [round(s, 3) for s in seconds],
        "per_task": {key: statistics.median(c[key] for c in counters if c[key] is not None)
                     if any(c[key] is not None for c in counters) else None for key in counters[0]},
    }


# --- transformers baseline --------------------------------------------------------------------------


class TransformersBaseline:
    """Label Studio's example shape: the model in the backend process, `generate` per task, one after another."""

    def __init__(self, model_dir: str, dtype: str):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(max(1, os.cpu_count() or 1))
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()

    def generate(self, body: dict) -> None:
        """The same work as one engine request: its prompt; n samples (open outputs) or one greedy answer long
        enough for the longest option (closed sets: the body of the first option-scoring request)."""
        inputs = self.tokenizer.apply_chat_template(body["messages"], add_generation_prompt=True, return_tensors="pt",
                                                    return_dict=True)
        choices = (body.get("structured_outputs") or {}).get("choice")
        if choices:
            longest = max(len(self.tokenizer(c, add_special_tokens=False)["input_ids"]) for c in choices)
            options = {"do_sample": False, "max_new_tokens": longest + 1}
        else:
            temperature = body.get("temperature", 1.0)
            options = {"do_sample": temperature > 0, "num_return_sequences": body.get("n", 1),
                       "max_new_tokens": body["max_tokens"], **({"temperature": temperature} if temperature > 0 else {})}
        with self.torch.no_grad():
            self.model.generate(**inputs, pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id, **options)

    def time_tasks(self, bodies: list[list[dict]], repeats: int) -> list[float]:
        """Seconds per pass over the tasks (each task: its sampling requests (the greedy answer and the samples),
        or for a closed set its first option-scoring request)."""
        self.generate(bodies[0][0])  # warm-up
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            for task_bodies in bodies:
                for body in _baseline_bodies(task_bodies):
                    self.generate(body)
            times.append(time.perf_counter() - started)
        return times


def _baseline_bodies(task_bodies: list[dict]) -> list[dict]:
    sampling = [b for b in task_bodies if not (b.get("structured_outputs") or {}).get("choice")]
    return sampling or task_bodies[:1]


# --- the run ----------------------------------------------------------------------------------------


def compare(workload: Workload, timed: dict, hf_times: list[float] | None, hf_tasks: int) -> dict:
    seconds, counters = timed["seconds"], timed["counters"]
    tasks = len(workload.tasks)
    ratios = [e / p for p, e in zip(seconds["predict"], seconds["engine_direct"])]
    entry = {
        "what": WORKLOADS[workload.name],
        "engine_requests_per_task": round(sum(len(u) for u in workload.engine_units) / tasks, 2),
        "predict": leg_summary(seconds["predict"], tasks, counters["predict"]),
        "engine_direct": leg_summary(seconds["engine_direct"], tasks, counters["engine_direct"]),
        "ratio_predict_over_engine": {**spread(ratios), "per_repeat": [round(r, 3) for r in ratios]},
        "prefix_cache_reset_per_leg": timed["prefix_cache_reset"],
    }
    entry["overhead_pct"] = round(100 * (1 / entry["ratio_predict_over_engine"]["median"] - 1), 1)
    entry["target_ratio"] = {"min": TARGET_RATIO, "met": entry["ratio_predict_over_engine"]["median"] >= TARGET_RATIO}
    if hf_times:
        hf_rate = spread([hf_tasks / s for s in hf_times], 3)
        speedup = entry["predict"]["tasks_per_s"]["median"] / hf_rate["median"]
        entry["transformers_generate"] = {"tasks": hf_tasks, "tasks_per_s": hf_rate, "seconds": [round(s, 2) for s in hf_times]}
        entry["speedup_vs_transformers"] = round(speedup, 2)
        entry["target_speedup"] = {"min": TARGET_SPEEDUP, "met": speedup >= TARGET_SPEEDUP}
    return entry


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model directory, or 'tiny' for a tiny random model (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--model-name", help="served model name (default: the directory's name; 'tiny' for --model tiny)")
    parser.add_argument("--engine-url", help="a running engine serving --model as --model-name (default: start one; "
                        "a shared engine's other traffic spoils the timings and its prefix cache cannot be reset)")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated: " + ", ".join(WORKLOADS))
    parser.add_argument("--tasks", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16, help="tasks in flight, both legs (the backend's 2 x 8 threads)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--transformers-tasks", type=int, default=16, help="tasks (the first ones) timed for transformers")
    parser.add_argument("--transformers-repeats", type=int, default=2)
    parser.add_argument("--transformers-dtype", default="float32", choices=("float32", "bfloat16"),
                        help="float32: the example's pipeline default, and on CPU the faster one for transformers")
    parser.add_argument("--skip-transformers", action="store_true")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    names = [n for n in args.workloads.split(",") if n]
    workdir = Path(tempfile.mkdtemp(prefix="dataengine-bench-"))
    model_dir, model_name = resolve_model(args.model, args.model_name, workdir)
    os.environ.setdefault("VLLM_SERVER_DEV_MODE", "1")  # our engine offers /reset_prefix_cache
    engine = start_engine(workdir, engine_url=args.engine_url, model=model_dir, model_name=model_name)
    env = {"DATAENGINE_SERVED_MODEL_NAME": model_name, "DATAENGINE_CANDIDATES": str(args.candidates),
           "DATAENGINE_LOG_LEVEL": "WARNING"}
    texts = sample_texts(args.tasks)
    report = {"model": model_name, "engine_started_by_bench": args.engine_url is None, "cpu_count": os.cpu_count(),
              "transformers_dtype": None if args.skip_transformers else args.transformers_dtype,
              "tasks": args.tasks, "concurrency": args.concurrency, "repeats": args.repeats,
              "candidates": args.candidates, "workloads": {}}
    try:
        recorded = record_workloads(engine.url, names, texts, env, workdir)
        baseline = None if args.skip_transformers else TransformersBaseline(model_dir, args.transformers_dtype)
        with run_backend(engine.url, workdir / "model_dir", workdir / "backend.log", env) as (backend_url, backend):
            for name in names:
                workload = build_workload(name, texts, backend_url, engine.url, recorded[name])
                timed = time_legs(workload, engine.url, backend.pid, args.concurrency, args.repeats)
                hf_tasks = min(args.transformers_tasks, len(texts))
                hf_times = baseline.time_tasks(workload.engine_bodies[:hf_tasks], args.transformers_repeats) if baseline else None
                report["workloads"][name] = compare(workload, timed, hf_times, hf_tasks)
    finally:
        engine.stop()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
