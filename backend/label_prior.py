"""A project's label prior, counted from its own annotations: what the untrained model cannot know.

Batch calibration (backend/calibration.py) removes the model's own preference for some labels, which leaves
every label equally likely a priori. A project's labels rarely are: a review project whose config offers
Positive, Negative and Neutral may hold almost no neutral reviews, and a calibrated 135M model then calls a
third of them Neutral (top-1 0.38 on binary reviews, README "Closed label sets"). The annotations say how
often each label is chosen, smoothed by `PSEUDO_COUNT` per option so that a label nobody chose yet keeps a
chance, and the calibration then matches that prior instead of a uniform one
(`calibration.prior_matched_bias`).

The counts live in Redis, shared by every backend process: one hash per project, annotation id -> the
labels that annotation chose per control (`{"sentiment": ["Positive"]}`). The webhook writes it
(ANNOTATION_CREATED / ANNOTATION_UPDATED replace the annotation's entry, a cancelled one or
ANNOTATIONS_DELETED removes it), so an edit or a delete never counts twice; the totals are kept beside it by
the same Lua script. Trained versions do not use it: their adapter learned the project's labels, prior
included. A Redis failure means no prior (logged), never a failed /predict or webhook.

Label Studio never resends a webhook it failed to deliver, and this Redis may keep nothing on disk, so every
training round also brings the counts in line with the export it reads (`LabelPriors.sync_from_export`).
"""
from __future__ import annotations

import json
import logging
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable

from redis import Redis
from redis.exceptions import RedisError

from .queue import RedisBackoff, key

log = logging.getLogger(__name__)

PSEUDO_COUNT = 1.0  # per option (a uniform Dirichlet prior)
MAX_ANNOTATIONS = 50_000  # per project; past it new annotations are not counted (the prior is settled by then)
MAX_REGIONS = 64  # regions read per annotation
MAX_NAME_CHARS = 200  # control names and labels longer than this are not counted
UPSERT_ACTIONS = {"ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED"}
DELETE_ACTIONS = {"ANNOTATIONS_DELETED"}
APPLY_CHUNK = 1000  # annotations per script call: a whole export at once would block Redis for its length


def label_prior_key(project: str, *parts: str) -> str:
    return key("label-prior", project, *parts)


def chosen_labels(result: Any) -> dict[str, list[str]]:
    """Per control (`from_name`), the closed-set labels an annotation's result chose: Choices' `choices` and
    Rating's `rating`, as strings. Anything malformed, oversized or of another kind is skipped."""
    chosen: dict[str, list[str]] = {}
    for region in result[:MAX_REGIONS] if isinstance(result, list) else []:
        if not isinstance(region, dict) or not isinstance(region.get("value"), dict):
            continue
        name = region.get("from_name")
        if not isinstance(name, str) or not name or len(name) > MAX_NAME_CHARS:
            continue
        value = region["value"]
        labels = value.get("choices") if "choices" in value else [value.get("rating")] if "rating" in value else []
        for label in labels if isinstance(labels, list) else []:
            text = _label_text(label)
            if text is not None and text not in chosen.setdefault(name, []):
                chosen[name].append(text)
    return {name: labels for name, labels in chosen.items() if labels}


def _label_text(label: Any) -> str | None:
    if isinstance(label, bool):
        return None
    if isinstance(label, int) or (isinstance(label, str) and 0 < len(label) <= MAX_NAME_CHARS):
        return str(label)
    return None


@dataclass(frozen=True)
class PriorUpdate:
    """What one webhook changes: annotation id -> its labels per control (None: forget the annotation)."""

    project: str
    entries: dict[int, dict[str, list[str]] | None]


def update_from_webhook(project: str, payload: dict[str, Any]) -> PriorUpdate:
    """The label-prior change a (parsed and validated) webhook payload makes; empty for other actions."""
    action = payload.get("action")
    annotations = payload.get("annotations", payload.get("annotation"))
    annotations = [annotations] if isinstance(annotations, dict) else annotations
    entries: dict[int, dict[str, list[str]] | None] = {}
    if action not in UPSERT_ACTIONS | DELETE_ACTIONS:
        return PriorUpdate(project, entries)
    for annotation in annotations if isinstance(annotations, list) else []:
        annotation_id = annotation.get("id") if isinstance(annotation, dict) else annotation
        if _is_annotation_id(annotation_id):
            entries[annotation_id] = None if action in DELETE_ACTIONS else _entry(annotation)
    return PriorUpdate(project, entries)


def _is_annotation_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _entry(annotation: dict[str, Any]) -> dict[str, list[str]] | None:
    """What an annotation counts: its closed-set labels; nothing when it was skipped."""
    return None if annotation.get("was_cancelled") else chosen_labels(annotation.get("result")) or None


def update_from_export(project: str, tasks: list[dict[str, Any]], counted: Iterable[int]) -> PriorUpdate:
    """The change that brings a project's counts in line with an export of its tasks: every exported
    annotation's labels (a skipped one chose nothing), and forgetting the `counted` annotations the export does
    not hold, deleted while their webhook was lost. A counted annotation newer than the export's newest (Label
    Studio's annotation ids only grow) was created after the export was read, and is kept."""
    entries: dict[int, dict[str, list[str]] | None] = {}
    for task in tasks:
        for annotation in task.get("annotations") or [] if isinstance(task, dict) else []:
            annotation_id = annotation.get("id") if isinstance(annotation, dict) else None
            if _is_annotation_id(annotation_id):
                entries[annotation_id] = _entry(annotation)
    newest = max(entries, default=0)
    for annotation_id in counted:
        if annotation_id <= newest and annotation_id not in entries:
            entries[annotation_id] = None
    return PriorUpdate(project, entries)


# KEYS: annotation id -> its count fields (JSON list), field -> count. ARGV: the cap, then per annotation its id
# and its new count fields ("" to forget it). An annotation's old fields are taken back before its new ones count.
_APPLY = """
local cap = tonumber(ARGV[1])
for i = 2, #ARGV, 2 do
  local id, new = ARGV[i], ARGV[i + 1]
  local old = redis.call('HGET', KEYS[1], id)
  if old or new == '' or redis.call('HLEN', KEYS[1]) < cap then
    if old then
      for _, f in ipairs(cjson.decode(old)) do redis.call('HINCRBY', KEYS[2], f, -1) end
    end
    if new == '' then
      redis.call('HDEL', KEYS[1], id)
    else
      redis.call('HSET', KEYS[1], id, new)
      for _, f in ipairs(cjson.decode(new)) do redis.call('HINCRBY', KEYS[2], f, 1) end
    end
  end
end
return 1
"""


def _count_fields(labels: dict[str, list[str]] | None) -> str:
    if not labels:
        return ""
    return json.dumps([json.dumps([control, label]) for control, chosen in labels.items() for label in chosen])


class LabelPriors:
    """The label counts of every project, in Redis: kept per annotation and as totals, updated atomically, so
    every process reads the same counts in one small HGETALL."""

    def __init__(self, redis: Redis):
        self.redis = redis
        self._apply = redis.register_script(_APPLY)
        self._backoff = RedisBackoff()

    def apply(self, update: PriorUpdate) -> None:
        """Write a change (a webhook's, or an export sync's). Bookkeeping: Redis trouble is logged, never raised."""
        keys = [label_prior_key(update.project), label_prior_key(update.project, "counts")]
        entries = list(update.entries.items())
        try:
            for start in range(0, len(entries), APPLY_CHUNK):
                args: list = [MAX_ANNOTATIONS]
                for annotation_id, labels in entries[start:start + APPLY_CHUNK]:
                    args += [str(annotation_id), _count_fields(labels)]
                self._apply(keys=keys, args=args)
        except RedisError as exc:
            log.warning("label prior of project %s not updated: %s", update.project, exc)

    def sync_from_export(self, project: str, tasks: list[dict[str, Any]]) -> None:
        """Make the counts what a fresh export of the project says (`update_from_export`): webhooks Label
        Studio failed to deliver, or a Redis that lost its data, leave them wrong until then. An annotation edited
        between the export and this call keeps its exported labels until the next round or edit. Bookkeeping:
        Redis trouble is logged, never raised."""
        try:
            counted = [int(field) for field in self.redis.hkeys(label_prior_key(project))]
        except RedisError as exc:
            log.warning("label prior of project %s not synced with its export: %s", project, exc)
            return
        self.apply(update_from_export(project, tasks, counted))

    def for_prediction(self, project: str, config, version, enumerate_max: int) -> dict[str, Counter]:
        """The counts a prediction uses: only for a closed label set on the untrained model (else none, unread)."""
        if version.adapter or config is None or config.enumerable_control(enumerate_max) is None:
            return {}
        return self.counts(project)

    def counts(self, project: str) -> dict[str, Counter]:
        """Per control name, how many annotations chose each label."""
        if self._backoff.active():
            return {}
        try:
            raw = self.redis.hgetall(label_prior_key(project, "counts"))
        except RedisError as exc:
            self._backoff.failed()
            log.warning("label prior of project %s unavailable (predicting without it for %.0f s): %s", project,
                        self._backoff.seconds, exc)
            return {}
        counted: dict[str, Counter] = {}
        for field, count in raw.items():
            control, label = json.loads(field)
            if int(count) > 0:
                counted.setdefault(control, Counter())[label] = int(count)
        return counted


def log_prior(counts: Counter | None, options: list[Any]) -> list[float] | None:
    """log P(option) from the counts, smoothed by PSEUDO_COUNT per option; None when no option was ever
    chosen (a uniform prior changes nothing)."""
    chosen = [float((counts or {}).get(str(option), 0)) for option in options]
    if not any(chosen):
        return None
    total = sum(chosen) + PSEUDO_COUNT * len(options)
    return [math.log((count + PSEUDO_COUNT) / total) for count in chosen]
