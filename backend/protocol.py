"""Request types of the HTTP API, each parsed from its JSON body by `from_body` (a 400 naming what is wrong)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import BadRequest
from .projects import project_id_from

MAX_TASK_IDS = 100_000


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
