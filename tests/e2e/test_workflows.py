"""Workflows through `casola up` (real processes, the tiny models): the voice agent (ASR -> LLM with
a tool call -> sentences -> TTS) streams from step to step, its tools run (two in parallel) and
their results reach the model, a bad tool call never runs, a deadline or a failed step ends the run
naming the step, and the per-step timings add up (issue 15, deliverable 9).

The tiny chat models are scripted (workers/tiny.py): `chat-agent` calls get_weather(Paris) and,
once a tool result is its last message, answers three sentences; so its text answer itself shows
that the tool turn reached it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from casola.wire import ErrorCode
from tests.e2e.procs import casola_up
from tests.e2e.stack import ROOT
from tests.require import need_program

WEATHER = '{ type = "object", properties = { city = { type = "string" } }, required = ["city"] }'
CONFIG = """
models_dir = "@MODELS@"

[ingress]
trace = true

[queue]
outbound_allow = ["127.0.0.1/32"]
models = ["ghost"]

[queue.filter]
policy = "off"
terms = ["smith"]
models = { screened = "block" }

[[workers]]
models = ["asr", "chat-agent", "chat-agent2", "chat-badtool", "chat-badargs"]
capacity = 4
threads = 4

[[workers]]
models = ["tts", "tools", "tools-slow", "echo"]
capacity = 8

[models.tools-slow]
kind = "tools"
options = { delay_ms = 300 }

[workflows.agent]
description = "the voice agent: speech in, speech out"
deadline_ms = 30000
steps = [
  { name = "asr", kind = "model", model = "asr", params = { response_format = "text" } },
  { name = "think", kind = "llm", model = "chat-agent", tools = ["get_weather"], params = { max_tokens = 200 } },
  { name = "split", kind = "sentences" },
  { name = "speak", kind = "model", model = "tts", params = { response_format = "wav" } },
]
[workflows.agent.tools.get_weather]
model = "tools"
description = "The current weather in a city"
parameters = @WEATHER@

[workflows.agent-filtered]
steps = [
  { name = "think", kind = "llm", model = "chat-agent", tools = ["get_weather"] },
  { name = "split", kind = "sentences", filter = true },
  { name = "speak", kind = "model", model = "tts" },
]
[workflows.agent-filtered.tools.get_weather]
model = "tools"
parameters = @WEATHER@

[workflows.screened]
steps = [{ name = "think", kind = "llm", model = "chat-agent2", tools = ["get_weather"] }]
[workflows.screened.tools.get_weather]
model = "tools"
parameters = @WEATHER@

[workflows.grounded]
steps = [{ name = "think", kind = "llm", model = "chat-agent", tools = ["get_weather"], grounded = true }]
[workflows.grounded.tools.get_weather]
model = "tools"
parameters = @WEATHER@

[workflows.confirms]
steps = [{ name = "think", kind = "llm", model = "chat-agent", tools = ["get_weather"] }]
[workflows.confirms.tools.get_weather]
model = "tools"
answer = "conditions"
parameters = @WEATHER@

[workflows.ghostly]
steps = [{ name = "haunt", kind = "model", model = "ghost" }]

[workflows.two-calls]
steps = [{ name = "think", kind = "llm", model = "chat-agent2", tools = ["get_weather"] }]
[workflows.two-calls.tools.get_weather]
model = "tools-slow"
parameters = @WEATHER@

[workflows.bad-tool]
steps = [{ name = "think", kind = "llm", model = "chat-badtool", tools = ["get_weather"] }]
[workflows.bad-tool.tools.get_weather]
url = "http://127.0.0.1:@TOOL_PORT@/get_weather"
parameters = @WEATHER@

[workflows.bad-args]
steps = [{ name = "think", kind = "llm", model = "chat-badargs", tools = ["get_weather"] }]
[workflows.bad-args.tools.get_weather]
url = "http://127.0.0.1:@TOOL_PORT@/get_weather"
parameters = @WEATHER@

[workflows.slow]
steps = [
  { name = "first", kind = "model", model = "echo" },
  { name = "slow", kind = "model", model = "echo", params = { delay-ms = 3000 } },
]

[workflows.failing]
steps = [
  { name = "first", kind = "model", model = "echo" },
  { name = "broken", kind = "model", model = "echo", params = { fail = "the model refused" } },
]
"""
MODELS = ("asr", "chat-agent", "tts", "tools", "echo", "agent", "two-calls", "slow")


class Answer:
    def __init__(self, status: int, headers: dict[str, str], body: bytes, trailers: dict[str, str]) -> None:
        self.status, self.headers, self.body, self.trailers = status, headers, body, trailers

    def timing(self) -> dict[str, float]:
        """Server-Timing from the trailer (a streamed answer) or the head."""
        raw = self.trailers.get("server-timing") or self.headers.get("server-timing", "")
        out = {}
        for item in raw.split(","):
            name, _, rest = item.strip().partition(";")
            if "dur=" in rest:
                out[name] = float(rest.split("dur=")[1].split(";")[0])
        return out

    def timeline(self) -> list[tuple[str, float, float]]:
        return [tuple(r) for r in json.loads(self.trailers["x-casola-flow-timeline"])]  # type: ignore[misc]


def post(port: int, path: str, body: bytes, headers: dict[str, str] | None = None) -> Answer:
    """A raw HTTP/1.1 POST that reads the chunked trailers too (urllib drops them)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", path, body, {"Content-Type": "application/octet-stream", **(headers or {})})
    r = conn.getresponse()
    head = {k.lower(): v for k, v in r.getheaders()}
    trailers: dict[str, str] = {}
    if head.get("transfer-encoding") == "chunked":
        data = _chunked(r.fp, trailers)  # type: ignore[arg-type]
    else:
        data = r.read()
    conn.close()
    return Answer(r.status, head, data, trailers)


def _chunked(fp: Any, trailers: dict[str, str]) -> bytes:
    out = b""
    while True:
        size = int(fp.readline().split(b";")[0], 16)
        if size == 0:
            break
        out += fp.read(size)
        fp.readline()
    while (line := fp.readline().rstrip(b"\r\n")) != b"":
        name, _, value = line.decode().partition(":")
        trailers[name.strip().lower()] = value.strip()
    return out


class ToolServer:
    """The HTTP tool endpoint of the bad-tool workflows: counts the calls it gets."""

    def __init__(self) -> None:
        import http.server
        import threading

        calls = self.calls = []  # type: ignore[var-annotated]

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                calls.append(self.rfile.read(int(self.headers["Content-Length"])))
                body = b'{"temperature_c": 18}'
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


class Up:
    def __init__(self, http: int, frames: int, key: str, tools: ToolServer, config: Path) -> None:
        self.http, self.frames, self.key, self.tools, self.config = http, frames, key, tools, config

    def run(self, workflow: str, body: bytes, **headers: str) -> Answer:
        return post(self.http, f"/v1/workflows/{workflow}", body, {"Authorization": f"Bearer {self.key}", **headers})


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    need_program("espeak-ng")  # the tiny set's TTS engine, and the question's speech
    root = tmp_path_factory.mktemp("workflows")
    models = root / "models"
    subprocess.run(
        [sys.executable, "-m", "casola", "models", "build-tiny", str(models)], check=True, cwd=ROOT, capture_output=True
    )
    tools = ToolServer()
    config = root / "casola.toml"
    text = CONFIG.replace("@MODELS@", str(models)).replace("@TOOL_PORT@", str(tools.port))
    config.write_text(text.replace("@WEATHER@", WEATHER))
    try:
        with casola_up(root, config, MODELS, frames=True) as running:
            yield Up(running.http, running.frames, running.key, tools, config)
    finally:
        tools.server.shutdown()


def _speech(text: str) -> bytes:
    return subprocess.run(
        ["espeak-ng", "-v", "en-us", "-w", "/dev/stdout", text], check=True, capture_output=True
    ).stdout


def _wav_samples(wav: bytes) -> tuple[int, bytes]:
    assert wav[:4] == b"RIFF" and wav[8:12] == b"WAVE", wav[:16]
    at = wav.index(b"data")
    return int.from_bytes(wav[at + 4 : at + 8], "little"), wav[at + 8 :]


def test_the_voice_agent_speaks_and_its_steps_stream_into_each_other(up: Up) -> None:
    a = up.run("agent", _speech("What's the weather in Paris?"), **{"Content-Type": "audio/wav"})
    assert a.status == 200, a.body[:300]
    assert a.headers["content-type"] == "audio/wav"  # what the last step (TTS) declared
    size, samples = _wav_samples(a.body)
    assert size == 0xFFFFFFFF and a.body.count(b"RIFF") == 1  # one continuous WAV, not three
    assert len(samples) > 22050  # over half a second of 16-bit speech at 22,050 Hz
    rows = a.timeline()
    stages = [r[0] for r in rows]
    assert stages[0] == "asr" and "think.get_weather" in stages  # the tool ran, between the LLM's rounds
    assert stages.count("speak") == 3  # one TTS request per sentence of AGENT_ANSWER
    last_token = max(done for stage, _, done in rows if stage == "think")
    first_tts = min(sent for stage, sent, _ in rows if stage == "speak")
    assert first_tts < last_token  # hand-off: TTS of sentence 1 started while the LLM still generated
    speak = [r for r in rows if r[0] == "speak"]
    assert speak[1][1] < speak[0][2] or speak[1][1] < last_token  # sentence 2 was asked for before 1 was all out


def test_the_per_step_timings_add_up_to_the_run(up: Up) -> None:
    t = up.run("agent", _speech("What's the weather in Paris?"), **{"Content-Type": "audio/wav"}).timing()
    steps = {k: v for k, v in t.items() if k.startswith("step.")}
    assert set(steps) == {"step.asr", "step.think", "step.think.get_weather", "step.speak"}
    assert sum(steps.values()) + t["flow-overhead"] == pytest.approx(t["work"], abs=0.01)
    assert 0 < t["first-byte"] < t["work"]
    assert t["flow-overhead"] < 0.25 * t["work"]
    whole = t["ingress"] + t["queue-overhead"] + t["wait"] + t["worker-rtt"]
    assert t["work"] <= t["worker-rtt"] and whole > t["work"]


def test_the_tool_result_reaches_the_model(up: Up) -> None:
    a = up.run("two-calls", b"What is the weather in Paris and London?")
    assert a.status == 200, a.body
    assert a.body.decode().strip() == "It is sunny in Paris and rainy in London. Take an umbrella to London!"


def test_two_tool_calls_run_in_parallel(up: Up) -> None:
    a = up.run("two-calls", b"What is the weather in Paris and London?")
    calls = [(sent, done) for stage, sent, done in a.timeline() if stage == "think.get_weather"]
    assert len(calls) == 2
    (_, d1), (s2, _) = sorted(calls)
    assert s2 < d1  # the second started before the first (300 ms each) was answered
    assert a.timing()["step.think.get_weather"] < 550  # about one 300 ms call, not two


@pytest.mark.parametrize(
    ("workflow", "answer"), [("bad-tool", "I cannot launch rockets."), ("bad-args", "I could not get the weather.")]
)
def test_a_bad_tool_call_is_rejected_without_running(up: Up, workflow: str, answer: str) -> None:
    before = len(up.tools.calls)
    a = up.run(workflow, b"Launch the rockets" if workflow == "bad-tool" else b"Weather in 42?")
    assert a.status == 200, a.body
    assert a.body.decode().strip() == answer  # the model was told, and answered without the tool
    assert len(up.tools.calls) == before  # the endpoint was never called
    assert not [r for r in a.timeline() if r[0] == "think.get_weather"]


def test_a_deadline_the_run_cannot_meet_ends_it_naming_the_step(up: Up) -> None:
    t0 = time.monotonic()
    a = up.run("slow", b"hi", **{"X-Casola-Deadline-Ms": "400"})
    took = time.monotonic() - t0
    assert a.status == 504, a.body
    err = json.loads(a.body)["error"]
    assert err["message"].startswith("workflow 'slow': deadline of ") and "still running: step 'slow'" in err["message"]
    assert took < 2.0  # at the deadline, not when the 3 s step would have ended


def test_a_failed_step_gives_an_error_naming_it(up: Up) -> None:
    a = up.run("failing", b"hi")
    assert a.status == 400, a.body
    msg = json.loads(a.body)["error"]["message"]
    assert "step 'broken'" in msg and "the model refused" in msg


def test_workflows_are_listed(up: Up) -> None:
    req = urllib.request.Request(
        f"http://127.0.0.1:{up.http}/v1/workflows", headers={"Authorization": f"Bearer {up.key}"}
    )
    with urllib.request.urlopen(req, timeout=5) as r:
        listed = {w["name"]: w for w in json.loads(r.read())["data"]}
    assert [s["name"] for s in listed["agent"]["steps"]] == ["asr", "think", "split", "speak"]
    assert listed["agent"]["steps"][1]["tools"] == ["get_weather"]
    out = subprocess.run(
        [sys.executable, "-m", "casola", "workflows", "list", "--config", str(up.config)],
        capture_output=True, text=True, cwd=ROOT, check=True,
    )  # fmt: skip
    assert "agent" in out.stdout and "think(llm:chat-agent tools=get_weather)" in out.stdout


def test_a_workflow_over_frames_and_as_an_async_job(up: Up) -> None:
    import asyncio

    from casola.client import Client

    async def main() -> tuple[bytes, dict[str, float], bytes]:
        c = await Client.connect(f"127.0.0.1:{up.frames}", up.key)
        try:
            s = c.stream("two-calls", b"weather?")
            body = await s.read()
            job = await c.submit("two-calls", b"weather?")
            result = await c.job_result(job.request_id, wait_ms=10000)
            return body, s.timing, result.payload  # type: ignore[union-attr]
        finally:
            await c.close()

    body, timing, async_body = asyncio.run(main())
    assert body == async_body and b"umbrella" in body
    assert "step.think" in timing and "flow-overhead" in timing


def test_fal_workflows_namespace_runs_a_workflow_as_a_job(up: Up) -> None:
    auth = {"Authorization": f"Key {up.key}", "Content-Type": "application/json"}
    base = f"http://127.0.0.1:{up.http}"
    req = urllib.request.Request(f"{base}/workflows/me/two-calls", b'{"question": "weather?"}', auth)
    with urllib.request.urlopen(req, timeout=10) as r:
        submitted = json.loads(r.read())
    assert submitted["status_url"].startswith(f"{base}/workflows/me/two-calls/requests/")
    end = time.monotonic() + 20
    while True:
        with urllib.request.urlopen(urllib.request.Request(submitted["status_url"], headers=auth), timeout=10) as r:
            if json.loads(r.read())["status"] == "COMPLETED":
                break
        assert time.monotonic() < end, "the fal job did not complete"
        time.sleep(0.05)
    with urllib.request.urlopen(urllib.request.Request(submitted["response_url"], headers=auth), timeout=10) as r:
        assert b"umbrella" in r.read()


def test_a_violating_sentence_is_never_spoken(up: Up) -> None:
    """AGENT_ANSWER's second sentence names Dr. Smith, and "smith" is a filter term here: sentence 1
    is spoken, sentence 2's audio never leaves the queue node, and the run ends naming the step."""
    import asyncio

    from casola.client import Client, RequestFailed

    async def main() -> tuple[bytes, RequestFailed | None]:
        c = await Client.connect(f"127.0.0.1:{up.frames}", up.key)
        got, err = b"", None
        try:
            async for piece in c.stream("agent-filtered", b"What's the weather in Paris?"):
                got += bytes(piece)
        except RequestFailed as exc:
            err = exc
        finally:
            await c.close()
        return got, err

    got, err = asyncio.run(main())
    assert err is not None and err.code == ErrorCode.CONTENT_POLICY_VIOLATION
    assert "step 'speak' (sentence 2)" in err.message
    _, samples = _wav_samples(got)
    alone = up.run("agent", _speech("Paris weather?"), **{"Content-Type": "audio/wav"})
    assert 0 < len(samples) < len(_wav_samples(alone.body)[1]) / 2  # sentence 1 only, of three


def test_the_workflow_input_is_filtered_like_any_request(up: Up) -> None:
    bad = up.run("screened", b"Ask Mr Smith about the weather")
    assert bad.status == 400 and json.loads(bad.body)["error"]["code"] == "content_policy_violation"
    assert up.run("screened", b"What is the weather?").status == 200


def test_a_step_refused_for_capacity_keeps_its_code_and_retry_after(up: Up) -> None:
    a = up.run("ghostly", b"boo")
    assert a.status == 503, a.body  # the step's no_capacity, not a 502 of the engine "failing"
    assert "step 'haunt'" in json.loads(a.body)["error"]["message"]
    assert int(a.headers["retry-after"]) >= 1


def test_with_grounded_a_call_whose_argument_the_user_never_said_does_not_run(up: Up) -> None:
    said = up.run("grounded", b"What's the weather in paris today?")  # chat-agent asks get_weather(Paris)
    assert "think.get_weather" in [r[0] for r in said.timeline()]
    unsaid = up.run("grounded", b"What is the capital of France?")
    assert unsaid.status == 200 and "think.get_weather" not in [r[0] for r in unsaid.timeline()]


def test_a_tool_that_answers_for_itself_ends_the_step_without_another_round(up: Up) -> None:
    a = up.run("confirms", b"Weather in Paris?")
    assert a.status == 200 and a.body == b"sunny"  # get_weather's "conditions" for Paris, as it is
    assert [r[0] for r in a.timeline()] == ["think", "think.get_weather"]  # the model was asked once


def test_a_json_conversation_is_the_llm_steps_history(up: Up) -> None:
    talk = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
    talk["messages"].append({"role": "user", "content": "What is the weather in Paris?"})
    json_ct = {"Content-Type": "application/json"}
    ok = up.run("grounded", json.dumps(talk).encode(), **json_ct)
    assert ok.status == 200 and "think.get_weather" in [r[0] for r in ok.timeline()]  # grounded in the last turn
    talk["messages"][-1] = {"role": "user", "content": "And there?"}  # Paris was said earlier, not now
    assert "think.get_weather" not in [
        r[0] for r in up.run("grounded", json.dumps(talk).encode(), **json_ct).timeline()
    ]
    bad = up.run("grounded", b'{"messages": [{"role": "assistant", "content": "x"}]}', **json_ct)
    assert bad.status == 400 and "step 'think'" in json.loads(bad.body)["error"]["message"]
