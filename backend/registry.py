"""Read side of the model registry: which model version serves a project.

The training side (training/registry.py) writes `MODEL_DIR/projects/<id>/current.json` atomically on
promotion; the backend only reads it. Without a promoted version the base model serves.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CURRENT_FILE = "current.json"
VERSIONS_DIR = "versions"


@dataclass(frozen=True)
class ServingVersion:
    name: str  # the model_version Label Studio sees
    adapter: str | None = None  # LoRA adapter name in the engine; None = base model
    adapter_path: str | None = None
    reward_model_path: str | None = None
    rm_weight: float | None = None  # the reward model's share in the served score; None: DATAENGINE_RM_WEIGHT


def base_version(model_name: str) -> ServingVersion:
    return ServingVersion(name=f"{model_name}-base")


def read_version_record(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(path) / "version.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


class VersionReader:
    def __init__(self, projects_dir: Path, model_name: str):
        self.projects_dir = Path(projects_dir)
        self.base = base_version(model_name)

    def current(self, project: str) -> ServingVersion:
        path = self.projects_dir / project / CURRENT_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return self.base
        return ServingVersion(
            name=data["version"],
            adapter=data.get("adapter"),
            adapter_path=data.get("adapter_path"),
            reward_model_path=data.get("reward_model_path"),
            rm_weight=data.get("rm_weight"),
        )

    def versions(self, project: str) -> list[dict[str, Any]]:
        """Every published version of a project, oldest first, with `current` marking the served one."""
        current = self.current(project).name
        root = self.projects_dir / project / VERSIONS_DIR
        records = [read_version_record(p) for p in sorted(root.glob("*")) if p.is_dir() and not p.name.startswith(".")]
        records = sorted((r for r in records if r), key=lambda r: r.get("created_at", 0))
        return [{**r, "current": r["name"] == current} for r in records]

    def projects(self) -> list[str]:
        return sorted(p.name for p in self.projects_dir.glob("*") if (p / VERSIONS_DIR).is_dir())
