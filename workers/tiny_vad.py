"""A tiny voice activity detector with Silero VAD v6's exact ONNX signature, for the tiny model set.

The real Silero model comes from a wheel (`casola models prepare-demo`, workers.demo); the tiny set is
built offline, so its `listen` model gets this stand-in instead: the same inputs (`input` [N, 64 + 512]
float32, `state` [2, N, 128] float32, `sr` int64) and outputs (`output` [N, 1], `stateN`), run by the
same code (workers.vad) on onnxruntime, but the probability is a logistic of the window's energy:
sigmoid(k * ln(mean(x²) + eps) + b), 0.5 at -30 dBFS, 0.01 at -40 dBFS, above 0.99 at -20 dBFS. The
64 context samples are sliced off and the state is passed through. It tells loud from quiet, not speech
from noise: it is a test model, like the scripted Whisper next to it.

The ONNX file is protobuf written by hand (about 1 KB), so neither `onnx` nor torch is needed; the field
numbers are onnx.proto's (ModelProto, GraphProto, NodeProto, TensorProto, ValueInfoProto, TypeProto).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Final

import numpy as np

from workers.tiny import write_manifest

__all__ = ["ENERGY_VAD", "build_tiny_listen", "energy_vad_onnx"]

ENERGY_VAD: Final = "energy_vad.onnx"
CONTEXT: Final = 64
_MID_DB: Final = -32.0  # probability 0.5 here
_SLOPE: Final = 2.0  # per unit of ln(power): 10 dB is ln(10) = 2.30 units, so -40 dBFS gives 0.025
_DECAY_DB: Final = 3.0  # the held power falls 3 dB a window (94 dB/s): speech's short dips are bridged
_OPSET: Final = 13  # ReduceMean still takes its axes as an attribute
_IR_VERSION: Final = 7
_FLOAT, _INT64 = 1, 7  # TensorProto.DataType
_ATTR_INT, _ATTR_INTS = 2, 7  # AttributeProto.AttributeType


# --------------------------------------------------------------------------- protobuf, by hand
def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # int64 two's complement, as protobuf encodes negative varints
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _int(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(value)


def _bytes(field: int, value: bytes | str) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return _varint(field << 3 | 2) + _varint(len(data)) + data


def _tensor(name: str, array: np.ndarray) -> bytes:
    dtype = _FLOAT if array.dtype == np.float32 else _INT64
    dims = b"".join(_int(1, d) for d in array.shape)
    return dims + _int(2, dtype) + _bytes(8, name) + _bytes(9, array.astype(array.dtype.newbyteorder("<")).tobytes())


def _value_info(name: str, elem_type: int, dims: tuple[int | str, ...]) -> bytes:
    shape = b"".join(_bytes(1, _int(1, d) if isinstance(d, int) else _bytes(2, d)) for d in dims)
    tensor_type = _int(1, elem_type) + _bytes(2, shape)
    return _bytes(1, name) + _bytes(2, _bytes(1, tensor_type))


def _node(op: str, inputs: tuple[str, ...], output: str, attrs: bytes = b"") -> bytes:
    return b"".join(_bytes(1, i) for i in inputs) + _bytes(2, output) + _bytes(3, output) + _bytes(4, op) + attrs


def _ints_attr(name: str, values: tuple[int, ...]) -> bytes:
    return _bytes(5, _bytes(1, name) + b"".join(_int(8, v) for v in values) + _int(20, _ATTR_INTS))


def _int_attr(name: str, value: int) -> bytes:
    return _bytes(5, _bytes(1, name) + _int(3, value) + _int(20, _ATTR_INT))


def energy_vad_onnx(mid_db: float = _MID_DB, slope: float = _SLOPE, decay_db: float = _DECAY_DB) -> bytes:
    """The ONNX model: the window's power, held against the state's (less `decay_db` per window), mapped
    to sigmoid(slope * (ln(held power) - ln(power at mid_db)))."""
    bias = -slope * math.log(10 ** (mid_db / 10))
    big = 1 << 30  # past the end of an axis: onnxruntime clamps it
    consts: dict[str, np.ndarray] = {
        "starts": np.array([CONTEXT], np.int64),
        "ends": np.array([big], np.int64),
        "axes": np.array([1], np.int64),
        "s0": np.array([0, 0, 0], np.int64),
        "e0": np.array([1, big, 1], np.int64),
        "axes0": np.array([0, 1, 2], np.int64),
        "first": np.array([0], np.int64),
        "shape": np.array([2, 1, 128], np.int64),
        "decay": np.array(10 ** (-decay_db / 10), np.float32),
        "eps": np.array(1e-10, np.float32),
        "k": np.array(slope, np.float32),
        "b": np.array(bias, np.float32),
    }
    nodes = [
        _node("Slice", ("input", "starts", "ends", "axes"), "window"),  # drop the 64 context samples
        _node("Mul", ("window", "window"), "squares"),
        _node("ReduceMean", ("squares",), "power", _ints_attr("axes", (1,)) + _int_attr("keepdims", 1)),
        _node("Slice", ("state", "s0", "e0", "axes0"), "prev3"),  # state[0, :, 0]: the held power
        _node("Squeeze", ("prev3", "first"), "prev"),
        _node("Mul", ("prev", "decay"), "decayed"),
        _node("Max", ("power", "decayed"), "held"),
        _node("Unsqueeze", ("held", "first"), "held3"),
        _node("Expand", ("held3", "shape"), "stateN"),
        _node("Add", ("held", "eps"), "floored"),
        _node("Log", ("floored",), "log_power"),
        _node("Mul", ("log_power", "k"), "scaled"),
        _node("Add", ("scaled", "b"), "logit"),
        _node("Sigmoid", ("logit",), "output"),
    ]
    graph = b"".join(_bytes(1, n) for n in nodes) + _bytes(2, "tiny_energy_vad")
    graph += b"".join(_bytes(5, _tensor(name, value)) for name, value in consts.items())
    graph += _bytes(11, _value_info("input", _FLOAT, ("batch", "samples")))
    graph += _bytes(11, _value_info("state", _FLOAT, (2, "batch", 128)))
    graph += _bytes(11, _value_info("sr", _INT64, ()))
    graph += _bytes(12, _value_info("output", _FLOAT, ("batch", 1)))
    graph += _bytes(12, _value_info("stateN", _FLOAT, (2, "batch", 128)))
    opset = _bytes(8, _int(2, _OPSET))
    return _int(1, _IR_VERSION) + _bytes(2, "casola workers.tiny_vad") + _bytes(7, graph) + opset


def build_tiny_listen(out_dir: str | Path, *, asr: str = "../asr", options: dict[str, object] | None = None) -> Path:
    """A `listen` model directory: the energy VAD above and a manifest whose `asr` names the Whisper
    model directory (relative to this one: by default the set's scripted `asr`)."""
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / ENERGY_VAD).write_bytes(energy_vad_onnx())
    write_manifest(
        out,
        "listen",
        description="voice activity (a tiny energy VAD in Silero's ONNX signature) + the scripted Whisper",
        source="casola workers.tiny_vad (hand-written ONNX; no download)",
        options={"vad": ENERGY_VAD, "asr": asr, **(options or {})},
    )
    return out
