"""Request types of the HTTP API, each parsed from its JSON body by `from_body` (a 400 naming what is wrong).

What the body alone can tell is checked here; what needs the project's stored settings (the label config
/setup stored, the room for a new project) is the services' business (backend/services.py).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .errors import BadRequest, PayloadTooLarge
from .projects import project_id_from

MAX_TASK_IDS = 100_000


def text_field(body: dict[str, Any], *names: str) -> str:
    """The first of `names` the body holds (absent, null or "": ""); a 400 naming it when it is not a string."""
    for name in names:
        value = body.get(name)
        if value in (None, ""):
            continue
        if not isinstance(value, str):
            raise BadRequest(f"'{name}' must be a string, got {type(value).__name__}")
        return value
    return ""


def parse_extra_params(raw: Any) -> dict[str, Any]:
    """Per-project overrides from the ML backend's "extra params" (a JSON object, or its text)."""
    if raw in (None, "", {}):
        return {}
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise BadRequest(f"extra_params is not valid JSON: {exc.msg}") from exc
    if not isinstance(raw, dict):
        raise BadRequest("extra_params must be a JSON object, e.g. {\"candidates\": 6}")
    overrides: dict[str, Any] = {}
    if "candidates" in raw:
        value = raw["candidates"]
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 32:
            raise BadRequest(f"extra_params.candidates must be an integer from 1 to 32, got {value!r}")
        overrides["candidates"] = value
    if "temperature" in raw:
        value = raw["temperature"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 2:
            raise BadRequest(f"extra_params.temperature must be a number in (0, 2], got {value!r}")
        overrides["temperature"] = float(value)
    return overrides


@dataclass(frozen=True)
class SetupRequest:
    """`POST /setup`: {"project", "schema" | "label_config", "hostname", "access_token", "extra_params"}."""

    project: str
    schema: str  # "": keep the stored one
    hostname: str
    access_token: str
    extra_params: Any = None  # parsed by `overrides()`, after the config is checked

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> "SetupRequest":
        return cls(
            project=project_id_from(body.get("project")),
            schema=text_field(body, "schema", "label_config"),
            hostname=text_field(body, "hostname"),
            access_token=text_field(body, "access_token"),
            extra_params=body.get("extra_params"),
        )

    def overrides(self) -> dict[str, Any]:
        return parse_extra_params(self.extra_params)


@dataclass(frozen=True)
class PredictTasksRequest:
    """`POST /predict`: {"tasks": [...], "project", "label_config", "params": {"context", "extra_params"}}."""

    tasks: list
    project: str
    label_config: str  # "": the one /setup stored
    params: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_body(cls, body: dict[str, Any], max_tasks: int) -> "PredictTasksRequest":
        tasks = body.get("tasks")
        if not isinstance(tasks, list) or not tasks:
            raise BadRequest("'tasks' must be a non-empty list of Label Studio tasks")
        if len(tasks) > max_tasks:
            raise PayloadTooLarge(
                f"{len(tasks)} tasks in one /predict; the limit is {max_tasks} "
                "(DATAENGINE_MAX_PREDICT_TASKS): pre-label a whole project with POST /prelabel or `dataengine prelabel`"
            )
        project = project_id_from(body.get("project"))
        label_config = text_field(body, "label_config")
        params = body.get("params") if isinstance(body.get("params"), dict) else {}
        return cls(tasks, project, label_config, params)

    @property
    def interactive(self) -> bool:
        """Label Studio's interactive pre-annotation (`context` set): its UI reads ONE prediction per task."""
        return self.params.get("context") is not None

    def overrides(self) -> dict[str, Any]:
        return parse_extra_params(self.params.get("extra_params")) if self.params.get("extra_params") else {}


@dataclass(frozen=True)
class PrelabelRequest:
    """A pre-labelling run to enqueue: `POST /prelabel`, TASKS_CREATED in ranking projects, reconcile, the CLI."""

    project: str
    force: bool = False
    limit: int | None = None
    task_ids: tuple[int, ...] = ()
    reason: str = "api"

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> "PrelabelRequest":
        """`POST /prelabel` body: {"project": ID, "force"?: bool, "limit"?: int >= 1, "tasks"?: [task ids]}."""
        raw = body.get("project")
        if raw in (None, ""):
            raise BadRequest("'project' is required: the Label Studio project id to pre-label")
        if isinstance(raw, bool) or not isinstance(raw, (int, str)) or not str(raw).isdigit():
            raise BadRequest(f"'project' must be a numeric Label Studio project id, got {str(raw)[:80]!r}")
        project = project_id_from(raw)
        force = body.get("force", False)
        if not isinstance(force, bool):
            raise BadRequest(f"'force' must be true or false, got {force!r}")
        limit = body.get("limit")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise BadRequest(f"'limit' must be a positive integer, got {limit!r}")
        tasks = body.get("tasks", [])
        if not isinstance(tasks, list) or any(isinstance(t, bool) or not isinstance(t, int) for t in tasks):
            raise BadRequest("'tasks' must be a list of integer task ids")
        if len(tasks) > MAX_TASK_IDS:
            raise BadRequest(f"'tasks' lists {len(tasks)} ids; at most {MAX_TASK_IDS} (leave it out for the whole project)")
        return cls(project, force, limit, tuple(tasks))

    def describe(self) -> str:
        """The job's description in GET /jobs."""
        tasks = f", {len(self.task_ids)} tasks" if self.task_ids else ""
        forced = ", forced" if self.force else ""
        return f"pre-label project {self.project} ({self.reason}{tasks}{forced})"
