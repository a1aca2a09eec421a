"""The remote deployment over real HTTP on loopback: Streamable HTTP and SSE with the `mcp`
SDK's client, bearer tokens and tenants, rate limits, progress, cancellation, metering, the
Files API. The server is a real process; the sandboxes are real gVisor containers."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx2
import pytest
from conftest import TENANT, Session, http_server
from mcp.client import Client
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp_types import INVALID_PARAMS

pytestmark = pytest.mark.anyio

# Callers by role; their tenants are named after the test tenant (conftest removes them all).
TENANTS = {"a": TENANT, "b": f"{TENANT}-b", "slow": f"{TENANT}-slow", "one": f"{TENANT}-one"}
TOKENS = {role: f"token-{role}-" + role[0] * 20 for role in TENANTS}


@pytest.fixture(scope="module")
def remote(engine, tmp_path_factory) -> Iterator[str]:
    tokens = tmp_path_factory.mktemp("tokens") / "tokens.json"
    tenants = {TENANTS[role]: {"token_sha256": hashlib.sha256(t.encode()).hexdigest()} for role, t in TOKENS.items()}
    tenants[TENANTS["slow"]].update(rate_per_minute=3, max_concurrent=1)
    tenants[TENANTS["one"]].update(max_concurrent=1, max_stored_bytes=100_000)
    tokens.write_text(json.dumps({"tenants": tenants}))
    with http_server("--tokens", str(tokens), "--timeout", "20", "--memory", "1g", "--max-upload", "1m") as base:
        yield base


def headers(role: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[role]}"}


@asynccontextmanager
async def http_session(base: str, role: str, **client_options: Any):
    transport = streamable_http_client(f"{base}/mcp", http_client=httpx2.AsyncClient(headers=headers(role), timeout=60))
    async with Client(transport, **client_options) as client:
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
    async with http_session(remote, "a") as a:
        r = await a.bash("echo secret > a.txt; echo hi")
        assert r["stdout"] == "hi\n"
        cid = a.last_meta["container"]["id"]
        file_id = r["content"][0]["file_id"]
    never_cid, never_fid = "container_" + "Q" * 24, "file_" + "Q" * 24  # well-formed, never existed
    async with http_session(remote, "b") as b:
        # Guessing or reusing another tenant's ids: indistinguishable from nonexistent.
        theirs = await b.call("bash_code_execution", {"command": "cat a.txt"}, meta={"container": cid})
        never = await b.call("bash_code_execution", {"command": "cat a.txt"}, meta={"container": never_cid})
        assert theirs == never == {"type": "bash_code_execution_tool_result_error", "error_code": "container_expired"}
        theirs = await b.call("text_editor_code_execution", {"command": "view", "path": "a.txt"}, meta={"container": cid})
        never = await b.call("text_editor_code_execution", {"command": "view", "path": "a.txt"}, meta={"container": never_cid})
        assert theirs["error_code"] == "container_expired" and theirs == same_but_id(never, never_cid, cid)
        assert (await b.bash("cat a.txt"))["return_code"] == 1  # b's own container has no a.txt
        assert b.last_meta["container"]["id"] != cid
        listing = json.loads((await b.client.read_resource("codeexec://containers")).contents[0].text)["containers"]
        assert cid not in {c["id"] for c in listing}
        theirs, never = await mcp_error_of(b, file_id), await mcp_error_of(b, never_fid)
        assert theirs[0] == INVALID_PARAMS and theirs == same_but_id(never, never_fid, file_id)
    async with httpx2.AsyncClient() as http:
        for path in ("/v1/files/{}", "/v1/files/{}/content"):
            theirs = await http.get(remote + path.format(file_id), headers=headers("b"))
            never = await http.get(remote + path.format(never_fid), headers=headers("b"))
            assert theirs.status_code == never.status_code == 404 and theirs.json() == never.json()
        assert (await http.delete(f"{remote}/v1/files/{file_id}", headers=headers("b"))).status_code == 404
        body = {"file_id": file_id}
        theirs = await http.post(f"{remote}/v1/containers/{cid}/files", json=body, headers=headers("b"))
        never = await http.post(f"{remote}/v1/containers/{never_cid}/files", json=body, headers=headers("b"))
        assert theirs.status_code == never.status_code == 404 and theirs.json() == never.json()
        # ... and all of it is still there for its owner.
        assert (await http.get(f"{remote}/v1/files/{file_id}/content", headers=headers("a"))).content == b"secret\n"


def same_but_id(answer: Any, old: str, new: str) -> Any:
    """`answer` with one id swapped for another (error messages may name the id asked for)."""
    return json.loads(json.dumps(answer).replace(old, new))


async def mcp_error_of(session: Session, file_id: str) -> list[Any]:
    with pytest.raises(MCPError) as caught:
        await session.client.read_resource(f"codeexec://files/{file_id}")
    return [caught.value.code, caught.value.message]


async def test_sse_transport(remote):
    async with Client(sse_client(f"{remote}/sse", headers=headers("a")), mode="legacy") as client:
        session = Session(client)
        assert (await session.bash("echo over-sse"))["stdout"] == "over-sse\n"


async def test_rate_limit_then_recovery(remote):
    async with http_session(remote, "slow") as s:
        # 3 per minute, a full bucket at first: three calls run, the next ones are refused
        # (the five take far less than the 20 s in which one call's worth refills).
        results = [await s.bash("echo ran") for _ in range(5)]
        refused = {"type": "bash_code_execution_tool_result_error", "error_code": "too_many_requests"}
        assert [r.get("stdout") for r in results[:3]] == ["ran\n"] * 3 and results[3:] == [refused] * 2, results
        r = await s.call("text_editor_code_execution", {"command": "view", "path": "."})
        assert r["error_code"] == "too_many_requests" and "rate limit" in r["error_message"]
        await anyio.sleep(21)  # 3 per minute: one call's worth refills in 20 s
        back = await s.bash("echo back")
        assert back.get("stdout") == "back\n", back


async def test_progress_during_a_long_command(remote):
    async with http_session(remote, "a") as s:
        seen: list[str] = []

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            seen.append(message or "")

        r = await s.bash("for i in 1 2 3 4 5; do echo tick $i; sleep 1; done", progress_callback=on_progress)
        assert r["stdout"].count("tick") == 5
        assert len(seen) >= 3 and any("tick" in m for m in seen)


async def test_cancellation_kills_the_command(remote):
    async with http_session(remote, "a") as s:
        await s.bash("rm -f marker")
        with anyio.move_on_after(2) as scope:
            await s.bash("sleep 600; touch marker")
        assert scope.cancelled_caught
        for _ in range(50):  # without the cancellation it would run for 10 minutes
            r = await s.bash("ps -eo args | grep -c '^sleep 600' || true; ls marker 2>&1 || true")
            if r["stdout"].startswith("0\n"):
                break
            await anyio.sleep(0.2)
        assert r["stdout"] == "0\nls: cannot access 'marker': No such file or directory\n", r


async def test_files_api_round_trip_and_metering(remote):
    async with httpx2.AsyncClient(headers=headers("a"), timeout=60) as http:
        before = (await http.get(f"{remote}/v1/usage")).json()
        payload = b"city,temp\nOslo,3\nLima,19\n"
        up = await http.post(f"{remote}/v1/files", files={"file": ("../../weather data.csv", payload, "text/csv")})
        assert up.status_code == 201
        meta = up.json()
        assert meta["filename"] == "weather data.csv" and meta["size_bytes"] == len(payload)
        assert meta["id"] in {f["id"] for f in (await http.get(f"{remote}/v1/files")).json()["data"]}
        async with http_session(remote, "a") as s:
            r = await s.bash("cat 'uploads/weather data.csv' | wc -l; sleep 1", meta={"container_upload": [meta["id"]]})
            assert r["stdout"].strip() == "3"
            used = s.last_meta["container"]["id"]
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
        # The container's execution time is what ran in it (a second's sleep and a little
        # more); it is billed the API's 5-minute minimum.
        was = {c["id"]: c for c in before["containers"]}.get(used, {"execution_seconds": 0.0})
        mine = {c["id"]: c for c in after["containers"]}[used]
        assert 1.0 <= mine["execution_seconds"] - was["execution_seconds"] < 30, mine
        assert mine["billed_seconds"] == 300.0
        assert after["execution_seconds"] - before["execution_seconds"] == pytest.approx(
            mine["execution_seconds"] - was["execution_seconds"], abs=0.01
        )
        metrics = (await http.get(f"{remote}/metrics")).text
        assert 'mcp_codeexec_calls_total{tool="bash_code_execution",outcome="ok"}' in metrics


async def test_max_concurrent_and_cancellation_frees_the_slot(remote):
    refused = {"type": "bash_code_execution_tool_result_error", "error_code": "too_many_requests"}
    async with http_session(remote, "one") as s:  # max_concurrent 1
        await s.bash("rm -f first-started")
        async with anyio.create_task_group() as tg:
            long_call = anyio.CancelScope()

            async def first() -> None:
                with long_call:
                    await s.bash("touch first-started; sleep 600")

            tg.start_soon(first)
            await anyio.sleep(3)  # the first call holds the tenant's one slot
            assert await s.bash("echo second") == refused
            r = await s.call("text_editor_code_execution", {"command": "view", "path": "."})
            assert r["error_code"] == "too_many_requests" and "limit 1" in r["error_message"], r
            long_call.cancel()
        # The cancelled call gives its slot back (as soon as the server has the client's
        # cancellation: a separate HTTP request) and its command is gone.
        for _ in range(50):
            r = await s.bash("ls first-started; ps -eo args | grep -c '^sleep 600' || true")
            if r != refused and r["stdout"] == "first-started\n0\n":
                break
            await anyio.sleep(0.2)
        assert r["stdout"] == "first-started\n0\n", r


async def test_files_api_metadata_disposition_quota_and_container_put(remote):
    async with httpx2.AsyncClient(headers=headers("one"), timeout=60) as http:
        for f in (await http.get(f"{remote}/v1/files")).json()["data"]:  # a clean slate for the quota
            await http.delete(f"{remote}/v1/files/{f['id']}")
        up = await http.post(f"{remote}/v1/files", files={"file": ("résumé 1.txt", b"hello\n" * 10_000, "text/plain")})
        assert up.status_code == 201, up.text
        meta = up.json()
        assert set(meta) == {"type", "id", "filename", "size_bytes", "mime_type", "created_at", "downloadable",
                             "tenant", "container_id", "path"}
        assert (meta["type"], meta["filename"], meta["size_bytes"], meta["mime_type"], meta["downloadable"]) == (
            "file", "résumé 1.txt", 60_000, "text/plain", True)
        assert (meta["container_id"], meta["path"]) == (None, None) and meta["id"].startswith("file_")
        assert (await http.get(f"{remote}/v1/files/{meta['id']}")).json() == meta
        content = await http.get(f"{remote}/v1/files/{meta['id']}/content")
        assert content.content == b"hello\n" * 10_000
        assert content.headers["content-disposition"] == "attachment; filename*=UTF-8''r%C3%A9sum%C3%A9%201.txt"
        assert content.headers["content-type"].startswith("text/plain")
        # max_stored_bytes 100_000: a second 60 KB file would pass it.
        over = await http.post(f"{remote}/v1/files", files={"file": ("more.bin", b"x" * 60_000)})
        assert over.status_code == 429 and over.json()["error"]["type"] == "rate_limit_error", over.text
        assert [f["id"] for f in (await http.get(f"{remote}/v1/files")).json()["data"]] == [meta["id"]]
        small = await http.post(f"{remote}/v1/files", files={"file": ("small.csv", b"a,b\n1,2\n")})
        assert small.status_code == 201
        # Into a container: by default under uploads/, or at the path named.
        async with http_session(remote, "one") as s:
            await s.bash("true")
            cid = s.last_meta["container"]["id"]
            put = await http.post(f"{remote}/v1/containers/{cid}/files", json={"file_id": small.json()["id"]})
            assert put.status_code == 201 and put.json() == {
                "container_id": cid, "file_id": small.json()["id"], "path": "/workspace/uploads/small.csv"}
            put = await http.post(f"{remote}/v1/containers/{cid}/files", json={"file_id": meta["id"], "path": "/workspace/in/r.txt"})
            assert put.status_code == 201 and put.json()["path"] == "/workspace/in/r.txt"
            r = await s.bash("cat uploads/small.csv; wc -c < in/r.txt")
            assert r["stdout"] == "a,b\n1,2\n60000\n", r
        put = await http.post(f"{remote}/v1/containers/{cid}/files", json={"file_id": meta["id"], "path": "rel/r.txt"})
        assert put.status_code == 201 and put.json()["path"] == "rel/r.txt"  # relative to the working directory
        bad = await http.post(f"{remote}/v1/containers/{cid}/files", json={"path": "x"})
        assert bad.status_code == 400
        for outside in ("/etc/x.txt", "../../tmp/x.txt", "/workspace/../x", "", "/workspace"):
            bad = await http.post(f"{remote}/v1/containers/{cid}/files", json={"file_id": meta["id"], "path": outside})
            assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error", (outside, bad.text)
        missing = await http.post(f"{remote}/v1/containers/{cid}/files", json={"file_id": "file_" + "Q" * 24})
        assert missing.status_code == 404 and missing.json()["error"]["message"] == "file not found"
        for f in (meta, small.json()):
            assert (await http.delete(f"{remote}/v1/files/{f['id']}")).json() == {"id": f["id"], "type": "file_deleted"}


async def test_sse_messages_need_a_token(remote):
    async with httpx2.AsyncClient() as http:
        for auth in ({}, {"Authorization": "Bearer wrong"}):
            r = await http.post(f"{remote}/messages/?session_id=" + "0" * 32, json={}, headers=auth)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


async def test_stateless_calls_share_the_default_container_sessions_do_not(remote):
    ids = []
    for _ in range(2):
        async with http_session(remote, "b", mode="legacy") as s:  # handshake: an Mcp-Session-Id each
            assert s.client.protocol_version != "2026-07-28"
            await s.bash("true")
            ids.append(s.last_meta["container"]["id"])
    assert ids[0] != ids[1]
    stateless = []
    for _ in range(2):
        async with http_session(remote, "b") as s:  # 2026-07-28: no session
            await s.bash("true")
            stateless.append(s.last_meta["container"]["id"])
            assert s.client.protocol_version == "2026-07-28"
    assert stateless[0] == stateless[1] and stateless[0] not in ids
    async with http_session(remote, "b") as s:  # naming a container keeps several apart
        await s.bash("true", meta={"container": ids[0]})
        assert s.last_meta["container"]["id"] == ids[0]
