"""Preference pairs and SFT examples from Label Studio exports (pure; no engine, no Redis).

Fixtures follow Label Studio's export JSON: annotations carry `completed_by`, `was_cancelled`,
`parent_prediction`, `updated_at`; result regions carry `id`/`origin`; Ranker results are keyed by the
Ranker's name (or by bucket), Pairwise results point `to_name` at the Pairwise tag itself.
"""
from __future__ import annotations

import json
import random

import pytest

from backend.label_config import compile_label_config
from backend.prompts import build_messages
from tests.conftest import LABEL_CONFIGS
from training.preferences import (
    SOURCE_ANNOTATION,
    SOURCE_BUCKETS,
    SOURCE_PAIRWISE,
    SOURCE_PICKED,
    SOURCE_RANKER,
    derive,
)

SENTIMENT = (LABEL_CONFIGS / "sentiment.xml").read_text()
TOPICS = (LABEL_CONFIGS / "topics.xml").read_text()
NER = (LABEL_CONFIGS / "ner.xml").read_text()
SUMMARY = (LABEL_CONFIGS / "summary.xml").read_text()
INSTRUCTIONS = "Label the overall opinion of the reviewer."

RANKER = """<View>
  <Text name="prompt" value="$prompt"/>
  <List name="candidates" value="$candidates" title="Model answers"/>
  <Ranker name="rank" toName="candidates"/>
</View>"""

RANKER_BUCKETS = """<View>
  <Text name="prompt" value="$prompt"/>
  <List name="candidates" value="$candidates" title="Model answers"/>
  <Ranker name="rank" toName="candidates">
    <Bucket name="best" title="Best"/>
    <Bucket name="acceptable" title="Acceptable"/>
    <Bucket name="reject" title="Reject"/>
  </Ranker>
</View>"""

PAIRWISE = """<View>
  <Text name="prompt" value="$prompt"/>
  <Pairwise name="comparison" toName="answer_a,answer_b" selectionStyle="background-color: #eee"/>
  <Text name="answer_a" value="$answer_a"/>
  <Text name="answer_b" value="$answer_b"/>
</View>"""

HASH_MAP_ANSWERS = [
    {"id": "c1", "title": "Candidate 1", "body": "A hash map stores key-value pairs and finds values by hashing keys."},
    {"id": "c2", "title": "Candidate 2", "body": "It is a map."},
    {"id": "c3", "title": "Candidate 3", "body": "A hash map is a table that hashes each key to a bucket, so lookups take constant time on average."},
    {"id": "c4", "title": "Candidate 4", "body": "A hash map is like a list you search from the start."},
    {"id": "c5", "title": "Candidate 5", "body": "Hash maps are used in Python dictionaries."},
]
HASH_MAP_PROMPT = "Explain what a hash map is in one sentence."


# --- fixture builders (the shapes of a Label Studio JSON export) -----------------------------------


def choices(label, region_id, origin="manual", from_name="sentiment"):
    labels = label if isinstance(label, list) else [label]
    return {"id": region_id, "from_name": from_name, "to_name": "text", "type": "choices", "origin": origin,
            "value": {"choices": labels}}


def annotation(ann_id, task_id, result, *, by=1, parent=None, cancelled=False, updated="2024-05-02T10:00:00Z"):
    return {
        "id": ann_id, "completed_by": by, "result": result, "was_cancelled": cancelled, "ground_truth": False,
        "created_at": updated, "updated_at": updated, "draft_created_at": None, "lead_time": 7.4,
        "prediction": {}, "result_count": len(result), "unique_id": f"u-{ann_id}", "import_id": None,
        "last_action": None, "bulk_created": False, "task": task_id, "project": 3, "updated_by": by,
        "parent_prediction": parent, "parent_annotation": None, "last_created_by": None,
    }


def prediction(pred_id, task_id, result, score):
    return {
        "id": pred_id, "result": result, "model_version": "Qwen2.5-0.5B-Instruct@base", "created_ago": "2 hours",
        "score": score, "cluster": None, "neighbors": None, "mislabeling": 0.0,
        "created_at": "2024-05-02T08:00:00Z", "updated_at": "2024-05-02T08:00:00Z", "model": None,
        "model_run": None, "task": task_id, "project": 3,
    }


def task(task_id, data, annotations=(), predictions=()):
    return {
        "id": task_id, "data": data, "annotations": list(annotations), "predictions": list(predictions),
        "drafts": [], "meta": {}, "created_at": "2024-05-01T09:00:00Z", "updated_at": "2024-05-02T10:00:00Z",
        "inner_id": task_id, "total_annotations": len(annotations), "cancelled_annotations": 0,
        "total_predictions": len(predictions), "comment_count": 0, "unresolved_comment_count": 0,
        "last_comment_updated_at": None, "project": 3, "updated_by": [], "file_upload": "reviews.json",
        "comment_authors": [],
    }


def answer(**fields):
    return json.dumps(fields, separators=(",", ":"), ensure_ascii=False)


def summarize(pairs):
    return [(p.chosen, p.rejected, round(p.margin, 4), round(p.weight, 4), p.source) for p in pairs]


def base_counts(**overrides):
    counts = {
        "tasks": 1, "annotations": 1, "cancelled": 0, "empty": 0, "excluded_annotations": 0, "invalid_tasks": 0,
        "ties": 0, "dropped_low_agreement": 0, "pairs": 0, "sft": 1, "pairs_by_source": {},
    }
    counts.update(overrides)
    return counts


PASTA = "The pasta was cold and the waiter ignored us for twenty minutes."


def sentiment_predictions(task_id, first_id=101):
    return [
        prediction(first_id, task_id, [choices("Negative", "p1")], 0.62),
        prediction(first_id + 1, task_id, [choices("Neutral", "p2")], 0.25),
        prediction(first_id + 2, task_id, [choices("Positive", "p3")], 0.13),
    ]


# --- answer projects -------------------------------------------------------------------------------


def test_choices_picked_unchanged_beats_the_other_candidates():
    # Exactly as exported: the annotator accepted prediction 101 as is (region id and origin kept).
    exported = {
        "id": 7,
        "data": {"text": PASTA},
        "annotations": [
            {
                "id": 55, "completed_by": 2,
                "result": [{"id": "p1", "from_name": "sentiment", "to_name": "text", "type": "choices",
                            "origin": "prediction", "value": {"choices": ["Negative"]}}],
                "was_cancelled": False, "ground_truth": False, "created_at": "2024-05-02T10:00:00.123456Z",
                "updated_at": "2024-05-02T10:00:00.123456Z", "lead_time": 3.2, "prediction": {}, "result_count": 1,
                "task": 7, "project": 3, "parent_prediction": 101, "parent_annotation": None, "last_action": None,
            }
        ],
        "predictions": sentiment_predictions(7),
    }
    derived = derive([exported], SENTIMENT, INSTRUCTIONS)

    negative, neutral, positive = answer(sentiment="Negative"), answer(sentiment="Neutral"), answer(sentiment="Positive")
    assert summarize(derived.pairs) == [
        (negative, neutral, 1.0, 1.0, SOURCE_ANNOTATION),
        (negative, positive, 1.0, 1.0, SOURCE_ANNOTATION),
    ]  # picked>unpicked would repeat these exactly, so it adds nothing
    config = compile_label_config(SENTIMENT, INSTRUCTIONS)
    expected_prompt = build_messages(config, {"text": PASTA}, INSTRUCTIONS)
    pair = derived.pairs[0]
    assert pair.task_id == 7 and pair.prompt == expected_prompt
    assert pair.chosen_result == exported["annotations"][0]["result"]
    assert pair.rejected_result == exported["predictions"][1]["result"]
    [example] = derived.sft
    assert (example.task_id, example.completion, example.weight) == (7, negative, 1.0)
    assert example.prompt == expected_prompt
    assert derived.counts == base_counts(pairs=2, pairs_by_source={SOURCE_ANNOTATION: 2})


def test_multiple_choice_edited_from_a_candidate_adds_picked_over_unpicked():
    review = "Arrived two weeks late and the handle snapped on day one."
    predictions = [
        prediction(201, 8, [choices(["Price", "Quality"], "t1", from_name="topics")], 0.5),
        prediction(202, 8, [choices(["Quality"], "t2", from_name="topics")], 0.3),
        prediction(203, 8, [choices(["Service"], "t3", from_name="topics")], 0.2),
    ]
    # started from 201, dropped Price, added Delivery (Label Studio stores the order clicked)
    edited = [choices(["Delivery", "Quality"], "t1", origin="prediction-changed", from_name="topics")]
    derived = derive([task(8, {"text": review}, [annotation(60, 8, edited, parent=201)], predictions)], TOPICS)

    human = answer(topics=["Quality", "Delivery"])  # config order, as the model is asked to answer
    p201, p202, p203 = answer(topics=["Price", "Quality"]), answer(topics=["Quality"]), answer(topics=["Service"])
    assert summarize(derived.pairs) == [
        (human, p201, 1.0, 1.0, SOURCE_ANNOTATION),
        (human, p202, 1.0, 1.0, SOURCE_ANNOTATION),
        (human, p203, 1.0, 1.0, SOURCE_ANNOTATION),
        (p201, p202, 0.5, 1.0, SOURCE_PICKED),
        (p201, p203, 0.5, 1.0, SOURCE_PICKED),
    ]
    assert [e.completion for e in derived.sft] == [human]
    assert derived.counts == base_counts(pairs=5, pairs_by_source={SOURCE_ANNOTATION: 3, SOURCE_PICKED: 2})


def test_picked_candidate_never_beats_the_answer_the_human_switched_to():
    predictions = sentiment_predictions(9)  # 101 Negative, 102 Neutral, 103 Positive
    switched = [choices("Positive", "p1", origin="prediction-changed")]
    derived = derive([task(9, {"text": PASTA}, [annotation(61, 9, switched, parent=101)], predictions)], SENTIMENT)

    negative, neutral, positive = answer(sentiment="Negative"), answer(sentiment="Neutral"), answer(sentiment="Positive")
    assert summarize(derived.pairs) == [
        (positive, negative, 1.0, 1.0, SOURCE_ANNOTATION),
        (positive, neutral, 1.0, 1.0, SOURCE_ANNOTATION),
        (negative, neutral, 0.5, 1.0, SOURCE_PICKED),  # not Negative > Positive: the human chose Positive
    ]


MERKEL = "Angela Merkel met executives from Siemens in Munich on Tuesday."


def span(region_id, start, end, label, origin="manual"):
    return {"id": region_id, "from_name": "label", "to_name": "text", "type": "labels", "origin": origin,
            "value": {"start": start, "end": end, "text": MERKEL[start:end], "labels": [label]}}


def test_ner_labels_become_entities_in_offset_order():
    predictions = [
        prediction(301, 10, [span("n1", 0, 13, "PER"), span("n2", 34, 41, "LOC"), span("n3", 45, 51, "LOC")], 0.7),
        prediction(302, 10, [span("n4", 7, 13, "PER"), span("n5", 34, 41, "ORG")], 0.3),
    ]
    # the annotator fixed Siemens; Label Studio lists the changed region last
    human = [span("n1", 0, 13, "PER", "prediction"), span("n3", 45, 51, "LOC", "prediction"),
             span("n2", 34, 41, "ORG", "prediction-changed")]
    derived = derive([task(10, {"text": MERKEL}, [annotation(62, 10, human, parent=301)], predictions)], NER)

    def entities(*pairs):
        return answer(label=[{"text": text, "label": label} for text, label in pairs])

    chosen = entities(("Angela Merkel", "PER"), ("Siemens", "ORG"), ("Munich", "LOC"))
    p301 = entities(("Angela Merkel", "PER"), ("Siemens", "LOC"), ("Munich", "LOC"))
    p302 = entities(("Merkel", "PER"), ("Siemens", "ORG"))
    assert summarize(derived.pairs) == [
        (chosen, p301, 1.0, 1.0, SOURCE_ANNOTATION),
        (chosen, p302, 1.0, 1.0, SOURCE_ANNOTATION),
        (p301, p302, 0.5, 1.0, SOURCE_PICKED),
    ]
    assert derived.sft[0].completion == chosen
    assert derived.sft[0].result == human


def test_textarea_edit():
    review = "Shipping was quick, but the box was crushed and one glass was broken."
    summary_region = lambda rid, text, origin="manual": {  # noqa: E731
        "id": rid, "from_name": "summary", "to_name": "text", "type": "textarea", "origin": origin,
        "value": {"text": [text]},
    }
    predictions = [
        prediction(401, 11, [summary_region("s1", "Fast shipping, damaged box.")], 0.6),
        prediction(402, 11, [summary_region("s2", "The customer is happy.")], 0.4),
    ]
    edited = [summary_region("s1", "Fast shipping, but the box arrived crushed with a broken glass.", "prediction-changed")]
    derived = derive([task(11, {"text": review}, [annotation(63, 11, edited, parent=401)], predictions)], SUMMARY)

    human = answer(summary="Fast shipping, but the box arrived crushed with a broken glass.")
    p401, p402 = answer(summary="Fast shipping, damaged box."), answer(summary="The customer is happy.")
    assert summarize(derived.pairs) == [
        (human, p401, 1.0, 1.0, SOURCE_ANNOTATION),
        (human, p402, 1.0, 1.0, SOURCE_ANNOTATION),
        (p401, p402, 0.5, 1.0, SOURCE_PICKED),
    ]
    assert [e.completion for e in derived.sft] == [human]


def test_cancelled_and_empty_annotations_are_counted_but_give_nothing():
    tasks = [
        task(12, {"text": PASTA}, [annotation(70, 12, [], cancelled=True)], sentiment_predictions(12)),
        # skipped after clicking a choice: Label Studio keeps the result on a cancelled annotation
        task(13, {"text": PASTA}, [annotation(71, 13, [choices("Neutral", "x")], cancelled=True)], sentiment_predictions(13)),
        task(14, {"text": PASTA}, [annotation(72, 14, [], by=2)], sentiment_predictions(14)),
        task(15, {"text": PASTA}, [], sentiment_predictions(15)),  # not labeled yet
    ]
    derived = derive(tasks, SENTIMENT)

    assert derived.pairs == [] and derived.sft == []
    assert derived.counts == base_counts(tasks=4, annotations=3, cancelled=2, empty=1, sft=0)


# --- comparison projects ---------------------------------------------------------------------------


def ranker_result(ranking, region_id="rk1", to_name="candidates"):
    return [{"id": region_id, "from_name": "rank", "to_name": to_name, "type": "ranker", "origin": "manual",
             "value": {"ranker": ranking}}]


def body(item_id):
    return next(item["body"] for item in HASH_MAP_ANSWERS if item["id"] == item_id)


def test_ranker_list_gives_every_ordered_pair_with_distance_margins():
    data = {"prompt": HASH_MAP_PROMPT, "candidates": HASH_MAP_ANSWERS[:4]}
    model_order = [prediction(501, 16, ranker_result({"rank": ["c1", "c2", "c3", "c4"]}), 0.8)]
    human = ranker_result({"rank": ["c3", "c1", "c4", "c2"]})
    derived = derive([task(16, data, [annotation(80, 16, human, parent=501)], model_order)], RANKER)

    third = round(1 / 3, 4)
    c1, c2, c3, c4 = (body(i) for i in ("c1", "c2", "c3", "c4"))
    assert summarize(derived.pairs) == [
        (c3, c1, third, 1.0, SOURCE_RANKER),
        (c3, c4, round(2 / 3, 4), 1.0, SOURCE_RANKER),
        (c3, c2, 1.0, 1.0, SOURCE_RANKER),
        (c1, c4, third, 1.0, SOURCE_RANKER),
        (c1, c2, round(2 / 3, 4), 1.0, SOURCE_RANKER),
        (c4, c2, third, 1.0, SOURCE_RANKER),
    ]  # the model's own ordering (the prediction) gives no pairs of its own
    assert derived.pairs[0].prompt == [{"role": "user", "content": HASH_MAP_PROMPT}]
    assert derived.pairs[0].chosen_result == human
    [example] = derived.sft
    assert (example.completion, example.prompt) == (c3, [{"role": "user", "content": HASH_MAP_PROMPT}])
    assert derived.counts == base_counts(pairs=6, pairs_by_source={SOURCE_RANKER: 6})


def test_ranker_result_is_keyed_by_the_ranker_name():
    config = RANKER.replace('name="rank"', 'name="preference"')
    result = [{"id": "rk", "from_name": "preference", "to_name": "candidates", "type": "ranker",
               "value": {"ranker": {"preference": ["c2", "c1"]}}}]
    data = {"prompt": HASH_MAP_PROMPT, "candidates": HASH_MAP_ANSWERS[:2]}
    derived = derive([task(17, data, [annotation(81, 17, result)])], config)

    assert summarize(derived.pairs) == [(body("c2"), body("c1"), 1.0, 1.0, SOURCE_RANKER)]


def test_ranker_buckets_pair_across_buckets_in_config_order_and_ignore_the_unplaced_pool():
    data = {"prompt": HASH_MAP_PROMPT, "candidates": HASH_MAP_ANSWERS}
    human = ranker_result({"best": ["c3"], "acceptable": ["c1", "c5"], "reject": ["c2"], "_": ["c4"]})
    derived = derive([task(18, data, [annotation(82, 18, human)])], RANKER_BUCKETS)

    c1, c2, c3, c5 = (body(i) for i in ("c1", "c2", "c3", "c5"))
    assert summarize(derived.pairs) == [
        (c3, c1, 0.5, 1.0, SOURCE_BUCKETS),
        (c3, c5, 0.5, 1.0, SOURCE_BUCKETS),
        (c3, c2, 1.0, 1.0, SOURCE_BUCKETS),
        (c1, c2, 0.5, 1.0, SOURCE_BUCKETS),
        (c5, c2, 0.5, 1.0, SOURCE_BUCKETS),
    ]  # nothing inside "acceptable", nothing with c4
    assert [e.completion for e in derived.sft] == [c3]
    assert derived.counts == base_counts(pairs=5, pairs_by_source={SOURCE_BUCKETS: 5})


def test_pairwise_selected_side_is_chosen():
    data = {
        "prompt": "Summarize: the meeting moved from Monday to Wednesday because the venue flooded.",
        "answer_a": "The meeting is on Monday.",
        "answer_b": "The meeting moved to Wednesday after the venue flooded.",
    }
    # Label Studio's Pairwise result points to_name at the Pairwise tag itself
    result = [{"id": "pw1", "from_name": "comparison", "to_name": "comparison", "type": "pairwise",
               "origin": "manual", "value": {"selected": "right"}}]
    derived = derive([task(19, data, [annotation(83, 19, result)])], PAIRWISE)

    assert summarize(derived.pairs) == [(data["answer_b"], data["answer_a"], 1.0, 1.0, SOURCE_PAIRWISE)]
    assert derived.pairs[0].prompt == [{"role": "user", "content": data["prompt"]}]  # the sides are not the prompt
    assert [e.completion for e in derived.sft] == [data["answer_b"]]
    assert derived.counts == base_counts(pairs=1, pairs_by_source={SOURCE_PAIRWISE: 1})


# --- several annotators ----------------------------------------------------------------------------


def sentiment_vote(ann_id, task_id, label, by, parent=None, updated="2024-05-02T10:00:00Z"):
    return annotation(ann_id, task_id, [choices(label, f"r{ann_id}")], by=by, parent=parent, updated=updated)


def consensus_tasks():
    mixed = task(21, {"text": PASTA}, [
        sentiment_vote(90, 21, "Negative", by=1, parent=111),
        sentiment_vote(91, 21, "Negative", by=2, parent=111),
        sentiment_vote(92, 21, "Positive", by={"id": 3, "email": "c@example.com"}),  # API payloads nest the user
    ], [prediction(111, 21, [choices("Negative", "q1")], 0.6), prediction(112, 21, [choices("Positive", "q2")], 0.4)])
    unanimous = task(22, {"text": "Lovely staff, great coffee."}, [
        sentiment_vote(93, 22, "Positive", by=1), sentiment_vote(94, 22, "Positive", by=2),
        sentiment_vote(95, 22, "Positive", by=3),
    ], [prediction(121, 22, [choices("Positive", "q3")], 0.7), prediction(122, 22, [choices("Neutral", "q4")], 0.3)])
    solo = task(23, {"text": "It was fine, I guess."}, [sentiment_vote(96, 23, "Neutral", by=3)],
                [prediction(131, 23, [choices("Negative", "q5")], 0.9)])
    return [mixed, unanimous, solo]


def test_multi_annotator_consensus_weights_pairs_by_agreement():
    derived = derive(consensus_tasks(), SENTIMENT)

    negative, neutral, positive = answer(sentiment="Negative"), answer(sentiment="Neutral"), answer(sentiment="Positive")
    assert summarize(derived.pairs) == [
        (negative, positive, 1.0, round(2 / 3, 4), SOURCE_ANNOTATION),  # task 21: 2 of 3 agree
        (positive, neutral, 1.0, 1.0, SOURCE_ANNOTATION),  # task 22: unanimous
        (neutral, negative, 1.0, 0.5, SOURCE_ANNOTATION),  # task 23: annotator 3 alone, who agrees half the time
    ]
    assert [(e.task_id, e.completion, round(e.weight, 4)) for e in derived.sft] == [
        (21, negative, round(2 / 3, 4)), (22, positive, 1.0), (23, neutral, 0.5),
    ]
    assert derived.stats.per_task == {21: pytest.approx(2 / 3), 22: 1.0}
    assert derived.stats.per_annotator == {1: 1.0, 2: 1.0, 3: 0.5}
    assert derived.stats.excluded_annotators == []
    assert derived.counts == base_counts(tasks=3, annotations=7, pairs=3, sft=3, pairs_by_source={SOURCE_ANNOTATION: 3})


def test_task_below_min_task_agreement_is_dropped():
    derived = derive(consensus_tasks(), SENTIMENT, min_task_agreement=0.7)

    assert [e.task_id for e in derived.sft] == [22, 23]
    assert {p.task_id for p in derived.pairs} == {22, 23}
    assert derived.counts["dropped_low_agreement"] == 1


def test_tie_gives_no_consensus_and_drops_the_task():
    tie = task(24, {"text": PASTA}, [sentiment_vote(97, 24, "Positive", by=1), sentiment_vote(98, 24, "Negative", by=2)],
               sentiment_predictions(24))
    derived = derive([tie], SENTIMENT)

    assert derived.pairs == [] and derived.sft == []
    assert derived.stats.per_task == {} and derived.stats.per_annotator == {}  # nothing to agree with
    assert derived.counts == base_counts(annotations=2, ties=1, sft=0)


def test_low_agreement_annotator_is_excluded_before_consensus():
    tasks = [
        task(31, {"text": PASTA}, [sentiment_vote(100, 31, "Negative", by=1), sentiment_vote(101, 31, "Negative", by=2),
                                   sentiment_vote(102, 31, "Positive", by=9)], sentiment_predictions(31)),
        task(32, {"text": "Best ramen in town."}, [sentiment_vote(103, 32, "Positive", by=1),
                                                   sentiment_vote(104, 32, "Positive", by=2),
                                                   sentiment_vote(105, 32, "Negative", by=9)]),
        task(33, {"text": "Meh."}, [sentiment_vote(106, 33, "Positive", by=9)], sentiment_predictions(33)),
    ]
    derived = derive(tasks, SENTIMENT)

    assert derived.stats.per_annotator == {1: 1.0, 2: 1.0, 9: 0.0}
    assert derived.stats.excluded_annotators == [9]
    assert derived.stats.per_task == {31: 1.0, 32: 1.0}  # measured without annotator 9
    negative, neutral, positive = answer(sentiment="Negative"), answer(sentiment="Neutral"), answer(sentiment="Positive")
    assert summarize(derived.pairs) == [
        (negative, neutral, 1.0, 1.0, SOURCE_ANNOTATION),
        (negative, positive, 1.0, 1.0, SOURCE_ANNOTATION),
    ]  # task 32 has no predictions; task 33 only had annotator 9
    assert [(e.task_id, e.completion, e.weight) for e in derived.sft] == [(31, negative, 1.0), (32, positive, 1.0)]
    assert derived.counts == base_counts(
        tasks=3, annotations=7, excluded_annotations=3, dropped_low_agreement=1, pairs=2, sft=2,
        pairs_by_source={SOURCE_ANNOTATION: 2},
    )


def test_resubmission_by_the_same_annotator_counts_once_with_the_latest_result():
    resubmitted = task(34, {"text": PASTA}, [
        sentiment_vote(110, 34, "Positive", by=1, updated="2024-05-02T10:00:00Z"),
        sentiment_vote(111, 34, "Negative", by=1, updated="2024-05-03T10:00:00Z"),
    ], sentiment_predictions(34))
    derived = derive([resubmitted], SENTIMENT)

    assert [e.completion for e in derived.sft] == [answer(sentiment="Negative")]
    assert derived.stats.per_task == {}  # one annotator: no agreement to measure


def test_output_does_not_depend_on_export_order():
    tasks = consensus_tasks()
    shuffled = tasks[:]
    random.Random(4).shuffle(shuffled)
    assert derive(shuffled, SENTIMENT).pairs == derive(tasks, SENTIMENT).pairs


def test_task_missing_its_text_field_is_counted_invalid():
    broken = task(35, {"review": PASTA}, [sentiment_vote(112, 35, "Negative", by=1)], sentiment_predictions(35))
    derived = derive([broken], SENTIMENT)

    assert derived.pairs == [] and derived.sft == []
    assert derived.counts["invalid_tasks"] == 1


# --- the compiler's inverse ------------------------------------------------------------------------

ALL_CONTROLS = """<View>
  <Text name="text" value="$text"/>
  <Choices name="sentiment" toName="text"><Choice value="Pos"/><Choice value="Neg"/></Choices>
  <Choices name="topics" toName="text" choice="multiple"><Choice value="A"/><Choice value="B"/></Choices>
  <Rating name="stars" toName="text" maxRating="4"/>
  <Number name="score" toName="text" min="0" max="10"/>
  <TextArea name="note" toName="text"/>
  <Labels name="ner" toName="text"><Label value="PER"/><Label value="LOC"/></Labels>
</View>"""


def test_answer_from_results_inverts_results_from_answer():
    config = compile_label_config(ALL_CONTROLS)
    texts = {"text": "Ann flew to Oslo. Ann slept."}
    original = {
        "sentiment": "Neg", "topics": ["A", "B"], "stars": 3, "score": 2.5, "note": "short trip",
        "ner": [{"text": "Ann", "label": "PER"}, {"text": "Oslo", "label": "LOC"}],
    }
    results = config.results_from_answer(original, texts)
    assert config.answer_from_results(results, texts) == original
    # and the answer reads back to the same regions: results -> answer -> results is stable
    again = config.results_from_answer(config.answer_from_results(results, texts), texts)
    assert again == results


def test_answer_from_human_results_ignores_ids_origin_and_region_order():
    config = compile_label_config(ALL_CONTROLS)
    texts = {"text": "Ann flew to Oslo. Ann slept."}
    human = [
        {"id": "z", "from_name": "ner", "to_name": "text", "type": "labels", "origin": "manual",
         "value": {"start": 12, "end": 16, "labels": ["LOC"]}},  # no "text": read it from the task
        {"id": "y", "from_name": "topics", "to_name": "text", "type": "choices", "value": {"choices": ["B", "A"]}},
        {"id": "x", "from_name": "ner", "to_name": "text", "type": "labels", "value": {"start": 0, "end": 3, "text": "Ann", "labels": ["PER"]}},
    ]
    assert config.answer_from_results(human, texts) == {
        "topics": ["A", "B"],
        "ner": [{"text": "Ann", "label": "PER"}, {"text": "Oslo", "label": "LOC"}],
    }  # controls without a region are left out
