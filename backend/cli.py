"""Serving commands of the `dataengine` CLI (`serve`). training/cli.py adds the training commands and is
the console-script entry point, since only the training side may import both packages."""
from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile

from .logs import configure_logging, gunicorn_logconfig
from .settings import Settings, get_settings

log = logging.getLogger("dataengine")


def serve(settings: Settings) -> int:
    """Start (or attach to) the engine, then the HTTP backend under gunicorn; stop the engine on exit."""
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
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="dataengine-metrics-"))
    get_settings.cache_clear()
    worker = start_worker() if settings.run_worker else None
    try:
        run_gunicorn(get_settings())
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(timeout=30)
        if engine is not None:
            engine.stop()
    return 0


def start_worker() -> subprocess.Popen:
    """The RQ worker as a child process (started by module name: backend never imports training)."""
    log.info("starting the RQ worker (REDIS_URL=%s)", get_settings().redis_url)
    return subprocess.Popen([sys.executable, "-m", "training.cli", "worker"])


def run_gunicorn(settings: Settings) -> None:
    from gunicorn.app.base import BaseApplication

    from .app import create_app

    class _Application(BaseApplication):
        def load_config(self):
            self.cfg.set("bind", f"{settings.host}:{settings.port}")
            self.cfg.set("workers", settings.workers)
            self.cfg.set("threads", settings.threads)
            self.cfg.set("worker_class", "gthread")
            self.cfg.set("timeout", int(settings.engine_request_timeout) + 30)
            self.cfg.set("loglevel", settings.log_level.lower())
            self.cfg.set("accesslog", "-")
            logconfig = gunicorn_logconfig(settings.log_level, settings.log_format)
            if logconfig:
                self.cfg.set("logconfig_dict", logconfig)

        def load(self):
            return create_app(get_settings())

    log.info("dataengine backend listening on http://%s:%d", settings.host, settings.port)
    _Application().run()


def add_serving_commands(subparsers) -> None:
    subparsers.add_parser("serve", help="start the engine (unless DATAENGINE_ENGINE_URL is set) and the backend")


def run_serving_command(args: argparse.Namespace) -> int | None:
    if args.command == "serve":
        return serve(get_settings())
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dataengine")
    add_serving_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    configure_logging(get_settings().log_level, get_settings().log_format)
    return run_serving_command(args) or 0


if __name__ == "__main__":
    sys.exit(main())
