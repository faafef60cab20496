"""Headless Chromium (Debian's `chromium`) as the browser tests run it."""

from __future__ import annotations

from pathlib import Path


def chromium_args(binary: str, profile: Path, url: str, *extra: str) -> list[str]:
    """The command line: headless, no first-run noise, a fresh profile; `extra` flags before the URL."""
    return [
        binary,
        "--headless=new",
        "--no-sandbox",  # root in CI; the sandbox needs an unprivileged user
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--metrics-recording-only",
        *extra,
        f"--user-data-dir={profile}",
        url,
    ]
