"""One tool call's path: who calls (tenant), which container serves it (session, or the
container the request names), the tenant's limits, the tool itself, metering, and the MCP
result (the API's object as structured content and JSON text, charts inline)."""

from __future__ import annotations

import base64
import json
import logging
import time
from typing import Any

import anyio
import mcp_types as types
from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.context import ServerRequestContext
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import BaseModel

from mcp_codeexec import tools
from mcp_codeexec.agent import protocol as p
from mcp_codeexec.app import App
from mcp_codeexec.errors import CodeExecError, FileNotFound, InvalidToolInput
from mcp_codeexec.files import UPLOADS_DIR
from mcp_codeexec.sandbox import Sandbox

log = logging.getLogger(__name__)

Context = ServerRequestContext[App]

_MAX_CONTAINER_UPLOADS = 100
# How often a running command's partial output goes out as a progress notification.
_PROGRESS_INTERVAL = 1.0
_PROGRESS_TAIL = 2000


def tenant_of(app: App) -> str:
    """The caller's tenant: from the bearer token over HTTP, the configured one over stdio."""
    token = get_access_token()
    return token.client_id if token is not None else app.settings.tenant


def session_key(app: App, ctx: Context) -> str | None:
    """Whose container a call without a named one uses. stdio: the process is the session.
    HTTP: the transport's session (Mcp-Session-Id, or the SSE connection). The stateless
    2026-07-28 protocol has none: with --container-handles such a call gets a new container
    (None), as in the Claude API; without, the tenant's default container ("default")."""
    request = ctx.request
    headers = getattr(request, "headers", None)
    if headers is None:
        return "stdio"
    session = headers.get("mcp-session-id") or getattr(request, "query_params", {}).get("session_id")
    if session:
        return str(session)
    if app.settings.container_handles and ctx.protocol_version in MODERN_PROTOCOL_VERSIONS:
        return None
    return "default"


def container_argument(app: App, arguments: dict[str, Any]) -> str | None:
    """--container-handles: the tool argument `container` (an id; InvalidToolInput for any
    other type). It overrides the session's container and `_meta.container`."""
    if not app.settings.container_handles:
        return None
    named = arguments.pop("container", None)
    if named is not None and not isinstance(named, str):
        raise InvalidToolInput("container must be a container id (a string such as container_…)")
    return named


def requested_container(ctx: Context) -> str | None:
    """The container a request names in `_meta`: "container_…" or {"id": "container_…"}
    (InvalidToolInput for any other shape; an id that names nothing is the manager's
    container_expired)."""
    named = (ctx.meta or {}).get("container")
    if named is None:
        return None
    if isinstance(named, dict) and set(named) <= {"id", "expires_at"}:
        named = named.get("id")
    if not isinstance(named, str):
        raise InvalidToolInput('_meta.container must be a container id or {"id": "container_…"}')
    return named


def container_uploads(ctx: Context) -> list[str]:
    """The file ids a request's `_meta.container_upload` names: one id or a list of ids
    (InvalidToolInput for anything else)."""
    named = (ctx.meta or {}).get("container_upload")
    if named is None:
        return []
    ids = [named] if isinstance(named, str) else named
    if not isinstance(ids, list) or len(ids) > _MAX_CONTAINER_UPLOADS or not all(isinstance(f, str) for f in ids):
        raise InvalidToolInput(
            f"_meta.container_upload must be a file id or a list of at most {_MAX_CONTAINER_UPLOADS} file ids"
        )
    return ids


async def put_file(app: App, tenant: str, sandbox: Sandbox, file_id: str, path: str | None = None) -> str:
    """Copy a stored file into a container (default: <workdir>/uploads/<filename>); its path."""
    meta = app.files.get(tenant, file_id)
    data = app.files.read(tenant, file_id) if meta else None
    if meta is None or data is None:
        raise FileNotFound(f"no file {file_id[:80]!r}")
    target = path or f"{app.settings.workdir}/{UPLOADS_DIR}/{meta.filename}"
    await sandbox.write_file(target, data)
    return target


def to_result(outcome: BaseModel, meta: dict[str, Any] | None = None) -> types.CallToolResult:
    data = outcome.model_dump(mode="json")
    return types.CallToolResult(
        content=[types.TextContent(text=json.dumps(data, ensure_ascii=False))],
        structured_content=data,
        is_error=data["type"].endswith("_tool_result_error"),
        _meta=meta or None,
    )


async def call_tool(app: App, ctx: Context, tool: str, arguments: dict[str, Any]) -> types.CallToolResult:
    """Run one call of an offered tool; every failure is a result of the tool's error type."""
    try:
        return await _call(app, ctx, tool, arguments)
    except CodeExecError as exc:  # bad _meta, an upload that is not there, ...
        return to_result(tools.error(tool, exc.code, exc.message))
    except Exception:  # noqa: BLE001 - errors are results, even our own bugs
        log.exception("call %s: unexpected error", ctx.request_id)
        return to_result(tools.error(tool, "unavailable", "internal error in the server; see its log"))


async def _call(app: App, ctx: Context, tool: str, arguments: dict[str, Any]) -> types.CallToolResult:
    tenant = tenant_of(app)
    arguments = dict(arguments)
    session = session_key(app, ctx)
    requested = container_argument(app, arguments) or requested_container(ctx)
    uploads = container_uploads(ctx)

    async def get_sandbox() -> Sandbox:
        sandbox = await app.sessions.sandbox(session, requested, tenant)
        for file_id in uploads:  # the API's container_upload: files put in before the call
            await put_file(app, tenant, sandbox, file_id)
        uploads.clear()
        return sandbox

    refusal = app.limits.acquire(tenant)
    if refusal is not None:
        log.info("tenant %s: too many requests: %s", tenant, refusal)
        return to_result(tools.error(tool, "too_many_requests", refusal))
    started = time.monotonic()
    try:
        outcome = await _run(app, ctx, tool, get_sandbox, arguments)
    finally:
        app.limits.release(tenant)
    elapsed = time.monotonic() - started
    container_id = outcome.sandbox.info.id if outcome.sandbox is not None else None
    app.usage.record(tenant, container_id, elapsed)
    app.metrics.observe(tool, outcome.result, elapsed)
    log.info("call %s tenant=%s tool=%s container=%s outcome=%s %.1f ms", ctx.request_id, tenant, tool,
             container_id, getattr(outcome.result, "error_code", "ok"), elapsed * 1000)
    result = to_result(outcome.result, {"container": outcome.sandbox.info.meta()} if outcome.sandbox else None)
    if app.settings.container_handles and outcome.sandbox is not None:  # the model learns its handle
        cid = outcome.sandbox.info.id
        result.content.append(types.TextContent(text=f'container: {cid} (pass "container": "{cid}" to keep working in this sandbox)'))
    for mime_type, data in outcome.images:  # the charts the model made, inline
        result.content.append(types.ImageContent(data=base64.b64encode(data).decode(), mime_type=mime_type))
    return result


async def _run(app: App, ctx: Context, tool: str, get_sandbox: tools.SandboxGetter, arguments: dict[str, Any]) -> tools.Outcome:
    settings = app.settings
    kind = settings.tool_profile.kind(tool)
    if kind == "editor":
        return await tools.editor(get_sandbox, arguments)
    run = tools.bash if kind == "bash" else tools.python
    if not (ctx.meta and ctx.meta.get("progress_token") is not None):
        return await run(settings, get_sandbox, arguments, store=app.files)
    progress = _Progress(ctx)  # partial output while it runs (also a keep-alive)
    async with anyio.create_task_group() as tg:
        tg.start_soon(progress.run)
        outcome = await run(settings, get_sandbox, arguments, progress.add, store=app.files)
        tg.cancel_scope.cancel()
    return outcome


class _Progress:
    """Sends a running command's latest output as progress notifications (also a keep-alive)."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.tail = ""
        self.count = 0

    def add(self, output: p.Output) -> None:
        self.tail = (self.tail + output.data)[-_PROGRESS_TAIL:]

    async def run(self) -> None:
        while True:
            await anyio.sleep(_PROGRESS_INTERVAL)
            self.count += 1
            await self.ctx.session.report_progress(self.count, None, self.tail or "running")
            self.tail = ""
