"""Property-based fuzzing of every route: no generated input gets a 5xx (issue 15, point 3).

Hypothesis generates request bodies three ways per route: arbitrary JSON values, raw bytes, and objects of
the route's own shape whose fields are fuzzed (so inputs get past the first checks and into the compiler,
the predictor, the image fetcher, Redis and RQ). The app is the real one (in process, through Flask's test
client), with the real engine and a real Redis database. Every 4xx must carry a JSON `error` message.

Bounded: DATAENGINE_FUZZ_EXAMPLES examples per route (default 1000), no per-example deadline; the number of
requests sent is printed at the end (run pytest with -s to see it).
"""
from __future__ import annotations

import json
import os
from collections import Counter
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings as hypothesis_settings, strategies as st

from backend.app import create_app
from tests.conftest import flushed_redis, load_config, make_settings, redis_db, shipped_configs

pytestmark = pytest.mark.engine

REDIS_URL = redis_db(14)  # shared with tests/test_hostile_input.py, flushed around each test
EXAMPLES = int(os.environ.get("DATAENGINE_FUZZ_EXAMPLES", "1000"))
SENT: Counter = Counter()  # requests sent, per route
STATUSES: Counter = Counter()  # (route, status) of the answers
SHIPPED = [load_config(name) for name in ("sentiment", "ner", "topics", "image_classification", "ranking", "pairwise")]
CONFIGS = [xml for xml, _ in SHIPPED]
ACTIONS = ["ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED", "START_TRAINING",
           "TASKS_CREATED", "PROJECT_UPDATED"]
FUZZ = hypothesis_settings(
    max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)

# --- strategies ---------------------------------------------------------------------------------------

text = st.text(max_size=40)
scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | text
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4), max_leaves=16
)
ids = st.integers(-5, 2**64) | st.sampled_from([1, 2, 3]) | text | st.none() | st.booleans() | st.floats()
projects = st.integers(1, 50) | st.integers(1, 50).map(str) | ids | st.sampled_from(["1.1712", "7", "../x", "a" * 70, "1.2.3"]) | st.fixed_dictionaries({"id": ids})
configs = st.sampled_from(CONFIGS) | text | json_values | st.sampled_from(["<View>", "<View><Text name='t' value='$t'/></View>"])
urls = st.sampled_from([
    "http://example.com:99999/a.png", "http://[x", "http://127.0.0.1/a\t.png", "http://127.0.0.1:9/a.png",
    "/data/upload/1/a.png", "/data/local-files/?d=../../etc/passwd", "data:image/png;base64,@@", "s3://b/k", "",
    "http://\u00df.invalid/x.png", "http://[::1]:0/", "http://10.0.0.1/x.png", "ftp://x/y",
]) | text
field_values = text | urls | json_values
task_data = st.dictionaries(st.sampled_from(["text", "image", "t", "candidates", "prompt", "answer_a", "answer_b"]) | text,
                            field_values, max_size=4)
tasks = st.fixed_dictionaries({}, optional={"id": ids, "data": task_data | json_values, "predictions": json_values}) | json_values


@st.composite
def shipped_predict(draw) -> dict:
    """A shipped config with its sample tasks, some of their fields replaced by fuzzed values: these get past
    validation into the predictor, the image fetcher and the engine."""
    xml, samples = draw(st.sampled_from(SHIPPED))
    chosen = draw(st.lists(st.sampled_from(samples), min_size=1, max_size=3))
    mutated = []
    for task in chosen:
        data = dict(task["data"])
        for key in draw(st.lists(st.sampled_from(sorted(data)), max_size=2)):
            data[key] = draw(field_values)
        mutated.append({"id": draw(ids), "data": data})
    body = {"tasks": mutated, "label_config": xml, "project": draw(projects)}
    if draw(st.booleans()):
        body["params"] = {"context": draw(st.none() | json_values), "extra_params": draw(extra_params)}
    return body

extra_params = json_values | st.fixed_dictionaries({}, optional={"candidates": json_values | st.integers(-2, 40),
                                                                  "temperature": json_values | st.floats()})


def shaped(required: dict, optional: dict) -> st.SearchStrategy:
    return st.fixed_dictionaries(required, optional=optional)


BODIES = {
    "/setup": shaped({}, {"project": projects, "schema": configs, "label_config": configs, "extra_params": extra_params,
                          "hostname": st.sampled_from(["", "http://127.0.0.1:9", "https://elsewhere.invalid", "x"]) | json_values,
                          "access_token": text | json_values}),
    "/predict": shipped_predict() | shaped({"tasks": st.lists(tasks, max_size=3) | json_values},
                                           {"label_config": configs, "project": projects,
                                            "params": shaped({}, {"context": json_values, "extra_params": extra_params}) | json_values}),
    "/webhook": shaped({"action": st.sampled_from(ACTIONS) | text | json_values},
                       {"project": projects, "annotation": json_values | shaped({}, {"id": ids, "task": ids, "result": json_values}),
                        "annotations": st.lists(shaped({}, {"id": ids, "task": ids}) | json_values, max_size=3) | json_values,
                        "task": shaped({}, {"id": ids}) | json_values, "tasks": st.lists(ids | shaped({}, {"id": ids}), max_size=3)}),
    "/prelabel": shaped({}, {"project": projects, "force": json_values, "limit": json_values | st.integers(-1, 10),
                             "tasks": st.lists(ids, max_size=5) | json_values}),
}


def raw_body(route: str) -> st.SearchStrategy[bytes]:
    shaped_json = BODIES[route].map(lambda v: json.dumps(v).encode())
    other = (json_values.map(lambda v: json.dumps(v).encode()) | st.binary(max_size=200)
             | st.text(max_size=200).map(lambda s: s.encode("utf-8", "surrogatepass")))
    return st.one_of(shaped_json, shaped_json, shaped_json, other)  # mostly the route's own shape


content_types = st.sampled_from(["application/json"] * 6 + ["text/plain", "", "application/json; charset=latin-1",
                                                           "multipart/form-data"])

# --- the app ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(tmp_path_factory, engine_url):
    model_dir = tmp_path_factory.mktemp("fuzz") / "model_dir"
    with flushed_redis(REDIS_URL):
        app = create_app(make_settings(model_dir, engine_url, redis_url=REDIS_URL, candidates=2))
        yield app.test_client()
        app.extensions["dataengine"].predictor.close()
    print(f"\nfuzz: {sum(SENT.values())} requests sent ({dict(SENT)}); answers: {dict(sorted(STATUSES.items()))}")


def check(response, route: str) -> None:
    SENT[route] += 1
    STATUSES[(route, response.status_code)] += 1
    assert response.status_code < 500, f"{route}: {response.status_code} {response.get_data(as_text=True)[:500]}"
    if response.status_code >= 400 and response.status_code != 404 or response.is_json:
        body = response.get_json()
        assert response.status_code < 400 or isinstance(body.get("error"), str), body


@pytest.mark.parametrize("route", sorted(BODIES))
def test_post_routes_never_answer_5xx(client, route):
    @FUZZ
    @given(body=raw_body(route), content_type=content_types)
    def post(body, content_type):
        check(client.post(route, data=body, headers={"Content-Type": content_type} if content_type else {}), route)

    post()


query_values = text | st.integers().map(str) | st.sampled_from(["1", "0", "-1", "10001", "1;DROP", "../x", "ü"])


def test_get_routes_never_answer_5xx(client):
    @FUZZ
    @given(
        route=st.sampled_from(["/events", "/jobs", "/versions", "/health", "/metrics", "/jobs/"]),
        params=st.dictionaries(st.sampled_from(["project", "limit"]) | text, query_values, max_size=3),
        job_id=query_values,
    )
    def get(route, params, job_id):
        path = route + quote(job_id, safe="") if route == "/jobs/" else route
        check(client.get(path, query_string=params), route)

    get()
