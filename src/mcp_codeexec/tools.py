"""The two tools' semantics: validated input in, the API's result object out.

Everything the sandbox can do wrong becomes a typed result here; nothing raises to the
MCP layer.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from pydantic import ValidationError

from mcp_codeexec import wire
from mcp_codeexec.agent import protocol as p
from mcp_codeexec.deployment.base import BackendUnavailable
from mcp_codeexec.sandbox import CallTimedOut, Sandbox, SandboxDied

log = logging.getLogger(__name__)

# Editor calls need no more than this; commands get the configured time limit.
_EDITOR_TIMEOUT = 30.0


async def bash(
    sandbox: Sandbox, arguments: dict[str, Any], on_output: Callable[[p.Output], None] | None = None
) -> wire.BashOutcome:
    try:
        args = wire.BashInput.model_validate(arguments)
    except ValidationError:
        return wire.BashError(error_code="invalid_tool_input")
    if "\x00" in args.command:
        return wire.BashError(error_code="invalid_tool_input")
    try:
        s = sandbox.settings
        reply = await sandbox.request(
            p.Exec(command=args.command, cwd=s.workdir, timeout=s.timeout, max_output=s.max_output_bytes, stream=on_output is not None),
            s.timeout,
            on_output,
        )
    except BackendUnavailable as exc:
        log.warning("bash: backend unavailable: %s", exc)
        return wire.BashError(error_code="unavailable")
    except CallTimedOut:
        return wire.BashError(error_code="execution_time_exceeded")
    except SandboxDied as exc:
        # Not an API error code: the command's process tree is gone, as after a kill -9.
        # Say what happened where the model reads it.
        return wire.BashResult(
            stdout="",
            stderr=f"[mcp-codeexec] {exc.reason}. The sandbox was restarted; files in the workspace are intact.\n",
            return_code=137,
        )
    if isinstance(reply, p.Failure):
        log.warning("bash: agent failure: %s", reply)
        return wire.BashError(error_code="unavailable")
    if reply.timed_out:
        return wire.BashError(error_code="execution_time_exceeded")
    return wire.BashResult(stdout=reply.stdout, stderr=reply.stderr, return_code=reply.return_code)


def _editor_error(code: str, message: str) -> wire.EditorError:
    return wire.EditorError(error_code=code, error_message=message)  # type: ignore[arg-type]


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(x) for x in err["loc"] if x not in ("view", "create", "str_replace")) or "input"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


async def editor(sandbox: Sandbox, arguments: dict[str, Any]) -> wire.EditorOutcome:
    try:
        args = wire.editor_input.validate_python(arguments)
    except ValidationError as exc:
        return _editor_error("invalid_tool_input", _describe(exc))
    request = p.Edit(**args.model_dump())
    try:
        reply = await sandbox.request(request, _EDITOR_TIMEOUT)
    except BackendUnavailable as exc:
        return _editor_error("unavailable", str(exc))
    except CallTimedOut:
        return _editor_error("execution_time_exceeded", "the editor did not answer in time; the sandbox was restarted")
    except SandboxDied as exc:
        return _editor_error("unavailable", f"{exc.reason}; the sandbox was restarted, files are intact")
    if isinstance(reply, p.Failure):
        code = reply.code if reply.code in ("file_not_found", "string_not_found", "invalid_tool_input") else "unavailable"
        return _editor_error(code, reply.message)
    return wire.editor_result.validate_python(reply.result)
