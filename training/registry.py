"""Write side of the model registry (the backend only reads it: backend/registry.py).

Layout under MODEL_DIR/projects/<id>/:
  versions/<name>/version.json   what the version is: adapter, reward model, metrics, snapshot hash, parent
  versions/<name>/adapter/       LoRA adapter (policy), optional
  versions/<name>/reward_model/  reward model, optional
  current.json                   the promoted version; replaced atomically (write + rename)
  decisions.jsonl                every promotion / rejection / rollback, appended
A crash at any point leaves current.json either the old or the new version, never a mix.

Every published adapter is also entered under its engine name in MODEL_DIR/adapters/<adapter_name>/ (hard links to
the version's files, one rename), where vLLM's `lora_filesystem_resolver` finds it on every engine replica that
mounts MODEL_DIR: a request naming the adapter is all it takes to serve it (README, "Scale out").
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from backend.projects import atomic_write_json
from backend.registry import ADAPTERS_DIR, CURRENT_FILE, VERSIONS_DIR, ServingVersion, read_version_record

ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class VersionRecord:
    name: str
    project: str
    parent: str | None
    created_at: float
    snapshot_hash: str | None = None
    adapter_path: str | None = None
    adapter_name: str | None = None  # name in the engine: version + content hash, never reused for other weights
    reward_model_path: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    rm_weight: float | None = None  # the reward model's share in the served score, chosen by the gate
    option_temperature: float | None = None  # closed label sets: the gate's fit (backend.registry.ServingVersion)

    def serving(self) -> ServingVersion:
        return ServingVersion.from_record(asdict(self))


def _content_hash(directory: Path) -> str:
    """Short hash of a directory's files. vLLM keeps an adapter NAME bound to the path it first loaded, so a
    name must never be reused for other weights (a vanished path even kills its engine core)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(path.relative_to(directory).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:10]


def adapter_name_for(name: str, directory: Path) -> str:
    """The engine's name for an adapter: the version's name + a hash of the adapter's files."""
    return f"{name}-{_content_hash(Path(directory))}"


def publish_adapter(adapters_dir: Path, name: str, adapter_dir: Path, engine_model: str | None = None) -> Path:
    """Enter an adapter as `adapters_dir/<name>/`, where vLLM's filesystem resolver looks for the name a request
    gives. Its files are hard links to `adapter_dir`'s (copies across filesystems), so deleting the version
    never leaves an engine a dangling entry. The resolver only takes an adapter whose `base_model_name_or_path` is
    the engine's own `--model`: `engine_model` (the engine's answer, `EngineClient.served_model_path`) is written
    into the entry's config; None keeps the trained one. Idempotent: names are content hashes, so an existing
    entry already holds these weights."""
    adapters_dir = Path(adapters_dir)
    entry = adapters_dir / name
    if entry.is_dir():
        return entry
    adapters_dir.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=adapters_dir))
    try:
        for source in sorted(p for p in Path(adapter_dir).iterdir() if p.is_file()):
            if source.name == ADAPTER_CONFIG and engine_model is not None:
                config = json.loads(source.read_text(encoding="utf-8"))
                (temp / ADAPTER_CONFIG).write_text(json.dumps({**config, "base_model_name_or_path": engine_model}, indent=2))
            else:
                _link_or_copy(source, temp / source.name)
        os.chmod(temp, 0o755)  # mkdtemp's 0700: an engine running as another user must read it
        os.rename(temp, entry)
    except OSError:
        shutil.rmtree(temp, ignore_errors=True)
        if not entry.is_dir():  # else another process published the same name first
            raise
    return entry


def unpublish_adapter(adapters_dir: Path, name: str) -> None:
    """Remove an entry no request will name again (a discarded version, a stage the gate has measured)."""
    shutil.rmtree(Path(adapters_dir) / name, ignore_errors=True)


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(source, target)


class Registry:
    def __init__(self, projects_dir: Path, project: str, model_name: str):
        self.project = project
        self.model_name = model_name
        self.root = Path(projects_dir) / project
        self.adapters_dir = Path(projects_dir).parent / ADAPTERS_DIR  # MODEL_DIR/projects -> MODEL_DIR/adapters

    # --- versions ----------------------------------------------------------------------------------
    def next_version_name(self) -> str:
        existing = [p.name for p in (self.root / VERSIONS_DIR).glob("*") if p.is_dir() and not p.name.startswith(".")]
        return f"{self.model_name}-p{self.project}-v{len(existing) + 1}"

    def staging_dir(self, name: str) -> Path:
        """Where a job writes a version's files before `create_version` publishes it."""
        path = self.root / VERSIONS_DIR / f".staging-{name}"
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def create_version(self, name: str, staged: Path, *, parent: str | None, snapshot_hash: str | None,
                       metrics: dict[str, Any], engine_model: str | None = None) -> VersionRecord:
        """Publish a staged version directory under its final name (one rename); its adapter, if any, is entered
        for the engines first (`publish_adapter`, `engine_model` as there)."""
        final = self.version_dir(name)
        has_adapter = (staged / "adapter").exists()
        record = VersionRecord(
            name=name,
            project=self.project,
            parent=parent,
            created_at=time.time(),
            snapshot_hash=snapshot_hash,
            adapter_path=str(final / "adapter") if has_adapter else None,
            adapter_name=adapter_name_for(name, staged / "adapter") if has_adapter else None,
            reward_model_path=str(final / "reward_model") if (staged / "reward_model").exists() else None,
            metrics=metrics,
        )
        atomic_write_json(staged / "version.json", asdict(record))
        if record.adapter_name:
            publish_adapter(self.adapters_dir, record.adapter_name, staged / "adapter", engine_model)
        staged.rename(final)
        return record

    def version_dir(self, name: str) -> Path:
        return self.root / VERSIONS_DIR / name

    def update(self, record: VersionRecord) -> None:
        """Rewrite a published version's record (what the gate learned about it: its blend, its evaluation)."""
        atomic_write_json(self.version_dir(record.name) / "version.json", asdict(record))

    def discard(self, record: VersionRecord) -> None:
        """Remove a version that was never promoted (its round failed after publishing it): a retried round must
        not leave one orphan version, reward models and all, per attempt."""
        if record.name != self.current_name():
            shutil.rmtree(self.version_dir(record.name), ignore_errors=True)
            if record.adapter_name:
                unpublish_adapter(self.adapters_dir, record.adapter_name)

    def get(self, name: str) -> VersionRecord | None:
        data = read_version_record(self.version_dir(name))
        return VersionRecord(**data) if data else None

    def current_name(self) -> str | None:
        try:
            return json.loads((self.root / CURRENT_FILE).read_text())["version"]
        except FileNotFoundError:
            return None

    # --- promotion ---------------------------------------------------------------------------------
    def promote(self, record: VersionRecord, reason: str, evaluation: dict[str, Any] | None = None) -> None:
        serving = record.serving()
        atomic_write_json(
            self.root / CURRENT_FILE,
            {
                "version": serving.name,
                "adapter": serving.adapter,
                "adapter_path": serving.adapter_path,
                "reward_model_path": serving.reward_model_path,
                "rm_weight": serving.rm_weight,
                "option_temperature": serving.option_temperature,
                "promoted_at": time.time(),
            },
        )
        self.record_decision("promoted", record.name, reason, evaluation)

    def reject(self, record: VersionRecord, reason: str, evaluation: dict[str, Any] | None = None) -> None:
        self.record_decision("rejected", record.name, reason, evaluation)

    def rollback(self, to: str | None = None) -> str:
        """Serve `to` (a version name, or "base"), or the version promoted before the current one."""
        target = to or self._previous_promoted()
        if target in (None, "base"):
            (self.root / CURRENT_FILE).unlink(missing_ok=True)
            self.record_decision("rollback", "base", f"rollback from {self.current_name()}")
            return f"{self.model_name}-base"
        record = self.get(target)
        if record is None:
            raise ValueError(f"project {self.project} has no version {target!r}")
        self.promote(record, reason="rollback")
        return record.name

    def _previous_promoted(self) -> str | None:
        current = self.current_name()
        promoted = [d["version"] for d in self.decisions() if d["decision"] == "promoted" and d["version"] != current]
        return promoted[-1] if promoted else None

    # --- decisions ---------------------------------------------------------------------------------
    def record_decision(self, decision: str, version: str, reason: str, evaluation: dict[str, Any] | None = None) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        entry = {"at": time.time(), "decision": decision, "version": version, "reason": reason, "evaluation": evaluation}
        with open(self.root / "decisions.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry, sort_keys=True) + "\n")

    def decisions(self) -> list[dict[str, Any]]:
        path = self.root / "decisions.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
