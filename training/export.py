"""Export a project's truth from Label Studio through the SDK: config, instructions, tasks with
annotations and predictions. Training always re-reads this instead of trusting the webhook stream,
because Label Studio never retries a webhook it failed to deliver."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from backend.label_studio import client


@dataclass(frozen=True)
class ProjectExport:
    project: str
    label_config: str
    instructions: str
    tasks: list[dict[str, Any]]

    @property
    def annotation_count(self) -> int:
        return sum(len(t.get("annotations") or []) for t in self.tasks)


def export_project(
    url: str, api_key: str, project: str, progress: Callable[[int], None] | None = None, page_size: int = 100
) -> ProjectExport:
    ls = client(url, api_key, timeout=60.0)
    project_obj = ls.projects.get(id=int(project))
    tasks = []
    for task in ls.tasks.list(project=int(project), fields="all", page_size=page_size):
        tasks.append(task_as_dict(task))
        if progress and len(tasks) % page_size == 0:
            progress(len(tasks))
    return ProjectExport(
        project=project,
        label_config=project_obj.label_config or "",
        instructions=getattr(project_obj, "expert_instruction", "") or "",
        tasks=tasks,
    )


def task_as_dict(task: Any) -> dict[str, Any]:
    """An SDK task as a plain dict, with `annotations` and `predictions` always lists."""
    data = task.model_dump(mode="json") if hasattr(task, "model_dump") else dict(task)
    data["annotations"] = data.get("annotations") or []
    data["predictions"] = data.get("predictions") or []
    return data
