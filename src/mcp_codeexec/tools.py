"""The two tools' semantics: validated input in, the API's result object out.

Everything that can go wrong (bad input, engine down, time limit, dead or expired sandbox,
too many containers) becomes a typed result here; nothing raises to the MCP layer.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, get_args

from pydantic import BaseModel, ValidationError

from mcp_codeexec import wire
from mcp_codeexec.agent import protocol as p
from mcp_codeexec.config import Settings
from mcp_codeexec.errors import CodeExecError, SandboxDied
from mcp_codeexec.files import FileMeta, FileStore, StoreFull
from mcp_codeexec.sandbox import Sandbox

log = logging.getLogger(__name__)

# Editor calls need no more than this; commands get the configured time limit.
_EDITOR_TIMEOUT = 30.0

SandboxGetter = Callable[[], Awaitable[Sandbox]]


class Outcome:
    """A tool's result object, the sandbox that produced it (None if none was reached), the
    output files it registered, and the small images among them (MIME type, bytes) to show
    inline."""

    def __init__(
        self,
        result: BaseModel,
        sandbox: Sandbox | None,
        files: list[FileMeta] | None = None,
        images: list[tuple[str, bytes]] | None = None,
    ) -> None:
        self.result = result
        self.sandbox = sandbox
        self.files = files or []
        self.images = images or []


async def register_outputs(
    settings: Settings, store: FileStore, sandbox: Sandbox, written: list[list[Any]], total: int
) -> tuple[list[FileMeta], list[str], list[tuple[str, bytes]]]:
    """Copy the files a command wrote out of the sandbox into the store; (files, notes for
    the model about what was left out, the small images to show inline with their bytes)."""
    files: list[FileMeta] = []
    notes: list[str] = []
    images: list[tuple[str, bytes]] = []
    for path, size in written[: settings.max_output_files]:
        if size > settings.max_file_bytes:
            notes.append(f"{path} ({size} bytes) is over the {settings.max_file_bytes}-byte output-file limit: not registered")
            continue
        room = store.room(sandbox.tenant)
        if size > room:
            notes.append(f"{path} ({size} bytes): not registered: the cap on stored files would be exceeded "
                         f"({room} bytes left; delete files to make room)")
            continue
        try:
            data = await sandbox.read_file(path, min(settings.max_file_bytes, room))
            meta = store.add(sandbox.tenant, path.rsplit("/", 1)[-1], data, sandbox.info.id, path)
            files.append(meta)
            if meta.is_image and meta.size_bytes <= settings.inline_image_bytes:
                images.append((meta.mime_type, data))
        except (CodeExecError, StoreFull) as exc:  # gone, grew past a limit meanwhile, ...
            notes.append(f"{path}: not registered ({exc})")
    if total > settings.max_output_files:
        notes.append(f"{total - settings.max_output_files} more files were written; only the first {settings.max_output_files} were registered")
    return files, notes, images


async def _run(get_sandbox: SandboxGetter, request: p.Request, limit: float, on_output: Any = None) -> tuple[Any, Sandbox | None, CodeExecError | None]:
    """(reply, sandbox, error): the error is None on success."""
    sandbox = None
    try:
        sandbox = await get_sandbox()
        return await sandbox.request(request, limit, on_output), sandbox, None
    except CodeExecError as exc:
        if exc.code == "unavailable" and not isinstance(exc, SandboxDied):
            log.warning("backend unavailable: %s", exc)
        return None, sandbox, exc


_CODES = {
    wire.EDITOR_TOOL: set(get_args(wire.EditorErrorCode)),
    wire.CODE_TOOL: set(get_args(wire.CodeErrorCode)),
    wire.BASH_TOOL: set(get_args(wire.BashErrorCode)),
}


_TOOL_OF: dict[type[BaseModel], str] = {wire.BashError: wire.BASH_TOOL, wire.CodeError: wire.CODE_TOOL}


def error(tool: str, code: str, message: str) -> BaseModel:
    """The error object of `tool` (only the editor's carries a message). A code the tool's
    errors do not include becomes the nearest one it does: a missing file named in the
    request is bad input to bash."""
    if code not in _CODES.get(tool, _CODES[wire.BASH_TOOL]):
        code = "invalid_tool_input" if code in ("file_not_found", "string_not_found") else "unavailable"
    if tool == wire.EDITOR_TOOL:
        return wire.EditorError(error_code=code, error_message=message)  # type: ignore[arg-type]
    if tool == wire.CODE_TOOL:
        return wire.CodeError(error_code=code)  # type: ignore[arg-type]
    return wire.BashError(error_code=code)  # type: ignore[arg-type]


def _clip(text: str, limit: int = 300) -> str:
    """Text from a sandbox, cut short for a log line."""
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


# What one output stream may take once JSON-encoded. A result travels twice (structured
# content and its JSON text), and clients cap one message (the mcp SDK: 1 MiB per SSE
# event): binary output, whose control bytes escape to 6 characters each, is cut to fit.
WIRE_BUDGET = 128 * 1024


def _wire_cost(ch: str) -> int:
    return 1 if " " <= ch and ch not in '"\\' else len(json.dumps(ch)) - 2


def fit_to_wire(text: str, budget: int = WIRE_BUDGET) -> str:
    """`text`, or its head and tail with a marker, so that it JSON-encodes to at most
    about `budget` characters."""
    if len(text) * 6 <= budget or len(json.dumps(text, ensure_ascii=False)) <= budget:
        return text
    half = budget // 2 - 200
    head_end = cost = 0
    while head_end < len(text) and cost + _wire_cost(text[head_end]) <= half:
        cost += _wire_cost(text[head_end])
        head_end += 1
    tail_start, cost = len(text), 0
    while tail_start > head_end and cost + _wire_cost(text[tail_start - 1]) <= half:
        tail_start -= 1
        cost += _wire_cost(text[tail_start])
    omitted = tail_start - head_end
    marker = (f"\n[... {omitted} characters omitted: this output is mostly control characters or binary, which "
              "take up to 6 bytes each once encoded; write such output to a file instead ...]\n")
    return text[:head_end] + marker + text[tail_start:]


def _encodable(text: str) -> bool:
    """False for NUL bytes and lone surrogates (neither can reach a process as UTF-8)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\x00" not in text


async def _command(
    settings: Settings,
    get_sandbox: SandboxGetter,
    request: p.Exec | p.Repl,
    limit: float,
    kind: tuple[type[Any], type[Any], type[Any]],
    on_output: Callable[[p.Output], None] | None,
    store: FileStore | None,
) -> Outcome:
    """Run a command (bash) or a cell (Python) and shape the API's result: `kind` is
    (result, output entry, error) of the tool's wire types."""
    result_cls, output_cls, error_cls = kind
    reply, sandbox, failure = await _run(get_sandbox, request, limit, on_output)
    if isinstance(failure, SandboxDied):
        # Not an API error code: the process tree is gone, as after a kill -9. Say what
        # happened where the model reads it.
        stderr = f"[mcp-codeexec] {failure.reason}. The sandbox was restarted; files in the workspace are intact.\n"
        return Outcome(result_cls(stdout="", stderr=stderr, return_code=137), sandbox)
    if failure is not None:
        return Outcome(error(_TOOL_OF[error_cls], failure.code, failure.message), sandbox)
    if isinstance(reply, p.Failure):
        log.warning("agent failure: %s", _clip(reply.message))
        return Outcome(error_cls(error_code="unavailable"), sandbox)
    if reply.timed_out:
        return Outcome(error_cls(error_code="execution_time_exceeded"), sandbox)
    files: list[FileMeta] = []
    images: list[tuple[str, bytes]] = []
    # First: this sandbox came back without its memory (a failed restore): never silently.
    stderr = (sandbox.take_notice() if sandbox is not None else "") + reply.stderr
    if reply.files_note:
        stderr += f"[mcp-codeexec] {reply.files_note}\n"
    if store is not None and reply.files and sandbox is not None:
        files, notes, images = await register_outputs(settings, store, sandbox, reply.files, max(reply.files_total, len(reply.files)))
        stderr += "".join(f"[mcp-codeexec] {note}\n" for note in notes)
    result = result_cls(
        stdout=fit_to_wire(reply.stdout),
        stderr=fit_to_wire(stderr),
        return_code=reply.return_code,
        content=[output_cls(file_id=f.id) for f in files],
    )
    return Outcome(result, sandbox, files, images)


async def bash(
    settings: Settings,
    get_sandbox: SandboxGetter,
    arguments: dict[str, Any],
    on_output: Callable[[p.Output], None] | None = None,
    store: FileStore | None = None,
) -> Outcome:
    try:
        args = wire.BashInput.model_validate(arguments)
    except ValidationError:
        return Outcome(wire.BashError(error_code="invalid_tool_input"), None)
    if not _encodable(args.command):
        return Outcome(wire.BashError(error_code="invalid_tool_input"), None)
    request = p.Exec(
        command=args.command,
        cwd=settings.workdir,
        timeout=settings.timeout,
        max_output=settings.max_output_bytes,
        stream=on_output is not None,
        tools=settings.tools_enabled,
    )
    kind = (wire.BashResult, wire.BashOutput, wire.BashError)
    return await _command(settings, get_sandbox, request, settings.timeout, kind, on_output, store)


async def python(
    settings: Settings,
    get_sandbox: SandboxGetter,
    arguments: dict[str, Any],
    on_output: Callable[[p.Output], None] | None = None,
    store: FileStore | None = None,
) -> Outcome:
    """`code_execution`: a cell of the container's persistent interpreter (20260120+), or
    a fresh interpreter per call (20250522: the cell runs, then the interpreter is reset)."""
    try:
        args = wire.CodeInput.model_validate(arguments)
    except ValidationError:
        return Outcome(wire.CodeError(error_code="invalid_tool_input"), None)
    if not _encodable(args.code):
        return Outcome(wire.CodeError(error_code="invalid_tool_input"), None)
    profile = settings.tool_profile
    limit = settings.cell_timeout if profile.cell_limit else settings.timeout
    request = p.Repl(
        code=args.code,
        timeout=limit,
        max_output=settings.max_output_bytes,
        timeout_is_result=profile.cell_limit,
        stream=on_output is not None,
        cwd=settings.workdir,
        tools=settings.tools_enabled,
    )
    kind = (wire.CodeResult, wire.CodeOutput, wire.CodeError)
    outcome = await _command(settings, get_sandbox, request, limit, kind, on_output, store)
    if profile.legacy and outcome.sandbox is not None:
        await _run(get_sandbox, p.ReplReset(), _EDITOR_TIMEOUT)  # no state carries over
    return outcome


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
        return Outcome(error(wire.EDITOR_TOOL, "invalid_tool_input", _describe(exc)), None)
    reply, sandbox, failure = await _run(get_sandbox, p.Edit(**args.model_dump()), _EDITOR_TIMEOUT)
    if isinstance(failure, SandboxDied):
        return Outcome(error(wire.EDITOR_TOOL, "unavailable", f"{failure.reason}; the sandbox was restarted, files are intact"), sandbox)
    if failure is not None:
        return Outcome(error(wire.EDITOR_TOOL, failure.code, failure.message), sandbox)
    if isinstance(reply, p.Failure):
        code = reply.code if reply.code in ("file_not_found", "string_not_found", "invalid_tool_input") else "unavailable"
        return Outcome(error(wire.EDITOR_TOOL, code, reply.message), sandbox)
    return Outcome(wire.editor_result.validate_python(reply.result), sandbox)
