"""atheris entry point: the connection state machine. Usage: python fuzz/fuzz_connection.py CORPUS_DIR [flags].

The first input byte picks the starting point (fresh acceptor, acceptor or dialer after the handshake).
"""

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

with atheris.instrument_imports(include=["casola"]):
    from fuzz.harness import fuzz_connection


def fuzz_one_input(data: bytes) -> None:
    fuzz_connection(data)


if __name__ == "__main__":
    atheris.Setup(sys.argv, fuzz_one_input)
    atheris.Fuzz()
