"""Label Studio webhook payloads -> validated feedback events.

Label Studio sends one webhook per action with a 1 s timeout and never retries, so this module only
parses; anything slow happens in RQ jobs. Payload shapes (checked against Label Studio 1.23):
  ANNOTATION_CREATED / ANNOTATION_UPDATED  {action, annotation, task, project}
  ANNOTATIONS_CREATED                      {action, annotation: [...] or annotations: [...], project}
  ANNOTATIONS_DELETED                      {action, annotations: [{id}], project}   (no task)
  START_TRAINING                           {action, project}                        (no annotation)
  TASKS_CREATED                            {action, tasks: [...], project}
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import BadRequest
from .projects import project_id_from

ANNOTATION_CHANGES = {"ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED"}
HANDLED_ACTIONS = ANNOTATION_CHANGES | {"START_TRAINING", "TASKS_CREATED"}


@dataclass(frozen=True)
class FeedbackEvent:
    action: str
    project: str
    annotation_ids: tuple[int, ...] = ()
    task_ids: tuple[int, ...] = ()
    received_at: float = field(default_factory=time.time)

    @property
    def changes(self) -> int:
        """How many annotations this event adds, changes or removes (drives the training trigger)."""
        return len(self.annotation_ids) if self.action in ANNOTATION_CHANGES else 0

    def to_record(self) -> dict[str, Any]:
        record = asdict(self)
        record["annotation_ids"] = list(self.annotation_ids)
        record["task_ids"] = list(self.task_ids)
        return record


def parse_webhook(body: dict[str, Any]) -> FeedbackEvent:
    action = body.get("action")
    if not isinstance(action, str) or not action:
        raise BadRequest("webhook payload has no 'action'")
    project = _project_of(body)
    if action not in HANDLED_ACTIONS:
        return FeedbackEvent(action=action, project=project)
    if action == "START_TRAINING":
        return FeedbackEvent(action=action, project=project)
    if action == "TASKS_CREATED":
        return FeedbackEvent(action=action, project=project, task_ids=_ids(body.get("tasks"), "tasks"))
    annotations = body.get("annotations", body.get("annotation"))
    if isinstance(annotations, dict):
        annotations = [annotations]
    if not isinstance(annotations, list) or not annotations:
        raise BadRequest(f"{action} webhook has no 'annotation(s)'")
    annotation_ids = _ids(annotations, "annotation")
    task_ids = _task_ids(body, annotations)
    return FeedbackEvent(action=action, project=project, annotation_ids=annotation_ids, task_ids=task_ids)


def _project_of(body: dict[str, Any]) -> str:
    project = body.get("project")
    if isinstance(project, dict):
        project = project.get("id")
    if project in (None, ""):
        raise BadRequest("webhook payload has no 'project'")
    return project_id_from(project)


def _ids(items: Any, what: str) -> tuple[int, ...]:
    if not isinstance(items, list):
        raise BadRequest(f"webhook '{what}' must be a list")
    ids = []
    for item in items:
        value = item.get("id") if isinstance(item, dict) else item
        if isinstance(value, bool) or not isinstance(value, int):
            raise BadRequest(f"webhook {what} item without an integer 'id': {str(item)[:100]}")
        ids.append(value)
    return tuple(ids)


def _task_ids(body: dict[str, Any], annotations: list) -> tuple[int, ...]:
    task = body.get("task")
    if isinstance(task, dict) and isinstance(task.get("id"), int):
        return (task["id"],)
    ids = {a.get("task") for a in annotations if isinstance(a, dict) and isinstance(a.get("task"), int)}
    return tuple(sorted(ids))
