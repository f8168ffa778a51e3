"""Read side of the model registry: which model version serves a project.

The training side (training/registry.py) writes `MODEL_DIR/projects/<id>/current.json` atomically on
promotion; the backend only reads it. Without a promoted version the base model serves.

`MODEL_DIR/adapters/<engine name>/` holds every published adapter under the name requests give it: the directory
vLLM's `lora_filesystem_resolver` plugin reads (`VLLM_LORA_RESOLVER_CACHE_DIR`), so any engine replica loads a
version's adapter the first time a request names it.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CURRENT_FILE = "current.json"
VERSIONS_DIR = "versions"
DECISIONS_FILE = "decisions.jsonl"
ADAPTERS_DIR = "adapters"  # next to MODEL_DIR/projects
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServingVersion:
    name: str  # the model_version Label Studio sees
    adapter: str | None = None  # LoRA adapter name in the engine; None = base model
    adapter_path: str | None = None
    reward_model_path: str | None = None
    rm_weight: float | None = None  # the reward model's share in the served score; None: DATAENGINE_RM_WEIGHT
    # closed label sets: option log-probabilities are divided by this before the softmax (fitted by the gate on
    # held-out tasks: a fine-tuned adapter is overconfident); None: 1
    option_temperature: float | None = None

    @classmethod
    def from_current(cls, data: dict[str, Any]) -> "ServingVersion":
        """From `current.json` (what training/registry.py writes on promotion)."""
        return cls(str(data["version"]), data.get("adapter"), data.get("adapter_path"), data.get("reward_model_path"),
                   data.get("rm_weight"), data.get("option_temperature"))

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "ServingVersion":
        """From a version's `version.json`: its adapter only when one was published."""
        adapter_path = record.get("adapter_path")
        return cls(record["name"], record.get("adapter_name") if adapter_path else None, adapter_path,
                   record.get("reward_model_path"), record.get("rm_weight"), record.get("option_temperature"))


def base_version(model_name: str) -> ServingVersion:
    return ServingVersion(name=f"{model_name}-base")


def read_version_record(path: Path) -> dict[str, Any] | None:
    """A version's record; None when it is missing, or corrupt (logged)."""
    record_path = Path(path) / "version.json"
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError) as exc:
        log.error("corrupt version record %s left out: %s", record_path, exc)
        return None
    return record if isinstance(record, dict) and isinstance(record.get("name"), str) else None


class VersionReader:
    def __init__(self, projects_dir: Path, model_name: str):
        self.projects_dir = Path(projects_dir)
        self.base = base_version(model_name)

    def current(self, project: str) -> ServingVersion:
        path = self.projects_dir / project / CURRENT_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return ServingVersion.from_current(data)
        except FileNotFoundError:
            return self.base
        except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as exc:
            fallback = self._last_promoted(project)
            log.error("%s is corrupt (%s); serving %s, the last promoted version (the next promotion or "
                      "`dataengine rollback` rewrites it)", path, exc, fallback.name)
            return fallback

    def _last_promoted(self, project: str) -> ServingVersion:
        """From decisions.jsonl: the newest promoted version whose record is intact; else the base model."""
        root = self.projects_dir / project
        try:
            lines = (root / DECISIONS_FILE).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            return self.base
        for line in reversed(lines):
            try:
                decision = json.loads(line)
            except ValueError:
                continue
            if not isinstance(decision, dict) or decision.get("decision") not in ("promoted", "rollback"):
                continue
            if decision.get("version") == "base" and decision["decision"] == "rollback":
                return self.base
            record = read_version_record(root / VERSIONS_DIR / str(decision.get("version")))
            if record is not None:
                return ServingVersion.from_record(record)
        return self.base

    def versions(self, project: str) -> list[dict[str, Any]]:
        """Every published version of a project, oldest first, with `current` marking the served one."""
        current = self.current(project).name
        root = self.projects_dir / project / VERSIONS_DIR
        records = [read_version_record(p) for p in sorted(root.glob("*")) if p.is_dir() and not p.name.startswith(".")]
        records = sorted((r for r in records if r), key=lambda r: r.get("created_at", 0))
        return [{**r, "current": r["name"] == current} for r in records]

    def projects(self) -> list[str]:
        return sorted(p.name for p in self.projects_dir.glob("*") if (p / VERSIONS_DIR).is_dir())
