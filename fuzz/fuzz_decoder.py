"""atheris entry point: the frame decoder. Usage: python fuzz/fuzz_decoder.py CORPUS_DIR [libFuzzer flags]."""

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

with atheris.instrument_imports(include=["casola"]):
    from fuzz.harness import fuzz_decoder


def fuzz_one_input(data: bytes) -> None:
    fuzz_decoder(data)


if __name__ == "__main__":
    atheris.Setup(sys.argv, fuzz_one_input)
    atheris.Fuzz()
