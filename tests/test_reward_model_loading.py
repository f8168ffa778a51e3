"""Right after a promotion, the first /predict loads the version's reward model. Seen on a running backend:
many predict threads loaded it at once, transformers' lazy imports failed in some of them (`cannot import name
'AutoTokenizer'`), and a 300-task Retrieve Predictions stored nothing. It must load once, under a lock, while
the other threads wait."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO, TINY_NAME, load_config, run_backend


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory, tiny_rm_base) -> Path:
    """A saved reward model (a scalar head on the tiny encoder), as a round writes one."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    out = tmp_path_factory.mktemp("rm") / "reward_model"
    BertForSequenceClassification.from_pretrained(tiny_rm_base, num_labels=1).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_rm_base).save_pretrained(out)
    return out


def test_concurrent_first_requests_load_the_reward_model_once(reward_model_dir):
    """16 threads ask for the scorer at the same moment in a fresh interpreter (transformers not yet imported)."""
    script = textwrap.dedent(f"""
        import json, threading
        from backend import reranker
        from backend.reward_scoring import RewardModel
        loads, errors, original = [], [], RewardModel.load.__func__
        def counted(cls, path, *args, **kwargs):
            loads.append(path)
            return original(cls, path, *args, **kwargs)
        RewardModel.load = classmethod(counted)
        barrier = threading.Barrier(16)
        def first_request():
            barrier.wait()
            try:
                reranker.load_scorer({str(reward_model_dir)!r}).score(["review text\\nAnswer: x"])
            except Exception as exc:
                errors.append(repr(exc))
        threads = [threading.Thread(target=first_request) for _ in range(16)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        print(json.dumps({{"loads": len(loads), "errors": errors}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    assert outcome == {"loads": 1, "errors": []}


@pytest.mark.engine
def test_the_first_300_task_predict_after_a_promotion_answers_every_task(engine_url, reward_model_dir, tmp_path):
    """The served backend (granian, several threads) with a freshly promoted version that has a reward model."""
    model_dir = tmp_path / "model_dir"
    project = model_dir / "projects" / "77"
    project.mkdir(parents=True)
    current = {"version": f"{TINY_NAME}-p77-v1", "adapter": None, "adapter_path": None,
               "reward_model_path": str(reward_model_dir), "rm_weight": 0.5}
    (project / "current.json").write_text(json.dumps(current))
    xml, tasks = load_config("topics")  # sampled candidates: the reward model reorders several per task
    many = [{"id": i + 1, "data": tasks[i % len(tasks)]["data"]} for i in range(300)]
    with run_backend(engine_url, model_dir, tmp_path / "serve.log") as (url, _):
        response = httpx.post(url + "/predict", json={"tasks": many, "label_config": xml, "project": "77.1"}, timeout=300)
    assert response.status_code == 200, response.text[:2000]
    body = response.json()
    assert body["model_version"] == current["version"] and "errors" not in body
    assert len(body["results"]) == 300 and all(predictions for predictions in body["results"])
