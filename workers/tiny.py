"""Tiny, structurally real CTranslate2 models built offline from numpy, for tests and `casola models build-tiny`.

Each builder writes an ordinary model directory (model.bin, config.json, vocabulary.json, a tokenizer.json
matching the vocabulary id for id, and the `casola.json` manifest), so workers take the same code path as
with real converted models. No torch, no transformers, no download: the whole set builds in about 0.2 s on
2 CPU cores, plus about 0.3 s to import ctranslate2.

With `script=`, a decoder is deterministic: it answers ANY input with that text, then its end token. All
decoder sub-layers are zeroed so the residual stream carries only the token embedding; embeddings are
orthogonal zero-mean Hadamard rows (which LayerNorm/RMSNorm leave as they are) and the output projection
maps each script chunk to the next one, a bigram. Without a script, weights are random (seeded).
An LM may have a second script, `after_tool=`, that it answers once the conversation ends with a tool
result: the one-round tool loop of an agent (see `build_tiny_lm`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final

import numpy as np
from ctranslate2.specs import common_spec, model_spec, transformer_spec, whisper_spec
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from workers.spec import MANIFEST

__all__ = [
    "AGENT_ANSWER",
    "AGENT_CHAT_TEMPLATE",
    "CHAT_TEMPLATE",
    "TOOL_RESULT_TOKEN",
    "WHISPER_LANGS",
    "build_bpe_tokenizer",
    "build_tiny_encoder",
    "build_tiny_lm",
    "build_tiny_set",
    "build_tiny_whisper",
    "file_sha256",
    "script_chunks",
    "write_manifest",
]

_CORPUS: Final = (
    "the quick brown fox jumps over the lazy dog",
    "hello world this is a tiny test model for the voice agent",
    "how can i help you today please say that again",
    "one two three four five six seven eight nine ten",
)
_SOURCE: Final = "casola workers.tiny (numpy, seeded; no download)"

# ChatML with Hermes/Qwen-style tools, after Qwen2.5's template. The explicit `{{- '...' }}` style makes the
# output independent of the environment's trim_blocks/lstrip_blocks. `bos_token` is emitted by the template
# (the HF convention), so a caller renders with bos_token and does not prepend it again.
_CHAT_TURNS: Final = """\
{{- bos_token if bos_token is defined and bos_token else '' }}
{%- set ns = namespace(system=none, start=0) %}
{%- if messages and messages[0].role == 'system' %}
    {%- set ns.system = messages[0].content %}
    {%- set ns.start = 1 %}
{%- endif %}
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if ns.system %}{{- ns.system + '\\n\\n' }}{%- endif %}
    {{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n' }}
    {{- 'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}
    {%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}
    {{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments ' }}
    {{- 'within <tool_call></tool_call> XML tags:\\n<tool_call>\\n' }}
    {{- '{\"name\": <function-name>, \"arguments\": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}
{%- elif ns.system is not none %}
    {{- '<|im_start|>system\\n' + ns.system + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages[ns.start:] %}
    {%- if message.role == 'user' or message.role == 'system' %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- elif message.role == 'assistant' %}
        {{- '<|im_start|>assistant' }}
        {%- if message.content %}{{- '\\n' + message.content }}{%- endif %}
        {%- for call in message.tool_calls or [] %}
            {%- set fn = call.function if call.function is defined else call %}
            {{- '\\n<tool_call>\\n{\"name\": \"' + fn.name + '\", \"arguments\": ' }}
            {%- if fn.arguments is string %}{{- fn.arguments }}{%- else %}{{- fn.arguments | tojson }}{%- endif %}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or loop.previtem.role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
        {{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}
        {%- if loop.last or loop.nextitem.role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}
    {%- else %}
        {{- raise_exception('unknown chat role: ' + message.role) }}
    {%- endif %}
{%- endfor %}
"""
CHAT_TEMPLATE: Final = _CHAT_TURNS + "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}\n"

# The template of a test model with an `after_tool` script: the same, except that a generation prompt after
# a tool result ends with TOOL_RESULT_TOKEN, so the prompt's last token says which script to answer.
TOOL_RESULT_TOKEN: Final = "<|tool_result|>"
AGENT_CHAT_TEMPLATE: Final = (
    _CHAT_TURNS + "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if messages and messages[-1].role == 'tool' %}{{- '" + TOOL_RESULT_TOKEN + "' }}{%- endif %}"
    "{%- endif %}\n"
)

_CHAT_TOKENS: Final = ("<|im_start|>", "<|im_end|>")  # special in the tiny LM vocab, as in real ChatML models


# --------------------------------------------------------------------------- manifest
def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (model files are far larger than memory should hold twice)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(
    directory: Path,
    kind: str,
    *,
    description: str,
    source: str,
    options: dict[str, Any],
    files: dict[str, str] | None = None,
) -> Path:
    """Writes `casola.json` into `directory` (atomically: a reader never sees half a manifest).

    `files` defaults to the sha256 of every other regular file in the directory.
    """
    if files is None:
        files = {p.name: file_sha256(p) for p in sorted(directory.iterdir()) if p.is_file() and p.name != MANIFEST}
    data = {"kind": kind, "description": description, "source": source, "files": files, "options": options}
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, directory / MANIFEST)
    return directory / MANIFEST


# --------------------------------------------------------------------------- tokenizer
def script_chunks(text: str, taken: Iterable[str] = ()) -> list[str]:
    """Word chunks of `text` (leading whitespace kept), all distinct so a bigram can replay them.

    A repeated word, or one in `taken` (the chunks of another script of the same model), is merged with
    the word(s) after it.

    Raises:
        ValueError: the text ends in words that cannot be made distinct.
    """
    used = set(taken)
    chunks: list[str] = []
    cur = ""
    for word in re.findall(r"\s*\S+", text):
        cur += word
        if cur not in used:
            chunks.append(cur)
            used.add(cur)
            cur = ""
    if cur:
        if not chunks:
            raise ValueError(f"cannot split {text!r} into chunks distinct from {sorted(used)}")
        used.discard(chunks[-1])
        chunks[-1] += cur
        if chunks[-1] in used:
            raise ValueError(f"cannot split {text!r} into distinct chunks")
    return chunks


def build_bpe_tokenizer(
    vocab_size: int,
    special_tokens: Iterable[str],
    corpus: Iterable[str] = _CORPUS,
    text_tokens: Iterable[str] = (),
) -> tuple[Tokenizer, list[str]]:
    """A byte-level BPE trained in-process on a few sentences (milliseconds), and its vocabulary by id.

    Ids: the BPE vocab, then `text_tokens` (plain added tokens, decoded verbatim), then `special_tokens`
    in the given order -- the layout Whisper expects.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any text encodes
        show_progress=False,
        special_tokens=[],
    )
    tok.train_from_iterator(list(corpus), trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in text_tokens])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    vocab: list[str | None] = [None] * tok.get_vocab_size(with_added_tokens=True)
    for token, i in tok.get_vocab(with_added_tokens=True).items():
        vocab[i] = token
    if any(v is None for v in vocab):
        raise RuntimeError("tokenizer ids are not contiguous")
    return tok, [v for v in vocab if v is not None]


# --------------------------------------------------------------------------- weights
class _Weights:
    """Seeded random weights in torch.nn.Linear layout ([out, in]); std=0 gives all-zero sub-layers."""

    def __init__(self, seed: int, std: float = 0.02) -> None:
        self.rng = np.random.default_rng(seed)
        self.std = std

    def randn(self, *shape: int) -> np.ndarray:
        return (self.rng.standard_normal(shape) * self.std).astype(np.float32)

    def linear(self, spec: Any, out_dim: int, in_dim: int, bias: bool = True) -> None:
        spec.weight = self.randn(out_dim, in_dim)
        if bias:
            spec.bias = self.randn(out_dim)

    def norm(self, spec: Any, dim: int) -> None:
        spec.gamma = np.ones(dim, np.float32)
        if hasattr(spec, "beta"):  # LayerNorm; RMSNorm has no beta
            spec.beta = np.zeros(dim, np.float32)

    def self_attn(self, spec: Any, d: int) -> None:
        self.linear(spec.linear[0], 3 * d, d)  # fused q, k, v
        self.linear(spec.linear[1], d, d)
        self.norm(spec.layer_norm, d)

    def cross_attn(self, spec: Any, d: int) -> None:
        self.linear(spec.linear[0], d, d)  # q
        self.linear(spec.linear[1], 2 * d, d)  # fused k, v
        self.linear(spec.linear[2], d, d)
        self.norm(spec.layer_norm, d)

    def ffn(self, spec: Any, d: int, ff: int) -> None:
        self.linear(spec.linear_0, ff, d)
        self.linear(spec.linear_1, d, ff)
        self.norm(spec.layer_norm, d)


def _hadamard(n: int) -> np.ndarray:
    h = np.ones((1, 1), np.float32)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def _script_bigram(
    emb: np.ndarray,
    proj: np.ndarray,
    script_ids: list[int],
    end_id: int,
    branch: tuple[int, list[int]] | None = None,
) -> None:
    """Sets `emb`/`proj` so greedy decoding emits the script token after each script token, then `end_id`.

    Any other last token maps to the first script token. With `branch` = (trigger id, script ids), the
    trigger token maps to that second script's first token, which is replayed the same way. Row 0 of the
    Hadamard matrix is skipped: it is not zero-mean, so a norm layer would change it.

    Raises:
        ValueError: tokens shared by the scripts (or the trigger), or a d_model too small or not a power of 2.
    """
    d = emb.shape[1]
    links = list(zip(script_ids, [*script_ids[1:], end_id], strict=True))
    if branch is not None:
        trigger, ids = branch
        links += [(trigger, ids[0]), *zip(ids, [*ids[1:], end_id], strict=True)]
    tokens = [token for token, _ in links]
    if len(set(tokens)) != len(tokens):
        raise ValueError("script tokens must be distinct, within and across scripts (see script_chunks)")
    if d & (d - 1) or len(links) + 2 > d:
        raise ValueError(f"scripts have {len(links)} tokens; use a power-of-2 d_model >= {len(links) + 2}")
    h = _hadamard(d)
    emb[:] = h[1]
    proj[:] = 0.0
    proj[script_ids[0]] += h[1]
    for i, (token, nxt) in enumerate(links):
        emb[token] = h[i + 2]
        proj[nxt] += h[i + 2]


def _save(
    spec: model_spec.ModelSpec,
    directory: Path,
    quantization: str | None,
    tokenizer: Tokenizer,
    extra: dict[str, str | bytes],
) -> None:
    """Validates, quantizes and saves like ctranslate2's Converter.convert(), plus tokenizer and extra files."""
    spec.validate()
    spec.optimize(quantization=quantization)
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    spec.save(str(directory))
    tokenizer.save(str(directory / "tokenizer.json"))
    for name, content in extra.items():
        data = content.encode() if isinstance(content, str) else content
        (directory / name).write_bytes(data)


# --------------------------------------------------------------------------- whisper
WHISPER_LANGS: Final = ("en", "de", "fr")


def build_tiny_whisper(
    out_dir: str | Path,
    *,
    n_mels: int = 80,
    d_model: int = 64,
    heads: int = 2,
    enc_layers: int = 2,
    dec_layers: int = 2,
    ffn: int = 256,
    bpe_vocab: int = 400,
    n_audio_ctx: int = 1500,  # 30 s of 10 ms frames after the stride-2 conv
    n_text_ctx: int = 448,
    seed: int = 0,
    multilingual: bool = True,
    script: str | None = None,
    quantization: str | None = None,
    options: dict[str, Any] | None = None,
) -> Path:
    """A Whisper model directory; with `script`, it transcribes ANY audio to that text (then <|endoftext|>)."""
    out = Path(out_dir)
    # CTranslate2 >= 4.7 calls a Whisper model multilingual (detect_language allowed) iff its vocabulary has
    # an empty-string token, as OpenAI's multilingual vocab does just before <|endoftext|>: reserve that id.
    specials = ["<|reserved_empty|>"] if multilingual else []
    specials += ["<|endoftext|>", "<|startoftranscript|>", *(f"<|{lang}|>" for lang in WHISPER_LANGS)]
    # The order matters: num_languages is derived from the distance between these ids.
    specials += ["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>"]
    specials += ["<|notimestamps|>", *(f"<|{i * 0.02:.2f}|>" for i in range(1501))]
    chunks = script_chunks(script) if script else []
    tok, vocab = build_bpe_tokenizer(bpe_vocab, specials, text_tokens=chunks)
    vocab = ["" if t == "<|reserved_empty|>" else t for t in vocab]
    ids = {t: i for i, t in enumerate(vocab)}
    w = _Weights(seed)

    spec = whisper_spec.WhisperSpec(enc_layers, heads, dec_layers, heads)
    enc = spec.encoder
    enc.conv1.weight = w.randn(d_model, n_mels, 3)
    enc.conv1.bias = w.randn(d_model)
    enc.conv2.weight = w.randn(d_model, d_model, 3)
    enc.conv2.bias = w.randn(d_model)
    enc.position_encodings.encodings = w.randn(n_audio_ctx, d_model)
    w.norm(enc.layer_norm, d_model)
    for layer in enc.layer:
        w.self_attn(layer.self_attention, d_model)
        w.ffn(layer.ffn, d_model, ffn)

    dec = spec.decoder
    emb = w.randn(len(vocab), d_model)
    dec.embeddings.weight = emb
    dec.position_encodings.encodings = w.randn(n_text_ctx, d_model)
    w.norm(dec.layer_norm, d_model)
    dec.projection.weight = emb  # tied, as in Whisper; saved once thanks to aliasing
    wd = _Weights(seed + 1, std=0.0) if script else w
    for layer in dec.layer:
        wd.self_attn(layer.self_attention, d_model)
        wd.cross_attn(layer.attention, d_model)
        wd.ffn(layer.ffn, d_model, ffn)
    if script:
        dec.position_encodings.encodings = np.zeros((n_text_ctx, d_model), np.float32)
        proj = np.zeros_like(emb)
        _script_bigram(emb, proj, [ids[c] for c in chunks], ids["<|endoftext|>"])
        dec.projection.weight = proj

    spec.register_vocabulary(vocab)
    spec.config.suppress_ids = []
    spec.config.suppress_ids_begin = [ids["<|endoftext|>"]]
    spec.config.lang_ids = [ids[f"<|{lang}|>"] for lang in WHISPER_LANGS]
    spec.config.alignment_heads = [[dec_layers - 1, h] for h in range(heads)]
    _save(spec, out, quantization, tok, {})
    what = f"scripted {script!r}" if script else "random weights"
    lang = "multilingual" if multilingual else "English-only"
    write_manifest(out, "whisper", description=f"tiny {lang} Whisper, {what}", source=_SOURCE, options=options or {})
    return out


# --------------------------------------------------------------------------- decoder-only LM
def build_tiny_lm(
    out_dir: str | Path,
    *,
    d_model: int = 64,
    heads: int = 4,
    layers: int = 2,
    ffn: int = 256,
    bpe_vocab: int = 400,
    seed: int = 0,
    script: str | None = None,
    after_tool: str | None = None,
    quantization: str | None = None,
    chat_template: str | None = CHAT_TEMPLATE,
    options: dict[str, Any] | None = None,
) -> Path:
    """A decoder-only LM directory; with `script`, greedy decoding answers ANY prompt with it, then </s>.

    With `after_tool` as well, the model answers that second script instead when the conversation's last
    message is a tool result, and `script` otherwise: script a tool call, then the answer the tool's result
    leads to, and a tool loop has a model to run. A bigram model sees only the prompt's last token, so the
    branch has to be made visible there: this is a test model, and its chat template (AGENT_CHAT_TEMPLATE,
    used instead of the default CHAT_TEMPLATE) ends the generation prompt after a tool message with the
    special token TOOL_RESULT_TOKEN, which maps to `after_tool`'s first chunk. A real model reads the
    tool result; this one only reacts to the marker, whatever the result says. The two scripts' chunks are
    kept distinct from each other (script_chunks' `taken`). A `chat_template` of your own must emit the
    marker the same way.

    Raises:
        ValueError: `after_tool` without `script`, a template without the marker, or scripts too long for
            `d_model` (together at most d_model - 3 chunks).
    """
    out = Path(out_dir)
    chunks = script_chunks(script) if script else []
    after = script_chunks(after_tool, taken=chunks) if after_tool else []
    specials = ["<unk>", "<s>", "</s>", *_CHAT_TOKENS]
    if after_tool:
        if not script:
            raise ValueError("after_tool needs a script for the first round")
        chat_template = AGENT_CHAT_TEMPLATE if chat_template == CHAT_TEMPLATE else chat_template
        if not chat_template or TOOL_RESULT_TOKEN not in chat_template:
            raise ValueError(f"an after_tool model needs a chat template that emits {TOOL_RESULT_TOKEN}")
        specials.append(TOOL_RESULT_TOKEN)
    tok, vocab = build_bpe_tokenizer(bpe_vocab, specials, text_tokens=[*chunks, *after])
    w = _Weights(seed, std=0.0) if script else _Weights(seed)
    # llama layout (RMSNorm, RoPE, SwiGLU, grouped-query attention), like SmolLM2 and most chat models
    kv_heads = max(1, heads // 2)
    spec = transformer_spec.TransformerDecoderModelSpec.from_config(
        layers,
        heads,
        activation=common_spec.Activation.SWISH,
        ffn_glu=True,
        rms_norm=True,
        rotary_dim=0,
        rotary_interleave=False,
        num_heads_kv=kv_heads,
    )
    dec = spec.decoder
    dec.embeddings.weight = w.randn(len(vocab), d_model)
    dec.projection.weight = w.randn(len(vocab), d_model)
    for layer in dec.layer:
        attn = layer.self_attention
        w.linear(attn.linear[0], (heads + 2 * kv_heads) * (d_model // heads), d_model, bias=False)
        w.linear(attn.linear[1], d_model, d_model, bias=False)
        w.norm(attn.layer_norm, d_model)
        w.linear(layer.ffn.linear_0, ffn, d_model, bias=False)
        w.linear(layer.ffn.linear_0_noact, ffn, d_model, bias=False)
        w.linear(layer.ffn.linear_1, d_model, ffn, bias=False)
        w.norm(layer.ffn.layer_norm, d_model)
    dec.scale_embeddings = False
    w.norm(dec.layer_norm, d_model)
    if script:
        emb, proj = np.zeros((len(vocab), d_model), np.float32), np.zeros((len(vocab), d_model), np.float32)
        branch = (vocab.index(TOOL_RESULT_TOKEN), [vocab.index(c) for c in after]) if after else None
        _script_bigram(emb, proj, [vocab.index(c) for c in chunks], vocab.index("</s>"), branch)
        dec.embeddings.weight, dec.projection.weight = emb, proj
    spec.register_vocabulary(vocab)
    spec.config.bos_token, spec.config.eos_token, spec.config.unk_token = "<s>", "</s>", "<unk>"
    spec.config.layer_norm_epsilon = 1e-5
    _save(spec, out, quantization, tok, {"chat_template.jinja": chat_template} if chat_template else {})
    what = f"scripted {script!r}" if script else "random weights"
    if after_tool:
        what += f", after a tool result {after_tool!r}"
    write_manifest(
        out,
        "llm",
        description=f"tiny llama LM, {what}",
        source=_SOURCE,
        options=options if options is not None else {"end_tokens": ["</s>"]},
    )
    return out


# --------------------------------------------------------------------------- encoder (BERT-like)
def build_tiny_encoder(
    out_dir: str | Path,
    *,
    d_model: int = 64,
    heads: int = 2,
    layers: int = 2,
    ffn: int = 256,
    bpe_vocab: int = 400,
    labels: tuple[str, ...] = ("ok", "violence", "spam"),
    seed: int = 0,
    quantization: str | None = None,
    options: dict[str, Any] | None = None,
) -> Path:
    """A BERT-style post-norm encoder with pooler, plus `classifier.npz` (weight [labels, d], bias [labels]).

    CTranslate2 has no classification head: the caller computes pooler_output @ weight.T + bias.
    """
    out = Path(out_dir)
    tok, vocab = build_bpe_tokenizer(bpe_vocab, ["[PAD]", "[UNK]", "[CLS]", "[SEP]"])
    w = _Weights(seed)
    enc = transformer_spec.TransformerEncoderSpec(
        layers,
        heads,
        pre_norm=False,
        activation=common_spec.Activation.GELU,
        num_source_embeddings=2,  # token ids + token type ids
        embeddings_merge=common_spec.EmbeddingsMerge.ADD,
        layernorm_embedding=True,
    )
    spec = transformer_spec.TransformerEncoderModelSpec(enc, pooling_layer=True)
    enc.scale_embeddings = False
    enc.embeddings[0].weight = w.randn(len(vocab), d_model)
    enc.embeddings[1].weight = w.randn(2, d_model)
    enc.position_encodings.encodings = w.randn(512, d_model)
    w.norm(enc.layernorm_embedding, d_model)
    for layer in enc.layer:
        w.self_attn(layer.self_attention, d_model)
        w.ffn(layer.ffn, d_model, ffn)
    w.linear(spec.pooler_dense, d_model, d_model)
    spec.register_vocabulary(vocab)
    spec.config.unk_token, spec.config.bos_token, spec.config.eos_token = "[UNK]", "[CLS]", "[SEP]"
    spec.config.layer_norm_epsilon = 1e-12
    head = w.randn(len(labels), d_model)
    _save(spec, out, quantization, tok, {})
    np.savez(out / "classifier.npz", weight=head, bias=np.zeros(len(labels), np.float32))
    default = {"labels": list(labels), "flag_labels": list(labels[1:]), "threshold": 0.5, "max_length": 512}
    write_manifest(
        out,
        "classify",
        description=f"tiny BERT-style classifier ({', '.join(labels)}), random weights",
        source=_SOURCE,
        options=options if options is not None else default,
    )
    return out


# --------------------------------------------------------------------------- the set
def _call(name: str, arguments: str) -> str:
    """One Hermes-format tool call, as Qwen/SmolLM2/Hermes models write it."""
    return f'<tool_call>\n{{"name": "{name}", "arguments": {arguments}}}\n</tool_call>'


_TOOL_CALL: Final = _call("set_lights", '{"on": true}')
_WEATHER_PARIS: Final = _call("get_weather", '{"city": "Paris"}')
_WEATHER_LONDON: Final = _call("get_weather", '{"city": "London"}')
# Abbreviations and a decimal inside, so a sentence splitter downstream is put to the test.
AGENT_ANSWER: Final = (
    " It is 18 degrees and sunny in Paris. Dr. Smith says 3.5 hours of sun remain, so enjoy it."
    " Have a lovely afternoon!"
)
# chat-agent has 8 layers (the others 2) so that a token takes ~1.3-2 ms through workers.llm on 2 CPU cores
# (2 layers: ~0.7 ms, 4: ~0.9 ms) and a test can see by timestamps that the answer streams. Its zero layers
# cost no disk (CTranslate2 saves identical weights once) and leave the scripted answers exact.
_AGENT_LAYERS: Final = 8


def build_tiny_set(out_dir: str | Path) -> dict[str, Path]:
    """Writes the tiny model set, one directory per model name, and returns {name: directory}.

    asr          scripted multilingual Whisper (80 mels): any audio -> " turn on the lights"
    asr-en       scripted English-only Whisper -> " hello world"
    chat         scripted llama LM: any prompt -> " Sure, turning on the lights now." then </s>
    chat-tools   scripted llama LM answering a Hermes-format <tool_call> for set_lights(on=true)
    chat-agent   a one-round tool loop (AGENT_CHAT_TEMPLATE): a <tool_call> for get_weather(city="Paris"),
                 and after a tool result AGENT_ANSWER, three sentences with "Dr." and "3.5" inside;
                 8 layers, so that a token takes ~1-3 ms on a CPU
    chat-agent2  two <tool_call>s in one answer, get_weather for Paris and for London; after the tool
                 results " It is sunny in Paris and rainy in London. Take an umbrella to London!"
    chat-badtool a <tool_call> for launch_rockets, a tool that does not exist; after a tool result
                 " I cannot launch rockets."
    chat-badargs a <tool_call> for get_weather with {"city": 42}, which its schema refuses; after a tool
                 result " I could not get the weather."
    chat-random  random-weight llama LM, int8, that never stops early (for long generations)
    classify     BERT-style encoder + classifier head, labels ok / violence / spam
    tts          espeak-ng, no model files
    tools        the example tools get_weather and set_timer (workers.tools), no model files
    listen       voice activity + transcripts of a stream (workers.listen): a tiny energy VAD in Silero's
                 ONNX signature (workers.tiny_vad) and the scripted `asr` above

    The chat models end with </s>, the tool-loop ones in both rounds.
    """
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    dirs = {
        "asr": build_tiny_whisper(root / "asr", script=" turn on the lights"),
        "asr-en": build_tiny_whisper(root / "asr-en", multilingual=False, script=" hello world"),
        "chat": build_tiny_lm(root / "chat", script=" Sure, turning on the lights now."),
        "chat-tools": build_tiny_lm(root / "chat-tools", script=_TOOL_CALL),
        "chat-agent": build_tiny_lm(
            root / "chat-agent", script=_WEATHER_PARIS, after_tool=AGENT_ANSWER, layers=_AGENT_LAYERS
        ),
        "chat-agent2": build_tiny_lm(
            root / "chat-agent2",
            script=_WEATHER_PARIS + "\n" + _WEATHER_LONDON,
            after_tool=" It is sunny in Paris and rainy in London. Take an umbrella to London!",
        ),
        "chat-badtool": build_tiny_lm(
            root / "chat-badtool",
            script=_call("launch_rockets", '{"count": 3}'),
            after_tool=" I cannot launch rockets.",
        ),
        "chat-badargs": build_tiny_lm(
            root / "chat-badargs",
            script=_call("get_weather", '{"city": 42}'),
            after_tool=" I could not get the weather.",
        ),
        "chat-random": build_tiny_lm(
            root / "chat-random", quantization="int8", options={"end_tokens": ["</s>"], "ignore_eos": True}
        ),
        "classify": build_tiny_encoder(root / "classify"),
    }
    dirs["tts"] = _engine_dir(
        root / "tts", "tts", "espeak-ng speech (no model files)", "espeak-ng", {"engine": "espeak-ng"}
    )
    dirs["tools"] = _engine_dir(
        root / "tools",
        "tools",
        "example tools get_weather and set_timer (no model files)",
        "casola workers.tools (fixed local data)",
        {},
    )
    from workers.tiny_vad import build_tiny_listen  # it writes its manifest with this module's helpers

    dirs["listen"] = build_tiny_listen(root / "listen", asr="../asr")
    return dirs


def _engine_dir(directory: Path, kind: str, description: str, source: str, options: dict[str, Any]) -> Path:
    """A model directory without model files: only its manifest."""
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir()
    write_manifest(directory, kind, description=description, source=source, options=options)
    return directory
