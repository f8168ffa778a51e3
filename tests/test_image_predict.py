"""/predict for image projects against the REAL vLLM engine serving a tiny random vision-language model
(Idefics3/SmolVLM architecture, built offline at test time; see training/tiny_vlm.py for why not Qwen2-VL on
this CPU engine).

The model is random, so these tests check what must hold whatever it says: predictions are valid for the
config, closed sets are scored exhaustively, the image really reaches the model, and a bad image fails
only its own task. The local HTTP server from tests/test_images.py stands in for Label Studio's file
serving (token-checked `/data/upload/...`); a real Label Studio runs in tests/e2e.
"""
from __future__ import annotations

import os
import threading

import pytest
from label_studio_sdk.label_interface import LabelInterface
from PIL import Image

from tests.conftest import free_port, load_config, make_settings, shipped_configs
from tests.test_images import CORRUPT, GOOD, TOKEN, VQA, ImageHost, data_uri, encode, png, png_header_only

pytestmark = pytest.mark.engine
TINY_VLM_NAME = "tiny-vlm"


@pytest.fixture(scope="module")
def vlm_engine_url(tmp_path_factory):
    """DATAENGINE_TEST_VLM_ENGINE_URL reuses a running engine serving the tiny VLM as "tiny-vlm"."""
    external = os.environ.get("DATAENGINE_TEST_VLM_ENGINE_URL")
    if external:
        yield external
        return
    from backend.engine_process import EngineProcess
    from backend.settings import Settings
    from training.tiny_vlm import build_tiny_vlm

    model = build_tiny_vlm(tmp_path_factory.mktemp("models") / "tiny-vlm")
    settings = Settings(
        model=str(model), served_model_name=TINY_VLM_NAME, engine_port=free_port(), engine_max_model_len=2048,
        model_dir=tmp_path_factory.mktemp("vlm-engine"), engine_start_timeout=400,
    )
    engine = EngineProcess(settings)
    assert "--limit-mm-per-prompt" in engine.command(str(model))  # a VLM gets the image limit flags
    engine.start()
    yield engine.url
    engine.stop()


@pytest.fixture(scope="module")
def label_studio_files():
    server = ImageHost()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def client(tmp_path, vlm_engine_url, label_studio_files):
    from backend.app import create_app

    settings = make_settings(
        tmp_path / "model_dir", vlm_engine_url, served_model_name=TINY_VLM_NAME,
        label_studio_url=label_studio_files.url, label_studio_api_key=TOKEN, allow_private_urls=False,
    )
    app = create_app(settings)
    yield app.test_client()
    app.extensions["dataengine"].predictor.close()


def post_predict(client, xml, tasks, **extra):
    return client.post("/predict", json={"tasks": tasks, "label_config": xml, "project": "1.1700000000", **extra})


def predict(client, xml, tasks, **extra):
    response = post_predict(client, xml, tasks, **extra)
    assert response.status_code == 200, response.get_json()
    return response.get_json()["results"]


@pytest.mark.parametrize("name", shipped_configs(images=True))
def test_shipped_image_configs_get_valid_ranked_predictions(client, name):
    xml, tasks = load_config(name)
    interface = LabelInterface(xml)
    results = predict(client, xml, tasks)
    assert len(results) == len(tasks) == 3
    for predictions in results:
        assert predictions
        scores = [p["score"] for p in predictions]
        assert scores == sorted(scores, reverse=True)
        for prediction in predictions:
            assert prediction["model_version"] == f"{TINY_VLM_NAME}-base"
            assert interface.validate_prediction({"result": prediction["result"]}), prediction


def test_image_classification_is_scored_exhaustively_and_the_image_reaches_the_model(client):
    xml, _ = load_config("image_classification")
    colors = [(255, 0, 0), (0, 0, 255), (20, 200, 20)]
    tasks = [{"id": i, "data": {"image": data_uri(png((56, 56), color))}} for i, color in enumerate(colors)]
    first = predict(client, xml, tasks)
    assert first == predict(client, xml, tasks)  # deterministic
    distributions = []
    for predictions in first:
        assert {p["result"][0]["value"]["choices"][0] for p in predictions} == {"Circle", "Square", "Triangle"}
        assert abs(sum(p["score"] for p in predictions) - 1.0) < 1e-3
        distributions.append(tuple(sorted((p["result"][0]["value"]["choices"][0], p["score"]) for p in predictions)))
    # same prompt, different pixels: the scores differ only if the image is part of the model's input
    assert len(set(distributions)) == 3


def test_multiple_choice_rating_and_visual_question_answering(client):
    tasks = [{"id": 1, "data": {"image": data_uri(GOOD), "question": "What colour is the square?"}}]
    predictions = predict(client, VQA, tasks, params={"extra_params": {"candidates": 3}})[0]
    assert predictions
    interface = LabelInterface(VQA)
    for prediction in predictions:
        assert interface.validate_prediction({"result": prediction["result"]})
        assert {"answer", "quality"} <= {r["from_name"] for r in prediction["result"]}


def test_label_studio_uploads_are_fetched_with_the_token(client, label_studio_files):
    xml, _ = load_config("image_captioning")
    label_studio_files.seen_auth.clear()
    results = predict(client, xml, [{"id": 5, "data": {"image": "/data/upload/1/cat.png"}}])
    assert results[0] and ("/data/upload/1/cat.png", f"Token {TOKEN}") in label_studio_files.seen_auth


def test_bad_images_fail_only_their_own_task(client, label_studio_files):
    xml, _ = load_config("image_classification")
    private = label_studio_files.url.replace("127.0.0.1", "localhost") + "/ok.png"  # loopback, not Label Studio
    unreachable = "http://images.no-such-host.invalid/cat.png"  # a closed loopback port would be refused as private
    tiff = data_uri(encode(Image.new("RGB", (8, 8)), "TIFF"), "application/octet-stream")
    tasks = [
        {"id": 1, "data": {"image": data_uri(GOOD)}},
        {"id": 2, "data": {"image": data_uri(CORRUPT)}},
        {"id": 3, "data": {"image": data_uri(png_header_only(50_000, 50_000))}},
        {"id": 4, "data": {"image": tiff}},
        {"id": 5, "data": {"image": unreachable}},
        {"id": 6, "data": {"image": private}},
        {"id": 7, "data": {"image": "/data/upload/1/ok.png"}},
        {"id": 8, "data": {"caption": "no image field"}},
    ]
    response = post_predict(client, xml, tasks)
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert [bool(p) for p in body["results"]] == [True, False, False, False, False, False, True, False]
    errors = {e["task"]: e for e in body["errors"]}
    assert {task: e["status"] for task, e in errors.items()} == {2: 422, 3: 413, 4: 415, 5: 422, 6: 403, 8: 422}
    assert "corrupt" in errors[2]["error"] and "pixels" in errors[3]["error"] and "TIFF" in errors[4]["error"]
    assert "cannot resolve host" in errors[5]["error"] and "DATAENGINE_ALLOW_PRIVATE_URLS" in errors[6]["error"]
    assert "'image'" in errors[8]["error"]
    assert all(e["error"].startswith("task ") for e in errors.values())
    assert [e["index"] for e in body["errors"]] == [1, 2, 3, 4, 5, 7]


def test_interactive_mode_gives_failed_tasks_an_empty_prediction(client):
    xml, _ = load_config("image_classification")
    tasks = [{"id": 1, "data": {"image": data_uri(GOOD)}}, {"id": 2, "data": {"image": data_uri(CORRUPT)}}]
    body = post_predict(client, xml, tasks, params={"context": {}}).get_json()
    assert body["results"][0]["result"] and body["results"][1]["result"] == []
    assert body["errors"][0]["task"] == 2


def test_a_call_whose_every_task_fails_is_a_4xx_naming_the_problem(client):
    xml, _ = load_config("image_classification")
    response = post_predict(client, xml, [{"id": 9, "data": {"image": data_uri(b"not an image")}}])
    assert response.status_code == 422
    assert "task 9 image 'image'" in response.get_json()["error"]


def test_more_images_than_the_engine_takes_is_a_clear_422(client):
    xml = """<View><Image name="a" value="$a"/><Image name="b" value="$b"/>
      <Choices name="same" toName="a"><Choice value="Yes"/><Choice value="No"/></Choices>
      <Choices name="other" toName="b"><Choice value="Yes"/><Choice value="No"/></Choices></View>"""
    response = post_predict(client, xml, [{"id": 1, "data": {"a": data_uri(GOOD), "b": data_uri(GOOD)}}])
    assert response.status_code == 422, response.get_json()
    assert "DATAENGINE_ENGINE_MAX_IMAGES" in response.get_json()["error"]
