"""Text classification with a CTranslate2 encoder (BERT-like) and a linear head: what casola's
content filter calls (`casola.filter.remote.parse_verdict` reads both answers below).

Input: the body is the text (UTF-8; invalid bytes are replaced). Two answers:
- plain: `{"flagged": bool, "label": str, "score": float, "scores": {label: p}}`;
- OpenAI moderation, when the body is JSON (`application/json`) with `"input"` (a string, a list of
  strings, or a list of `{"type": "text", "text": ...}` parts, which form one input):
  `{"id": "modr-...", "model": name, "results": [{"flagged", "categories": {label: bool},
  "category_scores": {label: p}}]}`, one result per input, all classified in one batch.
Other JSON bodies (e.g. a chat request being filtered) are classified on the text they carry
(`messages[].content`, `prompt`, `text`, ...). Audio, image and video bodies are not text: they get
`{"flagged": false}` without running the model.

A label is a violation (`categories[label]` true) when it is one of `flag_labels` and its
probability reaches `threshold`; `flagged` is whether any label is. `label`/`score` are the most
likely violation when flagged, else the most likely label. With a softmax head and threshold >= 0.5
that is exactly "the top label is a flag label with p >= threshold".

Manifest options: `labels` (head order), `flag_labels`, `threshold` (0.5), `max_length` (512 tokens,
[CLS] and [SEP] included), `activation` (softmax, or sigmoid for multi-label heads), `cls_token`
("[CLS]"), `sep_token` ("[SEP]"). The head is `classifier.npz` (weight [labels, d], bias [labels])
applied to the pooler output (the [CLS] hidden state when the model has no pooler).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Final

import msgspec
import numpy as np

from casola.wire import Buffer, RequestMeta
from casola.worker.call import HandlerError
from casola.worker.model import BlockingModel, Reply
from workers.device import load_model
from workers.spec import ModelSpec

__all__ = ["ClassifyModel"]

_JSON: Final = "application/json"
_NOT_TEXT: Final = ("audio/", "image/", "video/")
# Keys whose string values are what a user wrote, in the request shapes casola serves (chat,
# completions, responses, moderation); ids, model names and roles are left out of the verdict.
_TEXT_KEYS: Final = frozenset({"content", "text", "prompt", "input", "messages", "instructions", "system", "query"})
# Keys inside such a value that name things rather than say them ({"role": "user", "content": ...}).
_LABEL_KEYS: Final = frozenset({"role", "type", "name", "id", "model", "tool_call_id", "url", "detail", "format"})
_MAX_BATCH: Final = 256  # inputs per moderation request: bounds one request's memory and latency


def _load(path: str, device: str, compute_type: str, threads: int) -> tuple[Any, Any, np.ndarray, np.ndarray]:
    import ctranslate2
    from tokenizers import Tokenizer

    encoder = ctranslate2.Encoder(path, device=device, compute_type=compute_type, intra_threads=threads)
    tok = Tokenizer.from_file(str(Path(path) / "tokenizer.json"))
    with np.load(Path(path) / "classifier.npz") as head:
        weight, bias = head["weight"].astype(np.float32), head["bias"].astype(np.float32)
    return encoder, tok, weight, bias


class ClassifyModel(BlockingModel):
    """A sequence classifier. Requests run concurrently in the runtime's threads; `self` holds only
    the loaded model and its settings."""

    content_type = _JSON

    def __init__(self, spec: ModelSpec) -> None:
        self.name = spec.name
        self.device, self.compute_type, loaded = load_model(spec, _load)
        self.encoder, self.tokenizer, self.weight, self.bias = loaded
        o = spec.options
        n = self.weight.shape[0]
        self.labels: list[str] = [str(x) for x in o.get("labels", [f"LABEL_{i}" for i in range(n)])]
        if len(self.labels) != n or self.bias.shape != (n,):
            raise ValueError(f"model {spec.name!r}: {len(self.labels)} labels for a head with {n} outputs")
        self.flag_labels = frozenset(str(x) for x in o.get("flag_labels", []))
        self.threshold = float(o.get("threshold", 0.5))
        self.max_length = max(2, int(o.get("max_length", 512)))
        self.sigmoid = str(o.get("activation", "softmax")) == "sigmoid"
        self.cls_token, self.sep_token = str(o.get("cls_token", "[CLS]")), str(o.get("sep_token", "[SEP]"))

    def run_request(self, body: Buffer, meta: RequestMeta, cancelled: threading.Event) -> Reply:
        ctype = meta.content_type.split(";", 1)[0].strip().lower()
        if ctype.startswith(_NOT_TEXT):
            return Reply(_JSON, msgspec.json.encode({"flagged": False, "label": "", "score": 0.0, "scores": {}}))
        if ctype == _JSON or ctype.endswith("+json"):
            try:
                doc = msgspec.json.decode(body)
            except msgspec.DecodeError:
                doc = None  # not JSON after all: classify the bytes as text
            if isinstance(doc, dict) and "input" in doc:
                return self._moderation(_moderation_inputs(doc["input"]))
            if doc is not None:
                found = list(_texts(doc))
                if found:
                    return self._plain("\n".join(found))
        return self._plain(bytes(body).decode("utf-8", errors="replace"))

    def _plain(self, text: str) -> Reply:
        p = self.probabilities([text])[0]
        flagged, label, score = self._verdict(p)
        scores = {lab: float(x) for lab, x in zip(self.labels, p, strict=True)}
        return Reply(_JSON, msgspec.json.encode({"flagged": flagged, "label": label, "score": score, "scores": scores}))

    def _moderation(self, inputs: list[str]) -> Reply:
        results = []
        for p in self.probabilities(inputs):
            cats = {
                lab: lab in self.flag_labels and float(x) >= self.threshold
                for lab, x in zip(self.labels, p, strict=True)
            }
            scores = {lab: float(x) for lab, x in zip(self.labels, p, strict=True)}
            results.append({"flagged": any(cats.values()), "categories": cats, "category_scores": scores})
        doc = {"id": f"modr-{uuid.uuid4().hex}", "model": self.name, "results": results}
        return Reply(_JSON, msgspec.json.encode(doc))

    def _verdict(self, p: np.ndarray) -> tuple[bool, str, float]:
        hits = [
            (float(x), lab)
            for lab, x in zip(self.labels, p, strict=True)
            if lab in self.flag_labels and x >= self.threshold
        ]
        if hits:
            score, label = max(hits)
            return True, label, score
        top = int(np.argmax(p))
        return False, self.labels[top], float(p[top])

    def probabilities(self, texts: Sequence[str]) -> np.ndarray:
        """[len(texts), labels] class probabilities, the texts encoded in one batch."""
        import ctranslate2

        keep = self.max_length - 2
        batch = [
            [self.cls_token, *self.tokenizer.encode(t, add_special_tokens=False).tokens[:keep], self.sep_token]
            for t in texts
        ]
        out = self.encoder.forward_batch(batch)
        pooled = out.pooler_output
        if pooled is None:  # no pooler: BERT-style heads then read the [CLS] position
            pooled = out.last_hidden_state
        if pooled.device != "cpu":
            pooled = pooled.to_device(ctranslate2.Device.cpu)
        h = np.asarray(pooled, dtype=np.float32)
        if h.ndim == 3:
            h = h[:, 0]
        logits = h @ self.weight.T + self.bias
        if self.sigmoid:
            probs = 1.0 / (1.0 + np.exp(-logits))
        else:
            z = np.exp(logits - logits.max(axis=1, keepdims=True))
            probs = z / z.sum(axis=1, keepdims=True)
        return np.asarray(probs, dtype=np.float32)


def _moderation_inputs(value: object) -> list[str]:
    """OpenAI's `input`: a string, a list of strings (one result each), or a list of content parts
    (one input; only text parts can be classified here).

    Raises:
        HandlerError: any other shape, or too many inputs.
    """
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(x, str) for x in value):
        if len(value) > _MAX_BATCH:
            raise HandlerError(f"at most {_MAX_BATCH} inputs per request", param="input")
        return list(value)
    if isinstance(value, list) and value and all(isinstance(x, dict) for x in value):
        parts = []
        for x in value:
            if x.get("type") != "text" or not isinstance(x.get("text"), str):
                raise HandlerError(f"model classifies text parts only, not {x.get('type')!r}", param="input")
            parts.append(x["text"])
        return ["\n".join(parts)]
    raise HandlerError("input must be a string, a non-empty list of strings, or a list of text parts", param="input")


def _texts(doc: object, under_text_key: bool = False) -> Iterator[str]:
    """The user-written strings of a JSON request: values under `_TEXT_KEYS`, at any depth."""
    if isinstance(doc, str):
        if under_text_key:
            yield doc
    elif isinstance(doc, dict):
        for k, v in doc.items():
            yield from _texts(v, k in _TEXT_KEYS or (under_text_key and k not in _LABEL_KEYS))
    elif isinstance(doc, list):
        for v in doc:
            yield from _texts(v, under_text_key)
