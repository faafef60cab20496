"""What `casola up` prints once it serves: where it listens, the development key, and a request to
try on a model the configuration serves (echo when it serves echo)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Final

from casola.config import Config

__all__ = ["TryHint", "banner", "try_hint"]


def banner(endpoints: dict[str, str], state_dir: Path, ca: Path | None = None, hint: TryHint | None = None) -> None:
    """What `casola up` prints once it serves: where it listens, the dev key, and a request to try
    (`hint`: for a model the config serves; default echo's)."""
    key_file = state_dir / "dev-api-key"
    model, body, note = hint or _ECHO_HINT
    tls = f"  TLS: trust {ca} (Python clients: SSL_CERT_FILE={ca})\n" if ca else ""
    print(
        f"casola up: ingress {endpoints['http']}  raw frames {endpoints['frames'] or 'off'}  "
        f"queue node {endpoints['queue']}  ({endpoints['loop']})\n"
        f"  development API key: {key_file} (tenant 'dev')\n{tls}"
        f"  try: curl -sS -H \"Authorization: Bearer $(cat {key_file})\" -H 'X-Casola-Trace: 1' \\\n"
        f"         {body} {f'--cacert {ca} ' if ca else ''}{endpoints['http']}/v1/run/{model}"
        + (f"\n       ({note})" if note else ""),
        file=sys.stderr,
        flush=True,
    )


TryHint = tuple[str, str, str]  # (model, curl arguments for its body, a note or "")
_ECHO_HINT: Final[TryHint] = ("echo", "-i --data-binary 'hello'", "")
_CHAT: Final = """'{"messages": [{"role": "user", "content": "hello"}]}'"""
# A body each kind of model takes on /v1/run/{model} (docs/models.md), and what to know about it.
_KIND_HINTS: Final[dict[str, tuple[str, str]]] = {
    "steps": ("-i -H 'X-Casola-Param-steps: 3' --data-binary ''", "a job of 3 steps of 100 ms, answered in JSON"),
    "llm": (
        f"-i -H 'Content-Type: application/json' --data-binary {_CHAT}",
        "an OpenAI chat.completions body; /openai/v1/chat/completions takes the same",
    ),
    "whisper": (
        "-i -H 'Content-Type: audio/wav' --data-binary @speech.wav",
        "speech.wav: any recording, e.g. espeak-ng --stdout 'hello' > speech.wav",
    ),
    "tts": ("-D - -o hello.wav --data-binary 'hello'", "the answer is WAV audio: hello.wav; the head goes to stdout"),
    "classify": ("-i --data-binary 'hello'", "the answer is the classifier's verdict in JSON"),
}


def try_hint(config: Config) -> TryHint:
    """The request `casola up`'s banner suggests: echo when the config serves it, else the first
    model it serves (its local workers' first, then `[queue] models`), with a body for its kind."""
    served = list(dict.fromkeys([*(m for spec in config.workers for m in spec.models), *config.queue.models]))
    if not served or "echo" in served:
        return _ECHO_HINT
    model = served[0]
    kind = "steps" if model == "steps" else _model_kind(model, config)
    fallback = ("-i --data-binary @input", f"input: a body model {model!r} takes (docs/models.md)")
    body, note = _KIND_HINTS.get(kind, fallback)
    if not any(model in spec.models for spec in config.workers):
        note = f"{note}; " if note else ""
        note += "no local worker serves it: it answers once a worker registers"
    return model, body, note


def _model_kind(name: str, config: Config) -> str:
    """The kind of a model in the models directory or `[models.*]` ("" when it cannot be told)."""
    from workers.loader import resolve  # late: only configs naming such a model need it
    from workers.spec import SpecError

    try:
        return resolve(name, config.models_dir, config.models).kind
    except (SpecError, OSError):
        return ""
