"""Snapshots of derived training data: content-addressed, idempotent, atomic, readable back."""
from __future__ import annotations

import json

import pytest

from tests.test_preferences import SENTIMENT, consensus_tasks, sentiment_vote, task
from training import snapshot
from training.preferences import derive
from training.snapshot import (
    MANIFEST_FILE,
    PAIRS_FILE,
    SFT_FILE,
    label_config_hash,
    latest_snapshot,
    list_snapshots,
    read_manifest,
    read_pairs,
    read_sft,
    write_snapshot,
)

META = {"source": "http://label-studio:8080", "label_config_sha256": label_config_hash(SENTIMENT), "annotations": 7}


def derived_data(extra_tasks=()):
    return derive(consensus_tasks() + list(extra_tasks), SENTIMENT)


def one_more_task():
    return task(40, {"text": "Terrible parking, lovely food."}, [sentiment_vote(120, 40, "Neutral", by=1)])


def snapshot_dirs(project_dir):
    return sorted(p.name for p in (project_dir / "snapshots").iterdir())


def test_first_write_lays_out_round_one(tmp_path):
    derived = derived_data()
    info = write_snapshot(tmp_path, derived, META)

    assert info.round == 1
    assert info.path == tmp_path / "snapshots" / f"0001-{info.content_hash[:12]}"
    assert sorted(p.name for p in info.path.iterdir()) == [MANIFEST_FILE, PAIRS_FILE, SFT_FILE]
    assert info.counts == derived.counts and info.meta == META
    manifest = read_manifest(info)
    assert manifest["round"] == 1 and manifest["content_hash"] == info.content_hash
    assert manifest["counts"] == derived.counts and manifest["meta"] == META
    assert manifest["agreement"]["mean_task_agreement"] == pytest.approx((2 / 3 + 1) / 2)
    assert manifest["agreement"]["annotators"] == 3
    assert manifest["created_at"].endswith("+00:00")
    assert len((info.path / PAIRS_FILE).read_text().splitlines()) == len(derived.pairs) == 3


def test_hash_is_deterministic_across_projects_and_export_order(tmp_path):
    first = write_snapshot(tmp_path / "a", derived_data(), META)
    reordered = derive(list(reversed(consensus_tasks())), SENTIMENT)
    second = write_snapshot(tmp_path / "b", reordered, {"source": "elsewhere"})

    assert first.content_hash == second.content_hash
    for name in (PAIRS_FILE, SFT_FILE):
        assert (first.path / name).read_bytes() == (second.path / name).read_bytes()
    line = json.loads((first.path / PAIRS_FILE).read_text().splitlines()[0])
    assert list(line) == sorted(line)


def test_rewriting_the_same_content_returns_the_latest_snapshot(tmp_path):
    first = write_snapshot(tmp_path, derived_data(), META)
    again = write_snapshot(tmp_path, derived_data(), {**META, "annotations": 8})

    assert again == first
    assert snapshot_dirs(tmp_path) == [first.path.name]


def test_round_increments_when_content_changes(tmp_path):
    first = write_snapshot(tmp_path, derived_data(), META)
    second = write_snapshot(tmp_path, derived_data([one_more_task()]), META)

    assert (first.round, second.round) == (1, 2)
    assert second.content_hash != first.content_hash
    assert second.path.name.startswith("0002-")
    assert latest_snapshot(tmp_path) == second
    assert [s.round for s in list_snapshots(tmp_path)] == [1, 2]


def test_crash_mid_write_leaves_no_visible_snapshot(tmp_path, monkeypatch):
    first = write_snapshot(tmp_path, derived_data(), META)
    real_write = snapshot._write_synced

    def crash_on_manifest(path, data):
        if path.name == MANIFEST_FILE:
            raise OSError("disk full")
        real_write(path, data)

    monkeypatch.setattr(snapshot, "_write_synced", crash_on_manifest)
    with pytest.raises(OSError, match="disk full"):
        write_snapshot(tmp_path, derived_data([one_more_task()]), META)

    assert latest_snapshot(tmp_path) == first
    leftovers = [name for name in snapshot_dirs(tmp_path) if name.startswith(".tmp-")]
    assert len(leftovers) == 1  # half-written, hidden, and not listed

    monkeypatch.setattr(snapshot, "_write_synced", real_write)
    second = write_snapshot(tmp_path, derived_data([one_more_task()]), META)
    assert second.round == 2
    assert snapshot_dirs(tmp_path) == [first.path.name, second.path.name]  # the stale temp dir is gone


def test_crash_before_rename_on_first_write_leaves_nothing(tmp_path, monkeypatch):
    def no_rename(src, dst):
        raise OSError("killed")

    monkeypatch.setattr(snapshot.os, "rename", no_rename)
    with pytest.raises(OSError):
        write_snapshot(tmp_path, derived_data(), META)

    assert latest_snapshot(tmp_path) is None and list_snapshots(tmp_path) == []


def test_readers_round_trip(tmp_path):
    derived = derived_data([one_more_task()])
    info = write_snapshot(tmp_path, derived, META)

    assert read_pairs(info) == derived.pairs
    assert read_sft(info) == derived.sft
    assert read_pairs(latest_snapshot(tmp_path))[0].prompt[1]["role"] == "user"


def test_no_snapshots_yet(tmp_path):
    assert latest_snapshot(tmp_path / "never-trained") is None
