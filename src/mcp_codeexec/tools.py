"""The two tools' semantics: validated input in, the API's result object out.

Everything that can go wrong (bad input, engine down, time limit, dead or expired sandbox,
too many containers) becomes a typed result here; nothing raises to the MCP layer.
"""

from __future__ import annotations

import logging
from typing import Any, Awaitable, Callable

from pydantic import BaseModel, ValidationError

from mcp_codeexec import wire
from mcp_codeexec.agent import protocol as p
from mcp_codeexec.config import Settings
from mcp_codeexec.containers import TooManyContainers
from mcp_codeexec.deployment.base import BackendUnavailable
from mcp_codeexec.sandbox import CallTimedOut, ContainerExpired, Sandbox, SandboxDied

log = logging.getLogger(__name__)

# Editor calls need no more than this; commands get the configured time limit.
_EDITOR_TIMEOUT = 30.0

SandboxGetter = Callable[[], Awaitable[Sandbox]]


class Outcome:
    """A tool's result object and the sandbox that produced it (None if none was reached)."""

    def __init__(self, result: BaseModel, sandbox: Sandbox | None) -> None:
        self.result = result
        self.sandbox = sandbox


async def _run(get_sandbox: SandboxGetter, request: p.Request, limit: float, on_output: Any = None) -> tuple[Any, Sandbox | None, str]:
    """(reply, sandbox, error code); the code is "" on success. For SandboxDied the reply
    is the reason."""
    sandbox = None
    try:
        sandbox = await get_sandbox()
        return await sandbox.request(request, limit, on_output), sandbox, ""
    except ContainerExpired as exc:
        return str(exc), sandbox, "container_expired"
    except TooManyContainers as exc:
        return str(exc), sandbox, "too_many_requests"
    except BackendUnavailable as exc:
        log.warning("backend unavailable: %s", exc)
        return str(exc), sandbox, "unavailable"
    except CallTimedOut:
        return "the sandbox did not answer in time and was restarted", sandbox, "execution_time_exceeded"
    except SandboxDied as exc:
        return exc.reason, sandbox, "died"


async def bash(
    settings: Settings,
    get_sandbox: SandboxGetter,
    arguments: dict[str, Any],
    on_output: Callable[[p.Output], None] | None = None,
) -> Outcome:
    try:
        args = wire.BashInput.model_validate(arguments)
    except ValidationError:
        return Outcome(wire.BashError(error_code="invalid_tool_input"), None)
    if "\x00" in args.command:
        return Outcome(wire.BashError(error_code="invalid_tool_input"), None)
    request = p.Exec(
        command=args.command,
        cwd=settings.workdir,
        timeout=settings.timeout,
        max_output=settings.max_output_bytes,
        stream=on_output is not None,
    )
    reply, sandbox, code = await _run(get_sandbox, request, settings.timeout, on_output)
    if code == "died":
        # Not an API error code: the command's process tree is gone, as after a kill -9.
        # Say what happened where the model reads it.
        return Outcome(
            wire.BashResult(
                stdout="",
                stderr=f"[mcp-codeexec] {reply}. The sandbox was restarted; files in the workspace are intact.\n",
                return_code=137,
            ),
            sandbox,
        )
    if code:
        return Outcome(wire.BashError(error_code=code), sandbox)  # type: ignore[arg-type]
    if isinstance(reply, p.Failure):
        log.warning("bash: agent failure: %s", reply)
        return Outcome(wire.BashError(error_code="unavailable"), sandbox)
    if reply.timed_out:
        return Outcome(wire.BashError(error_code="execution_time_exceeded"), sandbox)
    return Outcome(wire.BashResult(stdout=reply.stdout, stderr=reply.stderr, return_code=reply.return_code), sandbox)


def _editor_error(code: str, message: str) -> wire.EditorError:
    return wire.EditorError(error_code=code, error_message=message)  # type: ignore[arg-type]


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(x) for x in err["loc"] if x not in ("view", "create", "str_replace")) or "input"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


async def editor(get_sandbox: SandboxGetter, arguments: dict[str, Any]) -> Outcome:
    try:
        args = wire.editor_input.validate_python(arguments)
    except ValidationError as exc:
        return Outcome(_editor_error("invalid_tool_input", _describe(exc)), None)
    reply, sandbox, code = await _run(get_sandbox, p.Edit(**args.model_dump()), _EDITOR_TIMEOUT)
    if code == "died":
        return Outcome(_editor_error("unavailable", f"{reply}; the sandbox was restarted, files are intact"), sandbox)
    if code:
        return Outcome(_editor_error(code, reply), sandbox)
    if isinstance(reply, p.Failure):
        code = reply.code if reply.code in ("file_not_found", "string_not_found", "invalid_tool_input") else "unavailable"
        return Outcome(_editor_error(code, reply.message), sandbox)
    return Outcome(wire.editor_result.validate_python(reply.result), sandbox)
