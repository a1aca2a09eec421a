"""Programmatic tool calling (issue 14): code in a gVisor sandbox calls the tools of real
upstream MCP servers (installed by scripts/setup.sh): `@modelcontextprotocol/server-memory`
and `mcp-server-time` over stdio, `@modelcontextprotocol/server-everything` over Streamable
HTTP on loopback (and over stdio as `slow`, whose process the tests kill). Real server
process, real MCP clients, real Docker and gVisor."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from conftest import TENANT, Session, connect, free_port, http_server, server_pids, wait_for
from mcp.client import Client
from mcp.client.streamable_http import streamable_http_client

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = "20"


def upstreams() -> Path:
    pointer = REPO / ".cache" / "upstreams"
    if not pointer.exists():
        pytest.fail("the upstream MCP servers are not installed: run scripts/setup.sh")
    path = Path(pointer.read_text().strip())
    assert (path / ".done").exists(), f"{path}: incomplete install; run scripts/setup.sh"
    return path


def everything_js() -> str:
    return str(upstreams() / "npm/node_modules/@modelcontextprotocol/server-everything/dist/index.js")


@pytest.fixture(scope="module")
def everything_http() -> Iterator[str]:
    """server-everything in its Streamable HTTP mode, bound to 127.0.0.1 only."""
    port = free_port()
    proc = subprocess.Popen(
        ["node", "--require", str(REPO / "tests/upstreams/loopback.cjs"), everything_js(), "streamableHttp"],
        env={**os.environ, "PORT": str(port)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert proc.poll() is None, "server-everything exited"
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def tools_config(tmp_path_factory: pytest.TempPathFactory, everything_http: str) -> Path:
    base, directory = upstreams(), tmp_path_factory.mktemp("tools")
    memory = base / "npm/node_modules/@modelcontextprotocol/server-memory/dist/index.js"
    config = {
        "limits": {"call_timeout": 15},
        "servers": {
            "memory": {  # every tool but delete_entities
                "command": "node", "args": [str(memory)],
                "env": {"MEMORY_FILE_PATH": str(directory / "memory-{tenant}.jsonl")},
                "tools": ["create_entities", "read_graph", "search_nodes", "add_observations"],
            },
            "time": {"command": str(base / "venv/bin/mcp-server-time"), "tools": "*"},
            "everything": {"url": everything_http, "tools": ["echo", "get-sum", "get-structured-content"]},
            "slow": {"command": "node", "args": [everything_js(), "stdio"],
                     "tools": ["trigger-long-running-operation", "echo"]},
        },
    }
    path = directory / "tools.json"
    path.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
async def ptc(engine: Any, tools_config: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Session]:
    """The default profile (20250825): tools from scripts and the CLI. Its log is kept."""
    log = tmp_path_factory.mktemp("log") / "server.log"
    with open(log, "w") as errlog:
        async with connect("--tools-config", str(tools_config), "--timeout", TIMEOUT, "--memory", "1g",
                           "--cell-timeout", "91.25", errlog=errlog) as session:
            session.log = log  # type: ignore[attr-defined]
            yield session


async def py(session: Session, code: str) -> dict[str, Any]:
    """Run a Python script through bash (the 20250825 way)."""
    return await session.bash(f"python3 - <<'EOF'\n{code}\nEOF")


async def test_the_model_is_told_which_tools_it_can_call(ptc: Session) -> None:
    tools = {t.name: t for t in (await ptc.client.list_tools()).tools}
    description = tools["bash_code_execution"].description or ""
    assert "from mcp_tools import" in description and "memory (" in description and "Results stay in the sandbox" in description
    prompt = (await ptc.client.read_resource("codeexec://system-prompt")).contents[0].text  # type: ignore[union-attr]
    assert "## Tools your code can call" in prompt
    for signature in ("`read_graph()`", "`get_current_time(timezone: str)`", "`get_sum(a: float, b: float)`"):
        assert signature in prompt
    assert "delete_entities" not in prompt and "get_env" not in prompt  # outside the allow-lists


async def test_a_script_calls_tools_and_a_pipeline_uses_the_cli(ptc: Session) -> None:
    result = await py(ptc, """
from mcp_tools import memory
memory.create_entities(entities=[{"name": "ada", "entityType": "person", "observations": ["wrote the first program"]}])
graph = memory.read_graph()
print([e["name"] for e in graph["entities"]])
""")
    assert result["stdout"] == "['ada']\n", result
    result = await ptc.bash(
        "mcp-tool memory read_graph '{}' | python3 -c 'import json, sys; print(len(json.load(sys.stdin)[\"entities\"]))'"
        " && echo '{\"timezone\": \"UTC\"}' | mcp-tool time get_current_time - | grep -o '\"timezone\": \"UTC\"'"
    )
    assert result["stdout"] == '1\n"timezone": "UTC"\n', result
    result = await ptc.bash("mcp-tool everything get-sum '{\"a\": 2, \"b\": 40}'")
    assert result["stdout"] == "The sum of 2 and 40 is 42.\n", result


async def test_a_tool_that_errors_raises_the_typed_exception(ptc: Session) -> None:
    result = await py(ptc, """
import mcp_tools
from mcp_tools import time
try:
    time.get_current_time(timezone="Not/AZone")
except mcp_tools.ToolError as e:
    print(e.code, "|", e.message)
try:
    time.get_current_time(timezone=5)  # checked before the call
except mcp_tools.ToolError as e:
    print(e.code, "|", e.message)
try:
    mcp_tools.call("time", "get_current_time", {"timezone": 5})  # unchecked here: the server checks
except mcp_tools.ToolError as e:
    print(e.code, "|", e.message)
""")
    lines = result["stdout"].splitlines()
    assert lines[0].startswith("tool_error | ") and "Not/AZone" in lines[0], result  # the upstream's message
    assert lines[1] == "invalid_arguments | arguments.timezone: expected str, got int", result
    assert lines[2].startswith("invalid_arguments | timezone: 5 is not of type 'string'"), result
    cli = await ptc.bash("mcp-tool time get_current_time '{\"timezone\": \"Not/AZone\"}'; echo status=$?")
    assert cli["stdout"] == "status=1\n" and cli["stderr"].startswith("mcp-tool: time.get_current_time: "), cli


async def test_a_tool_outside_the_allow_list_is_refused_without_reaching_the_upstream(ptc: Session) -> None:
    result = await py(ptc, """
import mcp_tools
from mcp_tools import memory
memory.create_entities(entities=[{"name": "keep", "entityType": "thing", "observations": []}])
for server, tool, args in [("memory", "delete_entities", {"entityNames": ["keep"]}), ("everything", "get-env", {}),
                           ("nowhere", "x", {})]:
    try:
        mcp_tools.call(server, tool, args)
        print("CALLED", server, tool)
    except mcp_tools.ToolError as e:
        print(e.code, "|", e.message)
print(sorted(e["name"] for e in memory.read_graph()["entities"]))
print(hasattr(memory, "delete_entities"))
""")
    lines = result["stdout"].splitlines()
    assert lines[0] == "refused | tool 'delete_entities' of memory is not allowed here", result
    assert lines[1] == "refused | tool 'get-env' of everything is not allowed here", result
    assert lines[2] == "refused | no MCP server 'nowhere' here (servers: everything, memory, slow, time)", result
    assert "keep" in lines[3] and lines[4] == "False", result  # never reached the upstream


def slow_upstream_pids() -> list[int]:
    """The `slow` upstream's processes (server-everything over stdio) of the ptc server."""
    (server,) = server_pids("91.25")
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == server and b"stdio" in cmdline and any(
                b"server-everything" in a for a in cmdline
            ):
                found.append(int(entry))
    return found


SLOW_CALL = """
import time, mcp_tools
from mcp_tools import slow
open("/workspace/{marker}", "w").close()
started = time.monotonic()
try:
    slow.trigger_long_running_operation(duration=30, steps=3)
    print("finished")
except mcp_tools.ToolError as e:
    print(e.code, "|", e.message, "| after", round(time.monotonic() - started), "s")
"""


async def test_killing_an_upstream_mid_call_gives_a_clean_error_and_the_next_call_reconnects(ptc: Session) -> None:
    await ptc.bash("rm -f /workspace/slow-started")
    before = slow_upstream_pids()
    assert len(before) == 1, before
    results: list[dict[str, Any]] = []

    async def call() -> None:
        results.append(await py(ptc, SLOW_CALL.format(marker="slow-started")))

    async with anyio.create_task_group() as tg:
        tg.start_soon(call)
        assert (await ptc.bash(wait_for("/workspace/slow-started")))["return_code"] == 0
        await anyio.sleep(1.0)  # the call is with the upstream now
        os.kill(before[0], signal.SIGKILL)
    (result,) = results
    assert result["stdout"].startswith("unavailable | slow: the upstream server closed the connection"), result
    assert int(result["stdout"].rsplit("| after ", 1)[1].split()[0]) < 10, result  # not the 30 s of the tool
    again = await py(ptc, "from mcp_tools import slow\nprint(slow.echo(message='back'))")
    assert again["stdout"] == "Echo: back\n", again
    after = slow_upstream_pids()
    assert len(after) == 1 and after != before


async def test_a_cancelled_command_stops_its_pending_tool_calls(ptc: Session) -> None:
    await ptc.bash("rm -f /workspace/cancel-started")
    log: Path = ptc.log  # type: ignore[attr-defined]
    mark = len(log.read_text())
    with anyio.move_on_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(py, ptc, SLOW_CALL.format(marker="cancel-started"))
            assert (await ptc.bash(wait_for("/workspace/cancel-started")))["return_code"] == 0
            await anyio.sleep(1.0)
            cancelled_at = time.monotonic()
            tg.cancel_scope.cancel()  # the client cancels its call
    for _ in range(50):
        if "tool=slow.trigger-long-running-operation outcome=cancelled" in log.read_text()[mark:]:
            break
        await anyio.sleep(0.1)
    else:
        pytest.fail(f"the tool call was not cancelled: {log.read_text()[mark:][-2000:]}")
    assert time.monotonic() - cancelled_at < 5  # not the 30 s the tool would have taken
    assert (await ptc.bash("echo alive"))["stdout"] == "alive\n"


# --- the REPL profile ------------------------------------------------------------------


async def test_a_cell_calls_a_tool_100_times_and_prints_one_aggregate(engine: Any, tools_config: Path) -> None:
    async with connect("--tools-config", str(tools_config), "--profile", "20260120", "--timeout", TIMEOUT,
                       "--memory", "1g") as session:
        awaited = await session.python("""
from mcp_tools import everything
total = 0.0
for i in range(100):
    text = await everything.get_sum(a=i, b=i)   # "The sum of 3 and 3 is 6."
    total += float(text.rsplit(" ", 1)[1].rstrip("."))
print(f"100 calls, sum {total:g}")
""")
        assert awaited["stdout"] == "100 calls, sum 9900\n", awaited
        synchronous = await session.python(
            "weather = [everything.get_structured_content(location=c) for c in ['Chicago'] * 100]\n"
            "print(len(weather), sorted(weather[0]))"
        )
        assert synchronous["stdout"] == "100 ['conditions', 'humidity', 'temperature']\n", synchronous
        forgotten = await session.python("r = await everything.echo(message='x')\nprint(len(everything.echo(message='y')))")
        assert forgotten["return_code"] == 1 and "[not_awaited]" in forgotten["stderr"], forgotten


async def test_the_legacy_profile_offers_no_tools(engine: Any, tools_config: Path) -> None:
    async with connect("--tools-config", str(tools_config), "--profile", "20250522", "--memory", "1g") as session:
        result = await session.python("import mcp_tools")
        assert "ModuleNotFoundError" in result["stderr"], result
        prompt = (await session.client.read_resource("codeexec://system-prompt")).contents[0].text  # type: ignore[union-attr]
        assert "mcp_tools" not in prompt


# --- tenants over HTTP -------------------------------------------------------------------

TOKENS = {"a": "token-ptc-a-aaaaaaaaaaaaaaaaaaaa", "b": "token-ptc-b-bbbbbbbbbbbbbbbbbbbb"}


async def test_tenant_b_cannot_call_tenant_a_upstream(engine: Any, tools_config: Path, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.json"
    grants = {"a": ["memory", "time"], "b": ["time"]}
    tokens.write_text(json.dumps({"tenants": {
        f"{TENANT}-{role}": {"token_sha256": hashlib.sha256(token.encode()).hexdigest(), "upstreams": grants[role]}
        for role, token in TOKENS.items()
    }}))
    with http_server("--tokens", str(tokens), "--tools-config", str(tools_config), "--memory", "1g",
                     "--timeout", TIMEOUT) as base:

        async def run(role: str, code: str) -> str:
            http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {TOKENS[role]}"}, timeout=60)
            async with Client(streamable_http_client(f"{base}/mcp", http_client=http)) as client:
                session = Session(client)
                result = await py(session, code)
                prompt = (await client.read_resource("codeexec://system-prompt")).contents[0].text  # type: ignore[union-attr]
                return result["stdout"] + result["stderr"] + ("MEMORY-IN-PROMPT" if "`memory`" in prompt else "")

        a = await run("a", "from mcp_tools import memory\nmemory.create_entities(entities=[{'name': 'secret-a', "
                           "'entityType': 't', 'observations': []}])\nprint(memory.read_graph()['entities'][0]['name'])")
        assert a == "secret-a\nMEMORY-IN-PROMPT", a
        b = await run("b", """
import mcp_tools
print(mcp_tools.servers())
try:
    mcp_tools.call("memory", "read_graph")
except mcp_tools.ToolError as e:
    print(e.code, "|", e.message)
try:
    from mcp_tools import memory
except ImportError as e:
    print("ImportError")
""")
        assert b == "['time']\nrefused | no MCP server 'memory' here (servers: time)\nImportError\n", b
