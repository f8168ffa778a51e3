"""The gate reads back a version's held-out ranking from its own gate instead of ranking those tasks again
(training/heldout_cache.py), against the REAL vLLM engine serving the tiny model."""
from __future__ import annotations

from dataclasses import replace

import pytest

from backend.engine_client import EngineClient
from backend.label_config import compile_label_config
from backend.registry import ServingVersion
from tests.conftest import TINY_NAME, load_config
from training.evaluate import EvalTask, rank_heldout
from training.heldout_cache import CACHE_FILE, RankingContext, rank_heldout_reusing, save_ranking

pytestmark = pytest.mark.engine

VERSION = ServingVersion(name=f"{TINY_NAME}-v1")


def eval_tasks(name: str, count: int) -> tuple[str, list[EvalTask]]:
    xml, tasks = load_config(name)
    texts = [t["data"]["text"] for t in tasks]
    made = [{"id": i, "data": {"text": f"{texts[i % len(texts)]} ({i})"}} for i in range(count)]
    return xml, [EvalTask(task, []) for task in made]


@pytest.fixture
def engine(settings):
    client = EngineClient.from_settings(settings, batch=True)
    yield client
    client.close()


def context_for(settings, xml: str, instructions: str = "") -> RankingContext:
    return RankingContext(settings, compile_label_config(xml, settings=settings), xml, instructions, "tiny")


def test_only_tasks_the_version_has_not_ranked_go_to_the_engine(settings, engine, tmp_path):
    xml, tasks = eval_tasks("ner", 6)
    context = context_for(settings, xml)
    first, reused = rank_heldout_reusing(context, VERSION, tmp_path, tasks[:4], engine)
    assert reused == 0 and len(first.tasks) == 4
    save_ranking(tmp_path, first, context, VERSION)

    later = [tasks[4], tasks[0], tasks[5], tasks[2]]  # two new tasks among two ranked ones, in another order
    again, reused = rank_heldout_reusing(context, VERSION, tmp_path, later, engine)
    assert reused == 2
    assert [t.task["id"] for t in again.tasks] == [4, 0, 5, 2]
    stored = {t.task["id"]: r.candidates for t, r in zip(first.tasks, first.ranked)}
    for task, ranked in zip(again.tasks, again.ranked):
        assert ranked.candidates, task.task
        if task.task["id"] in stored:
            assert ranked.candidates == stored[task.task["id"]]


def test_a_change_the_ranking_depends_on_ranks_everything_again(settings, engine, tmp_path):
    xml, tasks = eval_tasks("ner", 3)
    context = context_for(settings, xml)
    save_ranking(tmp_path, rank_heldout_reusing(context, VERSION, tmp_path, tasks, engine)[0], context, VERSION)
    assert rank_heldout_reusing(context, VERSION, tmp_path, tasks, engine)[1] == 3
    assert rank_heldout_reusing(context_for(settings, xml, "Tag people only."), VERSION, tmp_path, tasks, engine)[1] == 0
    other = replace(context, settings=settings.model_copy(update={"temperature": settings.temperature / 2}))
    assert rank_heldout_reusing(other, VERSION, tmp_path, tasks, engine)[1] == 0
    (tmp_path / CACHE_FILE).write_text("{not json")
    assert rank_heldout_reusing(context, VERSION, tmp_path, tasks, engine)[1] == 0  # a damaged file: ranked again


def test_a_read_back_closed_set_is_served_at_the_versions_own_temperature(settings, engine, tmp_path):
    """The gate stores the candidate's ranking before it fits the option temperature; read back for the promoted
    version (temperature fitted) it must equal what the engine gives that version."""
    settings = settings.model_copy(update={"calibration": "none"})
    xml, tasks = eval_tasks("sentiment", 4)
    context = context_for(settings, xml)
    raw = rank_heldout(settings, context.config, VERSION, tasks, engine=engine)
    save_ranking(tmp_path, raw, context, VERSION)
    promoted = replace(VERSION, option_temperature=3.0)
    read_back, reused = rank_heldout_reusing(context, promoted, tmp_path, tasks, engine)
    fresh = rank_heldout(settings, context.config, promoted, tasks, engine=engine)
    assert reused == 4
    for stored, ranked in zip(read_back.ranked, fresh.ranked):
        assert [c.key for c in stored.candidates] == [c.key for c in ranked.candidates]
        assert [c.score for c in stored.candidates] == pytest.approx([c.score for c in ranked.candidates], abs=2e-3)
    raw_scores = [c.score for r in raw.ranked for c in r.candidates]
    assert raw_scores != pytest.approx([c.score for r in read_back.ranked for c in r.candidates], abs=1e-4)  # tempered


def test_a_batch_calibrated_ranking_is_never_stored(settings, engine, tmp_path):
    """A closed set on a version without an adapter is calibrated over its batch: a task's scores depend on the
    other tasks, so they cannot be read back one by one."""
    xml, tasks = eval_tasks("sentiment", 3)
    context = context_for(settings, xml)
    assert settings.calibration == "batch"
    save_ranking(tmp_path, rank_heldout(settings, context.config, VERSION, tasks, engine=engine), context, VERSION)
    assert not (tmp_path / CACHE_FILE).exists()
    assert rank_heldout_reusing(context, VERSION, tmp_path, tasks, engine)[1] == 0


def test_image_rankings_are_never_stored(settings):
    """An image task holds the image's URL: the bytes behind it may change, so its ranking is not read back."""
    xml, _ = load_config("image_classification")
    assert not context_for(settings, xml).is_per_task(VERSION)
    assert context_for(settings, load_config("ner")[0]).is_per_task(VERSION)
