"""A round's training on every GPU of a host: `accelerate launch` as a child process of the RQ job.

DATAENGINE_TRAIN_PROCESSES > 1 (or an accelerate config file in DATAENGINE_ACCELERATE_CONFIG) makes
`rounds._train_version` call `train_launched` instead of training in the work horse. That runs

    python -m accelerate.commands.launch --multi_gpu --num_processes N ... -m training.launch <spec.json>

accelerate starts N processes (torchrun underneath); in each, `main` rebuilds the round's inputs from the spec (the
snapshot directory for the pairs and SFT examples, the export the parent wrote for tasks, config and instructions)
and runs `rounds.train_models`, whose TRL trainers train data-parallel: DDP over NCCL on GPUs, gloo on CPU, or
FSDP / DeepSpeed ZeRO as the config file says. Each trainer keeps its global batch (`distributed.per_device_batch`),
so a round takes the same optimizer steps on any number of processes. The main process writes the files into the
staging directory, exactly as one process would, and the metrics to `result.json`. The RQ job, meanwhile, forwards
the main process's progress lines to `job.meta`, and a failure raises in the job with the failing process's own
message. The gate, the promotion and the engine calls stay in the RQ job.

Chosen over wrapping the trainers ourselves: accelerate (already a TRL dependency) owns process start, rendezvous,
device placement and the FSDP/DeepSpeed plumbing; this module only passes the inputs in and the results out.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from backend.settings import Settings

from .distributed import is_main_process, world_size
from .export import ProjectExport
from .preferences import AgreementStats, DerivedData
from .rounds import RoundInputs, project_kind, train_models
from .snapshot import read_pairs, read_sft, snapshot_at

log = logging.getLogger(__name__)
PROGRESS_PREFIX = "@@dataengine-progress "
SECRETS = {"label_studio_api_key", "basic_auth_user", "basic_auth_pass", "webhook_secret", "redis_url"}
RESULT_FILE = "result.json"
OUTPUT_TAIL = 40


class LaunchError(RuntimeError):
    """The launched training failed; the message is the failing process's own."""


# --- the RQ job's side -----------------------------------------------------------------------------


def train_launched(inputs: RoundInputs, staged: Path, settings: Settings, progress: Callable[..., None]) -> dict[str, Any]:
    """`rounds.train_models` on `settings.train_processes` processes; its metrics, plus `launch`: the processes and
    the kind of distribution (MULTI_GPU, MULTI_CPU, FSDP, DEEPSPEED) the trainers ran with."""
    with tempfile.TemporaryDirectory(prefix="dataengine-launch-") as scratch:
        work = Path(scratch)
        spec = write_spec(work, inputs, staged, settings)
        command = launch_command(settings, spec)
        log.info("training on %d processes: %s", settings.train_processes, " ".join(command))
        returncode, tail = _run(command, progress)
        if returncode != 0:
            raise LaunchError(f"training on {settings.train_processes} processes failed (exit {returncode}): "
                              f"{_failure(work, tail)}")
        result = json.loads((work / RESULT_FILE).read_text(encoding="utf-8"))
    return {**result["metrics"], "launch": {**result["launch"], "accelerate_config": settings.accelerate_config or None}}


def write_spec(work: Path, inputs: RoundInputs, staged: Path, settings: Settings) -> Path:
    """What the launched processes need, as files: the snapshot's path, the export, the staging directory, the
    settings (secrets left out: the processes train, they never call Label Studio or Redis)."""
    export = work / "export.json"
    export.write_text(json.dumps(asdict(inputs.exported)), encoding="utf-8")
    spec = {
        "project": inputs.project,
        "snapshot": str(inputs.snapshot.path),
        "export": str(export),
        "staged": str(staged),
        "work": str(work),
        "parent_pid": os.getpid(),
        "settings": settings.model_dump(mode="json", exclude=SECRETS),
    }
    path = work / "spec.json"
    path.write_text(json.dumps(spec), encoding="utf-8")
    return path


def launch_command(settings: Settings, spec: Path) -> list[str]:
    import torch

    processes = settings.train_processes
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
               "--num_machines", "1", "--main_process_port", str(_free_port())]
    if settings.accelerate_config:
        command += ["--config_file", settings.accelerate_config]  # FSDP, DeepSpeed ZeRO ...: the file decides
    else:
        command += ["--multi_gpu"] if processes > 1 else []  # DDP (torchrun); on a CPU host over gloo
        command += ["--mixed_precision", "no", "--dynamo_backend", "no"]  # the trainers set their own precision
    if not torch.cuda.is_available():
        command += ["--num_cpu_threads_per_process", str(max(1, (os.cpu_count() or 1) // processes))]
    return command + ["-m", "training.launch", str(spec)]


def _run(command: list[str], progress: Callable[..., None]) -> tuple[int, list[str]]:
    """Run the launcher; progress lines go to `progress`, the rest is logged and its tail kept for errors. An
    exception here (RQ's job timeout) ends the whole process group."""
    paths = [_source_root(), *filter(None, [os.environ.get("PYTHONPATH")])]  # this checkout's training package
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "TOKENIZERS_PARALLELISM": "false"}
    tail: deque[str] = deque(maxlen=OUTPUT_TAIL)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                               start_new_session=True)
    try:
        for line in process.stdout:
            event = _progress_event(line)
            if event is not None:
                progress(event.pop("stage"), **event)
            else:
                tail.append(line.rstrip())
                log.debug("training: %s", line.rstrip())
        return process.wait(), list(tail)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _progress_event(line: str) -> dict[str, Any] | None:
    if not line.startswith(PROGRESS_PREFIX):
        return None
    try:
        event = json.loads(line[len(PROGRESS_PREFIX):])
    except ValueError:
        return None
    return event if isinstance(event, dict) and isinstance(event.get("stage"), str) else None


def _failure(work: Path, tail: list[str]) -> str:
    """The first failing process's own error, else the end of the launcher's output."""
    for path in sorted(work.glob("error-*.json")):
        try:
            return json.loads(path.read_text(encoding="utf-8"))["error"]
        except (ValueError, KeyError, OSError):
            continue
    return "\n".join(tail[-10:]) or "no output"


def _free_port() -> int:
    """The rendezvous port: two rounds on one host must not share torchrun's default 29500."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _source_root() -> str:
    return str(Path(__file__).resolve().parents[1])


# --- each launched process -------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    work = Path(spec["work"])
    _exit_with(spec["parent_pid"])
    try:
        settings = Settings(**spec["settings"])
        inputs = read_inputs(spec)
        metrics = train_models(inputs, project_kind(inputs.exported.label_config, settings), Path(spec["staged"]),
                               settings, report)
    except BaseException as exc:
        rank = os.environ.get("RANK", "0")
        (work / f"error-{rank}.json").write_text(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), encoding="utf-8")
        raise
    if is_main_process():
        launch = {"processes": world_size(), "distributed_type": _distributed_type()}  # what the trainers ran on
        temp = work / f"{RESULT_FILE}.tmp"
        temp.write_text(json.dumps({"metrics": metrics, "launch": launch}, default=str), encoding="utf-8")
        temp.rename(work / RESULT_FILE)
    return 0


def _distributed_type() -> str:
    from accelerate import PartialState

    return str(PartialState().distributed_type.value)


def read_inputs(spec: dict[str, Any]) -> RoundInputs:
    """The round's inputs as the RQ job had them: pairs and SFT examples from the snapshot it wrote."""
    snapshot = snapshot_at(Path(spec["snapshot"]))
    exported = ProjectExport(**json.loads(Path(spec["export"]).read_text(encoding="utf-8")))
    derived = DerivedData(read_pairs(snapshot), read_sft(snapshot), AgreementStats(), snapshot.counts)
    return RoundInputs(spec["project"], exported, derived, snapshot)


def report(stage: str, **detail: Any) -> None:
    """Progress for the RQ job (which reads this process's output): the main process speaks for all."""
    if is_main_process():
        print(PROGRESS_PREFIX + json.dumps({"stage": stage, **detail}, default=str), flush=True)


def _exit_with(parent_pid: int) -> None:
    """A SIGKILLed work horse leaves no training behind (its retry would reuse the staging directory)."""
    def watch() -> None:
        while True:
            time.sleep(2.0)
            try:
                os.kill(parent_pid, 0)
            except ProcessLookupError:
                os._exit(3)
            except PermissionError:
                pass

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
