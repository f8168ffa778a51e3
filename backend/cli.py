"""Serving commands of the `dataengine` CLI: `serve`, and `versions` (what each project serves). The console
script is dataengine/cli.py, above both halves: it adds training/cli.py's commands to these."""
from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile

from pydantic import ValidationError

from .logs import configure_logging, redact_url, server_logconfig
from .settings import Settings, configuration_error, get_settings

log = logging.getLogger("dataengine")
ACCESS_LOG_FORMAT = '%(addr)s "%(method)s %(path)s %(protocol)s" %(status)d %(dt_ms).1fms'


def serve(settings: Settings) -> int:
    """Start (or attach to) the engine, then the HTTP backend; stop the engine on exit."""
    from .engine_process import EngineProcess, EngineStartError

    engine = None
    if not settings.engine_url:
        engine = EngineProcess(settings)
        try:
            log.info("starting the vLLM engine for %s (first start compiles; about a minute on CPU)", settings.model)
            os.environ["DATAENGINE_ENGINE_URL"] = engine.start()
        except EngineStartError as exc:
            log.error("%s", exc)
            return 2
    if not settings.auth_configured:
        log.warning(
            "no authentication: BASIC_AUTH_USER/BASIC_AUTH_PASS are not set, so anyone who reaches %s:%d can call "
            "/setup, /predict, /prelabel and /webhook (the compose file publishes this port); set them, or keep "
            "the port on a private network", settings.host, settings.port,
        )
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="dataengine-metrics-"))
    get_settings.cache_clear()
    worker = start_worker() if settings.run_worker else None
    try:
        run_http_server(get_settings())
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(timeout=30)
        if engine is not None:
            engine.stop()
    return 0


def start_worker() -> subprocess.Popen:
    """The RQ worker as a child process (`dataengine worker`, started by module name: backend never imports
    training)."""
    log.info("starting the RQ worker (REDIS_URL=%s)", redact_url(get_settings().redis_url))
    return subprocess.Popen([sys.executable, "-m", "dataengine", "worker", "--queues", "training,prelabel"])


def run_http_server(settings: Settings) -> None:
    """The Flask app under granian's WSGI interface: `workers` processes, `threads` Python threads each.

    granian parses HTTP in Rust. Under a burst of 50 webhooks on 2 cores its per-request overhead is a
    third of gunicorn's gthread worker (bench/webhook.py: p95 about 30 ms versus 70-80 ms in the same runs),
    and Label Studio gives a webhook 1 s. Request-size limits stay in the app (DATAENGINE_MAX_REQUEST_BYTES);
    engine calls have their own timeout (DATAENGINE_ENGINE_REQUEST_TIMEOUT)."""
    from granian import Granian
    from granian.constants import Interfaces
    from granian.log import LogLevels

    server = Granian(
        "backend.app:create_app",
        factory=True,  # each worker builds its app from the environment (create_app() reads the settings)
        address=settings.host,
        port=settings.port,
        interface=Interfaces.WSGI,
        workers=settings.workers,
        blocking_threads=settings.threads,
        # without it, one worker that misses the stop request (a Ctrl-C that lands while it still builds its app)
        # keeps `serve` waiting for it for good
        workers_kill_timeout=settings.workers_kill_timeout,
        log_level=LogLevels(settings.log_level.lower()),
        log_dictconfig=server_logconfig(settings.log_level, settings.log_format),
        log_access=True,
        log_access_format=ACCESS_LOG_FORMAT,
    )
    log.info("dataengine backend listening on http://%s:%d", settings.host, settings.port)
    server.serve()


def add_serving_commands(subparsers) -> None:
    subparsers.add_parser("serve", help="start the engine (unless DATAENGINE_ENGINE_URL is set) and the backend")
    versions = subparsers.add_parser("versions", help="list model versions per project and which one serves")
    versions.add_argument("--project")


def run_serving_command(args: argparse.Namespace) -> int | None:
    """The command's exit code; None when `args.command` is not a serving command."""
    if args.command == "serve":
        return serve(get_settings())
    if args.command == "versions":
        return print_versions(args.project)
    return None


def print_versions(project: str | None) -> int:
    from .registry import VersionReader

    settings = get_settings()
    reader = VersionReader(settings.projects_dir, settings.model_name)
    projects = [project] if project else reader.projects()
    if not projects:
        print(f"no trained versions under {settings.projects_dir}; every project serves {reader.base.name}")
    for name in projects:
        print(f"project {name}: serving {reader.current(name).name}")
        for version in reader.versions(name):
            mark = "*" if version["current"] else " "
            metrics = version.get("metrics", {})
            summary = ", ".join(f"{k}={v}" for k, v in metrics.items() if isinstance(v, (int, float)))
            print(f"  {mark} {version['name']:<28} parent={version.get('parent') or '-':<24} {summary}")
    return 0


def start_logging() -> Settings | None:
    """The settings, with logging configured from them; None (the problem printed, values left out) when the
    environment holds settings that cannot be used."""
    try:
        settings = get_settings()
    except ValidationError as exc:
        print(f"error: {configuration_error(exc)}", file=sys.stderr)
        return None
    configure_logging(settings.log_level, settings.log_format)
    return settings
