"""Container handles (--container-handles) and which calls share a sandbox, per protocol era
and transport: the `mcp` SDK's 2026-07-28 client (stateless) over Streamable HTTP, its
handshake-era client over SSE, and stdio. Real server processes, real Docker, real gVisor;
every result validated strictly (conftest.Session)."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx2
import pytest
from conftest import TENANT, Session, connect, http_server
from mcp.client import Client
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client

from mcp_codeexec import wire

pytestmark = pytest.mark.anyio

ARGS = ("--timeout", "20", "--memory", "1g", "--no-prepare")
TOKENS = {TENANT: "token-handles-a-" + "a" * 16, f"{TENANT}-b": "token-handles-b-" + "b" * 16}
A, B = TOKENS.values()
NO_SUCH = "container_" + "Z" * 24


@pytest.fixture(scope="module")
def handles(engine, tmp_path_factory) -> Iterator[str]:
    """A server with --container-handles and two tenants."""
    tokens = tmp_path_factory.mktemp("tokens") / "tokens.json"
    tokens.write_text(json.dumps({"tenants": {t: {"token_sha256": hashlib.sha256(k.encode()).hexdigest()}
                                              for t, k in TOKENS.items()}}))
    with http_server("--container-handles", "--tokens", str(tokens), *ARGS) as base:
        yield base


@pytest.fixture(scope="module")
def plain(engine) -> Iterator[str]:
    """A server as deployed by default (no handles, no tokens)."""
    with http_server(*ARGS) as base:
        yield base


def auth(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


@asynccontextmanager
async def stateless(base: str, token: str | None = A) -> AsyncIterator[Session]:
    """The SDK's default client: protocol 2026-07-28, no session."""
    http = httpx2.AsyncClient(headers=auth(token), timeout=60)
    async with Client(streamable_http_client(f"{base}/mcp", http_client=http)) as client:
        yield Session(client)


@asynccontextmanager
async def over_sse(base: str, token: str | None = A) -> AsyncIterator[Session]:
    """A handshake-era session over SSE."""
    async with Client(sse_client(f"{base}/sse", headers=auth(token)), mode="legacy") as client:
        yield Session(client)


async def bash(session: Session, command: str, container: str | None = None, **kwargs: Any) -> tuple[dict[str, Any], str | None]:
    """(the result, the handle its text block names, checked against `_meta`)."""
    arguments = {"command": command} | ({"container": container} if container else {})
    structured, result = await session.call_full("bash_code_execution", arguments, **kwargs)
    named = [b.text for b in result.content[1:] if getattr(b, "type", "") == "text"]
    if not named:
        return structured, None
    [line] = named
    match = re.fullmatch(r'container: (container_\w{24}) \(pass "container": "\1" to keep working in this sandbox\)', line)
    assert match, line
    assert match.group(1) == (result.meta or {})["container"]["id"]
    return structured, match.group(1)


async def test_stateless_conversations_are_apart_and_handles_thread_them(handles):
    async with stateless(handles) as one, stateless(handles) as two:
        r, first = await bash(one, "echo one > mine.txt; ls")
        assert r["return_code"] == 0 and first
        r, second = await bash(two, "ls")
        assert second != first and "mine.txt" not in r["stdout"]  # a new container, its own files
        r, again = await bash(one, "ls")  # no handle: a new container again, as in the API
        assert again not in (first, second) and "mine.txt" not in r["stdout"]
        r, same = await bash(one, "cat mine.txt", container=first)  # threading the handle continues
        assert (r["stdout"], same) == ("one\n", first)
    # Two sub-agents (two clients) handed one handle share a sandbox both ways.
    async with stateless(handles) as left, stateless(handles) as right:
        await bash(left, "echo left > shared.txt", container=first)
        r, _ = await bash(right, "cat shared.txt mine.txt; echo right >> shared.txt", container=first)
        assert r["stdout"] == "left\none\n"
        r, _ = await bash(left, "cat shared.txt", container=first)
        assert r["stdout"] == "left\nright\n"


async def test_foreign_or_unknown_handles_are_expired(handles):
    async with stateless(handles, A) as a, stateless(handles, B) as b:
        _, mine = await bash(a, "true")
        for handle in (mine, NO_SUCH, "not-an-id"):  # another tenant's id is like one that never was
            structured, _ = await bash(b, "true", container=handle)
            assert structured == {"type": "bash_code_execution_tool_result_error", "error_code": "container_expired"}
        structured, _ = await b.call_full("bash_code_execution", {"command": "true", "container": 7})
        assert structured["error_code"] == "invalid_tool_input"


async def test_every_tool_takes_a_handle_and_says_so(handles):
    async with stateless(handles) as s:
        tools = {t.name: t for t in (await s.client.list_tools()).tools}
        for name, schema in ((wire.BASH_TOOL, wire.BASH_INPUT_SCHEMA), (wire.EDITOR_TOOL, wire.EDITOR_INPUT_SCHEMA)):
            published = tools[name].input_schema
            assert published["properties"]["container"]["type"] == "string"
            assert {k: v for k, v in published["properties"].items() if k != "container"} == schema["properties"]
            assert published["required"] == schema["required"]
            assert "pass that id as `container`" in tools[name].description
        _, handle = await bash(s, "echo hi > h.txt")
        structured, result = await s.call_full(wire.EDITOR_TOOL, {"command": "view", "path": "h.txt", "container": handle})
        assert structured["content"] == "hi\n" and result.meta["container"]["id"] == handle


async def test_without_the_option_nothing_published_changes_and_meta_keeps_apart(plain):
    async with stateless(plain) as s:
        tools = {t.name: t for t in (await s.client.list_tools()).tools}
        assert tools[wire.BASH_TOOL].input_schema == wire.BASH_INPUT_SCHEMA
        assert tools[wire.EDITOR_TOOL].input_schema == wire.EDITOR_INPUT_SCHEMA
        assert "container" not in tools[wire.BASH_TOOL].description
        r, named = await bash(s, "echo x")
        assert named is None  # no extra text block
        # Stateless calls share the tenant's default container; _meta.container keeps
        # conversations apart (documented in the README).
        default = s.last_meta["container"]["id"]
    async with stateless(plain) as one, stateless(plain) as two:
        await bash(one, "echo one > conv.txt")
        assert one.last_meta["container"]["id"] == default
        # A second conversation: start it in a container of its own, then name it in _meta.
        async with over_sse(plain, None) as fresh:  # an SSE session gets a new container: use it as conversation two's
            await bash(fresh, "true")
            own = fresh.last_meta["container"]["id"]
        r, _ = await bash(two, "ls conv.txt || echo absent", meta={"container": own})
        assert r["stdout"].strip() == "absent" and two.last_meta["container"]["id"] == own
        r, _ = await bash(one, "cat conv.txt", meta={"container": default})
        assert r["stdout"] == "one\n"
        # An argument named container is ignored without the option (unknown keys are).
        r, _ = await bash(one, "cat conv.txt", container=own)
        assert r["stdout"] == "one\n" and one.last_meta["container"]["id"] == default


async def test_handshake_sessions_keep_their_container_and_the_argument_overrides(handles):
    async with stateless(handles) as s:
        _, other = await bash(s, "echo other > which.txt")
    async with over_sse(handles) as sse:
        r, home = await bash(sse, "echo home > which.txt")
        _, again = await bash(sse, "cat which.txt")
        assert again == home  # the session's container, without a handle
        r, there = await bash(sse, "cat which.txt", container=other)
        assert (r["stdout"], there) == ("other\n", other)
        r, back = await bash(sse, "cat which.txt")
        assert (r["stdout"], back) == ("home\n", home)
    async with connect("--container-handles", *ARGS) as stdio:  # same tenant, same engine
        r, home = await bash(stdio, "echo stdio > which.txt")
        r, there = await bash(stdio, "cat which.txt", container=other)
        assert (r["stdout"], there) == ("other\n", other)
        r, back = await bash(stdio, "cat which.txt")
        assert (r["stdout"], back) == ("stdio\n", home)
