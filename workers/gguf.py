"""Convert a llama or qwen2 GGUF (llama.cpp's format) into a CTranslate2 Generator directory, offline.

Writes model.bin, config.json, vocabulary.json, a Hugging Face tokenizer.json rebuilt from the GGUF's
`tokenizer.ggml.*` fields, and chat_template.jinja when the GGUF carries `tokenizer.chat_template`.
Any GGUF quantization is dequantized to float32 by the `gguf` package, then requantized by CTranslate2.
Only the byte-level BPE tokenizer (`tokenizer.ggml.model == "gpt2"`, as in SmolLM2, Qwen, Llama 3) is supported,
with the GPT-2, smollm and qwen2 pre-tokenizers. Needs ctranslate2, numpy, tokenizers and gguf; no torch.

The two architectures differ in three places (MODELS.md §4.3, §7.1): llama.cpp permutes llama's Q/K rows for
interleaved RoPE but not qwen2's; qwen2 has q/k/v biases; Qwen's tokenizer splits with its own regex after NFC.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

__all__ = ["ARCHITECTURES", "GGUFError", "build_tokenizer", "convert"]

# llama.cpp pre-tokenizer names whose only difference from GPT-2's regex is splitting digits one by one.
_SINGLE_DIGIT_PRE: Final = frozenset({"smollm"})
# Qwen2's split (its tokenizer.json; llama.cpp's LLAMA_VOCAB_PRE_TYPE_QWEN2 spells the same regex without (?i:)):
# single digits, letter runs with one leading non-letter, punctuation runs, newlines apart from other spaces.
_QWEN2_SPLIT: Final = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# token_embd and output closer than this (relative L2 distance) are one tied matrix stored twice in two
# quantizations (Qwen2.5-0.5B: 4.4 %); untied matrices are unrelated (distance about 1.4).
_TIED_DISTANCE: Final = 0.25


@dataclass(frozen=True)
class _Arch:
    rotary_interleave: bool  # llama.cpp permuted Q/K rows for GPT-J style RoPE (llama), or left them (qwen2)
    qkv_bias: bool  # attn_{q,k,v}.bias tensors


ARCHITECTURES: Final = {
    "llama": _Arch(rotary_interleave=True, qkv_bias=False),
    # As ctranslate2's own Qwen2 loader: HF rotary layout, biases on q/k/v only.
    "qwen2": _Arch(rotary_interleave=False, qkv_bias=True),
}


class GGUFError(ValueError):
    """The GGUF file is not a model this converter understands (architecture, tokenizer, tensors)."""


class _Reader:
    """Field and tensor access on a GGUFReader, by name."""

    def __init__(self, path: Path) -> None:
        import gguf

        self.gguf = gguf
        self.reader = gguf.GGUFReader(path)
        self.tensors = {t.name: t for t in self.reader.tensors}

    def has(self, key: str) -> bool:
        return key in self.reader.fields

    def field(self, key: str) -> Any:
        try:
            return self.reader.fields[key].contents()
        except KeyError:
            raise GGUFError(f"GGUF field {key!r} is missing") from None

    def bits(self, name: str) -> float:
        """Bits per weight of a tensor as stored (F32 32, Q8_0 8.5, Q5_0 5.5...)."""
        block, size = self.gguf.GGML_QUANT_SIZES[self.tensors[name].tensor_type]
        return 8 * size / block

    def tensor(self, name: str) -> np.ndarray:
        try:
            t = self.tensors[name]
        except KeyError:
            raise GGUFError(f"GGUF tensor {name!r} is missing") from None
        data = np.ascontiguousarray(self.gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        # F32 tensors come back as read-only views of the memory-mapped file; CTranslate2 quantizes in place.
        return data if data.flags.writeable else data.copy()


def build_tokenizer(gguf_path: str | Path) -> tuple[Any, list[str]]:
    """The tokenizers.Tokenizer and the vocabulary (by id) stored in a GGUF's `tokenizer.ggml.*` fields.

    Raises:
        GGUFError: not a byte-level BPE tokenizer, or fields are missing.
    """
    return _build_tokenizer(_Reader(Path(gguf_path)))


def _build_tokenizer(r: _Reader) -> tuple[Any, list[str]]:
    from tokenizers import AddedToken, Tokenizer, decoders, models

    if (kind := r.field("tokenizer.ggml.model")) != "gpt2":
        raise GGUFError(f"tokenizer.ggml.model {kind!r} is not supported (only byte-level BPE, 'gpt2')")
    tokens = list(r.field("tokenizer.ggml.tokens"))
    merges = [tuple(m.split(" ", 1)) for m in r.field("tokenizer.ggml.merges")]
    types = r.field("tokenizer.ggml.token_type")
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False, byte_fallback=False)
    tok = Tokenizer(bpe)
    _set_pre_tokenizer(tok, r.field("tokenizer.ggml.pre") if r.has("tokenizer.ggml.pre") else "default")
    tok.decoder = decoders.ByteLevel()
    token_type = r.gguf.TokenType
    # CONTROL tokens (<|im_start|>, <|endoftext|>...) must match as one unit and never be split by BPE;
    # USER_DEFINED ones are plain added words.
    control = [tokens[i] for i, ty in enumerate(types) if ty == token_type.CONTROL]
    user = [tokens[i] for i, ty in enumerate(types) if ty == token_type.USER_DEFINED]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    return tok, tokens


def _set_pre_tokenizer(tok: Any, pre: str) -> None:
    """The normalizer and pre-tokenizer llama.cpp's `tokenizer.ggml.pre` name stands for."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    if pre == "qwen2":
        tok.normalizer = normalizers.NFC()
        split = pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False)
        # The split regex already cut the words: ByteLevel only maps bytes to its alphabet.
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        return
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _SINGLE_DIGIT_PRE:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level


def _spec(r: _Reader, arch: str) -> Any:
    from ctranslate2.specs import common_spec, transformer_spec

    n_layers = int(r.field(f"{arch}.block_count"))
    spec = transformer_spec.TransformerDecoderModelSpec.from_config(
        n_layers,
        int(r.field(f"{arch}.attention.head_count")),
        activation=common_spec.Activation.SWISH,
        ffn_glu=True,
        rms_norm=True,
        rotary_dim=0,
        rotary_interleave=ARCHITECTURES[arch].rotary_interleave,
        rotary_base=float(r.field(f"{arch}.rope.freq_base")) if r.has(f"{arch}.rope.freq_base") else 10000.0,
        num_heads_kv=int(r.field(f"{arch}.attention.head_count_kv")),
    )
    dec = spec.decoder
    dec.scale_embeddings = False
    dec.embeddings.weight, dec.projection.weight = _embeddings(r)
    dec.layer_norm.gamma = r.tensor("output_norm.weight")
    for i, layer in enumerate(dec.layer):
        _layer(r, f"blk.{i}.", layer, ARCHITECTURES[arch])
    spec.config.layer_norm_epsilon = float(r.field(f"{arch}.attention.layer_norm_rms_epsilon"))
    return spec


def _embeddings(r: _Reader) -> tuple[np.ndarray, np.ndarray]:
    """(input embeddings, output projection). Small models tie them: no output.weight, or (Qwen2.5-0.5B's
    GGUF) the same matrix twice, token_embd at Q5_0 and output at Q8_0. A tied pair becomes one array
    holding the more precise copy, which CTranslate2 then stores once (its alias pass)."""
    if "output.weight" not in r.tensors:
        emb = r.tensor("token_embd.weight")
        return emb, emb
    names = sorted(("token_embd.weight", "output.weight"), key=r.bits, reverse=True)
    best = r.tensor(names[0])
    other = r.tensor(names[1])
    if best.shape == other.shape and np.linalg.norm(best - other) <= _TIED_DISTANCE * np.linalg.norm(best):
        return best, best
    return (best, other) if names[0] == "token_embd.weight" else (other, best)


def _layer(r: _Reader, p: str, layer: Any, arch: _Arch) -> None:
    attn = layer.self_attention
    attn.linear[0].weight = np.concatenate([r.tensor(p + f"attn_{x}.weight") for x in "qkv"])
    if arch.qkv_bias:
        attn.linear[0].bias = np.concatenate([r.tensor(p + f"attn_{x}.bias") for x in "qkv"])
    attn.linear[1].weight = r.tensor(p + "attn_output.weight")
    attn.layer_norm.gamma = r.tensor(p + "attn_norm.weight")
    layer.ffn.linear_0.weight = r.tensor(p + "ffn_gate.weight")
    layer.ffn.linear_0_noact.weight = r.tensor(p + "ffn_up.weight")
    layer.ffn.linear_1.weight = r.tensor(p + "ffn_down.weight")
    layer.ffn.layer_norm.gamma = r.tensor(p + "ffn_norm.weight")


def convert(gguf_path: str | Path, out_dir: str | Path, quantization: str | None = "int8") -> Path:
    """Converts a llama or qwen2 GGUF into a CTranslate2 model directory, replacing `out_dir`.

    Args:
        gguf_path: the .gguf file.
        out_dir: the directory to write (removed first if it exists).
        quantization: CTranslate2 weight type (int8, float16, float32...; None keeps float32).

    Returns:
        out_dir as a Path.

    Raises:
        GGUFError: another architecture or tokenizer, or a missing field or tensor.
        OSError: the file cannot be read or the directory written.
    """
    r = _Reader(Path(gguf_path))
    if (arch := r.field("general.architecture")) not in ARCHITECTURES:
        raise GGUFError(f"{gguf_path}: architecture {arch!r} is not supported (only {', '.join(ARCHITECTURES)})")
    spec = _spec(r, arch)
    tok, vocab = _build_tokenizer(r)
    spec.register_vocabulary(vocab)
    spec.config.bos_token = vocab[int(r.field("tokenizer.ggml.bos_token_id"))]
    spec.config.eos_token = vocab[int(r.field("tokenizer.ggml.eos_token_id"))]
    if r.has("tokenizer.ggml.unknown_token_id"):
        spec.config.unk_token = vocab[int(r.field("tokenizer.ggml.unknown_token_id"))]
    else:  # CTranslate2 requires some unk token; byte-level BPE never produces one
        spec.config.unk_token = spec.config.eos_token
    spec.validate()
    spec.optimize(quantization=quantization)
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    spec.save(str(out))
    tok.save(str(out / "tokenizer.json"))
    if r.has("tokenizer.chat_template"):
        (out / "chat_template.jinja").write_text(r.field("tokenizer.chat_template"))
    return out
