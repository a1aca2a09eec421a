"""server.py: the MCP surface (tools, resources, prompts) in this process, over the local
backend, driven by the `mcp` SDK's client."""

from __future__ import annotations

import base64
import json

import pytest
from mcp.shared.exceptions import MCPError

from mcp_codeexec import wire
from mcp_codeexec.prompt import PROMPT_NAME, PROMPT_URI
from mcp_codeexec.server import CONTAINERS_URI, FILES_URI, USAGE_URI, tool_list
from unit.conftest import local_settings, mcp_session

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    ("profile", "names"),
    [("20250825", [wire.BASH_TOOL, wire.EDITOR_TOOL]), ("20260120", [wire.BASH_TOOL, wire.EDITOR_TOOL, wire.CODE_TOOL]),
     ("20260521", [wire.BASH_TOOL, wire.EDITOR_TOOL, wire.CODE_TOOL]), ("20250522", [wire.CODE_TOOL])],
)
def test_tool_list_follows_the_profile(base: str, profile: str, names: list[str]) -> None:
    s = local_settings(base, profile=profile, timeout=11, cell_timeout=22)
    tools = tool_list(s)
    assert [t.name for t in tools] == names
    schemas = {wire.BASH_TOOL: (wire.BASH_INPUT_SCHEMA, wire.BASH_OUTPUT_SCHEMA),
               wire.EDITOR_TOOL: (wire.EDITOR_INPUT_SCHEMA, wire.EDITOR_OUTPUT_SCHEMA),
               wire.CODE_TOOL: (wire.CODE_INPUT_SCHEMA, wire.CODE_OUTPUT_SCHEMA)}
    for tool in tools:
        assert (tool.input_schema, tool.output_schema) == schemas[tool.name]
        assert s.workdir in (tool.description or "")
    code = next((t.description or "" for t in tools if t.name == wire.CODE_TOOL), "")
    if profile == "20260521":
        assert "at most 22 s of wall-clock time" in code
    elif profile == "20260120":
        assert "Time limit 11 s per cell" in code
    elif profile == "20250522":
        assert "fresh Python interpreter" in code


async def test_tools_resources_and_prompts_over_mcp(base: str) -> None:
    async with mcp_session(local_settings(base)) as s:
        assert [t.name for t in (await s.client.list_tools()).tools] == [wire.BASH_TOOL, wire.EDITOR_TOOL]
        with pytest.raises(MCPError, match="unknown tool 'code_execution'"):
            await s.client.call_tool(wire.CODE_TOOL, {"code": "1"})
        # Nothing yet: no files, no usage, no containers.
        assert await read_json(s, FILES_URI) == {"files": []}
        assert await read_json(s, CONTAINERS_URI) == {"containers": []}
        r, _ = await s.call_full(wire.BASH_TOOL, {"command": "printf 'x,y\\n' > out.csv"})
        [entry] = r["content"]
        cid = s.last_meta["container"]["id"]
        listed = (await s.client.list_resources()).resources
        uris = [str(res.uri) for res in listed]
        assert uris[:4] == [PROMPT_URI, CONTAINERS_URI, USAGE_URI, FILES_URI]
        assert uris[4:] == [f"{FILES_URI}/{entry['file_id']}"] and listed[4].name == "out.csv" and listed[4].size == 4
        [template] = (await s.client.list_resource_templates()).resource_templates
        assert template.uri_template == f"{FILES_URI}/{{file_id}}"
        blob = (await s.client.read_resource(f"{FILES_URI}/{entry['file_id']}")).contents[0]
        assert base64.b64decode(blob.blob) == b"x,y\n" and blob.mime_type == "text/csv"
        [meta] = (await read_json(s, FILES_URI))["files"]
        assert (meta["id"], meta["filename"], meta["container_id"]) == (entry["file_id"], "out.csv", cid)
        [container] = (await read_json(s, CONTAINERS_URI))["containers"]
        assert container["id"] == cid and container["state"] == "running"
        usage = await read_json(s, USAGE_URI)
        assert usage["code_execution_requests"] == 1 and usage["containers"][0]["id"] == cid  # not the unknown tool
        for bad in (f"{FILES_URI}/file_{'x' * 24}", "codeexec://nothing"):
            with pytest.raises(MCPError):
                await s.client.read_resource(bad)
        prompt_text = (await s.client.read_resource(PROMPT_URI)).contents[0].text
        assert "NO isolation" in prompt_text and local_settings(base).workdir in prompt_text
        [prompt] = (await s.client.list_prompts()).prompts
        assert prompt.name == PROMPT_NAME
        got = await s.client.get_prompt(PROMPT_NAME)
        assert got.messages[0].content.text == prompt_text
        with pytest.raises(MCPError, match="unknown prompt"):
            await s.client.get_prompt("other")


async def read_json(s: object, uri: str) -> dict:
    contents = (await s.client.read_resource(uri)).contents[0]  # type: ignore[attr-defined]
    assert contents.mime_type == "application/json"
    return json.loads(contents.text)
