"""The MCP surface: tools, the system-prompt resource and prompt, on the low-level server.

The low-level server is used because it publishes our JSON schemas exactly as written and
leaves argument validation to us (tools.py answers `invalid_tool_input`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import mcp_types as types
from mcp.server import Server
from mcp.server.context import ServerRequestContext
from mcp.shared.exceptions import MCPError
from pydantic import BaseModel

from mcp_codeexec import __version__, tools, wire
from mcp_codeexec.agent import protocol as p
from mcp_codeexec.config import Settings
from mcp_codeexec.deployment.base import BackendUnavailable, Deployment
from mcp_codeexec.deployment.docker import DockerDeployment
from mcp_codeexec.sandbox import Sandbox
from mcp_codeexec.prompt import PROMPT_NAME, PROMPT_URI, ImageFacts, system_prompt
from mcp_codeexec.containers import ContainerManager
from mcp_codeexec.sessions import Sessions

log = logging.getLogger(__name__)

CONTAINERS_URI = "codeexec://containers"

# How often a running command's partial output goes out as a progress notification.
_PROGRESS_INTERVAL = 1.0
_PROGRESS_TAIL = 2000


@dataclass
class AppState:
    settings: Settings
    deployment: Deployment
    containers: ContainerManager
    sessions: Sessions
    isolation: str
    facts: ImageFacts


def _tools(settings: Settings) -> list[types.Tool]:
    return [
        types.Tool(
            name=wire.BASH_TOOL,
            description=(
                "Run a bash command in the code execution sandbox (Linux, Python 3, no network). "
                f"Each call is a fresh bash in {settings.workdir}; files persist between calls, shell state "
                f"does not. Time limit {settings.timeout:g} s per call. Returns stdout, stderr and return_code."
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


def _session_key(ctx: ServerRequestContext[AppState]) -> str:
    # stdio has no session id: the process is the session.
    headers = getattr(ctx.request, "headers", None)
    return (headers.get("mcp-session-id") if headers else None) or "stdio"


def _requested_container(ctx: ServerRequestContext[AppState]) -> str | None:
    """The container a request names in `_meta`: "container_…" or {"id": "container_…"}."""
    named = (ctx.meta or {}).get("container")
    if isinstance(named, dict):
        named = named.get("id")
    return named if isinstance(named, str) else None


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


def build_server(settings: Settings, deployment: Deployment | None = None) -> Server[AppState]:
    @asynccontextmanager
    async def lifespan(_server: Server[AppState]) -> AsyncIterator[AppState]:
        backend = deployment or DockerDeployment(settings.runtime)
        isolation = f"{settings.runtime} (not checked yet)"
        try:
            info = await backend.check(settings.image)
            isolation = info.isolation
            log.info("sandboxes: %s, %s, image %s", info.engine, info.isolation, settings.image)
        except BackendUnavailable as exc:
            # Keep serving: calls answer `unavailable` until the engine is back.
            log.error("sandbox backend unavailable: %s", exc)
        if settings.runtime != "runsc":
            log.warning("runtime %r: sandboxes share the host kernel; use runsc (gVisor) for real isolation", settings.runtime)
        async with anyio.create_task_group() as task_group:
            containers = ContainerManager(settings, backend, task_group)
            sessions = Sessions(containers, settings.tenant, settings.container)
            task_group.start_soon(containers.run_reaper)
            task_group.start_soon(containers.run_pool)
            if settings.prepare_session:
                task_group.start_soon(_prepare, sessions)
            try:
                yield AppState(settings, backend, containers, sessions, isolation, ImageFacts())
            finally:
                with anyio.CancelScope(shield=True), anyio.move_on_after(20):
                    await containers.shutdown()
                task_group.cancel_scope.cancel()

    async def list_tools(ctx: ServerRequestContext[AppState], params: Any) -> types.ListToolsResult:
        return types.ListToolsResult(tools=_tools(settings))

    async def call_tool(ctx: ServerRequestContext[AppState], params: types.CallToolRequestParams) -> types.CallToolResult:
        state = ctx.lifespan_context
        session, requested = _session_key(ctx), _requested_container(ctx)

        async def get_sandbox() -> Sandbox:
            return await state.sessions.sandbox(session, requested)

        arguments = params.arguments or {}
        if params.name == wire.BASH_TOOL:
            progress = _Progress(ctx) if ctx.meta and ctx.meta.get("progress_token") is not None else None
            if progress is None:
                outcome = await tools.bash(settings, get_sandbox, arguments)
            else:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(progress.run)
                    outcome = await tools.bash(settings, get_sandbox, arguments, progress.add)
                    tg.cancel_scope.cancel()
        elif params.name == wire.EDITOR_TOOL:
            outcome = await tools.editor(get_sandbox, arguments)
        else:
            raise MCPError(code=types.INVALID_PARAMS, message=f"unknown tool {params.name!r}")
        meta = {"container": outcome.sandbox.info.meta()} if outcome.sandbox is not None else {}
        return _result(outcome.result, meta)

    def prompt_text(state: AppState) -> str:
        return system_prompt(state.settings, state.isolation, state.facts)

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
            ]
        )

    async def read_resource(ctx: ServerRequestContext[AppState], params: types.ReadResourceRequestParams) -> types.ReadResourceResult:
        state = ctx.lifespan_context
        uri = str(params.uri)
        if uri == PROMPT_URI:
            mime, text = "text/markdown", prompt_text(state)
        elif uri == CONTAINERS_URI:
            try:
                listing = await state.containers.list(state.sessions.tenant)
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
            messages=[types.PromptMessage(role="user", content=types.TextContent(text=prompt_text(ctx.lifespan_context)))],
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
