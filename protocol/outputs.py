"""Write generated files, or with --check report the stale ones: shared by the protocol generators."""

from __future__ import annotations

from pathlib import Path


def write_or_check(outputs: dict[Path, str], argv: list[str], root: Path, regenerate: str) -> int:
    """Exit status: with --check, 1 if any output differs from its file; otherwise write the stale ones."""
    stale = [p for p, text in outputs.items() if not p.exists() or p.read_text() != text]
    if "--check" in argv:
        for p in stale:
            print(f"stale: {p.relative_to(root)} (run {regenerate})")
        return 1 if stale else 0
    for p in stale:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(outputs[p])
        print(f"wrote {p.relative_to(root)}")
    return 0
