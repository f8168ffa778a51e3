"""End to end against a real Label Studio 1.23.2: connect our backend as an ML backend, retrieve ranked
predictions for every shipped config, annotate from a candidate, receive the webhook, and the
interactive pre-annotation call. Every check reads what Label Studio STORED or answered through its REST
API, never its own summary messages (its "Retrieved N predictions" is printed even when nothing was).
"""
from __future__ import annotations

import base64
import copy
import time

import httpx
import pytest
from label_studio_sdk.label_interface import LabelInterface

from backend.candidates import canonical_key
from tests.conftest import shipped_configs
from tests.e2e.conftest import (
    BASE_VERSION,
    BASIC_AUTH,
    CANDIDATES,
    backend_events,
    connect_ml_backend,
    create_connected_project,
    event_annotation_ids,
    expect,
    retrieve_predictions,
    stored_predictions,
    wait_for,
)

pytestmark = [pytest.mark.e2e, pytest.mark.engine]

SENTIMENT_LABELS = ["Positive", "Negative", "Neutral"]


def our_predictions(backend_url: str, project, task_ids: list[int]) -> list[list[dict]]:
    """What our backend answers for these tasks, asked directly the way Label Studio asks it."""
    tasks = [{"id": t, "data": project.tasks[t]["data"]} for t in task_ids]
    body = {"tasks": tasks, "project": f"{project.id}.0", "label_config": project.label_config, "params": {"context": None}}
    response = httpx.post(f"{backend_url}/predict", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["results"]


def test_all_shipped_configs_are_covered():
    assert {"sentiment", "topics", "ner", "summary"} <= set(shipped_configs())


@pytest.mark.parametrize("name", shipped_configs())
def test_retrieve_predictions_stores_ranked_candidates(name, ls, backend, ls_project, label_studio):
    project = ls_project(name)  # created, connected, 3 tasks imported, predictions retrieved once

    # Label Studio reports the backend connected; reading it re-runs its /health + /setup round trip.
    ml = expect(ls.get(f"/api/ml/{project.ml_backend['id']}"), 200, "read the ML backend")
    assert ml["state"] == "CO", f"ML backend not connected: {ml}\n{backend.log_tail()}"
    assert ml["url"] == backend.url and ml["is_interactive"] is True
    assert ml["model_version"] == BASE_VERSION, ml  # what our /setup returned
    listed = expect(ls.get("/api/ml", params={"project": project.id}), 200, "list ML backends")
    assert [b["id"] for b in listed] == [ml["id"]]

    interface = LabelInterface(project.label_config)
    stored = {t: stored_predictions(ls, t) for t in project.task_ids}
    for task_id, predictions in stored.items():
        where = f"{name} task {task_id}: {[(p['score'], p['result']) for p in predictions]}"
        assert 1 <= len(predictions) <= CANDIDATES, f"{where}\n{backend.log_tail()}\n{label_studio.log_tail()}"
        if name == "sentiment":  # a closed set is scored exhaustively: one prediction per label
            assert len(predictions) == len(SENTIMENT_LABELS), where
            assert sorted(p["result"][0]["value"]["choices"][0] for p in predictions) == sorted(SENTIMENT_LABELS), where
            assert sum(p["score"] for p in predictions) == pytest.approx(1.0, abs=1e-4), where
        for p in predictions:
            assert p["model_version"] == BASE_VERSION, where
            assert isinstance(p["score"], float) and 0.0 <= p["score"] <= 1.0, where
            assert interface.validate_prediction({"result": p["result"]}), f"not valid for the config: {p['result']}"
        assert len({canonical_key(p["result"]) for p in predictions}) == len(predictions), f"duplicates: {where}"
        # Label Studio keeps our order: the first stored prediction is the top-scored one, and so on down.
        scores = [p["score"] for p in predictions]
        assert scores == sorted(scores, reverse=True), f"stored order is not our ranking: {where}"

    if name == "sentiment":  # deterministic (log-probabilities, no sampling): compare with a direct call
        ours = our_predictions(backend.url, project, project.task_ids)
        for task_id, returned in zip(project.task_ids, ours):
            assert isinstance(returned, list), f"/predict must return a LIST of predictions per task, got {returned!r}"
            assert [(p["result"], p["score"]) for p in stored[task_id]] == [
                (p["result"], pytest.approx(p["score"], abs=1e-6)) for p in returned
            ], f"task {task_id}: Label Studio stored something other than what our backend returns"
            top = max(stored[task_id], key=lambda p: p["score"])
            assert top["result"] == returned[0]["result"]

    # Asking again must not duplicate: Label Studio skips tasks holding a prediction of the /setup version.
    retrieve_predictions(ls, project.id)
    again = {t: stored_predictions(ls, t) for t in project.task_ids}
    assert {t: [p["id"] for p in ps] for t, ps in again.items()} == {t: [p["id"] for p in ps] for t, ps in stored.items()}


def test_connecting_creates_a_webhook_to_our_backend(ls, backend, ls_project):
    project = ls_project("sentiment")
    hooks = expect(ls.get("/api/webhooks", params={"project": project.id}), 200, "list webhooks")
    assert [(h["url"], h["is_active"], h["send_payload"], h["send_for_all_actions"], h["headers"]) for h in hooks] == [
        (f"{backend.url}/webhook", True, True, True, {})
    ], hooks


@pytest.fixture(scope="module")
def annotations(ls, ls_project):
    """Two annotations on the first sentiment task, both started from its top candidate: one submitted
    as is, one edited to another label."""
    project = ls_project("sentiment")
    task_id = project.task_ids[0]
    top = stored_predictions(ls, task_id)[0]
    edited = copy.deepcopy(top["result"])
    chosen = edited[0]["value"]["choices"][0]
    edited[0]["value"]["choices"] = [next(label for label in SENTIMENT_LABELS if label != chosen)]
    started = time.time()
    created = [
        expect(
            ls.post(f"/api/tasks/{task_id}/annotations", json={"result": result, "parent_prediction": top["id"]}),
            201,
            "create annotation",
        )
        for result in (top["result"], edited)
    ]
    return {
        "project": project,
        "task": task_id,
        "top": top,
        "results": [top["result"], edited],
        "created": created,
        "started": started,
    }


def test_annotations_keep_their_parent_prediction(ls, annotations):
    top = annotations["top"]
    assert annotations["results"][0] != annotations["results"][1]
    for sent, created in zip(annotations["results"], annotations["created"]):
        stored = expect(ls.get(f"/api/annotations/{created['id']}"), 200, "read annotation")
        assert stored["task"] == annotations["task"]
        assert stored["parent_prediction"] == top["id"], stored
        assert stored["result"][0]["value"] == sent[0]["value"], stored


def assert_annotation_events_arrive(backend, project_id: int, wanted: set[int], since: float, auth=None, timeout=10.0):
    """Poll our backend's GET /events until ANNOTATION_CREATED events name every annotation in `wanted`."""

    def received() -> set[int]:
        ids: set[int] = set()
        for event in backend_events(backend.url, project_id, auth):
            # received_at tells this session's events from older ones in the same Redis database
            if event["action"] == "ANNOTATION_CREATED" and float(event["received_at"]) >= since:
                assert str(event["project"]) == str(project_id), event
                ids |= event_annotation_ids(event)
        return ids

    def arrived() -> set[int] | None:
        ids = received()
        return ids if wanted <= ids else None

    assert wait_for(arrived, timeout=timeout), (
        f"ANNOTATION_CREATED for annotations {sorted(wanted)} of project {project_id} not recorded within "
        f"{timeout:.0f} s; events: {backend_events(backend.url, project_id, auth)[-10:]}\n{backend.log_tail()}"
    )


def test_annotation_created_webhooks_reach_our_backend(backend, annotations):
    wanted = {a["id"] for a in annotations["created"]}
    assert_annotation_events_arrive(backend, annotations["project"].id, wanted, since=annotations["started"])


def test_backend_behind_basic_auth(ls, basic_auth_backend):
    """README: with BASIC_AUTH_USER/PASS on the backend, connect with Basic Authentication, and give the
    webhook Label Studio creates an Authorization header (it copies no credentials into it)."""
    url = basic_auth_backend.url
    user, password = BASIC_AUTH
    project = create_connected_project(
        ls, url, "sentiment", auth_method="BASIC_AUTH", basic_auth_user=user, basic_auth_pass=password
    )
    assert project.ml_backend["state"] == "CO", project.ml_backend
    refused = connect_ml_backend(ls, project.id, url)  # the same URL without credentials
    assert refused.status_code == 400 and "401" in refused.text, refused.text

    retrieve_predictions(ls, project.id)
    for task_id in project.task_ids:
        predictions = stored_predictions(ls, task_id)
        assert len(predictions) == len(SENTIMENT_LABELS), f"{predictions}\n{basic_auth_backend.log_tail()}"
        assert {p["model_version"] for p in predictions} == {BASE_VERSION}

    (hook,) = expect(ls.get("/api/webhooks", params={"project": project.id}), 200, "list webhooks")
    assert hook["url"] == f"{url}/webhook"
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    expect(ls.patch(f"/api/webhooks/{hook['id']}", json={"headers": {"Authorization": f"Basic {token}"}}), 200, "webhook header")
    started = time.time()
    top = stored_predictions(ls, project.task_ids[0])[0]
    annotation = expect(
        ls.post(f"/api/tasks/{project.task_ids[0]}/annotations", json={"result": top["result"], "parent_prediction": top["id"]}),
        201,
        "create annotation",
    )
    assert_annotation_events_arrive(basic_auth_backend, project.id, {annotation["id"]}, since=started, auth=BASIC_AUTH)


def test_interactive_annotating_returns_our_top_candidate(ls, backend, ls_project):
    project = ls_project("sentiment")
    task_id = project.task_ids[1]
    # deterministic config: what the backend serves now (the project's label prior moves with its annotations,
    # which other tests add, so the predictions stored at the start may be scored differently by now)
    top = our_predictions(backend.url, project, [task_id])[0][0]
    answer = expect(
        ls.post(f"/api/ml/{project.ml_backend['id']}/interactive-annotating", json={"task": task_id, "context": {}}),
        200,
        "interactive annotating",
    )
    assert "errors" not in answer, f"{answer}\n{backend.log_tail()}"
    data = answer["data"]
    # Label Studio's frontend (web/dist/apps/labelstudio/main.js) shows `response.data.result` as the suggestion.
    assert isinstance(data, dict), f"interactive answer must be one prediction (the UI reads data.result), got: {data!r}"
    assert data["result"] == top["result"]
    assert data["score"] == pytest.approx(top["score"], abs=1e-6)
    assert data["model_version"] == BASE_VERSION
