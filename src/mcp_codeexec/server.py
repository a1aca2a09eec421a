"""The MCP surface: thin handlers for tools, resources and prompts on the low-level server.

The low-level server is used because it publishes our JSON schemas exactly as written and
leaves argument validation to us (tools.py answers `invalid_tool_input`). Start-up and
wiring live in app.py, one call's path in calls.py.
"""

from __future__ import annotations

import base64
import dataclasses
import json
from typing import Any

import mcp_types as types
from mcp.server import Server
from mcp.server.context import ServerRequestContext
from mcp.shared.exceptions import MCPError

from mcp_codeexec import __version__, wire
from mcp_codeexec.app import App
from mcp_codeexec.calls import call_tool, tenant_of
from mcp_codeexec.config import Settings
from mcp_codeexec.errors import BackendUnavailable
from mcp_codeexec.prompt import PROMPT_NAME, PROMPT_URI, system_prompt

Context = ServerRequestContext[App]

CONTAINERS_URI = "codeexec://containers"
FILES_URI = "codeexec://files"
USAGE_URI = "codeexec://usage"
_LISTED_FILES = 50  # newest files listed as resources; every one is readable by id


# --- tools ------------------------------------------------------------------------------

def tool_list(settings: Settings, callable_tools: str = "") -> list[types.Tool]:
    """The tools the profile offers, with the API's schemas and descriptions of this
    deployment's own facts (working directory, time limits, the upstream tools code may
    call: `callable_tools`)."""
    profile = settings.tool_profile
    made = {
        wire.BASH_TOOL: lambda: types.Tool(
            name=wire.BASH_TOOL,
            description=(
                "Run a bash command in the code execution sandbox (Linux, Python 3, no network). "
                f"Each call is a fresh bash in {settings.workdir}; files persist between calls, shell state "
                f"does not. Time limit {settings.timeout:g} s per call. Returns stdout, stderr and return_code."
                + callable_tools
            ),
            input_schema=wire.BASH_INPUT_SCHEMA,
            output_schema=wire.BASH_OUTPUT_SCHEMA,
        ),
        wire.EDITOR_TOOL: lambda: types.Tool(
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
        wire.CODE_TOOL: lambda: _code_tool(settings, callable_tools),
    }
    listed = [made[name]() for name in profile.tools]
    return [_with_handle(tool) for tool in listed] if settings.container_handles else listed


# --container-handles: one more optional argument, and one sentence saying how it works.
HANDLE_PROPERTY = {
    "type": "string",
    "description": "A container id from an earlier result: run in that container (its files, its REPL state). "
    "Omit it to start in a new container.",
}
HANDLE_SENTENCE = (
    " Each result names its container (container_…); pass that id as `container` to keep working in the same "
    "sandbox, or omit it for a new one."
)


def _with_handle(tool: types.Tool) -> types.Tool:
    schema = {**tool.input_schema, "properties": {**tool.input_schema["properties"], "container": HANDLE_PROPERTY}}
    return tool.model_copy(update={"input_schema": schema, "description": (tool.description or "") + HANDLE_SENTENCE})


def _code_tool(settings: Settings, callable_tools: str) -> types.Tool:
    profile = settings.tool_profile
    if not profile.repl:
        semantics = "Each call runs in a fresh Python interpreter: nothing carries over but files."
    else:
        limit = (
            f"Each cell may run for at most {settings.cell_timeout:g} s of wall-clock time; past that it is stopped "
            "with a non-zero return_code and a detection_timeout notice, and the interpreter's state is reset."
            if profile.cell_limit
            else f"Time limit {settings.timeout:g} s per cell."
        )
        semantics = ("Cells run in one long-lived Python interpreter per container: variables, "
                     f"imports and functions carry over from cell to cell. {limit}" + callable_tools)
    return types.Tool(
        name=wire.CODE_TOOL,
        description=(
            f"Run Python 3 code in the code execution sandbox (no network), in {settings.workdir}, with files shared "
            f"with the other tools. {semantics} Print what you want to see: only stdout and stderr come back."
        ),
        input_schema=wire.CODE_INPUT_SCHEMA,
        output_schema=wire.CODE_OUTPUT_SCHEMA,
    )


async def list_tools(ctx: Context, params: Any) -> types.ListToolsResult:
    app = ctx.lifespan_context
    callable_tools = app.tools.tool_description(tenant_of(app)) if app.tools else ""
    return types.ListToolsResult(tools=tool_list(app.settings, callable_tools))


async def handle_call_tool(ctx: Context, params: types.CallToolRequestParams) -> types.CallToolResult:
    app = ctx.lifespan_context
    if app.settings.tool_profile.kind(params.name) is None:
        raise MCPError(code=types.INVALID_PARAMS, message=f"unknown tool {params.name!r}")
    return await call_tool(app, ctx, params.name, params.arguments or {})


# --- resources and prompts --------------------------------------------------------------

def _prompt_text(app: App) -> str:
    listing = app.tools.describe(tenant_of(app)) if app.tools else ""
    return system_prompt(app.settings, app.isolation, app.facts, listing)


async def list_resources(ctx: Context, params: Any) -> types.ListResourcesResult:
    app = ctx.lifespan_context
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
            for f in app.files.list(tenant_of(app))[:_LISTED_FILES]
        ]
    )


async def list_resource_templates(ctx: Context, params: Any) -> types.ListResourceTemplatesResult:
    return types.ListResourceTemplatesResult(
        resource_templates=[
            types.ResourceTemplate(
                uri_template=f"{FILES_URI}/{{file_id}}",
                name="file",
                description="A file by its id (the file_id of a bash_code_execution_output)",
            )
        ]
    )


async def read_resource(ctx: Context, params: types.ReadResourceRequestParams) -> types.ReadResourceResult:
    app = ctx.lifespan_context
    tenant = tenant_of(app)
    uri = str(params.uri)
    if uri == PROMPT_URI:
        mime, text = "text/markdown", _prompt_text(app)
    elif uri == USAGE_URI:
        report = {**app.usage.report(tenant), **(app.tools.report(tenant) if app.tools else {})}
        mime, text = "application/json", json.dumps(report, indent=2)
    elif uri == FILES_URI:
        listing = [dataclasses.asdict(f) for f in app.files.list(tenant)]
        mime, text = "application/json", json.dumps({"files": listing}, indent=2)
    elif uri.startswith(FILES_URI + "/"):
        file_id = uri[len(FILES_URI) + 1 :]
        meta = app.files.get(tenant, file_id)
        data = app.files.read(tenant, file_id) if meta else None
        if meta is None or data is None:
            raise MCPError(code=types.INVALID_PARAMS, message=f"no file {file_id!r}")
        return types.ReadResourceResult(
            contents=[types.BlobResourceContents(uri=uri, mime_type=meta.mime_type, blob=base64.b64encode(data).decode())]
        )
    elif uri == CONTAINERS_URI:
        try:
            listing = await app.containers.list(tenant)
        except BackendUnavailable as exc:
            raise MCPError(code=types.INTERNAL_ERROR, message=f"sandbox backend unavailable: {exc}") from None
        mime, text = "application/json", json.dumps({"containers": listing}, indent=2)
    else:
        raise MCPError(code=types.INVALID_PARAMS, message=f"unknown resource {params.uri}")
    return types.ReadResourceResult(contents=[types.TextResourceContents(uri=uri, mime_type=mime, text=text)])


async def list_prompts(ctx: Context, params: Any) -> types.ListPromptsResult:
    return types.ListPromptsResult(
        prompts=[types.Prompt(name=PROMPT_NAME, description="System prompt for using the code execution sandbox")]
    )


async def get_prompt(ctx: Context, params: types.GetPromptRequestParams) -> types.GetPromptResult:
    if params.name != PROMPT_NAME:
        raise MCPError(code=types.INVALID_PARAMS, message=f"unknown prompt {params.name!r}")
    return types.GetPromptResult(
        description="System prompt for using the code execution sandbox",
        messages=[types.PromptMessage(role="user", content=types.TextContent(text=_prompt_text(ctx.lifespan_context)))],
    )


def build_server(app: App) -> Server[App]:
    """The MCP server over `app`; its lifespan is the app running (app.py)."""
    return Server(
        "mcp-codeexec",
        version=__version__,
        instructions="Run code in a sandbox with bash_code_execution and text_editor_code_execution. "
        f"Read the resource {PROMPT_URI} (or prompt {PROMPT_NAME}) for how this sandbox differs from other environments.",
        lifespan=lambda _server: app.run(),
        on_list_tools=list_tools,
        on_call_tool=handle_call_tool,
        on_list_resources=list_resources,
        on_read_resource=read_resource,
        on_list_resource_templates=list_resource_templates,
        on_list_prompts=list_prompts,
        on_get_prompt=get_prompt,
    )
