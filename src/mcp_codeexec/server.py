"""The MCP surface: tools, the system-prompt resource and prompt, on the low-level server.

The low-level server is used because it publishes our JSON schemas exactly as written and
leaves argument validation to us (tools.py answers `invalid_tool_input`).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import mcp_types as types
from mcp.server import Server
from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.context import ServerRequestContext
from mcp.shared.exceptions import MCPError
from pydantic import BaseModel

from mcp_codeexec import __version__, tools, wire
from mcp_codeexec.agent import protocol as p
from mcp_codeexec.config import Settings
from mcp_codeexec.containers import ContainerManager
from mcp_codeexec.deployment import make_backend
from mcp_codeexec.deployment.base import Deployment
from mcp_codeexec.errors import BackendUnavailable, CodeExecError, FileNotFound, InvalidToolInput
from mcp_codeexec.files import UPLOADS_DIR, FileStore, default_data_dir, upload_plan
from mcp_codeexec.metrics import Metrics
from mcp_codeexec.prompt import PROMPT_NAME, PROMPT_URI, ImageFacts, system_prompt
from mcp_codeexec.sandbox import Sandbox
from mcp_codeexec.sessions import Sessions
from mcp_codeexec.tenants import Limits, Usage, load_tenants
from mcp_codeexec.upstream import Gateway, start_gateway

log = logging.getLogger(__name__)

CONTAINERS_URI = "codeexec://containers"
FILES_URI = "codeexec://files"
USAGE_URI = "codeexec://usage"
_LISTED_FILES = 50  # newest files listed as resources; every one is readable by id

# How often a running command's partial output goes out as a progress notification.
_PROGRESS_INTERVAL = 1.0
_PROGRESS_TAIL = 2000


@dataclass
class AppState:
    settings: Settings
    deployment: Deployment
    containers: ContainerManager
    sessions: Sessions
    files: FileStore
    limits: Limits
    usage: Usage
    metrics: Metrics
    isolation: str
    facts: ImageFacts
    tools: Gateway | None = None  # [issue 14 wiring] upstream MCP tools for code in sandboxes


def _tools(settings: Settings, callable_tools: str = "") -> list[types.Tool]:
    listed = [
        types.Tool(
            name=wire.BASH_TOOL,
            description=(
                "Run a bash command in the code execution sandbox (Linux, Python 3, no network). "
                f"Each call is a fresh bash in {settings.workdir}; files persist between calls, shell state "
                f"does not. Time limit {settings.timeout:g} s per call. Returns stdout, stderr and return_code."
                + callable_tools  # [issue 14 wiring]
            ),
            input_schema=wire.BASH_INPUT_SCHEMA,
            output_schema=wire.BASH_OUTPUT_SCHEMA,
        ),
        types.Tool(
            name=wire.EDITOR_TOOL,
            description=(
                "View, create or edit files in the code execution sandbox. "
                "view: a file's text as is (or a directory listing; images and PDFs come back base64). "
                "create: write a whole file. str_replace: replace text that occurs exactly once. "
                f"Relative paths resolve against {settings.workdir}."
            ),
            input_schema=wire.EDITOR_INPUT_SCHEMA,
            output_schema=wire.EDITOR_OUTPUT_SCHEMA,
        ),
    ]
    if settings.profile == "20250522":  # legacy: one Python-only tool, nothing else
        return [_code_tool(settings, "Each call runs in a fresh Python interpreter: nothing carries over but files.")]
    if settings.profile in ("20260120", "20260521"):
        limit = (
            f"Each cell may run for at most {settings.cell_timeout:g} s of wall-clock time; past that it is stopped "
            "with a non-zero return_code and a detection_timeout notice, and the interpreter's state is reset."
            if settings.profile == "20260521"
            else f"Time limit {settings.timeout:g} s per cell."
        )
        listed.append(_code_tool(settings, "Cells run in one long-lived Python interpreter per container: variables, "
                                          f"imports and functions carry over from cell to cell. {limit}" + callable_tools))
    return listed


def _code_tool(settings: Settings, semantics: str) -> types.Tool:
    return types.Tool(
        name=wire.CODE_TOOL,
        description=(
            f"Run Python 3 code in the code execution sandbox (no network), in {settings.workdir}, with files shared "
            f"with the other tools. {semantics} Print what you want to see: only stdout and stderr come back."
        ),
        input_schema=wire.CODE_INPUT_SCHEMA,
        output_schema=wire.CODE_OUTPUT_SCHEMA,
    )


def _session_key(ctx: ServerRequestContext[AppState]) -> str:
    """stdio: the process is the session. HTTP: the transport's session (Mcp-Session-Id, or
    the SSE connection); the stateless 2026-07-28 protocol has none, so its calls share the
    tenant's default container unless they name one."""
    request = ctx.request
    headers = getattr(request, "headers", None)
    if headers is None:
        return "stdio"
    return headers.get("mcp-session-id") or getattr(request, "query_params", {}).get("session_id") or "default"


_TOOLS_BY_PROFILE = {
    "20250825": {wire.BASH_TOOL: "bash", wire.EDITOR_TOOL: "editor"},
    "20260120": {wire.BASH_TOOL: "bash", wire.EDITOR_TOOL: "editor", wire.CODE_TOOL: "python"},
    "20260521": {wire.BASH_TOOL: "bash", wire.EDITOR_TOOL: "editor", wire.CODE_TOOL: "python"},
    "20250522": {wire.CODE_TOOL: "python"},
}


async def _run_tool(
    tool: str, ctx: ServerRequestContext[AppState], state: AppState, get_sandbox: Any, arguments: dict[str, Any]
) -> tools.Outcome:
    settings = state.settings
    if tool == "editor":
        return await tools.editor(get_sandbox, arguments)
    run = tools.bash if tool == "bash" else tools.python
    if not (ctx.meta and ctx.meta.get("progress_token") is not None):
        return await run(settings, get_sandbox, arguments, store=state.files)
    progress = _Progress(ctx)  # partial output while it runs (also a keep-alive)
    async with anyio.create_task_group() as tg:
        tg.start_soon(progress.run)
        outcome = await run(settings, get_sandbox, arguments, progress.add, store=state.files)
        tg.cancel_scope.cancel()
    return outcome


def _tenant(ctx: ServerRequestContext[AppState], settings: Settings) -> str:
    """The caller's tenant: from the bearer token over HTTP, the configured one over stdio."""
    token = get_access_token()
    return token.client_id if token is not None else settings.tenant


_MAX_CONTAINER_UPLOADS = 100


def _container_uploads(ctx: ServerRequestContext[AppState]) -> list[str]:
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


async def put_file(state: AppState, tenant: str, sandbox: Sandbox, file_id: str, path: str | None = None) -> str:
    """Copy a stored file into a container (default: <workdir>/uploads/<filename>); its path."""
    meta = state.files.get(tenant, file_id)
    data = state.files.read(tenant, file_id) if meta else None
    if meta is None or data is None:
        raise FileNotFound(f"no file {file_id[:80]!r}")
    target = path or f"{state.settings.workdir}/{UPLOADS_DIR}/{meta.filename}"
    await sandbox.write_file(target, data)
    return target


def _requested_container(ctx: ServerRequestContext[AppState]) -> str | None:
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


async def _prune_files(files: FileStore, interval: float) -> None:
    while True:
        await anyio.to_thread.run_sync(files.prune)
        await anyio.sleep(interval)


async def _image_facts(backend: Deployment, image: str) -> ImageFacts:
    """The image's manifest (libraries and tools with versions) for the system prompt: from
    the image's label, so no sandbox is started for it (image.py)."""
    try:
        manifest = await backend.image_manifest(image)  # Docker raises when there is no engine
        return ImageFacts.from_manifest(manifest) if manifest is not None else ImageFacts()
    except Exception as exc:  # noqa: BLE001 - the prompt then says "see the image manifest"
        log.warning("no manifest for image %s (%s): the system prompt lists no versions", image, exc)
        return ImageFacts()


async def _prepare(sessions: Sessions) -> None:
    """Start the stdio session's container at launch, so the first call finds it ready."""
    try:
        sandbox = await sessions.sandbox("stdio")
        await sandbox.agent()
    except Exception as exc:  # noqa: BLE001 - the first call will report it properly
        log.info("could not prepare the session's container: %s", exc)


def _result(outcome: BaseModel, meta: dict[str, Any]) -> types.CallToolResult:
    data = outcome.model_dump(mode="json")
    return types.CallToolResult(
        content=[types.TextContent(text=json.dumps(data, ensure_ascii=False))],
        structured_content=data,
        is_error=data["type"].endswith("_tool_result_error"),
        _meta=meta or None,
    )


def build_server(
    settings: Settings, deployment: Deployment | None = None, shared: list[AppState] | None = None
) -> Server[AppState]:
    shared = shared if shared is not None else []
    @asynccontextmanager
    async def lifespan(_server: Server[AppState]) -> AsyncIterator[AppState]:
        # Entered once per process: over HTTP the app enters it first, and the transports
        # (streamable HTTP, SSE) enter it again for themselves and get the same state.
        if shared:
            yield shared[0]
            return
        backend = deployment or make_backend(settings)
        isolation = f"{settings.runtime} (not checked yet)"
        try:
            info = await backend.check(settings.image)
            isolation = info.isolation
            log.info("sandboxes: %s, %s, image %s", info.engine, info.isolation, settings.image)
        except BackendUnavailable as exc:
            # Keep serving: calls answer `unavailable` until the engine is back.
            log.error("sandbox backend unavailable: %s", exc)
        facts = await _image_facts(backend, settings.image)
        if settings.backend == "local":
            log.warning("BACKEND LOCAL: NO ISOLATION. Commands run as plain processes on this host, with its "
                        "network and files. For tests only: never give this server to anyone or anything untrusted.")
        elif settings.runtime != "runsc":
            log.warning("runtime %r: sandboxes share the host kernel; use runsc (gVisor) for real isolation", settings.runtime)
        async with anyio.create_task_group() as task_group:
            policies = load_tenants(Path(settings.tokens_file)) if settings.tokens_file else {}
            gateway = await start_gateway(settings, policies, task_group)  # [issue 14 wiring]
            containers = ContainerManager(settings, backend, task_group, tools=gateway)
            sessions = Sessions(containers, settings.tenant, settings.container, upload_plan(settings.uploads, settings.workdir))
            data_dir = Path(settings.data_dir) if settings.data_dir else default_data_dir()
            caps = {p.name: p.max_stored_bytes for p in policies.values() if p.max_stored_bytes is not None}
            files = FileStore(data_dir / "files", settings.file_retention, lambda t: caps.get(t, settings.max_stored_bytes))
            metrics = Metrics()
            metrics.gauges["running_containers"] = lambda: containers.running_count
            metrics.gauges["pool_size"] = lambda: len(containers.pool)
            task_group.start_soon(containers.run_reaper)
            task_group.start_soon(containers.run_pool)
            if settings.prepare_session:
                task_group.start_soon(_prepare, sessions)
            if settings.file_retention is not None:
                task_group.start_soon(_prune_files, files, settings.reap_interval)
            state = AppState(
                settings, backend, containers, sessions, files, Limits(policies), Usage(data_dir / "usage.json"),
                metrics, isolation, facts, gateway,
            )
            shared.append(state)
            try:
                yield state
            finally:
                shared.clear()
                with anyio.CancelScope(shield=True), anyio.move_on_after(20):
                    await containers.shutdown()
                if gateway is not None:
                    gateway.close()  # [issue 14 wiring]
                task_group.cancel_scope.cancel()

    async def list_tools(ctx: ServerRequestContext[AppState], params: Any) -> types.ListToolsResult:
        gateway = ctx.lifespan_context.tools  # [issue 14 wiring]
        return types.ListToolsResult(tools=_tools(settings, gateway.tool_description(_tenant(ctx, settings)) if gateway else ""))

    async def call_tool(ctx: ServerRequestContext[AppState], params: types.CallToolRequestParams) -> types.CallToolResult:
        if _TOOLS_BY_PROFILE[settings.profile].get(params.name) is None:
            raise MCPError(code=types.INVALID_PARAMS, message=f"unknown tool {params.name!r}")
        try:
            return await handle_call(ctx, params)
        except CodeExecError as exc:  # bad _meta, an upload that is not there, ...
            return _result(tools.error(params.name, exc.code, exc.message), {})
        except Exception:  # noqa: BLE001 - errors are results, even our own bugs
            log.exception("call %s: unexpected error", ctx.request_id)
            return _result(tools.error(params.name, "unavailable", "internal error in the server; see its log"), {})

    async def handle_call(ctx: ServerRequestContext[AppState], params: types.CallToolRequestParams) -> types.CallToolResult:
        state = ctx.lifespan_context
        tenant = _tenant(ctx, settings)
        session, requested = _session_key(ctx), _requested_container(ctx)
        uploads = _container_uploads(ctx)

        async def get_sandbox() -> Sandbox:
            sandbox = await state.sessions.sandbox(session, requested, tenant)
            for file_id in uploads:  # the API's container_upload: files put in before the call
                await put_file(state, tenant, sandbox, file_id)
            uploads.clear()
            return sandbox

        tool = _TOOLS_BY_PROFILE[settings.profile][params.name]
        refusal = state.limits.acquire(tenant)
        if refusal is not None:
            log.info("tenant %s: too many requests: %s", tenant, refusal)
            return _result(tools.error(params.name, "too_many_requests", refusal), {})
        started = time.monotonic()
        try:
            outcome = await _run_tool(tool, ctx, state, get_sandbox, params.arguments or {})
        finally:
            state.limits.release(tenant)
        elapsed = time.monotonic() - started
        container_id = outcome.sandbox.info.id if outcome.sandbox is not None else None
        state.usage.record(tenant, container_id, elapsed)
        state.metrics.observe(params.name, outcome.result, elapsed)
        log.info("call %s tenant=%s tool=%s container=%s outcome=%s %.1f ms", ctx.request_id, tenant, params.name,
                 container_id, getattr(outcome.result, "error_code", "ok"), elapsed * 1000)
        meta = {"container": outcome.sandbox.info.meta()} if outcome.sandbox is not None else {}
        result = _result(outcome.result, meta)
        for file in outcome.files:  # show the charts the model made, inline
            if file.is_image and file.size_bytes <= settings.inline_image_bytes:
                data = state.files.read(file.tenant, file.id)
                if data is not None:
                    result.content.append(types.ImageContent(data=base64.b64encode(data).decode(), mime_type=file.mime_type))
        return result

    def prompt_text(state: AppState, tenant: str) -> str:
        listing = state.tools.describe(tenant) if state.tools else ""  # [issue 14 wiring]
        return system_prompt(state.settings, state.isolation, state.facts, listing)

    async def list_resources(ctx: ServerRequestContext[AppState], params: Any) -> types.ListResourcesResult:
        return types.ListResourcesResult(
            resources=[
                types.Resource(
                    uri=PROMPT_URI,
                    name="system-prompt",
                    description="System prompt: how this sandbox differs from your other environments, and its facts",
                    mime_type="text/markdown",
                ),
                types.Resource(
                    uri=CONTAINERS_URI,
                    name="containers",
                    description="Your containers: id, created_at, expires_at, state, size_bytes (JSON)",
                    mime_type="application/json",
                ),
                types.Resource(
                    uri=USAGE_URI,
                    name="usage",
                    description="Your metering: code execution requests, execution time per container (JSON)",
                    mime_type="application/json",
                ),
                types.Resource(
                    uri=FILES_URI,
                    name="files",
                    description="Your files (outputs of commands): id, filename, size, MIME type, created, container (JSON)",
                    mime_type="application/json",
                ),
            ]
            + [
                types.Resource(uri=f"{FILES_URI}/{f.id}", name=f.filename, mime_type=f.mime_type, size=f.size_bytes)
                for f in ctx.lifespan_context.files.list(_tenant(ctx, settings))[:_LISTED_FILES]
            ]
        )

    async def list_resource_templates(ctx: ServerRequestContext[AppState], params: Any) -> types.ListResourceTemplatesResult:
        return types.ListResourceTemplatesResult(
            resource_templates=[
                types.ResourceTemplate(
                    uri_template=f"{FILES_URI}/{{file_id}}",
                    name="file",
                    description="A file by its id (the file_id of a bash_code_execution_output)",
                )
            ]
        )

    async def read_resource(ctx: ServerRequestContext[AppState], params: types.ReadResourceRequestParams) -> types.ReadResourceResult:
        state = ctx.lifespan_context
        uri = str(params.uri)
        if uri == PROMPT_URI:
            mime, text = "text/markdown", prompt_text(state, _tenant(ctx, settings))
        elif uri == USAGE_URI:
            tenant = _tenant(ctx, settings)
            report = {**state.usage.report(tenant), **(state.tools.report(tenant) if state.tools else {})}  # [issue 14 wiring]
            mime, text = "application/json", json.dumps(report, indent=2)
        elif uri == FILES_URI:
            listing = [dataclasses.asdict(f) for f in state.files.list(_tenant(ctx, settings))]
            mime, text = "application/json", json.dumps({"files": listing}, indent=2)
        elif uri.startswith(FILES_URI + "/"):
            file_id = uri[len(FILES_URI) + 1 :]
            meta = state.files.get(_tenant(ctx, settings), file_id)
            data = state.files.read(_tenant(ctx, settings), file_id) if meta else None
            if meta is None or data is None:
                raise MCPError(code=types.INVALID_PARAMS, message=f"no file {file_id!r}")
            return types.ReadResourceResult(
                contents=[types.BlobResourceContents(uri=uri, mime_type=meta.mime_type, blob=base64.b64encode(data).decode())]
            )
        elif uri == CONTAINERS_URI:
            try:
                listing = await state.containers.list(_tenant(ctx, settings))
            except BackendUnavailable as exc:
                raise MCPError(code=types.INTERNAL_ERROR, message=f"sandbox backend unavailable: {exc}") from None
            mime, text = "application/json", json.dumps({"containers": listing}, indent=2)
        else:
            raise MCPError(code=types.INVALID_PARAMS, message=f"unknown resource {params.uri}")
        return types.ReadResourceResult(contents=[types.TextResourceContents(uri=uri, mime_type=mime, text=text)])

    async def list_prompts(ctx: ServerRequestContext[AppState], params: Any) -> types.ListPromptsResult:
        return types.ListPromptsResult(
            prompts=[types.Prompt(name=PROMPT_NAME, description="System prompt for using the code execution sandbox")]
        )

    async def get_prompt(ctx: ServerRequestContext[AppState], params: types.GetPromptRequestParams) -> types.GetPromptResult:
        if params.name != PROMPT_NAME:
            raise MCPError(code=types.INVALID_PARAMS, message=f"unknown prompt {params.name!r}")
        return types.GetPromptResult(
            description="System prompt for using the code execution sandbox",
            messages=[types.PromptMessage(role="user", content=types.TextContent(text=prompt_text(ctx.lifespan_context, _tenant(ctx, settings))))],
        )

    return Server(
        "mcp-codeexec",
        version=__version__,
        instructions="Run code in a sandbox with bash_code_execution and text_editor_code_execution. "
        f"Read the resource {PROMPT_URI} (or prompt {PROMPT_NAME}) for how this sandbox differs from other environments.",
        lifespan=lifespan,
        on_list_tools=list_tools,
        on_call_tool=call_tool,
        on_list_resources=list_resources,
        on_read_resource=read_resource,
        on_list_resource_templates=list_resource_templates,
        on_list_prompts=list_prompts,
        on_get_prompt=get_prompt,
    )


class _Progress:
    """Sends a running command's latest output as progress notifications (also a keep-alive)."""

    def __init__(self, ctx: ServerRequestContext[AppState]) -> None:
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
