"""Programmatic tool calling without Docker: the tools config, the gateway's checks against a
real upstream (server-memory over stdio, from scripts/setup.sh), hostile tool frames on the
agent connection, the agent's decoding of what user code sends, and the in-sandbox module's
argument checks."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mcp_codeexec.agent import mcp_tools
from mcp_codeexec.agent import protocol as p
from mcp_codeexec.agent.client import AgentClient, AgentDied, Bounds, CommandTools
from mcp_codeexec.agent.toolchannel import _decode
from mcp_codeexec.errors import ConfigError
from mcp_codeexec.upstream import Gateway, ToolLimits, ToolsConfig, load_tools_config

from .test_agent_client import MemoryStream, frame

pytestmark = pytest.mark.anyio
REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, config: Any, name: str = "tools.json") -> Path:
    path = tmp_path / name
    path.write_text(config if isinstance(config, str) else json.dumps(config))
    return path


# --- the config ----------------------------------------------------------------------------


def test_config_json_and_toml(tmp_path: Path) -> None:
    toml = write(tmp_path, """
[limits]
call_timeout = 5
[servers.memory]
command = "node"
args = ["x.js"]
env = { A = "b" }
tools = "*"
[servers.search]
url = "http://127.0.0.1:1/mcp"
headers = { Authorization = "Bearer t" }
tools = ["find"]
""", "tools.toml")
    config = load_tools_config(toml)
    assert config.limits.call_timeout == 5 and config.limits.max_calls_per_command == 1000
    assert config.servers["memory"].tools is None and config.servers["memory"].per_tenant
    assert config.servers["search"].tools == frozenset({"find"}) and not config.servers["search"].per_tenant
    same = load_tools_config(write(tmp_path, {"servers": {"memory": {"command": "node", "tools": "*"}}}))
    assert same.servers["memory"].command == "node"


@pytest.mark.parametrize(("config", "message"), [
    ({"servers": {"Memory": {"command": "x", "tools": "*"}}}, "must match"),
    ({"servers": {"call": {"command": "x", "tools": "*"}}}, "mcp_tools' own names"),
    ({"servers": {"json": {"command": "x", "tools": "*"}}}, "mcp_tools' own names"),
    ({"servers": {"m": {"command": "x"}}}, "tools is required"),
    ({"servers": {"m": {"command": "x", "tools": []}}}, "tools is required"),
    ({"servers": {"m": {"command": "x", "url": "http://a", "tools": "*"}}}, "either command"),
    ({"servers": {"m": {"url": "file:///etc/passwd", "tools": "*"}}}, "http:// or https://"),
    ({"servers": {"m": {"url": "http://a", "args": [], "tools": "*"}}}, "for command servers"),
    ({"servers": {"m": {"command": "x", "tools": "*", "bogus": 1}}}, "unknown keys"),
    ({"servers": {}, "limits": {"call_timeout": 0}}, "positive"),
    ({"servers": {}, "limits": {"max_calls_per_command": 1.5}}, "positive int"),
    ({"servers": {}, "limits": {"nope": 1}}, "unknown keys"),
    ({"tools": {}}, "expected"),
    ("{not json", "not valid JSON"),
])
def test_config_errors_say_what_is_wrong(tmp_path: Path, config: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_tools_config(write(tmp_path, config))


# --- the gateway against a real upstream -------------------------------------------------------


def memory_server(tmp_path: Path, tools: Any = "*") -> dict[str, Any]:
    pointer = REPO / ".cache" / "upstreams"
    if not pointer.exists():
        pytest.fail("the upstream MCP servers are not installed: run scripts/setup.sh")
    script = Path(pointer.read_text().strip()) / "npm/node_modules/@modelcontextprotocol/server-memory/dist/index.js"
    return {"command": "node", "args": [str(script)], "env": {"MEMORY_FILE_PATH": str(tmp_path / "{tenant}.jsonl")},
            "tools": tools}


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[Gateway]:
    path = write(tmp_path, {"servers": {"memory": memory_server(tmp_path, ["create_entities", "read_graph"])},
                            "limits": {"max_calls_per_command": 3, "max_argument_bytes": 2000, "max_result_bytes": 2500}})
    async with anyio.create_task_group() as tg:
        gw = Gateway(load_tools_config(path), tg, {"alice": ["memory"], "bob": ["memory"], "carol": []}, "alice")
        await gw.start()
        yield gw
        gw.close()
        tg.cancel_scope.cancel()


def request(tool: str, arguments: dict[str, Any] | None = None, server: str = "memory", call: int = 1) -> p.ToolRequest:
    return p.ToolRequest(call=call, op="call", server=server, tool=tool, arguments=arguments or {})


def entity(name: str, note: str = "") -> dict[str, Any]:
    return {"entities": [{"name": name, "entityType": "t", "observations": [note] if note else []}]}


async def test_gateway_checks_every_call(gateway: Gateway) -> None:
    cmd = CommandTools(1)
    ok = await gateway.call("alice", "c", request("read_graph"), cmd)
    assert ok.ok and ok.result == {"entities": [], "relations": []}
    for tenant, req, code, text in [
        ("carol", request("read_graph"), "refused", "no MCP server 'memory' here (servers: none)"),
        ("mallory", request("read_graph"), "refused", "no MCP server 'memory' here"),
        ("alice", request("read_graph", server="other"), "refused", "no MCP server 'other'"),
        ("alice", request("delete_entities"), "refused", "not allowed here"),
        ("alice", request("create_entities", {"entities": "nope"}), "invalid_arguments", "is not of type 'array'"),
        ("alice", request("create_entities", entity("x" * 3000)), "invalid_arguments", "at most 2000"),
    ]:
        reply = await gateway.call(tenant, "c", req, CommandTools(2))
        assert (reply.ok, reply.code) == (False, code) and text in reply.message, (tenant, req, reply)
    # per command: at most 3 calls (refusals above were not counted against command 1)
    assert (await gateway.call("alice", "c", request("create_entities", entity("a", "n" * 1300)), cmd)).ok
    assert (await gateway.call("alice", "c", request("create_entities", entity("b", "n" * 1300)), cmd)).ok
    over = await gateway.call("alice", "c", request("read_graph"), cmd)
    assert (over.ok, over.code) == (False, "limit") and "over 3 tool calls" in over.message
    big = await gateway.call("alice", "c", request("read_graph"), CommandTools(3))  # two 1300-byte notes, and more
    assert (big.ok, big.code) == (False, "limit") and "over the 2500-byte limit" in big.message
    report = gateway.report("alice")
    assert report["tools"]["memory.read_graph"]["calls"] == 3 and report["tools"]["(refused)"]["calls"] == 2


async def test_each_tenant_has_its_own_stdio_upstream(gateway: Gateway) -> None:
    assert (await gateway.call("alice", "c", request("create_entities", entity("alice-only")), CommandTools(1))).ok
    bob = await gateway.call("bob", "c", request("read_graph"), CommandTools(2))
    assert bob.ok and bob.result == {"entities": [], "relations": []}
    assert "memory" in gateway.catalog("bob") and gateway.catalog("carol") == {}
    assert gateway.describe("carol") == "" and "`read_graph()`" in gateway.describe("alice")


async def test_unknown_grants_are_a_config_error(tmp_path: Path) -> None:
    config = ToolsConfig({}, ToolLimits())
    async with anyio.create_task_group() as tg:
        with pytest.raises(ConfigError, match="not in the tools config"):
            Gateway(config, tg, {"alice": ["memory"]})


# --- tool frames on the agent connection ---------------------------------------------------


class Stream(MemoryStream):
    """The scripted agent stream, in objects: what the client sent is kept decoded, and
    push() frames an object."""

    def __init__(self) -> None:
        super().__init__([])
        self.sent: list[Any] = []  # type: ignore[assignment]

    async def send(self, data: bytes) -> None:
        await super().send(data)
        self.sent[-1] = json.loads(data[4:])

    def push(self, obj: Any) -> None:  # type: ignore[override]
        super().push(frame(obj))


HELLO = {"kind": "hello", "body": {"agent": None, "protocol": p.PROTOCOL_VERSION}}
EXEC = p.Exec(command="true", cwd="/workspace", timeout=5, max_output=100, tools=True)
RESULT = {"stdout": "", "stderr": "", "return_code": 0, "timed_out": False, "cancelled": False,
          "stdout_bytes": 0, "stderr_bytes": 0, "duration": 0.1}


async def running(stream: Stream) -> int:
    """The id of the request the client sent (once it has)."""
    while not stream.sent:
        await anyio.sleep(0.01)
    return int(stream.sent[0]["id"])


async def test_a_tool_frame_is_answered_and_ends_with_its_command() -> None:
    stream, seen, cancelled = Stream(), [], anyio.Event()

    async def on_tool(req: p.ToolRequest, command: CommandTools) -> p.ToolReply:
        seen.append(req)
        if req.tool == "forever":
            try:
                await anyio.sleep_forever()
            finally:
                cancelled.set()
        return p.ToolReply(call=req.call, ok=True, result={"echo": req.arguments})

    stream.push(HELLO)
    client = AgentClient(stream, Bounds("/workspace"), on_tool)
    async with anyio.create_task_group() as tg:
        tg.start_soon(client.serve)

        async def script() -> None:
            rid = await running(stream)
            stream.push({"id": 999, "kind": "tool", "body": {"call": 1, "op": "call", "server": "m", "tool": "x"}})
            stream.push({"id": rid, "kind": "tool", "body": {"call": 7, "op": "call", "server": "m", "tool": "t",
                                                             "arguments": {"a": 1}}})
            stream.push({"id": rid, "kind": "tool", "body": {"call": 8, "op": "call", "server": "m", "tool": "forever"}})
            while len(stream.sent) < 2:
                await anyio.sleep(0.01)
            stream.push({"id": rid, "kind": "result", "body": RESULT})

        tg.start_soon(script)
        with anyio.fail_after(5):
            assert isinstance(await client.request(EXEC), p.ExecResult)
            await cancelled.wait()  # the command ended: its pending call was cancelled
        await stream.aclose()
    assert [r.call for r in seen] == [7, 8]  # the frame for an unknown command was dropped
    assert stream.sent[1] == {"id": stream.sent[1]["id"], "op": "tool_reply",
                              "args": {"call": 7, "ok": True, "result": {"echo": {"a": 1}}, "code": "", "message": ""}}
    assert "malformed" not in client.death


BAD_TOOL_BODIES = [
    {"call": -1, "op": "call"},
    {"call": 1, "op": "delete"},
    {"call": 1, "op": "call", "server": "x" * 300},
    {"call": 1, "op": "call", "arguments": []},
    {"call": True, "op": "call"},
    {"call": 1, "op": "call", "extra": 1},
    "not an object",
]


@pytest.mark.parametrize("body", BAD_TOOL_BODIES)
async def test_a_malformed_tool_frame_ends_the_connection(body: Any) -> None:
    stream = Stream()
    stream.push(HELLO)
    client = AgentClient(stream, Bounds("/workspace"))
    async with anyio.create_task_group() as tg:
        tg.start_soon(client.serve)

        async def script() -> None:
            stream.push({"id": await running(stream), "kind": "tool", "body": body})

        tg.start_soon(script)
        with anyio.fail_after(5), pytest.raises(AgentDied):
            await client.request(EXEC)
    assert "malformed" in client.death


async def test_a_tool_frame_from_a_request_that_runs_no_code_ends_the_connection() -> None:
    stream = Stream()
    stream.push(HELLO)
    client = AgentClient(stream, Bounds("/workspace"))
    async with anyio.create_task_group() as tg:
        tg.start_soon(client.serve)

        async def script() -> None:
            stream.push({"id": await running(stream), "kind": "tool", "body": {"call": 1, "op": "list"}})

        tg.start_soon(script)
        with anyio.fail_after(5), pytest.raises(Exception, match="tool call from a edit request"):
            await client.request(p.Edit(command="view", path="/workspace/x"))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(["call", "op", "server", "tool", "arguments", "x"]),
                       st.none() | st.booleans() | st.integers() | st.text(max_size=5) | st.dictionaries(st.text(max_size=3), st.integers()),
                       max_size=5))
async def test_any_tool_body_is_answered_or_ends_the_connection(body: dict[str, Any]) -> None:
    stream = Stream()
    stream.push(HELLO)

    async def on_tool(req: p.ToolRequest, command: CommandTools) -> p.ToolReply:
        return p.ToolReply(call=req.call, ok=False, code="refused", message="no")

    client = AgentClient(stream, Bounds("/workspace"), on_tool)
    async with anyio.create_task_group() as tg:
        tg.start_soon(client.serve)

        async def script() -> None:
            rid = await running(stream)
            stream.push({"id": rid, "kind": "tool", "body": body})
            with anyio.move_on_after(0.3):
                while len(stream.sent) < 2 and not client.closed.is_set():
                    await anyio.sleep(0.01)
            stream.push({"id": rid, "kind": "result", "body": RESULT})

        tg.start_soon(script)
        with anyio.fail_after(5):
            try:
                await client.request(EXEC)
            except Exception as exc:  # noqa: BLE001 - AgentDied when the body was malformed
                assert client.closed.is_set() and "malformed" in client.death, exc
        await stream.aclose()


# --- what user code sends to the agent, and the in-sandbox module --------------------------------


@pytest.mark.parametrize(("body", "ok"), [
    (b'{"op": "list"}', True),
    (b'{"op": "call", "server": "m", "tool": "t", "arguments": {}}', True),
    (b'{"op": "call", "server": "m", "tool": "t", "arguments": []}', False),
    (b'{"op": "call", "server": "", "tool": "t", "arguments": {}}', False),
    (b'{"op": "list", "x": 1}', False),
    (b'[' * 100_000, False),
    (b'\xff', False),
])
def test_agent_decodes_caller_requests_strictly(body: bytes, ok: bool) -> None:
    assert isinstance(_decode(body), dict) is ok


SCHEMA = {"type": "object", "required": ["name", "count"], "additionalProperties": False, "properties": {
    "name": {"type": "string", "minLength": 1}, "count": {"type": "integer", "minimum": 0},
    "tags": {"type": "array", "items": {"enum": ["a", "b"]}}, "max-results": {"type": "number"}}}


def test_generated_functions_check_arguments_before_calling(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(mcp_tools, "_exchange", lambda req: calls.append(req) or "done")
    fn = mcp_tools._make_function("srv", {"name": "do-it", "description": "Does it.", "input_schema": SCHEMA})
    assert fn.__name__ == "do_it" and "Does it." in (fn.__doc__ or "")
    assert fn("x", 2, tags=["a"], **{"max-results": 3}) == "done"
    assert calls[-1]["arguments"] == {"name": "x", "count": 2, "tags": ["a"], "max-results": 3}
    for args, kwargs, message in [
        ((), {"name": "x"}, "missing a required argument: 'count'"),
        (("x", True), {}, "arguments.count: expected int, got bool"),
        (("", 1), {}, "at least 1 characters"),
        (("x", -1), {}, "at least 0"),
        (("x", 1), {"tags": ["c"]}, "must be one of"),
        (("x", 1), {"bogus": 1}, "unexpected 'bogus'"),
    ]:
        with pytest.raises(mcp_tools.ToolError, match=message) as info:
            fn(*args, **kwargs)
        assert info.value.code == "invalid_arguments"
    assert len(calls) == 1  # none of the bad ones reached the channel
    assert mcp_tools.python_name("class") == "class_" and mcp_tools.python_name("2x-y") == "_2x_y"


def test_no_channel_is_a_tool_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(mcp_tools.ENV, raising=False)
    with pytest.raises(mcp_tools.ToolError) as info:
        mcp_tools.call("m", "t")
    assert info.value.code == "no_channel"
    monkeypatch.setenv(mcp_tools.ENV, "mcp-codeexec-tools-nobody-listens-here")
    with pytest.raises(mcp_tools.ToolError, match="closed") as info:
        mcp_tools.call("m", "t")
    assert info.value.code == "no_channel"
