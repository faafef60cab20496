"""The voice-agent workflow three ways, same input, same run (issue 15, deliverable 10).

One spoken question (espeak-ng speech of "What's the weather in Paris?"), answered in speech by
ASR -> LLM (a tool call, get_weather, and a second round with its result) -> TTS:

- (a) workflow: `POST /v1/workflows/voice-agent` on a `casola up` this bench starts (`[ingress] trace =
  true`), streamed: first audio byte (client side, request sent -> first body byte), total, and
  the run's `flow-overhead`, `step.*`, `work` (Server-Timing trailer) and its timeline trailer.
- (b) chained: the same steps as three kinds of requests by the client through the same casola,
  as bench/voice_agent.py does: `/v1/run/<asr>` (text) -> `/v1/run/<llm>` (OpenAI JSON, streamed;
  the client runs the tool calls itself on `/v1/run/tools` and asks again with the results) ->
  TTS of the whole answer on `/v1/run/<tts>`: first audio byte and total.
- (c) direct: the same handlers in this process (workers.loader.resolve/build, driven through
  `run_request`), no platform at all; TTS per sentence as the workflow does (casola.flow.sentences,
  `lookahead` sentences at once, in threads), first audio = sentence 1's first audio piece.

Rounds rotate the order of the three modes. Reported per mode: median, p99, min and CPU per answer
(casola up, its workers and this process, with their espeak-ng children); for (a) the trailer's
stages and the timeline's idle gaps (what `flow-overhead` is made of); the platform's share
((a) total - (c) total) / (a) total, also paired per round; and the issue's
targets: flow-overhead p50 <= 1 ms (tiny set), and (b) first audio - (a) first audio >= the LLM's
generation time after its first sentence (from the timeline: last `think` done - first `speak` sent).

Usage:
    python bench/workflow.py                      # tiny models (built now with `casola models build-tiny`)
    python bench/workflow.py --set demo           # models/demo (`casola models prepare-demo`, with agent)
    python bench/workflow.py --rounds 5 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def _in_the_venv() -> None:
    """Re-run under <repo>/.venv's interpreter when this `python` lacks what bench/ imports."""
    try:
        import httpx  # noqa: F401
        import numpy  # noqa: F401
        import uvloop  # noqa: F401
    except ImportError as exc:
        venv = Path(__file__).resolve().parent.parent / ".venv"
        python = venv / "bin/python"
        if python.exists() and Path(sys.prefix).resolve() != venv.resolve():
            os.execv(python, [str(python), *sys.argv])
        raise SystemExit(f"bench/workflow.py: no module {exc.name}; run it with .venv/bin/python") from None


_in_the_venv()

from floor import ROOT, TICK, Procs, descendants, free_port, stat_fields  # noqa: E402
from handlers import Http, _whole  # noqa: E402
from upstack import Up, pct  # noqa: E402

from casola.flow.llm import StreamedAnswer  # noqa: E402
from casola.wire import Buffer, RequestMeta  # noqa: E402
from casola.worker.model import BlockingModel, Reply  # noqa: E402

QUESTION = "What's the weather in Paris?"
T = time.perf_counter
LOOKAHEAD = 2  # the speak step's default (casola.flow.spec.StepConfig.lookahead)


@dataclass(frozen=True)
class ModelSet:
    asr: str
    llm: str
    tts: str
    tools: str
    tool_results: str  # "messages" (role "tool") | "text" (one user message), as the llm step says
    max_rounds: int
    max_tokens: int
    rounds: int  # default rounds measured


SETS = {
    "tiny": ModelSet("asr", "chat-agent", "tts", "tools", "messages", 2, 200, 20),
    "demo": ModelSet("asr", "agent", "tts", "tools", "text", 1, 120, 5),
}


# -- the config ------------------------------------------------------------------------------------


def _toml(v: Any) -> str:
    """A JSON value as a TOML inline value."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml(x)}" for k, x in v.items()) + " }"
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return json.dumps(v)


def weather_tool() -> dict[str, Any]:
    from workers.tools import TOOL_SCHEMAS

    return TOOL_SCHEMAS["get_weather"]


def config_toml(s: ModelSet, tools_dir_exists: bool) -> str:
    """Workers and the `voice-agent` workflow (after tests/e2e/test_workflows.py), with Server-Timing on."""
    tool = weather_tool()
    llm_params = _toml({"max_tokens": s.max_tokens, "temperature": 0})
    extra = "" if s.tool_results == "messages" else f', tool_results = "{s.tool_results}"'
    think = f'{{ name = "think", kind = "llm", model = "{s.llm}", tools = ["get_weather"], params = {llm_params}'
    # one line: a TOML inline table does not span lines
    think += f", max_rounds = {s.max_rounds}, prune_arguments = true{extra} }}"
    return f"""
[[workers]]
models = ["{s.asr}", "{s.llm}"]
capacity = 4
threads = 4

[[workers]]
models = ["{s.tts}", "{s.tools}", "echo"]
capacity = 8
{"" if tools_dir_exists else f'[models.{s.tools}]{chr(10)}kind = "tools"{chr(10)}'}
[workflows.voice-agent]
description = "the voice agent: speech in, speech out"
deadline_ms = 60000
steps = [
  {{ name = "asr", kind = "model", model = "{s.asr}", params = {{ response_format = "text" }} }},
  {think},
  {{ name = "split", kind = "sentences" }},
  {{ name = "speak", kind = "model", model = "{s.tts}", params = {{ response_format = "wav" }} }},
]
[workflows.voice-agent.tools.get_weather]
model = "{s.tools}"
description = {json.dumps(tool["description"])}
parameters = {_toml(tool["parameters"])}
"""


def pruned(call: dict[str, str]) -> bytes:
    """A call's arguments without those its schema does not declare, as the workflow's
    `prune_arguments = true` does (the 0.5B model copies "required" into them): same work all ways."""
    from workers.tools import TOOL_SCHEMAS

    args = json.loads(call["arguments"] or "{}")
    declared = TOOL_SCHEMAS.get(call["name"], {}).get("parameters", {}).get("properties", {})
    call["arguments"] = json.dumps({k: v for k, v in args.items() if k in declared}, separators=(",", ":"))
    return call["arguments"].encode()  # and the history shows them so, as the engine's does


class TracedUp(Up):
    """bench/upstack.Up with `[ingress] trace = true` (Server-Timing on every answer)."""

    def __init__(self, procs: Procs, tmp: Path, toml: str, top: str = "") -> None:
        self.http, self.frames, self.queue = free_port(), free_port(), free_port()
        tmp.mkdir(parents=True, exist_ok=True)
        state, self.config = tmp / "state", tmp / "casola.toml"
        state.mkdir()
        self.config.write_text(
            f'{top}[ingress]\ntrace = true\nhttp = "127.0.0.1:{self.http}"\nframes = "127.0.0.1:{self.frames}"\n'
            f'[queue]\nlisten = "127.0.0.1:{self.queue}"\n{toml}'
        )
        self.name = "casola-up-workflow"
        cmd = [sys.executable, "-m", "casola", "up", "--config", str(self.config), "--state-dir", str(state)]
        self.procs, self.state = procs, state
        self.proc = procs.start(self.name, cmd)
        self.address = f"127.0.0.1:{self.frames}"


# -- HTTP answers ------------------------------------------------------------------------------------


class Answer:
    """A raw HTTP/1.1 response split into status, head, body (de-chunked) and trailers."""

    def __init__(self, buf: bytes) -> None:
        head, _, rest = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0][9:12])
        self.headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
        self.trailers: dict[str, str] = {}
        if self.headers.get("transfer-encoding", "").lower() != "chunked":
            self.body = rest
            return
        out, pos = bytearray(), 0
        while True:
            nl = rest.find(b"\r\n", pos)
            size = int(rest[pos:nl].split(b";")[0], 16)
            if size == 0:
                break
            out += rest[nl + 2 : nl + 2 + size]
            pos = nl + 2 + size + 2
        self.body = bytes(out)
        for line in rest[nl + 2 :].decode("latin-1").split("\r\n"):
            if line:
                k, _, v = line.partition(":")
                self.trailers[k.strip().lower()] = v.strip()

    def timing(self) -> dict[str, float]:
        """Server-Timing, the trailer's over the head's: {stage: ms}."""
        out: dict[str, float] = {}
        for raw in (self.headers.get("server-timing", ""), self.trailers.get("server-timing", "")):
            for item in raw.split(","):
                name, _, rest = item.strip().partition(";")
                if "dur=" in rest:
                    out[name] = float(rest.split("dur=")[1].split(";")[0])
        return out

    def check(self, what: str) -> Answer:
        if self.status != 200:
            raise RuntimeError(f"{what}: HTTP {self.status}: {self.body[:400]!r}")
        return self


def _first_body_byte(buf: bytes) -> bool:
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return False
    pos = end + 4
    if b"transfer-encoding: chunked" not in buf[:end].lower():
        return len(buf) > pos
    nl = buf.find(b"\r\n", pos)
    return nl >= 0 and int(buf[pos:nl].split(b";")[0], 16) > 0 and len(buf) > nl + 2


def post(http: Http, path: str, body: bytes, headers: dict[str, str]) -> tuple[Answer, float, float]:
    """(answer, ms to its first body byte, ms to its end), from the request's send."""
    first = [0.0]

    def on_data(buf: bytes) -> bool:
        if not first[0] and _first_body_byte(buf):
            first[0] = T()
        return _whole(buf)

    t0 = T()
    buf = http.post(path, body, headers, on_data)
    t1 = T()
    return Answer(buf), (first[0] - t0) * 1000, (t1 - t0) * 1000


# -- the LLM's answer, as the engine reads it (casola.flow.llm) -------------------------------------


Round = StreamedAnswer  # the engine's own, so both read an answer the same way


def sse_deltas(data: bytes) -> list[dict[str, Any]]:
    """The `delta` of each complete `chat.completion.chunk` event in `data`."""
    out = []
    for event in data.split(b"\n\n"):
        for line in event.split(b"\n"):
            if line.startswith(b"data:") and line[5:].strip() != b"[DONE]":
                for choice in json.loads(line[5:]).get("choices") or ():
                    out.append(choice.get("delta") or {})
    return out


def chat_body(s: ModelSet, messages: list[dict[str, Any]], offer: bool) -> bytes:
    """The llm step's body: its params, the messages, streamed, the tool offered while rounds are left."""
    body: dict[str, Any] = {"max_tokens": s.max_tokens, "temperature": 0, "messages": messages, "stream": True}
    if offer:
        t = weather_tool()
        body["tools"] = [{"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters")}}]
    return json.dumps(body).encode()


def history(s: ModelSet, answer: Round, results: list[str], question: str, n: int) -> list[dict[str, Any]]:
    """What goes back to the model after its tool calls (casola.flow.llm.LlmStage._history)."""
    calls = list(answer.calls.values())
    if s.tool_results == "text":
        lines = [f"{c['name']}({c['arguments']}) returned: {r}" for c, r in zip(calls, results, strict=True)]
        prompt = "\n".join(lines) + f"\n\nUsing these results, answer in one or two short sentences: {question}"
        return [{"role": "user", "content": prompt}]
    ids = [c["id"] or f"call_{n}_{i}" for i, c in enumerate(calls)]
    fns = [{"id": i, "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
           for i, c in zip(ids, calls, strict=True)]  # fmt: skip
    assistant = {"role": "assistant", "content": "".join(answer.text) or None, "tool_calls": fns}
    return [assistant, *({"role": "tool", "tool_call_id": i, "content": r} for i, r in zip(ids, results, strict=True))]


# -- (a) the workflow ---------------------------------------------------------------------------------


def mode_a(http: Http, s: ModelSet, wav: bytes) -> dict[str, Any]:
    a, first, total = post(http, "/v1/workflows/voice-agent", wav, {"Content-Type": "audio/wav"})
    a.check("workflow voice-agent")
    rows = json.loads(a.trailers["x-casola-flow-timeline"])
    think_done = max(done for stage, _, done in rows if stage == "think")
    speak_sent = [sent for stage, sent, _ in rows if stage == "speak"]
    timing = a.timing()
    return {
        "first_audio": first,
        "total": total,
        "timing": timing,
        "idle": idle_parts(rows, timing.get("work", 0.0)),
        "first_speak_sent": min(speak_sent),
        "gen_after_first_sentence": think_done - min(speak_sent),
        "sentences": len(speak_sent),
        "samples": len(a.body) - a.body.index(b"data") - 8,
        "timeline": rows,
    }


def idle_parts(rows: list[list[Any]], work: float) -> dict[str, float]:
    """Where no step request was in flight (what `flow-overhead` counts), from the timeline: before
    the first was sent, each hand-over `<last one to end> > <next sent>` with nothing in flight, and
    after the last one ended (the last bytes out, the END)."""
    spans = sorted((sent, done, stage) for stage, sent, done in rows)
    out = {"before": spans[0][0]}
    reach, last = spans[0][1], spans[0][2]
    for sent, done, stage in spans[1:]:
        if sent > reach:
            key = f"{last} > {stage}"
            out[key] = out.get(key, 0.0) + sent - reach
        if done > reach:
            reach, last = done, stage
    out["after"] = work - reach
    return out


# -- (b) chained by the client ------------------------------------------------------------------------


def mode_b(http: Http, s: ModelSet, wav: bytes) -> dict[str, Any]:
    t0 = T()
    hop: dict[str, float] = {"llm": 0.0, "tools": 0.0}
    asr, _, hop["asr"] = post(http, f"/v1/run/{s.asr}", wav, {"Content-Type": "audio/wav",
                                                              "X-Casola-Param-response_format": "text"})  # fmt: skip
    question = asr.check("asr").body.decode().strip()
    messages: list[dict[str, Any]] = [{"role": "user", "content": question}]
    text: list[str] = []
    for n in range(s.max_rounds + 1):
        body = chat_body(s, messages, n < s.max_rounds)
        llm, _, ms = post(http, f"/v1/run/{s.llm}", body, {"Content-Type": "application/json"})
        hop["llm"] += ms
        answer = Round()
        for delta in sse_deltas(llm.check(f"llm round {n + 1}").body):
            text.append(answer.take(delta))
        if not answer.calls:
            break
        results = []
        for call in answer.calls.values():
            headers = {"Content-Type": "application/json", "X-Casola-Param-Tool": call["name"]}
            got, _, ms = post(http, f"/v1/run/{s.tools}", pruned(call), headers)
            hop["tools"] += ms
            results.append(got.check("tool").body.decode())
        messages += history(s, answer, results, question, n + 1)
    words = "".join(text).strip()
    tts_at = (T() - t0) * 1000
    headers = {"Content-Type": "text/plain; charset=utf-8", "X-Casola-Param-response_format": "wav"}
    tts, first, hop["tts"] = post(http, f"/v1/run/{s.tts}", words.encode(), headers)
    tts.check("tts")
    return {
        "first_audio": tts_at + first,
        "total": (T() - t0) * 1000,
        "hops": hop,
        "answer": words,
        "samples": len(tts.body) - tts.body.index(b"data") - 8,
    }


# -- (c) the handlers in this process, no platform -------------------------------------------------------


class Direct:
    """The same handlers as the workers run (same specs), called in this process."""

    def __init__(self, s: ModelSet, config: Path) -> None:
        from casola.config import load_config
        from workers.loader import build, resolve

        cfg = load_config(config)
        self.s = s

        def load(name: str) -> BlockingModel:  # asr, llm and tts are blocking handlers: `run_request`
            handler = build(resolve(name, cfg.models_dir, cfg.models))
            assert isinstance(handler, BlockingModel), handler
            return handler

        self.asr, self.llm, self.tts = load(s.asr), load(s.llm), load(s.tts)
        self.pool = ThreadPoolExecutor(LOOKAHEAD, thread_name_prefix="direct-tts")

    def _call(self, handler: BlockingModel, body: bytes, ctype: str, params: dict[str, Any]) -> Iterable[Buffer]:
        """What the worker runtime would do with one request, minus the runtime: `run_request` in
        this thread, its answer's pieces as the handler produces them."""
        out = handler.run_request(body, RequestMeta(handler.name, 0, ctype, params), threading.Event())
        assert isinstance(out, Reply), type(out)
        return [out.body] if isinstance(out.body, bytes | bytearray | memoryview) else out.body

    def _speak(self, sentence: str, t0: float) -> tuple[float, int]:
        """(ms from t0 to this sentence's first audio piece, PCM bytes)."""
        first, size = 0.0, 0
        for piece in self._call(self.tts, sentence.encode(), "text/plain; charset=utf-8", {"response_format": "wav"}):
            first = first or T()
            size += len(piece)
        return (first - t0) * 1000, max(size - 44, 0)  # less the WAV header (StreamEncoder: 44 bytes)

    def run(self, wav: bytes) -> dict[str, Any]:
        from casola.flow.sentences import SentenceSplitter
        from workers.tools import run_tool

        s, t0 = self.s, T()
        question = b"".join(self._call(self.asr, wav, "audio/wav", {"response_format": "text"})).decode().strip()
        asr_ms = (T() - t0) * 1000
        split, speaking, said = SentenceSplitter(), [], []
        messages: list[dict[str, Any]] = [{"role": "user", "content": question}]

        def say(sentence: str) -> None:
            said.append((T() - t0) * 1000)
            speaking.append(self.pool.submit(self._speak, sentence, t0))

        for n in range(s.max_rounds + 1):
            answer = Round()
            for piece in self._call(self.llm, chat_body(s, messages, n < s.max_rounds), "application/json", {}):
                for delta in sse_deltas(bytes(piece)):
                    for sentence in split.feed(answer.take(delta)):
                        say(sentence)
            if not answer.calls:
                break
            results = [run_tool(c["name"], pruned(c)).decode() for c in answer.calls.values()]
            messages += history(s, answer, results, question, n + 1)
        if rest := split.flush():
            say(rest)
        llm_done = (T() - t0) * 1000
        spoken = [f.result() for f in speaking]
        return {
            "first_audio": spoken[0][0] if spoken else float("nan"),
            "total": (T() - t0) * 1000,
            "asr": asr_ms,
            "llm_done": llm_done,
            "first_sentence": said[0] if said else float("nan"),
            "gen_after_first_sentence": llm_done - said[0] if said else float("nan"),
            "sentences": len(spoken),
            "samples": sum(n for _, n in spoken),
        }


# -- the report ---------------------------------------------------------------------------------------


def _stats(xs: list[float]) -> dict[str, Any]:
    return {"p50": pct(xs, 50), "p99": pct(xs, 99), "min": min(xs) if xs else None, "n": len(xs)}


def summarize(s: ModelSet, rows: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    a, b, c = rows["a"], rows["b"], rows["c"]
    stages = sorted({k for r in a for k in r["timing"]})
    out: dict[str, Any] = {
        mode: {f: _stats([r[f] for r in rs]) for f in ("first_audio", "total", "cpu")} for mode, rs in rows.items()
    }
    out["a"]["timing"] = {k: _stats([r["timing"][k] for r in a if k in r["timing"]]) for k in stages}
    out["a"]["gen_after_first_sentence"] = _stats([r["gen_after_first_sentence"] for r in a])
    out["b"]["hops"] = {k: _stats([r["hops"][k] for r in b]) for k in b[0]["hops"]}
    idle = dict.fromkeys(k for r in a for k in r["idle"])  # a hand-over with no gap in a round counts 0
    out["a"]["idle"] = {k: _stats([r["idle"].get(k, 0.0) for r in a]) for k in idle}
    out["a"]["first_speak_sent"] = _stats([r["first_speak_sent"] for r in a])
    for k in ("asr", "llm_done", "first_sentence", "gen_after_first_sentence"):
        out["c"][k] = _stats([r[k] for r in c])
    a_total, c_total = out["a"]["total"]["p50"], out["c"]["total"]["p50"]
    gain = out["b"]["first_audio"]["p50"] - out["a"]["first_audio"]["p50"]
    gen = out["a"]["gen_after_first_sentence"]["p50"]
    overhead = out["a"]["timing"].get("flow-overhead", {}).get("p50")
    margins = [
        (rb["first_audio"] - ra["first_audio"]) - ra["gen_after_first_sentence"] for ra, rb in zip(a, b, strict=True)
    ]
    out["platform_share"] = (a_total - c_total) / a_total
    out["platform_ms"] = a_total - c_total
    # The same, paired per round (the modes of a round run back to back, under the same load).
    out["paired"] = {
        "platform_ms": _stats([ra["total"] - rc["total"] for ra, rc in zip(a, c, strict=True)]),
        "platform_share": _stats([(ra["total"] - rc["total"]) / ra["total"] for ra, rc in zip(a, c, strict=True)]),
        "first_audio_gain_ms": _stats([rb["first_audio"] - ra["first_audio"] for ra, rb in zip(a, b, strict=True)]),
        "gain_minus_gen_after_first_sentence": _stats(margins),
    }
    out["first_audio_gain_ms"] = gain
    out["first_audio_ratio"] = out["a"]["first_audio"]["p50"] / out["b"]["first_audio"]["p50"]
    out["targets"] = {
        "flow_overhead_p50_le_1ms": {"value": overhead, "met": overhead is not None and overhead <= 1.0,
                                     "applies": s is SETS["tiny"]},
        "first_audio_gain_ge_gen_after_first_sentence": {
            "gain": gain, "gen_after_first_sentence": gen, "met": gain >= gen,
            "rounds_met": sum(m >= 0 for m in margins), "rounds": len(margins),
        },
    }  # fmt: skip
    out["check"] = {
        "sentences_a_c": sorted({(ra["sentences"], rc["sentences"]) for ra, rc in zip(a, c, strict=True)}),
        "pcm_bytes_a_b_c": sorted(
            {(ra["samples"], rb["samples"], rc["samples"]) for ra, rb, rc in zip(a, b, c, strict=True)}
        ),
        "answer_b": sorted({r["answer"] for r in b}),
    }
    return out


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:,.3f}"


def _pair(v: dict[str, Any]) -> str:
    return f"{_f(v['p50']):>10} / {_f(v['p99'])}"


def report(out: dict[str, Any], head: str) -> None:
    print(f"\n{head}\n")
    print("| mode | first audio p50 | p99 | min | total p50 | p99 | min | CPU p50 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    names = {"a": "(a) workflow, casola", "b": "(b) chained by the client, casola", "c": "(c) direct, in process"}
    for m, name in names.items():
        fa, tot = out[m]["first_audio"], out[m]["total"]
        cells = [_f(v[k]) for v in (fa, tot) for k in ("p50", "p99", "min")] + [_f(out[m]["cpu"]["p50"])]
        print(f"| {name} | " + " | ".join(cells) + " |")
    a, c = out["a"], out["c"]
    print("\n(a) Server-Timing trailer, ms (p50 / p99):")
    for k, v in a["timing"].items():
        print(f"  {k:32} {_pair(v)}")
    print("(a) timeline, ms (p50 / p99):")
    for k, v in a["idle"].items():
        print(f"  {'idle ' + k:32} {_pair(v)}")
    print(f"  {'first speak sent':32} {_pair(a['first_speak_sent'])}")
    print(f"  {'LLM after sentence 1':32} {_pair(a['gen_after_first_sentence'])}  (last think done - first speak sent)")
    print("(b) per hop p50, ms: " + ", ".join(f"{k} {_f(v['p50'])}" for k, v in out["b"]["hops"].items()))
    parts = ("asr", "first_sentence", "llm_done", "gen_after_first_sentence")
    print("(c) p50, ms: " + ", ".join(f"{k} {_f(c[k]['p50'])}" for k in parts))
    share = out["platform_share"] * 100
    print(
        f"\nplatform share: ((a) - (c)) / (a) = {out['platform_ms']:,.3f} / {a['total']['p50']:,.3f} ms = {share:.1f} %"
    )
    print(f"first audio: (a) {out['first_audio_gain_ms']:,.3f} ms before (b); (a)/(b) = {out['first_audio_ratio']:.3f}")
    p = out["paired"]
    print(
        f"paired per round, p50: (a) - (c) total {_f(p['platform_ms']['p50'])} ms "
        f"({p['platform_share']['p50'] * 100:.1f} %), (b) - (a) first audio {_f(p['first_audio_gain_ms']['p50'])} ms, "
        f"that - LLM after sentence 1 {_f(p['gain_minus_gen_after_first_sentence']['p50'])} ms"
    )
    t = out["targets"]
    fo, fg = t["flow_overhead_p50_le_1ms"], t["first_audio_gain_ge_gen_after_first_sentence"]
    scope = "" if fo["applies"] else " (the target is set for the tiny set)"
    print(f"target flow-overhead p50 <= 1 ms: {_f(fo['value'])} ms: {'met' if fo['met'] else 'NOT met'}{scope}")
    print(
        f"target (b) - (a) first audio >= LLM after sentence 1: {_f(fg['gain'])} >= "
        f"{_f(fg['gen_after_first_sentence'])} ms: {'met' if fg['met'] else 'NOT met'} "
        f"(per round: {fg['rounds_met']} of {fg['rounds']})"
    )
    print(f"check: {out['check']}")


# -- main -----------------------------------------------------------------------------------------------


def _espeak(text: str) -> bytes:
    return subprocess.run(["espeak-ng", "-v", "en-us", "--stdout", text], check=True, capture_output=True).stdout


def _cpu_ms(pids: list[int]) -> float:
    """CPU time of this process and of `pids`, each with its finished children (espeak-ng runs)."""
    t = os.times()
    own = t.user + t.system + t.children_user + t.children_system
    return (own + sum(sum(int(x) for x in f[11:15]) / TICK for f in map(stat_fields, pids) if f)) * 1000


async def _ready(up: Up, models: list[str]) -> None:
    c = await up.ready(180)
    await c.close()
    await up.serving(models, 180)


def _models(args: argparse.Namespace, tmp: Path) -> Path:
    if args.models_dir:
        return Path(args.models_dir).resolve()
    if args.set == "demo":
        return (ROOT / "models" / "demo").resolve()
    out = tmp / "models"
    cmd = [sys.executable, "-m", "casola", "models", "build-tiny", str(out)]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)
    return out


def measure(s: ModelSet, models_dir: Path, tmp: Path, rounds: int, warmup: int) -> dict[str, list[dict[str, Any]]]:
    toml = config_toml(s, (models_dir / s.tools).exists())
    procs = Procs({**os.environ, "MALLOC_TOP_PAD_": "0"}, tmp)
    up = TracedUp(procs, tmp / "up", toml, f'models_dir = "{models_dir}"\n')
    rows: dict[str, list[dict[str, Any]]] = {"a": [], "b": [], "c": []}
    try:
        direct = Direct(s, up.config)  # loads while casola up starts
        asyncio.run(_ready(up, [s.asr, s.llm, s.tts, s.tools, "voice-agent"]))
        http, wav = Http(up.http, up.key()), _espeak(QUESTION)
        pids = [up.proc.pid, *descendants(up.proc.pid)]  # casola up and its worker processes
        modes = {"a": lambda: mode_a(http, s, wav), "b": lambda: mode_b(http, s, wav), "c": lambda: direct.run(wav)}
        order = list(modes)
        for i in range(warmup + rounds):
            for m in order[i % 3 :] + order[: i % 3]:  # rotated: no mode always runs first
                cpu = _cpu_ms(pids)
                r = modes[m]()
                r["cpu"] = _cpu_ms(pids) - cpu
                if i >= warmup:
                    rows[m].append(r)
        direct.pool.shutdown()
    finally:
        up.stop()
        procs.stop()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", choices=tuple(SETS), default="tiny")
    ap.add_argument("--models-dir", help="default: a fresh tiny set, or models/demo")
    ap.add_argument("--rounds", type=int, help="measured rounds per mode (default: tiny 20, demo 5)")
    ap.add_argument("--warmup", type=int, default=3, help="rounds per mode before measuring")
    ap.add_argument("--json", help="write the summary and every round here")
    args = ap.parse_args()
    s = SETS[args.set]
    rounds = args.rounds or s.rounds
    if shutil.which("espeak-ng") is None:
        print("bench/workflow.py: espeak-ng is not installed (the question's speech, the tiny TTS)", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="casola-bench-workflow-"))
    models_dir = _models(args, tmp)
    if not (models_dir / s.llm).exists():
        print(f"bench/workflow.py: {models_dir / s.llm} is missing (the tool-capable {s.llm} model): "
              "run `casola models prepare-demo` with the agent model first", file=sys.stderr)  # fmt: skip
        return 2
    rows = measure(s, models_dir, tmp, rounds, args.warmup)
    out = summarize(s, rows)
    head = (f"voice agent ({QUESTION!r}), set {args.set} ({models_dir}), {rounds} rounds per mode after "
            f"{args.warmup} warm-up, ms")  # fmt: skip
    report(out, head)
    if args.json:
        doc = {"argv": sys.argv, "set": args.set, "models_dir": str(models_dir), "rounds": rounds, **out, "raw": rows}
        Path(args.json).write_text(json.dumps(doc, indent=1, default=str))
    shutil.rmtree(tmp, ignore_errors=True)  # kept when the run failed: casola up's log is in it
    return 0


if __name__ == "__main__":
    sys.exit(main())
