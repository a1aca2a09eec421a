"""app.py: the server's state, built once; run() entered once per process (nested entries
share it); a backend that is down leaves the server answering; background work."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import anyio
import pytest

from mcp_codeexec.app import App
from mcp_codeexec.deployment.local import LocalDeployment
from mcp_codeexec.errors import BackendUnavailable
from unit.conftest import local_settings, mcp_session

pytestmark = pytest.mark.anyio


async def test_parts_exist_before_run_and_the_running_ones_after(base: str) -> None:
    app = App(local_settings(base))
    assert isinstance(app.backend, LocalDeployment) and app.isolation == "none (not checked yet)"
    for part in ("containers", "sessions"):
        with pytest.raises(BackendUnavailable, match="not running yet"):
            getattr(app, part)
    async with app.run() as running:
        assert running is app and "NO isolation" in app.isolation
        containers = app.containers
        async with app.run() as nested:  # the MCP transports enter it again: same state
            assert nested.containers is containers
        assert app.containers is containers  # the nested exit stopped nothing
        assert app.metrics.gauges["running_containers"]() == 0 and app.metrics.gauges["pool_size"]() == 0
    assert app._entered == 0


async def test_a_backend_that_is_down_leaves_calls_answering(base: str) -> None:
    blocker = Path(base) / "not-a-directory"
    blocker.write_text("")
    s = local_settings(base, local_dir=str(blocker / "sandboxes"))
    async with mcp_session(s) as session:
        assert await session.bash("true") == {"type": "bash_code_execution_tool_result_error", "error_code": "unavailable"}
        prompt = (await session.client.read_resource("codeexec://system-prompt")).contents[0].text
        assert "none (not checked yet)" in prompt  # the check failed: the prompt claims no isolation it has not seen


async def test_tenant_policies_set_the_stored_cap(base: str, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.json"
    digest = hashlib.sha256(b"t").hexdigest()
    tokens.write_text(json.dumps({"tenants": {"alice": {"token_sha256": digest, "max_stored_bytes": 5, "max_containers": 1}}}))
    app = App(local_settings(base, tokens_file=str(tokens), max_stored_bytes=100))
    assert app.policies["alice"].token_sha256 == digest
    assert app.files.cap("alice") == 5 and app.files.cap("bob") == 100
    assert app._containers_cap("alice") == 1 and app._containers_cap("bob") is None


async def test_the_stdio_session_is_prepared_at_start(base: str) -> None:
    app = App(local_settings(base, prepare_session=True))
    async with app.run():
        for _ in range(300):
            if app.containers.running_count:
                break
            await anyio.sleep(0.02)
        [record] = await app.backend.list("mcp-codeexec.default.")
        assert record.running
        sandbox = await app.sessions.sandbox("stdio")  # the first call finds it ready
        assert sandbox.name == record.name and sandbox.running


async def test_old_files_are_pruned_in_the_background(base: str) -> None:
    app = App(local_settings(base, file_retention=60, reap_interval=0.05))
    old = app.files.add("t", "old.txt", b"o")
    past = time.time() - 120
    os.utime(app.files.root / "t" / old.id, (past, past))
    async with app.run():
        for _ in range(100):
            if app.files.get("t", old.id) is None:
                break
            await anyio.sleep(0.02)
    assert app.files.get("t", old.id) is None
