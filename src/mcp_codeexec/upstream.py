"""Programmatic tool calling: code in a sandbox calls tools of upstream MCP servers that the
operator configured (`--tools-config FILE`), and only what it prints reaches the model.

The path of a call: user code (mcp_tools in the sandbox) -> the agent (toolchannel.py) ->
a `tool` frame on the agent connection (agent/client.py) -> Gateway.call here, which checks
it against the caller tenant's grants and the server's allow-list, bounds it, and calls
the upstream through the `mcp` SDK's client -> the answer goes back the same way.

Config (JSON, or TOML when the file ends in .toml):

    [limits]                          # optional; defaults below (ToolLimits)
    call_timeout = 60                 # seconds per call
    [servers.memory]                  # a server's name is its module: `from mcp_tools import memory`
    command = "npx"                   # stdio: command, args, env, cwd
    args = ["-y", "@modelcontextprotocol/server-memory"]
    tools = "*"                       # required: "*" or a list of tool names (the allow-list)
    per_tenant = true                 # stdio default: each tenant gets its own process, and
                                      # "{tenant}" in args, env and cwd becomes the tenant's name
    [servers.search]
    url = "http://127.0.0.1:3001/mcp" # Streamable HTTP: url, headers
    headers = { Authorization = "Bearer ..." }
    tools = ["search"]

Which tenants may call which servers: over HTTP with a tokens file, a tenant gets the
servers its entry names (`"upstreams": ["memory"]`, tenants.py), none otherwise; without
tokens (stdio, or an open HTTP server) the one tenant gets every server. A name nobody
configured is never reached: calls name a configured server or are refused.

Everything a sandbox sends is hostile: names, sizes, counts and time are bounded here,
after the agent connection's strict decoding (agent/client.py).
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
import tomllib
from collections.abc import Collection
from contextlib import AsyncExitStack
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpx2
import jsonschema
import mcp_types as types
from mcp.client import Client
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.exceptions import MCPError
from pydantic import ValidationError

from mcp_codeexec.agent import mcp_tools
from mcp_codeexec.agent import protocol as p
from mcp_codeexec.agent.client import CommandTools
from mcp_codeexec.errors import ConfigError

log = logging.getLogger(__name__)

_SERVER_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
# A server's name becomes an attribute of the mcp_tools module: it must not hide one.
_RESERVED = {name for name in vars(mcp_tools) if not name.startswith("__")} | {"mcp_tools"}
_MAX_TOOLS = 500  # tools kept per server (a listing past it is cut)
_MAX_PAGES = 20
_MAX_MESSAGE = 64 * 1024  # an upstream's error message, as passed on
_MAX_SCHEMA = 64 * 1024  # a tool's input schema in the catalog (larger: left out, unchecked)
_MAX_DESCRIPTION = 4000
_IDLE_CLOSE = 600.0  # a tenant's own upstream process is closed after this long unused
_PROMPT_TOOLS = 80  # tools listed in the prompt and descriptions, at most


@dataclass(frozen=True)
class ToolLimits:
    call_timeout: float = 60.0  # per call (a command's own limit also ends its calls)
    connect_timeout: float = 30.0  # to start an upstream and list its tools
    max_calls_per_command: int = 1000  # per bash command or REPL cell
    max_concurrent_per_command: int = 8
    max_concurrent_per_tenant: int = 16
    max_argument_bytes: int = 256 * 1024  # a call's arguments, as JSON
    max_result_bytes: int = 1024 * 1024  # what a call returns into the sandbox, as JSON


@dataclass(frozen=True)
class ServerSpec:
    name: str
    tools: frozenset[str] | None  # the allow-list; None: every tool the server lists
    command: str = ""
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    cwd: str | None = None
    url: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    per_tenant: bool = True

    def allows(self, tool: str) -> bool:
        return self.tools is None or tool in self.tools


@dataclass(frozen=True)
class ToolsConfig:
    servers: dict[str, ServerSpec]
    limits: ToolLimits = field(default_factory=ToolLimits)


def _strings(value: Any, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{what} must be a list of strings")
    return tuple(value)


def _table(value: Any, what: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ConfigError(f"{what} must be a table of strings")
    return tuple(sorted(value.items()))


def _server(name: str, entry: Any) -> ServerSpec:
    where = f"servers.{name}"
    if not _SERVER_NAME.fullmatch(name) or name in _RESERVED:
        raise ConfigError(f"{where}: a server's name must match [a-z][a-z0-9_]{{0,31}} and not be one of "
                          f"mcp_tools' own names ({', '.join(sorted(n for n in _RESERVED if not n.startswith('_')))})")
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected a table")
    unknown = set(entry) - {"command", "args", "env", "cwd", "url", "headers", "tools", "per_tenant"}
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
    tools = entry.get("tools")
    if tools == "*":
        allowed = None
    elif isinstance(tools, list) and tools:
        allowed = frozenset(_strings(tools, f"{where}.tools"))
    else:
        raise ConfigError(f'{where}.tools is required: "*" (every tool) or a non-empty list of tool names')
    if ("command" in entry) == ("url" in entry):
        raise ConfigError(f"{where}: give either command (stdio) or url (Streamable HTTP)")
    if "command" in entry:
        if set(entry) & {"headers"}:
            raise ConfigError(f"{where}: headers are for url servers")
        if not isinstance(entry["command"], str) or not entry["command"]:
            raise ConfigError(f"{where}.command must be a string")
        cwd = entry.get("cwd")
        if cwd is not None and not isinstance(cwd, str):
            raise ConfigError(f"{where}.cwd must be a string")
        per_tenant = entry.get("per_tenant", True)
        if not isinstance(per_tenant, bool):
            raise ConfigError(f"{where}.per_tenant must be true or false")
        return ServerSpec(name, allowed, command=entry["command"], args=_strings(entry.get("args", []), f"{where}.args"),
                          env=_table(entry.get("env", {}), f"{where}.env"), cwd=cwd, per_tenant=per_tenant)
    if set(entry) & {"args", "env", "cwd", "per_tenant"}:
        raise ConfigError(f"{where}: args, env, cwd and per_tenant are for command servers")
    url = entry["url"]
    if not isinstance(url, str) or not re.match(r"https?://", url):
        raise ConfigError(f"{where}.url must be an http:// or https:// URL")
    return ServerSpec(name, allowed, url=url, headers=_table(entry.get("headers", {}), f"{where}.headers"), per_tenant=False)


def _limits(entry: Any) -> ToolLimits:
    if not isinstance(entry, dict):
        raise ConfigError("limits: expected a table")
    known = {f.name: f for f in fields(ToolLimits)}
    unknown = set(entry) - set(known)
    if unknown:
        raise ConfigError(f"limits: unknown keys {sorted(unknown)}")
    for key, value in entry.items():
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not numeric or value <= 0 or (known[key].type == "int" and not isinstance(value, int)):
            raise ConfigError(f"limits.{key} must be a positive {known[key].type}")
    return ToolLimits(**entry)


def load_tools_config(path: Path) -> ToolsConfig:
    """The config file, or ConfigError saying exactly what is wrong (the server refuses to
    start on a file it cannot read whole)."""
    try:
        text = path.read_text("utf-8")
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except OSError as exc:
        raise ConfigError(f"tools config {path}: {exc.strerror or exc}") from None
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"tools config {path}: not valid {'TOML' if path.suffix == '.toml' else 'JSON'} ({exc})") from None
    if not isinstance(data, dict) or set(data) - {"servers", "limits"} or not isinstance(data.get("servers"), dict):
        raise ConfigError(f'tools config {path}: expected {{"servers": {{"<name>": {{...}}}}, "limits": {{...}}}}')
    try:
        servers = {name: _server(name, entry) for name, entry in data["servers"].items()}
        return ToolsConfig(servers, _limits(data.get("limits", {})))
    except ConfigError as exc:
        raise ConfigError(f"tools config {path}: {exc}") from None


# --- one upstream connection ------------------------------------------------------------


class UpstreamUnavailable(Exception):
    """The upstream cannot be reached (not started, died, refused the handshake)."""


class Upstream:
    """One connection to an upstream server (a tenant's own, or shared), held open by a task
    of its own (the SDK's client must be entered and left in one task), re-made on the next
    call after it dies."""

    def __init__(self, spec: ServerSpec, limits: ToolLimits, task_group: anyio.abc.TaskGroup, tenant: str = "") -> None:
        self.spec = spec
        self.tenant = tenant  # "" for a shared connection
        self.limits = limits
        self.task_group = task_group
        self.client: Client | None = None
        self.tools: dict[str, types.Tool] = {}  # allowed tools, as listed at the last connect
        self.last_used = time.monotonic()
        self.in_flight = 0
        self._scope: anyio.CancelScope | None = None
        self._lock = anyio.Lock()

    def _transport(self, stack: AsyncExitStack) -> Any:
        s = self.spec
        if s.url:
            http = create_mcp_http_client(headers=dict(s.headers))
            stack.push_async_callback(http.aclose)
            return streamable_http_client(s.url, http_client=http)
        def fill(text: str) -> str:  # a tenant's own process may get its own files
            return text.replace("{tenant}", self.tenant) if s.per_tenant else text

        return stdio_client(StdioServerParameters(
            command=s.command, args=[fill(a) for a in s.args], env={k: fill(v) for k, v in s.env},
            cwd=fill(s.cwd) if s.cwd else None,
        ))

    async def connect(self) -> Client:
        if self.client is not None:
            return self.client
        async with self._lock:
            if self.client is not None:
                return self.client
            ready = anyio.Event()
            failure: list[str] = []
            self.task_group.start_soon(self._hold, ready, failure)
            with anyio.move_on_after(self.limits.connect_timeout + 5):
                await ready.wait()
            if self.client is None:
                self.close()
                raise UpstreamUnavailable(failure[0] if failure else "it did not answer in time")
            return self.client

    async def _hold(self, ready: anyio.Event, failure: list[str]) -> None:
        """Connect, list the tools, then keep the connection until close()."""
        with anyio.CancelScope() as scope:
            self._scope = scope
            try:
                async with AsyncExitStack() as stack:
                    client = await stack.enter_async_context(
                        Client(self._transport(stack), cache=None, read_timeout_seconds=self.limits.connect_timeout)
                    )
                    self.tools = await self._list(client)
                    self.client = client
                    log.info("upstream %s: connected, %d tools allowed", self.spec.name, len(self.tools))
                    ready.set()
                    await anyio.sleep_forever()
            except Exception as exc:  # noqa: BLE001 - whatever the upstream does stays here
                failure.append(_describe(exc))
                log.warning("upstream %s: connection ended: %s", self.spec.name, failure[-1])
            finally:
                self.client = None
                ready.set()

    async def _list(self, client: Client) -> dict[str, types.Tool]:
        tools: dict[str, types.Tool] = {}
        cursor: str | None = None
        for _ in range(_MAX_PAGES):
            page = await client.list_tools(cursor=cursor)
            for tool in page.tools:
                if self.spec.allows(tool.name) and len(tools) < _MAX_TOOLS:
                    tools[tool.name] = tool
            cursor = page.next_cursor
            if cursor is None:
                break
        return tools

    def close(self) -> None:
        """Drop the connection (a stdio server's process is stopped); the next call makes a
        new one."""
        self.client = None
        if self._scope is not None:
            self._scope.cancel()

    async def call(self, tool: str, arguments: dict[str, Any], timeout: float) -> types.CallToolResult:
        self.last_used = time.monotonic()
        self.in_flight += 1
        try:
            client = await self.connect()
            with anyio.fail_after(timeout):
                return await client.call_tool(tool, arguments)
        except MCPError as exc:
            if exc.code == types.CONNECTION_CLOSED:
                self.close()
                raise UpstreamUnavailable("the upstream server closed the connection (it exited or was stopped)") from None
            raise
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, httpx2.HTTPError, OSError) as exc:
            self.close()
            raise UpstreamUnavailable(_describe(exc)) from None
        finally:
            self.in_flight -= 1
            self.last_used = time.monotonic()


def _describe(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:500]


# --- results ----------------------------------------------------------------------------


def _item(block: Any) -> Any:
    if isinstance(block, types.TextContent):
        return block.text
    if isinstance(block, (types.ImageContent, types.AudioContent)):
        return {"type": block.type, "mime_type": block.mime_type, "data": block.data}
    if isinstance(block, types.EmbeddedResource):
        return {"type": "resource", **block.resource.model_dump(mode="json", by_alias=True, exclude_none=True)}
    if isinstance(block, types.ResourceLink):
        return {"type": "resource_link", "uri": str(block.uri), "name": block.name}
    return block.model_dump(mode="json", by_alias=True, exclude_none=True)


def result_value(result: types.CallToolResult) -> Any:
    """What a call returns to code: the structured content when the tool gives one, else
    its content: one text as a str, several items as a list."""
    if result.structured_content is not None:
        return result.structured_content
    items = [_item(block) for block in result.content]
    return None if not items else items[0] if len(items) == 1 else items


def error_text(result: types.CallToolResult) -> str:
    text = "\n".join(b.text for b in result.content if isinstance(b, types.TextContent)) or "the tool reported an error"
    return text if len(text) <= _MAX_MESSAGE else text[:_MAX_MESSAGE] + f"... ({len(text)} characters)"


# --- signatures for the model -----------------------------------------------------------


def signature(tool: types.Tool) -> str:
    """`name(a: str, b?: int)`, short, as the sandbox module names them."""
    schema: dict[str, Any] = tool.input_schema if isinstance(tool.input_schema, dict) else {}
    props: dict[str, Any] = schema["properties"] if isinstance(schema.get("properties"), dict) else {}
    required = [n for n in schema.get("required") or [] if n in props]
    parts = [f"{n}: {mcp_tools._type_name(props[n])}" for n in required]
    parts += [f"{n}?: {mcp_tools._type_name(props[n])}" for n in props if n not in required]
    return f"{mcp_tools.python_name(tool.name)}({', '.join(parts)})"


def _first_sentence(text: str | None, limit: int = 100) -> str:
    text = " ".join((text or "").split())
    cut = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0]
    return cut if len(cut) <= limit else cut[: limit - 1] + "…"


# --- the gateway ------------------------------------------------------------------------


@dataclass
class _Meter:
    calls: int = 0
    errors: int = 0
    seconds: float = 0.0


class Gateway:
    """The server's one entry point for tool calls from sandboxes: built at start-up from
    the config, run in the server's task group. `call()` answers one ToolRequest."""

    def __init__(
        self,
        config: ToolsConfig,
        task_group: anyio.abc.TaskGroup,
        grants: dict[str, Collection[str]] | None = None,
        default_tenant: str = "default",
    ) -> None:
        """`grants`: tenant -> the servers it may call; None: every tenant may call every
        server (no tokens file)."""
        for tenant, names in (grants or {}).items():
            unknown = set(names) - set(config.servers)
            if unknown:
                raise ConfigError(f"tenant {tenant}: upstreams {sorted(unknown)} are not in the tools config")
        self.config = config
        self.limits = config.limits
        self.task_group = task_group
        self.grants = grants
        self.default_tenant = default_tenant
        self._instances: dict[tuple[str, str], Upstream] = {}
        self._tenant_active: dict[str, int] = {}
        self._meters: dict[str, dict[str, _Meter]] = {}

    # --- who may call what

    def servers_for(self, tenant: str) -> list[str]:
        if self.grants is None:
            return sorted(self.config.servers)
        return sorted(set(self.grants.get(tenant, ())) & set(self.config.servers))

    def _instance(self, server: str, tenant: str) -> Upstream:
        spec = self.config.servers[server]
        key = (server, tenant if spec.per_tenant else "")
        if key not in self._instances:
            self._instances[key] = Upstream(spec, self.limits, self.task_group, key[1])
        return self._instances[key]

    def _listed(self, server: str) -> dict[str, types.Tool]:
        """The server's allowed tools, from whichever connection listed them last."""
        for (name, _), upstream in self._instances.items():
            if name == server and upstream.tools:
                return upstream.tools
        return {}

    # --- life

    async def start(self) -> None:
        """Connect every server once (in parallel) so its tools are known for the prompt
        and the tool descriptions; a server that fails is logged and retried on first use."""

        async def one(server: str) -> None:
            try:
                await self._instance(server, self.default_tenant).connect()
            except UpstreamUnavailable as exc:
                log.error("upstream %s: cannot connect: %s (its tools are listed once it answers)", server, exc)

        async with anyio.create_task_group() as tg:
            for server in self.config.servers:
                tg.start_soon(one, server)
        self.task_group.start_soon(self._close_idle)

    async def _close_idle(self) -> None:
        while True:
            await anyio.sleep(60)
            now = time.monotonic()
            for (server, tenant), upstream in list(self._instances.items()):
                if tenant and not upstream.in_flight and now - upstream.last_used > _IDLE_CLOSE and upstream.client:
                    log.info("upstream %s for tenant %s: idle, closed", server, tenant)
                    upstream.close()

    def close(self) -> None:
        for upstream in self._instances.values():
            upstream.close()

    # --- what the model and the sandbox are told

    def catalog(self, tenant: str) -> dict[str, list[dict[str, Any]]]:
        """{server: [{"name", "description", "input_schema"}]}: what mcp_tools builds its
        functions from."""
        catalog: dict[str, list[dict[str, Any]]] = {}
        for server in self.servers_for(tenant):
            entries = []
            for tool in self._listed(server).values():
                schema = tool.input_schema if len(json.dumps(tool.input_schema)) <= _MAX_SCHEMA else {"type": "object"}
                entries.append({"name": tool.name, "description": (tool.description or "")[:_MAX_DESCRIPTION],
                                "input_schema": schema})
            catalog[server] = entries
        return catalog

    def describe(self, tenant: str) -> str:
        """The callable tools, one line per server, for the system prompt ("" if none)."""
        lines, count = [], 0
        for server in self.servers_for(tenant):
            tools = list(self._listed(server).values())
            shown = tools[: max(0, _PROMPT_TOOLS - count)]
            count += len(shown)
            listing = "; ".join(f"`{signature(t)}`" + (f" {_first_sentence(t.description)}" if t.description else "")
                                for t in shown)
            more = f"; and {len(tools) - len(shown)} more (`mcp-tool {server}` lists them)" if len(shown) < len(tools) else ""
            lines.append(f"- `{server}`: {listing or 'its tools are listed once it answers (`mcp-tool ' + server + '`)'}{more}")
        return "\n".join(lines)

    def tool_description(self, tenant: str) -> str:
        """A sentence for the bash and code tools' descriptions ("" if no tools)."""
        names = [f"{s} ({', '.join(mcp_tools.python_name(t) for t in list(self._listed(s))[:12])})"
                 for s in self.servers_for(tenant)]
        if not names:
            return ""
        return (" Code run here can call these MCP tools as Python functions (`from mcp_tools import <server>`) or with "
                f"`mcp-tool <server> <tool> '<json>'`: {'; '.join(names)}. Results stay in the sandbox unless printed; "
                "see the system prompt for signatures.")

    def report(self, tenant: str) -> dict[str, Any]:
        meters = self._meters.get(tenant, {})
        return {
            "tool_calls": sum(m.calls for m in meters.values()),
            "tool_errors": sum(m.errors for m in meters.values()),
            "tool_seconds": round(sum(m.seconds for m in meters.values()), 3),
            "tools": {name: {"calls": m.calls, "errors": m.errors, "seconds": round(m.seconds, 3)}
                      for name, m in sorted(meters.items())},
        }

    # --- calls

    async def call(self, tenant: str, container: str, request: p.ToolRequest, command: CommandTools) -> p.ToolReply:
        """Answer one request from code in `container` of `tenant`. Never raises but for
        cancellation (the command ended)."""
        if request.op == "list":
            return await self._list_for(tenant, request)
        started = time.monotonic()
        outcome = "cancelled"
        try:
            reply = await self._call(tenant, request, command)
            outcome = "ok" if reply.ok else reply.code
            return reply
        finally:
            elapsed = time.monotonic() - started
            known = request.server in self.servers_for(tenant) and self.config.servers[request.server].allows(request.tool)
            name = f"{request.server}.{request.tool}" if known else "(refused)"
            meter = self._meters.setdefault(tenant, {}).setdefault(name, _Meter())
            meter.calls += 1
            meter.errors += outcome != "ok"
            meter.seconds += elapsed
            log.info("tool call tenant=%s container=%s tool=%s outcome=%s %.1f ms", tenant, container,
                     name if known else repr(f"{request.server[:40]}.{request.tool[:40]}"), outcome, elapsed * 1000)

    async def _list_for(self, tenant: str, request: p.ToolRequest) -> p.ToolReply:
        for server in self.servers_for(tenant):
            if not self._listed(server):
                try:
                    await self._instance(server, tenant).connect()
                except UpstreamUnavailable as exc:
                    log.warning("upstream %s: cannot connect for a listing: %s", server, exc)
        return p.ToolReply(call=request.call, ok=True, result=self.catalog(tenant))

    async def _call(self, tenant: str, request: p.ToolRequest, command: CommandTools) -> p.ToolReply:
        def fail(code: str, message: str) -> p.ToolReply:
            return p.ToolReply(call=request.call, ok=False, code=code, message=message)

        limits = self.limits
        servers = self.servers_for(tenant)
        if request.server not in servers:  # the same answer whether it exists for others or not
            return fail("refused", f"no MCP server {request.server[:64]!r} here (servers: {', '.join(servers) or 'none'})")
        spec = self.config.servers[request.server]
        if not spec.allows(request.tool):
            return fail("refused", f"tool {request.tool[:100]!r} of {spec.name} is not allowed here")
        if command.calls >= limits.max_calls_per_command:
            return fail("limit", f"over {limits.max_calls_per_command} tool calls in one command")
        if command.active >= limits.max_concurrent_per_command:
            return fail("limit", f"over {limits.max_concurrent_per_command} tool calls at once in one command")
        if self._tenant_active.get(tenant, 0) >= limits.max_concurrent_per_tenant:
            return fail("limit", f"over {limits.max_concurrent_per_tenant} tool calls at once for this tenant")
        try:
            size = len(json.dumps(request.arguments, ensure_ascii=False).encode("utf-8", "surrogatepass"))
        except (ValueError, RecursionError):
            return fail("invalid_arguments", "the arguments cannot be encoded as JSON")
        if size > limits.max_argument_bytes:
            return fail("invalid_arguments", f"arguments of {size} bytes (at most {limits.max_argument_bytes})")
        upstream = self._instance(spec.name, tenant)
        command.calls += 1
        command.active += 1
        self._tenant_active[tenant] = self._tenant_active.get(tenant, 0) + 1
        try:
            try:
                await upstream.connect()
            except UpstreamUnavailable as exc:
                return fail("unavailable", f"cannot reach the MCP server {spec.name}: {exc}")
            tool = upstream.tools.get(request.tool)
            if tool is None:
                return fail("refused", f"{spec.name} has no tool {request.tool[:100]!r}")
            problem = _schema_problem(tool.input_schema, request.arguments)
            if problem:
                return fail("invalid_arguments", problem)
            try:
                result = await upstream.call(request.tool, request.arguments, limits.call_timeout)
            except TimeoutError:
                return fail("timeout", f"no answer from {spec.name} within {limits.call_timeout:g} s")
            except UpstreamUnavailable as exc:
                return fail("unavailable", f"{spec.name}: {exc}")
            except MCPError as exc:  # the upstream refused the request itself
                return fail("tool_error", exc.message[:_MAX_MESSAGE])
            except ValidationError as exc:
                return fail("unavailable", f"{spec.name} answered a malformed result ({exc.error_count()} errors)")
            if result.is_error:
                return fail("tool_error", error_text(result))
            value = result_value(result)
            size = len(json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass"))
            if size > limits.max_result_bytes:
                return fail("limit", f"the result is {size} bytes as JSON, over the {limits.max_result_bytes}-byte limit "
                                     "(ask the tool for less)")
            return p.ToolReply(call=request.call, ok=True, result=value)
        finally:
            command.active -= 1
            self._tenant_active[tenant] -= 1


def _schema_problem(schema: Any, arguments: dict[str, Any]) -> str:
    """Why `arguments` do not fit the tool's input schema ("" if they do, or if the schema
    itself is unusable: the upstream then judges)."""
    try:
        validator = jsonschema.validators.validator_for(schema)(schema)
        errors = sorted(validator.iter_errors(arguments), key=lambda e: list(e.path))[:5]
    except (jsonschema.exceptions.SchemaError, TypeError, ValueError, RecursionError):
        return ""
    return "; ".join(f"{'/'.join(map(str, e.path)) or 'arguments'}: {e.message[:200]}" for e in errors)


def _grants(policies: dict[str, Any] | None) -> dict[str, Collection[str]] | None:
    """tenant -> servers from the tokens file's `upstreams`; None (all to the one tenant)
    without a tokens file."""
    if not policies:
        return None
    return {policy.name: policy.upstreams for policy in policies.values()}


def check_tools_config(path: Path, policies: dict[str, Any] | None) -> ToolsConfig:
    """Read the tools config and check the tenants' grants against it (ConfigError)."""
    config = load_tools_config(path)
    for tenant, names in (_grants(policies) or {}).items():
        unknown = set(names) - set(config.servers)
        if unknown:
            raise ConfigError(f"tenant {tenant}: upstreams {sorted(unknown)} are not in the tools config {path}")
    return config


async def start_gateway(
    settings: Any, policies: dict[str, Any] | None, task_group: anyio.abc.TaskGroup
) -> Gateway | None:
    """The server's gateway from its settings (None when no tools are configured or the
    profile offers none), connected to its upstreams. The one call start-up needs."""
    if not settings.tools_enabled:
        return None
    config = check_tools_config(Path(settings.tools_config), policies)
    gateway = Gateway(config, task_group, _grants(policies), settings.tenant)
    await gateway.start()
    return gateway
