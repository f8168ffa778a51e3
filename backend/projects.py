"""Per-project settings that Label Studio gives us at /setup, kept under MODEL_DIR so that every
HTTP worker process and backend replica sharing the volume sees the same values."""
from __future__ import annotations

import json
import os
import re
import tempfile
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cachetools import LRUCache

from .errors import BadRequest, RequestError

DEFAULT_PROJECT = "default"
_PROJECT_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass
class ProjectSettings:
    candidates: int | None = None  # overrides DATAENGINE_CANDIDATES for this project
    temperature: float | None = None
    instructions: str = ""  # the project's expert_instruction, read from Label Studio at /setup
    label_config: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    # what Label Studio sent at /setup (`hostname`, `access_token`): used to read its hosted images when
    # LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY are not configured (settings.json is written mode 0600)
    label_studio_hostname: str = ""
    label_studio_token: str = ""


@dataclass(frozen=True)
class Sampling:
    """How many candidates to generate for a task, at which temperature."""

    candidates: int
    temperature: float

    @classmethod
    def resolve(cls, settings, stored: ProjectSettings, overrides: dict[str, Any] | None = None) -> "Sampling":
        """A request's `extra_params`, else the project's /setup values, else DATAENGINE_CANDIDATES/_TEMPERATURE:
        what /predict and pre-labelling both sample with."""
        overrides = overrides or {}
        return cls(
            candidates=overrides.get("candidates") or stored.candidates or settings.candidates,
            temperature=overrides.get("temperature") or stored.temperature or settings.temperature,
        )


def project_id_from(value: Any) -> str:
    """Label Studio sends `project` as an int at /setup and as "<id>.<timestamp>" at /predict."""
    if value in (None, ""):
        return DEFAULT_PROJECT
    project = str(value).split(".", 1)[0]
    if not _PROJECT_ID.match(project):
        raise BadRequest(f"'project' must be a Label Studio project id, got {str(value)[:80]!r}")
    return project


def atomic_write_json(path: Path, payload: Any) -> None:
    """Write-then-rename, so readers never see a half-written file; the data is on disk before the rename
    and the rename is on disk before we return, so a power cut leaves the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=2, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def fsync_directory(directory: Path) -> None:
    """Make a rename or a new entry in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


SETTINGS_CACHE_BYTES = 64 * 1024 * 1024  # ProjectStore keeps settings read from disk up to this size in all


class ProjectStore:
    def __init__(self, projects_dir: Path, cache_bytes: int = SETTINGS_CACHE_BYTES):
        self.projects_dir = Path(projects_dir)
        # project -> (mtime, settings, file size): least recently used first out, weighed by the file's size
        self._cache: LRUCache = LRUCache(maxsize=cache_bytes, getsizeof=lambda entry: entry[2])
        self._lock = threading.Lock()

    def _path(self, project: str) -> Path:
        return self.projects_dir / project / "settings.json"

    def get(self, project: str) -> ProjectSettings:
        path = self._path(project)
        try:
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            return ProjectSettings()
        with self._lock:
            cached = self._cache.get(project)
        if cached and cached[0] == mtime:
            return cached[1]
        text = path.read_text(encoding="utf-8")
        data = json.loads(text)
        known = {k: v for k, v in data.items() if k in ProjectSettings.__dataclass_fields__}
        settings = ProjectSettings(**known)
        if len(text) + 1024 <= self._cache.maxsize:
            with self._lock:
                self._cache[project] = (mtime, settings, len(text) + 1024)
        return settings

    def check_room_for(self, project: str, max_projects: int) -> None:
        """A 403 when `project` is new and MODEL_DIR already holds `max_projects` projects."""
        if (self.projects_dir / project).is_dir() or not self.projects_dir.is_dir():
            return
        known = sum(1 for p in self.projects_dir.iterdir() if p.is_dir())
        if known >= max_projects:
            raise RequestError(
                f"project {project} is new and {known} projects are known already; the limit is {max_projects} "
                "(DATAENGINE_MAX_PROJECTS)", 403,
            )

    def save(self, project: str, settings: ProjectSettings) -> None:
        atomic_write_json(self._path(project), asdict(settings))
