"""Model registry: versions, atomic promotion, rollback, decisions; hot swap through the real engine."""
from __future__ import annotations

import json

import pytest

from backend.registry import VersionReader
from training.registry import Registry
from tests.conftest import TINY_NAME, load_config


def publish(registry: Registry, tmp_path, with_adapter: str | None = None, parent=None):
    name = registry.next_version_name()
    staged = registry.staging_dir(name)
    if with_adapter:
        import shutil

        shutil.copytree(with_adapter, staged / "adapter")
    return registry.create_version(name, staged, parent=parent, snapshot_hash="abc", metrics={"top1": 0.5})


def test_promote_and_rollback_change_what_serves(tmp_path):
    registry = Registry(tmp_path, "3", TINY_NAME)
    reader = VersionReader(tmp_path, TINY_NAME)
    assert reader.current("3").name == f"{TINY_NAME}-base"
    v1 = publish(registry, tmp_path)
    assert v1.name == f"{TINY_NAME}-p3-v1" and reader.current("3").name == f"{TINY_NAME}-base"  # published, not served
    registry.promote(v1, "first")
    v2 = publish(registry, tmp_path, parent=v1.name)
    registry.promote(v2, "better")
    assert reader.current("3").name == v2.name
    assert registry.rollback() == v1.name
    assert reader.current("3").name == v1.name
    assert registry.rollback("base") == f"{TINY_NAME}-base"
    assert reader.current("3").name == f"{TINY_NAME}-base"
    assert [d["decision"] for d in registry.decisions()] == ["promoted", "promoted", "promoted", "rollback"]
    listed = reader.versions("3")
    assert [v["name"] for v in listed] == [v1.name, v2.name] and not any(v["current"] for v in listed)
    with pytest.raises(ValueError, match="no version"):
        registry.rollback("nope")


def test_half_staged_versions_are_invisible(tmp_path):
    registry = Registry(tmp_path, "4", TINY_NAME)
    registry.staging_dir(registry.next_version_name())  # a crashed job's leftovers
    assert VersionReader(tmp_path, TINY_NAME).versions("4") == []


def test_versions_endpoint_and_cli(tmp_path):
    import subprocess
    import sys

    from backend.app import create_app
    from backend.engine_client import EngineClient
    from tests.conftest import REPO, make_settings

    settings = make_settings(tmp_path)
    registry = Registry(settings.projects_dir, "5", TINY_NAME)
    registry.promote(publish(registry, tmp_path), "test")
    client = create_app(settings, engine=EngineClient("http://127.0.0.1:9", TINY_NAME)).test_client()
    body = client.get("/versions?project=5").get_json()["projects"]["5"]
    assert body["current"] == f"{TINY_NAME}-p5-v1" and body["versions"][0]["current"] is True
    env = {"PATH": "/usr/bin:/bin", "MODEL_DIR": str(settings.model_dir), "DATAENGINE_SERVED_MODEL_NAME": TINY_NAME, "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "dataengine", "versions"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and f"serving {TINY_NAME}-p5-v1" in out.stdout, out.stderr
    back = subprocess.run([sys.executable, "-m", "dataengine", "rollback", "--project", "5", "--to", "base"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert back.returncode == 0 and f"now serves {TINY_NAME}-base" in back.stdout


@pytest.fixture(scope="module")
def random_adapter(tiny_model_dir, tmp_path_factory):
    """A LoRA adapter with random (non-zero) weights: it must change what the model says."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    lora = LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, lora)
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    peft_model.save_pretrained(out)
    return out


@pytest.mark.engine
def test_hot_swap_changes_predictions_and_version_without_restart(client, settings, random_adapter, engine_url):
    import httpx

    xml, tasks = load_config("sentiment")
    body = {"tasks": tasks, "label_config": xml, "project": "21.1"}
    before = client.post("/predict", json=body).get_json()
    assert before["model_version"] == f"{TINY_NAME}-base"
    registry = Registry(settings.projects_dir, "21", TINY_NAME)
    version = publish(registry, settings.projects_dir, with_adapter=str(random_adapter))
    registry.promote(version, "test")
    after = client.post("/predict", json=body).get_json()
    assert after["model_version"] == version.name
    assert all(p["model_version"] == version.name for preds in after["results"] for p in preds)
    scores = lambda r: [[p["score"] for p in preds] for preds in r["results"]]  # noqa: E731
    assert scores(after) != scores(before)  # the adapter changed the model's distribution
    assert version.adapter_name.startswith(version.name + "-")  # + content hash: names never reused
    assert version.adapter_name in [m["id"] for m in httpx.get(engine_url + "/v1/models", timeout=10).json()["data"]]
    registry.rollback("base")
    again = client.post("/predict", json=body).get_json()
    assert again["model_version"] == f"{TINY_NAME}-base" and scores(again) == scores(before)
    other = client.post("/predict", json={**body, "project": "22.1"}).get_json()
    assert other["model_version"] == f"{TINY_NAME}-base"  # versions are per project


@pytest.mark.engine
def test_missing_adapter_is_a_clear_error_and_the_engine_survives(client, settings, random_adapter, engine_url, tmp_path):
    import shutil

    import httpx

    registry = Registry(settings.projects_dir, "23", TINY_NAME)
    version = publish(registry, tmp_path, with_adapter=str(random_adapter))
    registry.promote(version, "test")
    shutil.rmtree(version.adapter_path)  # e.g. MODEL_DIR restored from an old backup
    xml, tasks = load_config("sentiment")
    response = client.post("/predict", json={"tasks": tasks, "label_config": xml, "project": "23.1"})
    assert response.status_code == 500 and "missing on disk" in response.get_json()["error"]
    assert httpx.get(engine_url + "/health", timeout=5).status_code == 200
    registry.rollback("base")
    assert client.post("/predict", json={"tasks": tasks, "label_config": xml, "project": "23.1"}).status_code == 200
