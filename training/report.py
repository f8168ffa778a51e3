"""`dataengine report`: what each training round decided, what labelling cost per model version (engine tokens
and seconds per 1,000 tasks, from the counts backend/usage.py keeps in Redis), and learning-curve plots (PNG + JSON)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from backend.usage import UsageRow, by_version

from .registry import Registry


def project_report(
    projects_dir: Path, project: str, model_name: str, usage: list[UsageRow] | None = None
) -> dict[str, Any]:
    """`usage`: the project's stored engine usage (None: Redis could not be read, the report says so)."""
    registry = Registry(projects_dir, project, model_name)
    rounds = []
    for decision in registry.decisions():
        evaluation = decision.get("evaluation") or {}
        rounds.append(
            {
                "at": decision["at"],
                "decision": decision["decision"],
                "version": decision["version"],
                "reason": decision["reason"],
                "candidate_score": (evaluation.get("candidate") or {}).get("score"),
                "current_score": (evaluation.get("current") or {}).get("score"),
                "heldout_tasks": (evaluation.get("candidate") or {}).get("tasks"),
            }
        )
    return {
        "project": project,
        "serving": registry.current_name() or f"{model_name}-base",
        "rounds": rounds,
        "cost": None if usage is None else by_version(usage),
    }


def plot_learning_curve(points: list[dict[str, Any]], png: Path, title: str, baseline: float | None = None) -> Path:
    """points: [{"choices": int, "served_top1": float, "candidate_top1": float}, ...]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [p["choices"] for p in points]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    ax.plot(xs, [p["served_top1"] for p in points], marker="o", label="served ranking (after the gate)")
    ax.plot(xs, [p["candidate_top1"] for p in points], marker="x", linestyle="--", label="candidate version")
    if baseline is not None:
        ax.axhline(baseline, color="grey", linestyle=":", label=f"base model ({baseline:.0%})")
    ax.set_xscale("log")
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_ylim(0, 1)
    ax.set_xlabel("human choices")
    ax.set_ylabel("top-1 accuracy on held-out tasks")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return png


def plot_rounds(report: dict[str, Any], png: Path) -> Path | None:
    scored = [r for r in report["rounds"] if r["candidate_score"] is not None]
    if not scored:
        return None
    points = [
        {"choices": i + 1, "served_top1": r["candidate_score"] if r["decision"] == "promoted" else r["current_score"],
         "candidate_top1": r["candidate_score"]}
        for i, r in enumerate(scored)
    ]
    return plot_learning_curve(points, png, f"project {report['project']}: score per training round")


def write_report(report: dict[str, Any], out_dir: Path) -> tuple[Path, Path | None]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"report-project-{report['project']}.json"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    return json_path, plot_rounds(report, out_dir / f"report-project-{report['project']}.png")
