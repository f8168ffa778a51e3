"""Closed-set batch calibration (backend/calibration.py): the estimate in the REAL Redis is shared by every
backend process, so the REAL tiny vLLM engine's option scores for a task do not depend on which HTTP worker
(or prelabel job) answers."""
from __future__ import annotations

import pytest

from backend.app import create_app
from backend.calibration import BatchCalibration, SharedBatchCalibration, prior_matched_bias
from tests.conftest import flushed_redis, load_config, make_settings, redis_db

REDIS_URL = redis_db(1)  # a database of its own, flushed per test


@pytest.fixture
def redis():
    with flushed_redis(REDIS_URL) as connection:
        yield connection


def flat(rows: list[list[float]]) -> list[float]:
    return [value for row in rows for value in row]


def scores(client, xml, tasks) -> list[dict[str, float]]:
    response = client.post("/predict", json={"tasks": tasks, "label_config": xml, "project": "5.1700000000"})
    assert response.status_code == 200, response.get_json()
    return [{p["result"][0]["value"]["choices"][0]: p["score"] for p in ranked} for ranked in response.get_json()["results"]]


def test_two_processes_calibrate_a_task_the_same_way(tmp_path, engine_url, redis):
    """Worker A has seen the project's three tasks; worker B (another process: its own app and Predictor) is
    asked for the first one alone and scores it as A does, because the estimate of the three is shared."""
    xml, tasks = load_config("sentiment")
    apps = [create_app(make_settings(tmp_path / name, engine_url, redis_url=REDIS_URL)) for name in ("a", "b")]
    worker_a, worker_b = (app.test_client() for app in apps)
    seen_by_a = scores(worker_a, xml, tasks)
    alone_on_b = scores(worker_b, xml, tasks[:1])
    assert alone_on_b[0] == pytest.approx(seen_by_a[0], abs=1e-6)
    again = scores(worker_a, xml, tasks)  # asking again changes nothing
    assert all(now == pytest.approx(before, abs=1e-6) for now, before in zip(again, seen_by_a))
    for app in apps:
        app.extensions["dataengine"].predictor.close()


def test_the_shared_estimate_matches_the_in_process_one(redis):
    rows = [("t1", [-0.1, -2.0, -3.0]), ("t2", [-0.5, -1.0, -4.0]), ("t3", [-0.2, -2.5, -2.0])]
    key = ("p", "base", "sentiment", ("Positive", "Negative", "Neutral"))
    shared = SharedBatchCalibration(redis).calibrate(key, rows)
    assert flat(shared) == pytest.approx(flat(BatchCalibration().calibrate(key, rows)))
    assert SharedBatchCalibration(redis).calibrate(key, rows[:1])[0] == pytest.approx(shared[0])  # t2, t3 still count
    other = ("p", "base", "sentiment", ("Positive", "Negative"))  # another option set: its own estimate
    assert SharedBatchCalibration(redis).calibrate(other, [("t1", [-0.1, -2.0])])[0] == pytest.approx([0.475, -0.475])


def test_the_shared_estimate_stops_growing_at_its_window(redis, monkeypatch):
    monkeypatch.setattr("backend.calibration.WINDOW", 2)
    key = ("p", "base", "c", ("A", "B"))
    calibration = SharedBatchCalibration(redis)
    first = calibration.calibrate(key, [("t1", [0.0, -2.0]), ("t2", [0.0, -4.0])])
    calibration.calibrate(key, [("t3", [-9.0, 0.0])])
    assert calibration.calibrate(key, [("t1", [0.0, -2.0])])[0] == pytest.approx(first[0])  # t3 was not added


def test_redis_down_falls_back_to_the_process_estimate():
    from redis import Redis

    calibration = SharedBatchCalibration(Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5))
    rows = [("t1", [-0.1, -2.0]), ("t2", [-0.5, -1.0])]
    assert flat(calibration.calibrate(("p",), rows)) == pytest.approx(flat(BatchCalibration().calibrate(("p",), rows)))
    assert calibration._backoff.active()  # the next requests do not wait for Redis again


def test_a_label_prior_is_matched_and_the_models_order_kept(redis):
    """Weak-model rows (tiny margins, one option favoured by bias yet nobody chose it): each option is the top
    one for its prior share of the tasks, and the tasks the model leans most towards A are the ones that get it."""
    import random

    rng = random.Random(0)
    rows = [[rng.gauss(0, 0.1), rng.gauss(0, 0.1), rng.gauss(0.2, 0.1)] for _ in range(300)]
    prior = [0.6, 0.38, 0.02]
    for calibration in (BatchCalibration(), SharedBatchCalibration(redis)):
        calibrated = calibration.calibrate(("p", "base", "c", ("A", "B", "N")), [(f"t{i}", r) for i, r in enumerate(rows)], prior)
        picked = [row.index(max(row)) for row in calibrated]
        assert [picked.count(j) / len(rows) for j in range(3)] == pytest.approx(prior, abs=0.02)
        by_margin = sorted(range(len(rows)), key=lambda i: rows[i][0] - rows[i][1])
        assert sum(picked[i] == 0 for i in by_margin[-60:]) >= 54 and sum(picked[i] == 0 for i in by_margin[:60]) <= 6
    assert prior_matched_bias([[0.0, 0.0]], [0.5, 0.5]) == pytest.approx([0.0, 0.0])
