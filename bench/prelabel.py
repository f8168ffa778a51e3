"""Bulk pre-labelling throughput: `dataengine prelabel` over a whole Label Studio project versus the same
model served one task per `/predict` request (how a naive script, or per-task retrieval, drives a backend).
Two baselines: /predict calls only (the predictions are not stored: cheaper than prelabel's work), and
/predict per task plus storing its predictions one by one through the REST API (the same end state).

Everything is real and runs on this machine: the embedded SmolLM2-135M-Instruct (`--model tiny`: a tiny
random model, for a quick check), the vLLM engine, a Label Studio 1.23.2 server (its own venv,
tests/e2e/label_studio_harness.py), and the backend under granian (`dataengine serve`). Prints one JSON
object: tasks/s of both paths measured in the same run, their ratio, the time a second (resumed) run takes to
skip everything, the prelabel process's peak memory, and what the run cost: the summary's engine tokens and
engine seconds per 1,000 tasks, and the same counts as the backend's /metrics shows them afterwards
(recorded in Redis at REDIS_URL; without a Redis there, `metrics_after_prelabel` is empty).

    .venv/bin/python bench/prelabel.py [--tasks 2000] [--baseline-tasks 300] [--config sentiment]
    .venv/bin/python bench/prelabel.py --model tiny --tasks 200 --baseline-tasks 20    # quick check
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from backend.settings import Settings  # noqa: E402
from bench.common import resolve_model, sample_texts, start_engine  # noqa: E402
from tests.conftest import run_backend  # noqa: E402
from tests.e2e.label_studio_harness import LabelStudioServer, ensure_label_studio_venv  # noqa: E402

# Runs the CLI in a child process and writes its peak RSS next to its own JSON summary.
_CHILD = (
    "import json, resource, sys\n"
    "from dataengine.cli import main\n"
    "code = main(sys.argv[2:])\n"
    "open(sys.argv[1], 'w').write(json.dumps({'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))\n"
    "sys.exit(code)\n"
)


def create_project(ls: httpx.Client, xml: str, texts: list[str]) -> int:
    project = ls.post("/api/projects", json={"title": f"bench prelabel {len(texts)}", "label_config": xml})
    project.raise_for_status()
    project_id = project.json()["id"]
    imported = ls.post(f"/api/projects/{project_id}/import", json=[{"data": {"text": t}} for t in texts], timeout=600)
    imported.raise_for_status()
    assert imported.json()["task_count"] == len(texts), imported.text
    return project_id


def one_request_per_task(backend_url: str, xml: str, project_id: int, texts: list[str]) -> dict:
    """The baseline: each task its own /predict call, one after the other, on a persistent connection."""
    client = httpx.Client(timeout=300)
    start = time.perf_counter()
    for i, text in enumerate(texts):
        body = {"tasks": [{"id": 10_000_000 + i, "data": {"text": text}}], "label_config": xml, "project": f"{project_id}.0"}
        response = client.post(f"{backend_url}/predict", json=body)
        response.raise_for_status()
    seconds = time.perf_counter() - start
    return {"tasks": len(texts), "seconds": round(seconds, 2), "tasks_per_s": round(len(texts) / seconds, 2)}


def one_request_per_task_stored(backend_url: str, xml: str, project_id: int, ls, tasks: list[dict]) -> dict:
    """The same end state as prelabel: each task its own /predict call, then its predictions stored one by one."""
    client = httpx.Client(timeout=300)
    start = time.perf_counter()
    for task in tasks:
        body = {"tasks": [{"id": task["id"], "data": task["data"]}], "label_config": xml, "project": f"{project_id}.0"}
        response = client.post(f"{backend_url}/predict", json=body)
        response.raise_for_status()
        for prediction in response.json()["results"][0]:
            stored = ls.post("/api/predictions", json={"task": task["id"], **prediction})
            stored.raise_for_status()
    seconds = time.perf_counter() - start
    return {"tasks": len(tasks), "seconds": round(seconds, 2), "tasks_per_s": round(len(tasks) / seconds, 2)}


def engine_usage_metrics(backend_url: str, project: str) -> dict[str, float]:
    """The backend's /metrics series of the project's pre-labelling cost (dataengine_engine_*{source="prelabel"})."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{backend_url}/metrics", timeout=30).text
    return {
        f"{s.name}{{model_version=\"{s.labels['model_version']}\"}}": s.value
        for family in text_string_to_metric_families(text)
        if family.name.startswith("dataengine_engine_")
        for s in family.samples
        if s.labels.get("project") == project and s.labels.get("source") == "prelabel" and s.name.endswith("_total")
    }


def run_prelabel(env: dict[str, str], project_id: int, workdir: Path, *args: str) -> dict:
    rss_file = workdir / f"rss-{time.time_ns()}.json"
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(rss_file), "prelabel", "--project", str(project_id), *args],
        cwd=REPO, env=env, capture_output=True, text=True,
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"prelabel failed ({done.returncode}):\n{done.stderr[-3000:]}")
    summary = json.loads(done.stdout)
    summary["wall_s"] = round(wall, 2)  # includes the child's start-up (imports) and the final summary
    summary.update(json.loads(rss_file.read_text()))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--baseline-tasks", type=int, default=300, help="tasks sent one per /predict (a sample: it is slow)")
    parser.add_argument("--config", default="sentiment", help="a shipped answer config from label_config/")
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--model", help="model directory, or 'tiny' for a tiny random model (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--engine-url", help="use a running engine serving --model as --model-name")
    parser.add_argument("--model-name", help="served model name (default: the directory's name; 'tiny' for --model tiny)")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="dataengine-bench-prelabel-"))
    model_dir, model_name = resolve_model(args.model, args.model_name, workdir)
    engine = start_engine(workdir, engine_url=args.engine_url, model=model_dir, model_name=model_name)
    engine_url = engine.url
    ensure_label_studio_venv()
    label_studio = LabelStudioServer(data_dir=workdir / "label-studio").start()
    xml = (REPO / "label_config" / f"{args.config}.xml").read_text()
    env = {
        **os.environ, "DATAENGINE_ENGINE_URL": engine_url, "DATAENGINE_SERVED_MODEL_NAME": model_name,
        "DATAENGINE_CANDIDATES": str(args.candidates), "LABEL_STUDIO_URL": label_studio.url,
        "LABEL_STUDIO_API_KEY": label_studio.token, "MODEL_DIR": str(workdir / "model_dir"), "DATAENGINE_LOG_LEVEL": "WARNING",
    }
    backend_env = {k: env[k] for k in ("DATAENGINE_CANDIDATES", "DATAENGINE_LOG_LEVEL", "LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY",
                                       "DATAENGINE_SERVED_MODEL_NAME")}
    backend = run_backend(engine_url, workdir / "model_dir", workdir / "backend.log", backend_env)
    backend_url, _ = backend.__enter__()
    try:
        with label_studio.client() as ls:
            texts = sample_texts(args.tasks)
            project_id = create_project(ls, xml, texts)
            one_request_per_task(backend_url, xml, project_id, texts[:8])  # warm-up: grammar, connections
            baseline = one_request_per_task(backend_url, xml, project_id, texts[: args.baseline_tasks])
            # equal work: a second project, so that prelabel below still finds every task of the first one to do
            stored_project = create_project(ls, xml, texts[: args.baseline_tasks])
            sample = ls.get("/api/tasks", params={"project": stored_project, "page_size": args.baseline_tasks}).json()["tasks"]
            baseline_stored = one_request_per_task_stored(backend_url, xml, stored_project, ls, sample)
            prelabel = run_prelabel(env, project_id, workdir)
            resumed = run_prelabel(env, project_id, workdir)
            stored = ls.get(f"/api/projects/{project_id}").json().get("total_predictions_number")
            cost_in_metrics = engine_usage_metrics(backend_url, str(project_id))
        prelabel_rate = prelabel["done"] / prelabel["seconds"]
        report = {
            "model": model_name,
            "config": args.config,
            "tasks": args.tasks,
            "candidates": args.candidates,
            "cpu_count": os.cpu_count(),
            "prelabel": {k: prelabel[k] for k in ("done", "failed", "predictions", "seconds", "wall_s", "tasks_per_s", "upload_seconds", "peak_rss_mb")},
            "prelabel_settings": {"concurrency": Settings().prelabel_concurrency, "batch_size": Settings().prelabel_batch_size},
            "one_request_per_task_predict": baseline,
            "speedup_vs_one_request_per_task": round(prelabel_rate / baseline["tasks_per_s"], 2),
            "one_request_per_task_predict_and_store": baseline_stored,
            "speedup_vs_one_request_per_task_stored": round(prelabel_rate / baseline_stored["tasks_per_s"], 2),
            "resume": {k: resumed[k] for k in ("seen", "skipped", "done", "seconds", "peak_rss_mb")},
            "usage": prelabel["usage"],  # the run's engine tokens and seconds, and per 1,000 tasks at its rate
            "metrics_after_prelabel": cost_in_metrics,
            "stored_predictions": stored,
        }
    finally:
        backend.__exit__(None, None, None)
        label_studio.stop()
        engine.stop()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
