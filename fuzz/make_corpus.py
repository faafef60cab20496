"""Seed the fuzz corpora from the golden vectors and the saved crash inputs.

Writes fuzz/corpus/decoder/ and fuzz/corpus/connection/ (not committed; rebuilt on demand).
Every file in fuzz/crashes/ is a past finding and is replayed by the tests forever.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
VECTORS = HERE.parent / "protocol" / "vectors"
CRASHES = HERE / "crashes"


def seeds() -> dict[str, list[bytes]]:
    """Inputs per harness: each vector, valid frames back to back, and every saved crash."""
    decoder: list[bytes] = []
    connection: list[bytes] = []
    valid: list[bytes] = []
    for path in sorted(VECTORS.glob("*.json")):
        for case in json.loads(path.read_text())["cases"]:
            data = bytes.fromhex(case["hex"])
            decoder.append(data)
            if "frame" in case:
                valid.append(data)
            for mode in (0, 1, 2):
                connection.append(bytes([mode]) + data)
    decoder.append(b"".join(valid))
    for path in sorted(CRASHES.glob("*")):
        if path.is_file() and path.name != "README.md":
            decoder.append(path.read_bytes())
            connection.append(path.read_bytes())
    return {"decoder": decoder, "connection": connection}


def main() -> int:
    for harness, inputs in seeds().items():
        out = HERE / "corpus" / harness
        out.mkdir(parents=True, exist_ok=True)
        for data in inputs:
            (out / hashlib.sha1(data).hexdigest()).write_bytes(data)
        print(f"{harness}: {len(inputs)} seeds in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
