"""The tools a workflow declares: each checks a call's arguments against its JSON schema before it
runs (an unknown tool or bad arguments never run: small models make up both, MODELS.md §7.1), and
runs as a request to a worker model (params {"tool": name}, body = the arguments) or as a POST to
an HTTP endpoint held to the webhook address rules (casola.net.outbound: no private or loopback
address unless allowed, no redirects), within its timeout and the workflow's remaining budget.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from jsonschema import Draft202012Validator

from casola.flow.run import Run, StepFailed
from casola.flow.spec import StepConfig, ToolConfig
from casola.flow.stages import Item, Source, whole_text
from casola.net.outbound import OutboundCallError, OutboundClient, OutboundError, OutboundPolicy
from casola.wire import ErrorCode

__all__ = ["Tool", "tool_stage"]

_encode = msgspec.json.Encoder().encode
MAX_RESULT = 1 << 20  # bytes of a tool's answer kept (it goes back into a prompt)


class Tool:
    def __init__(self, name: str, config: ToolConfig, outbound: OutboundPolicy) -> None:
        self.name, self.config = name, config
        self._validator = Draft202012Validator(config.parameters)
        self.schema: dict[str, Any] = {
            "type": "function",
            "function": {"name": name, "description": config.description, "parameters": config.parameters},
        }
        self._http = OutboundClient(outbound, timeout=config.timeout_ms / 1000) if config.url else None

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()

    def check(self, arguments: str, prune: bool = False) -> tuple[bytes, str]:
        """(the arguments as JSON bytes, "") when they may run, else (b"", why not). `prune`: first
        drop the arguments the schema does not declare (then the rest must pass)."""
        try:
            args = json.loads(arguments or "{}")
        except ValueError as exc:
            return b"", f"the arguments of {self.name} are not JSON ({exc})"
        declared = self.config.parameters.get("properties")
        if prune and isinstance(args, dict) and isinstance(declared, dict):
            args = {k: v for k, v in args.items() if k in declared}
        if not self._validator.is_valid(args):  # the fast path first; the errors only to explain one
            e = sorted(self._validator.iter_errors(args), key=lambda e: list(e.path))[0]
            at = "/".join(str(p) for p in e.path) or "the arguments"
            return b"", f"{self.name}: {at}: {e.message}"
        return _encode(args), ""

    async def call(self, run: Run, stage: str, args: bytes) -> bytes:
        """The tool's answer.

        Raises:
            StepFailed: it failed, was refused, or did not answer in time (naming the tool).
        """
        what = f"tool {self.name!r}"
        cfg = self.config
        if self._http is None:
            params = {"tool": self.name}
            ctype, limit = "application/json", cfg.timeout_ms
            async with run.request(stage, what, cfg.model, args, ctype, params, deadline_ms=limit) as s:
                return await s.read()
        headers = {"Content-Type": "application/json", "X-Casola-Tool": self.name}
        if run.meta.request_id:
            headers["X-Request-Id"] = run.meta.request_id
        left = run.remaining_ms(what)
        try:
            with run.timed(stage):
                async with asyncio.timeout(left / 1000 if left else None):
                    r = await self._http.post(cfg.url, args, headers, max_response=MAX_RESULT)
        except TimeoutError:
            raise run.fail(ErrorCode.DEADLINE_EXCEEDED, what, "no answer within the workflow's deadline") from None
        except (OutboundError, OutboundCallError) as exc:
            raise run.fail(ErrorCode.WORKER_FAILED, what, str(exc)) from None
        if not 200 <= r.status < 300:
            raise StepFailed(ErrorCode.WORKER_FAILED, f"workflow {run.workflow!r}: {what}: HTTP {r.status}")
        return r.body


class _ToolStage:
    content_type = "application/json"

    def __init__(self, run: Run, step: StepConfig, tool: Tool, upstream: Source) -> None:
        self.run, self.step, self.tool, self.upstream = run, step, tool, upstream

    async def items(self) -> AsyncIterator[Item]:
        text = await whole_text(self.upstream, f"step {self.step.name!r}", self.run)
        args, why = self.tool.check(text)
        if why:
            raise self.run.fail(ErrorCode.BAD_REQUEST, f"step {self.step.name!r}", why)
        yield await self.tool.call(self.run, self.step.name, args)


def tool_stage(run: Run, step: StepConfig, tool: Tool, upstream: Source) -> Source:
    """A `tool` step: the previous output is the call's arguments (JSON)."""
    return _ToolStage(run, step, tool, upstream)
