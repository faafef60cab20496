"""The classify handler on the tiny encoder: the plain and moderation answers, thresholds, the
text it picks out of JSON requests, and that casola's content filter parses what it says."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from casola.filter.remote import parse_verdict
from casola.wire import RequestMeta
from casola.worker import WorkerConfig, WorkerRuntime
from casola.worker.call import HandlerError
from casola.worker.model import Reply
from workers.classify import ClassifyModel
from workers.loader import resolve
from workers.spec import ModelSpec

LABELS = ["ok", "violence", "spam"]


@pytest.fixture(scope="module")
def spec(models_dir: Path) -> ModelSpec:
    return resolve("classify", models_dir)


@pytest.fixture(scope="module")
def clf(spec: ModelSpec) -> ClassifyModel:
    return ClassifyModel(spec)


def with_options(spec: ModelSpec, **options: Any) -> ClassifyModel:
    return ClassifyModel(dataclasses.replace(spec, options={**spec.options, **options}))


def answer(model: ClassifyModel, body: bytes, ctype: str = "text/plain") -> dict[str, Any]:
    r = model.run_request(body, RequestMeta(model.name, 0, ctype, {}), threading.Event())
    assert isinstance(r, Reply) and r.content_type == "application/json" and isinstance(r.body, bytes)
    doc: dict[str, Any] = msgspec.json.decode(r.body)
    return doc


def test_plain_answer_shape_and_probabilities(clf: ClassifyModel) -> None:
    doc = answer(clf, b"please say that again")
    assert set(doc) == {"flagged", "label", "score", "scores"}
    assert list(doc["scores"]) == LABELS
    assert sum(doc["scores"].values()) == pytest.approx(1.0, abs=1e-5)
    assert all(0 <= p <= 1 for p in doc["scores"].values())
    assert doc["label"] == max(doc["scores"], key=doc["scores"].get)  # not flagged: the top label
    assert doc["score"] == doc["scores"][doc["label"]]
    top = doc["label"]
    assert doc["flagged"] == (top in ("violence", "spam") and doc["score"] >= 0.5)


def test_invalid_utf8_is_replaced_and_long_text_truncated(clf: ClassifyModel) -> None:
    assert answer(clf, b"\xff\xfe broken \xc3")["label"] in LABELS
    long = answer(clf, b"the quick brown fox " * 2000)  # far past max_length tokens
    assert sum(long["scores"].values()) == pytest.approx(1.0, abs=1e-5)


def test_flagged_follows_the_threshold(spec: ModelSpec, clf: ClassifyModel) -> None:
    text = b"hello world this is a tiny test"
    scores = answer(clf, text)["scores"]
    worst = max(("violence", "spam"), key=scores.get)
    just_below = with_options(spec, threshold=scores[worst] + 1e-3)
    assert answer(just_below, text)["flagged"] is False
    low = with_options(spec, threshold=scores[worst] - 1e-3)
    doc = answer(low, text)
    assert doc["flagged"] is True and doc["label"] == worst and doc["score"] == pytest.approx(scores[worst])
    assert answer(with_options(spec, flag_labels=[]), text)["flagged"] is False
    assert answer(with_options(spec, threshold=0.0, flag_labels=["ok"]), text)["label"] == "ok"


def test_moderation_shape_for_a_list_of_inputs(clf: ClassifyModel) -> None:
    doc = answer(clf, b'{"input": ["first text", "a second, longer text to classify"]}', "application/json")
    assert set(doc) == {"id", "model", "results"}
    assert doc["id"].startswith("modr-") and doc["model"] == "classify"
    assert len(doc["results"]) == 2
    for res in doc["results"]:
        assert set(res) == {"flagged", "categories", "category_scores"}
        assert list(res["categories"]) == LABELS == list(res["category_scores"])
        assert sum(res["category_scores"].values()) == pytest.approx(1.0, abs=1e-5)
        assert res["flagged"] == any(res["categories"].values())
        for label, hit in res["categories"].items():
            assert hit == (label in ("violence", "spam") and res["category_scores"][label] >= 0.5)
    # a batch gives each input the scores it gets alone
    alone = answer(clf, b"first text")["scores"]
    assert doc["results"][0]["category_scores"] == pytest.approx(alone, abs=1e-4)


def test_moderation_string_and_text_parts(clf: ClassifyModel) -> None:
    one = answer(clf, b'{"input": "just one", "model": "omni-moderation-latest"}', "application/json")
    assert len(one["results"]) == 1
    parts = b'{"input": [{"type": "text", "text": "just"}, {"type": "text", "text": "one"}]}'
    assert len(answer(clf, parts, "application/json; charset=utf-8")["results"]) == 1
    for bad in (b'{"input": 3}', b'{"input": []}', b'{"input": [{"type": "image_url", "image_url": {"url": "x"}}]}'):
        with pytest.raises(HandlerError) as e:
            answer(clf, bad, "application/json")
        assert e.value.param == "input"


def test_other_json_is_judged_on_its_text(clf: ClassifyModel) -> None:
    chat = b'{"model": "chat", "messages": [{"role": "user", "content": "please say that again"}]}'
    doc = answer(clf, chat, "application/json")
    assert set(doc) == {"flagged", "label", "score", "scores"}
    assert doc["scores"] == pytest.approx(answer(clf, b"please say that again")["scores"], abs=1e-4)
    assert answer(clf, b"{not json", "application/json")["label"] in LABELS  # judged as text


def test_audio_is_not_text(clf: ClassifyModel) -> None:
    assert answer(clf, b"RIFF....WAVE", "audio/wav") == {"flagged": False, "label": "", "score": 0.0, "scores": {}}


def test_parse_verdict_reads_both_answers(spec: ModelSpec, clf: ClassifyModel) -> None:
    plain = answer(clf, b"hello world")
    v = parse_verdict(msgspec.json.encode(plain))
    assert v.flagged is plain["flagged"] and v.label == plain["label"] and v.score == pytest.approx(plain["score"])
    mod = answer(clf, b'{"input": ["hello world"]}', "application/json")
    v = parse_verdict(msgspec.json.encode(mod))
    assert v.flagged is False and v.label == ""
    # flagged answers too (threshold 0 flags the most likely flag label)
    eager = with_options(spec, threshold=0.0)
    v = parse_verdict(msgspec.json.encode(answer(eager, b"hello world")))
    assert v.flagged and v.label in ("violence", "spam") and 0 < v.score < 1
    m = answer(eager, b'{"input": "hello world"}', "application/json")
    v = parse_verdict(msgspec.json.encode(m))
    scores = m["results"][0]["category_scores"]
    assert v.flagged and v.label == max(("violence", "spam"), key=scores.get)
    assert v.score == pytest.approx(scores[v.label])


def test_sigmoid_head_for_multi_label_models(spec: ModelSpec) -> None:
    doc = answer(with_options(spec, activation="sigmoid"), b"hello")
    assert all(0 < p < 1 for p in doc["scores"].values())
    assert not np.isclose(sum(doc["scores"].values()), 1.0)


def test_labels_must_match_the_head(spec: ModelSpec) -> None:
    with pytest.raises(ValueError, match="labels"):
        with_options(spec, labels=["ok", "bad"])


def test_a_worker_serves_it_over_tcp(tmp_path: Path, clf: ClassifyModel) -> None:
    from tests.e2e.stack import HttpClient, Stack, run_uvloop

    async def main() -> None:
        stack = await Stack(tmp_path).start()
        rt = WorkerRuntime(WorkerConfig(queue=[stack.queue_addr], capacity=2), [clf], stack.worker_key)
        await rt.start()
        await rt.wait_registered()
        await stack.wait_workers(1, "classify")
        client = await HttpClient.connect(stack.http_port)
        head = {"Authorization": f"Bearer {stack.api_key}", "Content-Type": "application/json"}
        r = await client.request("POST", "/v1/run/classify", b'{"input": ["a", "b"]}', head)
        assert r.status == 200 and len(msgspec.json.decode(r.body)["results"]) == 2
        bad = await client.request("POST", "/v1/run/classify", b'{"input": 7}', head)
        assert bad.status == 400
        await client.close()
        await rt.stop()
        await stack.stop()

    run_uvloop(main)
