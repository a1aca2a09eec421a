"""The remote deployment over real HTTP on loopback: Streamable HTTP and SSE with the `mcp`
SDK's client, bearer tokens and tenants, rate limits, progress, cancellation, metering, the
Files API. The server is a real process; the sandboxes are real gVisor containers."""

from __future__ import annotations

import hashlib
import json
from contextlib import asynccontextmanager
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import anyio
import httpx2
import pytest
from mcp.client import Client
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client

from conftest import DATA_DIR, IMAGE, Session

pytestmark = pytest.mark.anyio

TOKENS = {"pytest": "token-alpha-" + "a" * 20, "pytest-b": "token-bravo-" + "b" * 20, "pytest-slow": "token-slow-" + "c" * 20}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def remote(engine, tmp_path_factory) -> Iterator[str]:
    tokens = tmp_path_factory.mktemp("tokens") / "tokens.json"
    tenants = {name: {"token_sha256": hashlib.sha256(t.encode()).hexdigest()} for name, t in TOKENS.items()}
    tenants["pytest-slow"].update(rate_per_minute=3, max_concurrent=1)
    tokens.write_text(json.dumps({"tenants": tenants}))
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mcp_codeexec", "--transport", "http", "--port", str(port), "--tokens", str(tokens),
         "--image", IMAGE, "--tenant", "pytest", "--data-dir", DATA_DIR, "--timeout", "20", "--memory", "1g", "--max-upload", "1m"],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                if httpx2.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx2.HTTPError:
                pass
            assert proc.poll() is None, "server exited"
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def headers(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[tenant]}"}


@asynccontextmanager
async def http_session(base: str, tenant: str):
    transport = streamable_http_client(f"{base}/mcp", http_client=httpx2.AsyncClient(headers=headers(tenant), timeout=60))
    async with Client(transport) as client:
        yield Session(client)


async def test_no_token_is_401(remote):
    async with httpx2.AsyncClient() as http:
        assert (await http.post(f"{remote}/mcp", json={})).status_code == 401
        assert (await http.get(f"{remote}/v1/files")).status_code == 401
        bad = {"Authorization": "Bearer wrong"}
        assert (await http.post(f"{remote}/mcp", json={}, headers=bad)).status_code == 401
        assert (await http.get(f"{remote}/sse", headers=bad)).status_code == 401
        assert (await http.get(f"{remote}/healthz")).json()["status"] == "ok"


async def test_streamable_http_and_tenant_isolation(remote):
    async with http_session(remote, "pytest") as a:
        r = await a.bash("echo secret > a.txt; echo hi")
        assert r["stdout"] == "hi\n"
        cid = a.last_meta["container"]["id"]
        file_id = r["content"][0]["file_id"]
    async with http_session(remote, "pytest-b") as b:
        # Guessing or reusing another tenant's ids: indistinguishable from nonexistent.
        assert (await b.bash("cat a.txt", meta={"container": cid}))["error_code"] == "container_expired"
        assert (await b.bash("cat a.txt"))["return_code"] == 1  # b's own container has no a.txt
        assert b.last_meta["container"]["id"] != cid
        listing = json.loads((await b.client.read_resource("codeexec://containers")).contents[0].text)["containers"]
        assert cid not in {c["id"] for c in listing}
        with pytest.raises(Exception):
            await b.client.read_resource(f"codeexec://files/{file_id}")
    async with httpx2.AsyncClient() as http:
        assert (await http.get(f"{remote}/v1/files/{file_id}", headers=headers("pytest-b"))).status_code == 404
        assert (await http.get(f"{remote}/v1/files/{file_id}", headers=headers("pytest"))).status_code == 200


async def test_sse_transport(remote):
    async with Client(sse_client(f"{remote}/sse", headers=headers("pytest")), mode="legacy") as client:
        session = Session(client)
        assert (await session.bash("echo over-sse"))["stdout"] == "over-sse\n"


async def test_rate_limit_then_recovery(remote):
    async with http_session(remote, "pytest-slow") as s:
        codes = [(await s.bash("true"))["type"] for _ in range(5)]
        assert "bash_code_execution_tool_result_error" in codes
        r = await s.call("bash_code_execution", {"command": "true"})
        assert r == {"type": "bash_code_execution_tool_result_error", "error_code": "too_many_requests"}
        await anyio.sleep(21)  # 3 per minute: one call's worth refills in 20 s
        back = await s.bash("echo back")
        assert back.get("stdout") == "back\n", back


async def test_progress_during_a_long_command(remote):
    async with http_session(remote, "pytest") as s:
        seen: list[str] = []

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            seen.append(message or "")

        r = await s.bash("for i in 1 2 3 4 5; do echo tick $i; sleep 1; done", progress_callback=on_progress)
        assert r["stdout"].count("tick") == 5
        assert len(seen) >= 3 and any("tick" in m for m in seen)


async def test_cancellation_kills_the_command(remote):
    async with http_session(remote, "pytest") as s:
        await s.bash("rm -f marker")
        with anyio.move_on_after(2):
            await s.client.call_tool("bash_code_execution", {"command": "sleep 600; touch marker"})
        await anyio.sleep(1)
        r = await s.bash("ps -eo args | grep -c '^sleep 600' || true; ls marker 2>&1 || true")
        assert r["stdout"].split("\n")[0] == "0", r


async def test_files_api_round_trip_and_metering(remote):
    async with httpx2.AsyncClient(headers=headers("pytest"), timeout=60) as http:
        before = (await http.get(f"{remote}/v1/usage")).json()
        payload = "city,temp\nOslo,3\nLima,19\n".encode()
        up = await http.post(f"{remote}/v1/files", files={"file": ("../../weather data.csv", payload, "text/csv")})
        assert up.status_code == 201
        meta = up.json()
        assert meta["filename"] == "weather data.csv" and meta["size_bytes"] == len(payload)
        assert meta["id"] in {f["id"] for f in (await http.get(f"{remote}/v1/files")).json()["data"]}
        async with http_session(remote, "pytest") as s:
            r = await s.bash("cat 'uploads/weather data.csv' | wc -l", meta={"container_upload": [meta["id"]]})
            assert r["stdout"].strip() == "3"
            out = await s.bash("python3 -c \"print(open('uploads/weather data.csv').read().upper())\" > report.txt")
            report_id = out["content"][0]["file_id"]
        content = await http.get(f"{remote}/v1/files/{report_id}/content")
        assert content.content == payload.decode().upper().encode() + b"\n"
        assert (await http.delete(f"{remote}/v1/files/{meta['id']}")).status_code == 200
        assert (await http.get(f"{remote}/v1/files/{meta['id']}")).status_code == 404
        assert (await http.get(f"{remote}/v1/files/{report_id}")).status_code == 200  # deleting one touches no other
        too_big = await http.post(f"{remote}/v1/files", files={"file": ("big.bin", b"x" * (2 << 20))})
        assert too_big.status_code == 413
        after = (await http.get(f"{remote}/v1/usage")).json()
        assert after["code_execution_requests"] - before["code_execution_requests"] == 2
        assert all(c["billed_seconds"] >= 300 for c in after["containers"])
        metrics = (await http.get(f"{remote}/metrics")).text
        assert 'mcp_codeexec_calls_total{tool="bash_code_execution",outcome="ok"}' in metrics
