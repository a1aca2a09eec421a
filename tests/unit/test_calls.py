"""calls.py: one call's path: _meta (container, container_upload), limits, metering, the MCP
result (structured + JSON text + inline images), progress, and errors as results."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from mcp_codeexec import calls, tools, wire
from mcp_codeexec.app import App
from mcp_codeexec.config import Settings
from mcp_codeexec.errors import InvalidToolInput
from unit.conftest import local_settings, mcp_session, workspace

pytestmark = pytest.mark.anyio
PNG = b"\x89PNG\r\n\x1a\n" + bytes(40)


def ctx(meta: dict[str, Any] | None = None, headers: dict[str, str] | None = None, query: dict[str, str] | None = None,
        protocol: str = "2025-06-18") -> Any:
    request = None if headers is None else SimpleNamespace(headers=headers, query_params=query or {})
    return SimpleNamespace(meta=meta, request=request, protocol_version=protocol)


def test_session_key() -> None:
    app: Any = SimpleNamespace(settings=Settings())
    assert calls.session_key(app, ctx()) == "stdio"
    assert calls.session_key(app, ctx(headers={"mcp-session-id": "abc"})) == "abc"
    assert calls.session_key(app, ctx(headers={}, query={"session_id": "sse1"})) == "sse1"
    assert calls.session_key(app, ctx(headers={})) == "default"
    # --container-handles: a stateless (modern protocol) call has no session; it gets a new container.
    handles: Any = SimpleNamespace(settings=Settings(container_handles=True))
    modern = sorted(MODERN_PROTOCOL_VERSIONS)[0]
    assert calls.session_key(handles, ctx(headers={}, protocol=modern)) is None
    assert calls.session_key(handles, ctx(headers={})) == "default"


def test_requested_container_and_uploads_shapes() -> None:
    cid = "container_" + "a" * 24
    assert calls.requested_container(ctx()) is None
    assert calls.requested_container(ctx({"container": cid})) == cid
    assert calls.requested_container(ctx({"container": {"id": cid, "expires_at": "x"}})) == cid
    for bad in (42, {"id": cid, "other": 1}, {"id": 5}, [cid]):
        with pytest.raises(InvalidToolInput):
            calls.requested_container(ctx({"container": bad}))
    assert calls.container_uploads(ctx()) == []
    assert calls.container_uploads(ctx({"container_upload": "file_1"})) == ["file_1"]
    assert calls.container_uploads(ctx({"container_upload": ["file_1", "file_2"]})) == ["file_1", "file_2"]
    for bad in (3, ["file_1", 2], ["f"] * 101, {"id": "file_1"}):
        with pytest.raises(InvalidToolInput):
            calls.container_uploads(ctx({"container_upload": bad}))


def test_to_result_carries_the_object_twice() -> None:
    result = calls.to_result(wire.BashError(error_code="unavailable"), {"container": {"id": "c"}})
    assert result.is_error and result.structured_content == {"type": "bash_code_execution_tool_result_error",
                                                             "error_code": "unavailable"}
    assert json.loads(result.content[0].text) == result.structured_content and result.meta == {"container": {"id": "c"}}
    assert calls.to_result(wire.CreateResult(is_file_update=False)).is_error is False


async def test_container_upload_images_inline_and_metering(base: str) -> None:
    s = local_settings(base)
    app = App(s)
    async with mcp_session(s, app) as session:
        stored = app.files.add(s.tenant, "data.txt", b"uploaded")
        r = await session.bash("cat uploads/data.txt", meta={"container_upload": stored.id})
        assert r["stdout"] == "uploaded"
        assert (workspace(s) / "uploads" / "data.txt").read_bytes() == b"uploaded"
        missing = await session.bash("true", meta={"container_upload": "file_" + "z" * 24})
        assert missing == {"type": "bash_code_execution_tool_result_error", "error_code": "invalid_tool_input"}
        edit = await session.edit(command="view", path="x", **{})
        assert edit["error_code"] == "file_not_found"
        # A chart: registered as a file, and its bytes inline as an image block.
        (workspace(s) / "src.png").write_bytes(PNG)
        r, full = await session.call_full(wire.BASH_TOOL, {"command": "cp src.png chart.png"})
        [entry] = r["content"]
        [image] = [block for block in full.content if block.type == "image"]
        assert image.mime_type == "image/png" and app.files.read(s.tenant, entry["file_id"]) == PNG
        assert app.usage.report(s.tenant)["code_execution_requests"] == 4
        assert 'mcp_codeexec_calls_total{tool="bash_code_execution",outcome="ok"} 2' in app.metrics.render()
        assert 'mcp_codeexec_errors_total{tool="text_editor_code_execution",code="file_not_found"} 1' in app.metrics.render()


async def test_rate_limit_answers_too_many_requests(base: str, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.json"
    digest = hashlib.sha256(b"t").hexdigest()
    tokens.write_text(json.dumps({"tenants": {"default": {"token_sha256": digest, "rate_per_minute": 1}}}))
    async with mcp_session(local_settings(base, tokens_file=str(tokens))) as session:
        assert (await session.bash("true"))["return_code"] == 0
        assert await session.bash("true") == {"type": "bash_code_execution_tool_result_error", "error_code": "too_many_requests"}
        assert (await session.edit(command="view", path="."))["error_code"] == "too_many_requests"


async def test_progress_notifications_carry_partial_output(base: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(calls, "_PROGRESS_INTERVAL", 0.1)
    seen: list[tuple[float, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, message))

    async with mcp_session(local_settings(base)) as session:
        await session.bash("true")  # the container is up before the timed call
        # In process the SDK hands the callback over directly; _meta names the token as JSON-RPC would.
        result = await session.client.call_tool(wire.BASH_TOOL, {"command": "echo first; sleep 0.6; echo second"},
                                                progress_callback=on_progress, meta={"progress_token": "p1"})
        assert result.structured_content["stdout"] == "first\nsecond\n"
    assert seen and [n for n, _ in seen] == list(range(1, len(seen) + 1))
    assert any(message and "first" in message for _, message in seen)


async def test_our_own_bug_is_a_result_not_a_crash(base: str, monkeypatch: pytest.MonkeyPatch) -> None:
    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(tools, "bash", broken)
    async with mcp_session(local_settings(base)) as session:
        assert await session.bash("true") == {"type": "bash_code_execution_tool_result_error", "error_code": "unavailable"}
        assert (await session.edit(command="view", path="."))["type"] == "text_editor_code_execution_view_result"
