"""Pre-labelling throughput of two RQ workers versus one, in the same run (issue 17, section 3).

Each arm pre-labels `--projects` fresh Label Studio projects of `--tasks` tasks each, one prelabel job per project,
all enqueued at once on the prelabel queue (as POST /prelabel does) and worked by real `dataengine worker --queues
prelabel` processes: one in the first arm, two in the second. Its time runs from the enqueue to the last job's end
(the workers are up and registered before). Arms alternate, `--repeats` times, and the report gives each arm's
tasks/s, the ratio per repeat and the median ratio.

Everything is real and on this machine: the vLLM engine (a tiny random model unless --engine-url / --model),
Label Studio 1.23.2 (its own venv, tests/e2e/label_studio_harness.py), Redis (REDIS_URL, or --redis-url). What two
workers can gain depends on what is left idle by one: a worker keeps DATAENGINE_PRELABEL_CONCURRENCY tasks in
flight at the engine and uploads in batches, so on a host whose cores the engine and Label Studio already fill,
the ratio stays near 1.

    .venv/bin/python bench/workers.py [--projects 4] [--tasks 100] [--repeats 2] [--engine-url URL]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from redis import Redis  # noqa: E402
from rq import Worker  # noqa: E402
from rq.job import Job  # noqa: E402

from backend.protocol import PrelabelRequest  # noqa: E402
from backend.queue import FeedbackQueue, enqueue_prelabel  # noqa: E402
from bench.common import sample_texts, start_engine  # noqa: E402
from bench.prelabel import create_project  # noqa: E402
from tests.conftest import stop_process  # noqa: E402
from tests.e2e.label_studio_harness import LabelStudioServer, ensure_label_studio_venv  # noqa: E402

DONE = {"finished", "failed", "stopped", "canceled"}


def start_workers(count: int, env: dict[str, str], workdir: Path, queue: FeedbackQueue) -> list[subprocess.Popen]:
    workers = []
    for index in range(count):
        with open(workdir / f"worker-{time.time_ns()}-{index}.log", "wb") as out:
            workers.append(subprocess.Popen([sys.executable, "-m", "dataengine", "worker", "--queues", "prelabel"],
                                            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + 120
    while Worker.count(connection=queue.redis, queue=queue.prelabel) < count:
        if time.monotonic() > deadline:
            raise SystemExit(f"{count} workers did not register in 120 s (logs in {workdir})")
        time.sleep(0.2)
    return workers


def run_arm(workers: int, projects: list[int], tasks: int, env: dict[str, str], workdir: Path, queue: FeedbackQueue) -> dict:
    processes = start_workers(workers, env, workdir, queue)
    try:
        start = time.perf_counter()
        ids = [enqueue_prelabel(queue, PrelabelRequest(str(p), reason="bench"), 3600) for p in projects]
        while True:
            jobs = Job.fetch_many(ids, connection=queue.redis)
            if all(job.get_status(refresh=False).value in DONE for job in jobs):
                break
            time.sleep(0.1)
        seconds = time.perf_counter() - start
    finally:
        for process in processes:
            stop_process(process)
    failed = [job.id for job in jobs if job.get_status(refresh=False).value != "finished"]
    if failed:
        raise SystemExit(f"prelabel jobs failed: {failed} (worker logs in {workdir})")
    done = sum(job.return_value()["done"] for job in jobs)
    if done != len(projects) * tasks:
        raise SystemExit(f"{done} tasks pre-labelled, {len(projects) * tasks} expected")
    return {"workers": workers, "jobs": len(ids), "tasks": done, "seconds": round(seconds, 2),
            "tasks_per_s": round(done / seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--projects", type=int, default=4, help="projects (= prelabel jobs) per arm")
    parser.add_argument("--tasks", type=int, default=100, help="tasks per project")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--config", default="sentiment", help="a shipped answer config from label_config/")
    parser.add_argument("--model", help="model directory (default: build a tiny random one)")
    parser.add_argument("--engine-url", help="use a running engine serving --model as --model-name")
    parser.add_argument("--model-name", default="tiny")
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="dataengine-bench-workers-"))
    engine = start_engine(workdir, engine_url=args.engine_url, model=args.model, model_name=args.model_name)
    ensure_label_studio_venv()
    label_studio = LabelStudioServer(data_dir=workdir / "label-studio").start()
    queue_name = f"bench-workers-{os.getpid()}"  # queues of this run only
    env = {
        **os.environ, "REDIS_URL": args.redis_url, "DATAENGINE_QUEUE_NAME": queue_name, "DATAENGINE_ENGINE_URL": engine.url,
        "DATAENGINE_SERVED_MODEL_NAME": args.model_name, "LABEL_STUDIO_URL": label_studio.url,
        "LABEL_STUDIO_API_KEY": label_studio.token, "MODEL_DIR": str(workdir / "model_dir"),
        "DATAENGINE_RECONCILE_INTERVAL": "0", "DATAENGINE_LOG_LEVEL": "WARNING",
    }
    queue = FeedbackQueue(args.redis_url, train_every=50, job_timeout=3600, queue_name=queue_name)
    xml = (REPO / "label_config" / f"{args.config}.xml").read_text()
    texts = sample_texts(args.tasks)
    arms: dict[int, list[dict]] = {1: [], 2: []}
    try:
        with label_studio.client() as ls:
            warm = [create_project(ls, xml, texts[:20])]
            run_arm(1, warm, 20, env, workdir, queue)  # engine grammar cache, Label Studio's first imports
            for _ in range(args.repeats):
                for workers in (1, 2):
                    projects = [create_project(ls, xml, texts) for _ in range(args.projects)]
                    arms[workers].append(run_arm(workers, projects, args.tasks, env, workdir, queue))
    finally:
        label_studio.stop()
        engine.stop()
        Redis.from_url(args.redis_url).delete(*[f"rq:queue:{q.name}" for q in queue.queues.values()])
    ratios = [two["tasks_per_s"] / one["tasks_per_s"] for one, two in zip(arms[1], arms[2])]
    print(json.dumps({
        "config": args.config, "projects_per_arm": args.projects, "tasks_per_project": args.tasks,
        "cpu_count": os.cpu_count(), "one_worker": arms[1], "two_workers": arms[2],
        "ratio_two_to_one": [round(r, 2) for r in ratios], "median_ratio": round(statistics.median(ratios), 2),
    }, indent=2))


if __name__ == "__main__":
    main()
