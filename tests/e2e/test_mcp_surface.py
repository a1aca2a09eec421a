"""The MCP surface: tool schemas, the system prompt, container identity, availability."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest
from conftest import connect
from mcp.shared.exceptions import MCPError
from mcp_types import INVALID_PARAMS

pytestmark = pytest.mark.anyio


async def test_tools_and_schemas(sandbox):
    tools = {t.name: t for t in (await sandbox.client.list_tools()).tools}
    assert set(tools) == {"bash_code_execution", "text_editor_code_execution"}
    assert tools["bash_code_execution"].input_schema["required"] == ["command"]
    editor = tools["text_editor_code_execution"].input_schema
    assert editor["properties"]["command"]["enum"] == ["view", "create", "str_replace"]
    assert editor["required"] == ["command", "path"]
    for tool in tools.values():
        assert tool.output_schema["type"] == "object" and "anyOf" in tool.output_schema


async def test_system_prompt_resource_and_prompt(sandbox):
    resources = (await sandbox.client.list_resources()).resources
    assert [str(r.uri) for r in resources][:4] == ["codeexec://system-prompt", "codeexec://containers", "codeexec://usage", "codeexec://files"]
    text = (await sandbox.client.read_resource("codeexec://system-prompt")).contents[0].text
    for fact in ("do not carry", "/workspace", "5 seconds", "No network", "Python 3.11", "1 GiB", "gVisor"):
        assert fact in text, fact
    prompt = await sandbox.client.get_prompt("code_execution_system_prompt")
    assert prompt.messages[0].content.text == text


async def test_container_meta(sandbox):
    await sandbox.bash("true")
    first = sandbox.last_meta["container"]
    await sandbox.edit(command="view", path=".")
    assert sandbox.last_meta["container"] == first  # one container per session
    assert first["id"].startswith("container_")
    expires = datetime.fromisoformat(first["expires_at"].replace("Z", "+00:00"))
    assert timedelta(days=29) < expires - datetime.now(UTC) <= timedelta(days=30)


async def test_missing_image_answers_unavailable(engine):
    """...and each refused create leaves no workspace volume behind (it is made first)."""
    before = {v["Name"] for v in engine.volumes()["Volumes"] or []}
    async with connect("--image", "mcp-codeexec-no-such-image:0") as s:
        r = await s.bash("true")
        assert r == {"type": "bash_code_execution_tool_result_error", "error_code": "unavailable"}
        r = await s.edit(command="view", path=".")
        assert r["error_code"] == "unavailable" and "mcp-codeexec-no-such-image:0" in r["error_message"]
    made = {v["Name"] for v in engine.volumes()["Volumes"] or []} - before
    assert not {v for v in made if v.startswith("mcp-codeexec-ws.")}, made


def test_runc_needs_explicit_opt_in():
    r = subprocess.run([sys.executable, "-m", "mcp_codeexec", "--runtime", "runc"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "--allow-weak-isolation" in r.stderr


async def test_unknown_tool_is_a_protocol_error(sandbox):
    with pytest.raises(MCPError) as caught:
        await sandbox.client.call_tool("no_such_tool", {})
    assert caught.value.code == INVALID_PARAMS and "no_such_tool" in caught.value.message
    assert (await sandbox.bash("echo still-serving"))["stdout"] == "still-serving\n"


@pytest.mark.parametrize(
    ("meta", "code"),
    [
        ({"container": 5}, "invalid_tool_input"),
        ({"container": {"id": ["x"]}}, "invalid_tool_input"),
        ({"container": ["container_x"]}, "invalid_tool_input"),
        ({"container": "container_" + "Z" * 24}, "container_expired"),
        ({"container_upload": 5}, "invalid_tool_input"),
        ({"container_upload": ["file_" + "a" * 24]}, "file_not_found"),
        ({"container_upload": "file_nope"}, "file_not_found"),
        ({"container_upload": ["f"] * 101}, "invalid_tool_input"),
    ],
    ids=["container-int", "container-id-list", "container-list", "container-unknown", "upload-int",
         "upload-unknown", "upload-bad-id", "upload-too-many"],
)
async def test_bad_meta_is_a_typed_error_result(sandbox, meta, code):
    """A request's _meta that is wrong in any way answers a typed error, never a protocol
    error, and never runs the call somewhere else (issue #10)."""
    r = await sandbox.call("text_editor_code_execution", {"command": "view", "path": "."}, meta=meta)
    assert r["type"] == "text_editor_code_execution_tool_result_error" and r["error_code"] == code, r
    # bash has no file_not_found: a missing upload is bad input to it.
    r = await sandbox.bash("echo ran", meta=meta)
    assert r == {"type": "bash_code_execution_tool_result_error",
                 "error_code": "invalid_tool_input" if code == "file_not_found" else code}
    assert (await sandbox.bash("echo still-serving"))["stdout"] == "still-serving\n"
