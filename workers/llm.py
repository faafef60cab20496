"""The `llm` handler: OpenAI chat.completions on a CTranslate2 decoder-only model, streamed token by token.

Native contract (`POST /v1/run/<model>`, and what the ingress's /v1/chat/completions forwards): the body is
an OpenAI chat.completions request (JSON, see `workers.chat.parse_request`); the answer is a
`chat.completion` object (application/json) or, with "stream": true, `chat.completion.chunk` SSE events
ending with `data: [DONE]` (text/event-stream), one DATA frame per event so each token leaves as it is made.
Invalid requests raise HandlerError (400) naming the OpenAI parameter.

The model directory holds model.bin, config.json (bos/eos tokens), vocabulary, tokenizer.json and
chat_template.jinja (HF-style; ChatML when absent). Manifest options (casola.json "options"):

    end_tokens          tokens that end the answer (default: config.json's eos_token), e.g. ["<|im_end|>"]
    system_prompt       system message put first when the request has no system/developer message
    repetition_penalty  CTranslate2's multiplicative penalty (default 1.0; SmolLM2 wants 1.1)
    max_tokens          answer length when the request gives none (default 512)
    context             the model's context length in tokens, prompt + answer (default 2048)
    ignore_eos          never stop before max_tokens (benchmarks, tests with random weights)
    temperature         sampling temperature when the request gives none (default 1.0, as OpenAI's)
    sampling_topk       top-k when sampling, 0 for the whole vocabulary (default 0)
    max_tool_calls      end the answer once it holds this many tool calls (default: no limit); 1 for a small
                        model that repeats or invents calls after the first (Qwen2.5-0.5B, MODELS.md §7.1)

Not honoured, though accepted: `seed` (CTranslate2 4.8 has no per-request seed: its sampler is seeded once
per thread), tool_choice "required" or a named function (only that tool is offered; the model is not
forced to call it), response_format json_object (not enforced).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import ctranslate2
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from casola.wire import Buffer, RequestMeta
from casola.worker.call import HandlerError
from casola.worker.model import BlockingModel, Reply
from workers.chat import (
    DEFAULT_TEMPLATE,
    DONE,
    ChatRequest,
    ChatTemplate,
    ChunkEncoder,
    OutputFilter,
    completion_body,
    new_completion_id,
    parse_request,
)
from workers.device import load_model
from workers.spec import ModelSpec, SpecError

__all__ = ["LLMModel"]

DEFAULT_CONTEXT: Final = 2048
DEFAULT_MAX_TOKENS: Final = 512


@dataclass(frozen=True)
class _Loaded:
    """What one model directory loads into; shared by every handler and request on it (read-only)."""

    generator: Any  # ctranslate2.Generator
    tokenizer: Any  # tokenizers.Tokenizer
    template: ChatTemplate
    eos_token: str


def _load(directory: str, device: str, compute_type: str, threads: int) -> _Loaded:
    path = Path(directory)
    config = json.loads((path / "config.json").read_text()) if (path / "config.json").exists() else {}
    source = path / "chat_template.jinja"
    # The template writes bos_token itself where the model wants one (HF convention; ChatML wants none), so
    # the prompt is tokenized without adding special tokens and nothing is prepended here.
    template = ChatTemplate(
        source.read_text() if source.exists() else DEFAULT_TEMPLATE,
        bos_token=config.get("bos_token") or "",
        eos_token=config.get("eos_token") or "",
    )
    generator = ctranslate2.Generator(str(path), device=device, compute_type=compute_type, intra_threads=threads)
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    return _Loaded(generator, tokenizer, template, config.get("eos_token") or "")


class LLMModel(BlockingModel):
    """Chat completions on one CTranslate2 Generator. Holds no per-request state: requests run concurrently
    in the worker's thread pool, and CTranslate2 queues them for its replicas (inter_threads, 1 by default)."""

    content_type = "application/json"

    def __init__(self, spec: ModelSpec) -> None:
        """Loads the model (once per process for a given directory and device).

        Raises:
            SpecError: no model directory, an option of the wrong type, or end tokens the vocabulary lacks.
            ValueError: the device or compute type cannot be used.
        """
        self.name = spec.name
        _device, _compute_type, self._m = load_model(spec, _load)
        o = spec.options
        try:
            ends = o.get("end_tokens") or ([self._m.eos_token] if self._m.eos_token else [])
            self._end_tokens: list[str] = [ends] if isinstance(ends, str) else [str(t) for t in ends]
            self._system_prompt = str(o.get("system_prompt") or "")
            self._repetition_penalty = float(o.get("repetition_penalty", 1.0))
            self._max_tokens = int(o.get("max_tokens", DEFAULT_MAX_TOKENS))
            self._context = int(o.get("context", DEFAULT_CONTEXT))
            self._ignore_eos = bool(o.get("ignore_eos", False))
            self._topk = int(o.get("sampling_topk", 0))
            self._temperature = float(o.get("temperature", 1.0))
            max_calls = o.get("max_tool_calls")
            self._max_tool_calls: int | None = None if max_calls is None else int(max_calls)
        except (TypeError, ValueError) as exc:
            raise SpecError(f"model {spec.name!r}: bad option: {exc}") from exc
        if self._max_tool_calls is not None and self._max_tool_calls < 1:
            raise SpecError(f"model {spec.name!r}: max_tool_calls must be at least 1, got {self._max_tool_calls}")
        ids = {t: self._m.tokenizer.token_to_id(t) for t in self._end_tokens}
        if unknown := [t for t, i in ids.items() if i is None]:
            raise SpecError(f"model {spec.name!r}: end_tokens not in the vocabulary: {unknown}")
        self._end_ids = frozenset(ids.values())

    def run_request(self, body: Buffer, meta: RequestMeta, cancelled: threading.Event) -> Reply:
        """Validate, render and tokenize now (errors become a 400 before any answer byte); generate in the
        answer: all of it for a JSON answer, token by token as the stream is read for SSE.

        Raises:
            HandlerError: an invalid request, or a prompt longer than the model's context.
        """
        req = parse_request(body)
        prompt = self._prompt(req)
        run = _Run(self, req, prompt, cancelled)
        if req.stream:
            return Reply("text/event-stream", _stream(run))
        return Reply("application/json", _whole(run))

    def _prompt(self, req: ChatRequest) -> list[str]:
        messages = req.messages
        if self._system_prompt and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": self._system_prompt}, *messages]
        text = self._m.template.render(messages, req.tools)
        tokens: list[str] = self._m.tokenizer.encode(text, add_special_tokens=False).tokens
        if len(tokens) >= self._context:
            raise HandlerError(
                f"This model's maximum context length is {self._context} tokens. However, your messages "
                f"resulted in {len(tokens)} tokens. Please reduce the length of the messages.",
                param="messages",
            )
        return tokens

    def _generate_kwargs(self, req: ChatRequest, prompt_len: int) -> dict[str, Any]:
        # A max_tokens beyond the context is cut to what fits (finish_reason "length"), as llama.cpp does.
        max_length = min(req.max_tokens or self._max_tokens, self._context - prompt_len)
        temperature = self._temperature if req.temperature is None else req.temperature
        greedy = temperature == 0 or req.top_p == 0
        # OpenAI's additive penalties have no CTranslate2 counterpart; a positive one raises the
        # multiplicative repetition penalty instead (2, their maximum, doubles it), never lowering the model's.
        penalty = max(req.frequency_penalty, req.presence_penalty, 0.0)
        repetition = max(self._repetition_penalty, 1.0 + penalty / 2) if penalty else self._repetition_penalty
        return {
            "max_length": max_length,
            "min_length": max_length if self._ignore_eos else 0,
            "sampling_topk": 1 if greedy else self._topk,
            "sampling_topp": 1.0 if greedy else req.top_p,
            "sampling_temperature": 1.0 if greedy else temperature,
            "repetition_penalty": repetition,
            "end_token": self._end_tokens or None,
        }


class _Run:
    """One request's generation: tokens → text → content and tool calls, with the counts and the finish."""

    __slots__ = (
        "cancelled",
        "completion_tokens",
        "created",
        "finish_reason",
        "id",
        "model",
        "prompt",
        "req",
        "tool_calls",
    )

    def __init__(self, model: LLMModel, req: ChatRequest, prompt: list[str], cancelled: threading.Event) -> None:
        self.model, self.req, self.prompt, self.cancelled = model, req, prompt, cancelled
        self.id, self.created = new_completion_id(), int(time.time())
        self.completion_tokens = 0
        self.finish_reason = "stop"
        self.tool_calls: list[dict[str, Any]] = []

    def pieces(self) -> Generator[tuple[str, list[dict[str, Any]]], None, None]:
        """(content delta, new tool calls) as the model produces them. Closing this stops the model."""
        m = self.model
        tok, end_ids = m._m.tokenizer, m._end_ids
        # DecodeStream holds back ids until they make whole UTF-8 characters (byte-level BPE splits them).
        decode = DecodeStream(skip_special_tokens=True)
        out = OutputFilter(self.req.stop, tools=bool(self.req.tools), max_tool_calls=m._max_tool_calls)
        kwargs = m._generate_kwargs(self.req, len(self.prompt))
        steps = m._m.generator.generate_tokens(self.prompt, **kwargs)
        self.finish_reason = "length"
        try:
            for step in steps:
                if self.cancelled.is_set():
                    return
                if step.token_id in end_ids:
                    self.finish_reason = "stop"
                    break
                self.completion_tokens += 1
                text = decode.step(tok, step.token_id)
                if text:
                    content, calls = out.feed(text)
                    if content or calls:
                        yield content, self._add(calls)
                    if out.done:  # a stop string, or the last tool call allowed: the model stops here
                        self.finish_reason = "stop"
                        break
        finally:
            # Stops CTranslate2 at its next step: its iterator's close makes the decoding callback say stop.
            steps.close()
        content, calls = out.finish()
        if content or calls:
            yield content, self._add(calls)
        if self.tool_calls and self.finish_reason == "stop":
            self.finish_reason = "tool_calls"

    def _add(self, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        self.tool_calls += calls
        return calls


def _whole(run: _Run) -> bytes:
    parts = [content for content, _ in run.pieces()]
    return completion_body(
        run.id,
        run.created,
        run.model.name,
        "".join(parts),
        run.tool_calls,
        run.finish_reason,
        len(run.prompt),
        run.completion_tokens,
    )


def _stream(run: _Run) -> Iterator[bytes]:
    enc = ChunkEncoder(run.id, run.created, run.model.name, run.req.include_usage)
    yield enc.role()  # the head leaves before the first token is computed
    pieces = run.pieces()
    try:
        for content, calls in pieces:
            if content:
                yield enc.content(content)
            if calls:
                yield enc.tool_calls(calls, len(run.tool_calls) - len(calls))
    finally:
        pieces.close()  # on a cancel this generator is closed: pass it on so the model stops
    if run.cancelled.is_set():
        return
    yield enc.finish(run.finish_reason)
    if run.req.include_usage:
        yield enc.usage(len(run.prompt), run.completion_tokens)
    yield DONE
