"""remote.py: the HTTP deployment on loopback, in this process over the local backend:
bearer tokens to tenants, the Files API, putting files into containers, usage, health,
metrics, and MCP over Streamable HTTP."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
import uvicorn
from conftest import Session, free_port
from mcp.client import Client
from mcp.client.streamable_http import streamable_http_client

from mcp_codeexec.config import Settings
from mcp_codeexec.remote import _in_workspace, _security, build_app
from unit.conftest import local_settings, workspace

pytestmark = pytest.mark.anyio
TOKENS = {"alice": "alice-secret", "bob": "bob-secret"}


def auth(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[tenant]}"}


@pytest.fixture
async def server(base: str, tmp_path: Path) -> AsyncIterator[tuple[str, Settings]]:
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"tenants": {
        name: {"token_sha256": hashlib.sha256(secret.encode()).hexdigest(), "max_stored_bytes": 1000}
        for name, secret in TOKENS.items()}}))
    s = local_settings(base, transport="http", port=free_port(), tokens_file=str(tokens), max_upload_bytes=2000)
    config = uvicorn.Config(build_app(s), host="127.0.0.1", port=s.port, log_level="warning", lifespan="on")
    http = uvicorn.Server(config)
    async with anyio.create_task_group() as tg:
        tg.start_soon(http.serve)
        while not http.started:
            await anyio.sleep(0.02)
        yield f"http://127.0.0.1:{s.port}", s
        http.should_exit = True


async def test_files_api_per_tenant(server: tuple[str, Settings]) -> None:
    url, _ = server
    async with httpx2.AsyncClient(base_url=url, timeout=30) as http:
        assert (await http.get("/v1/files")).status_code == 401
        assert (await http.get("/v1/files", headers={"Authorization": "Bearer wrong"})).status_code == 401
        up = await http.post("/v1/files", headers=auth("alice"), files={"file": ("data.csv", b"a,b\n")})
        assert up.status_code == 201
        meta = up.json()
        assert (meta["type"], meta["filename"], meta["size_bytes"], meta["mime_type"]) == ("file", "data.csv", 4, "text/csv")
        listed = (await http.get("/v1/files", headers=auth("alice"))).json()["data"]
        assert [f["id"] for f in listed] == [meta["id"]]
        assert (await http.get(f"/v1/files/{meta['id']}", headers=auth("alice"))).json() == meta
        content = await http.get(f"/v1/files/{meta['id']}/content", headers=auth("alice"))
        assert content.content == b"a,b\n" and "filename*=UTF-8''data.csv" in content.headers["content-disposition"]
        # Bob sees none of it.
        assert (await http.get("/v1/files", headers=auth("bob"))).json() == {"data": []}
        for path in (f"/v1/files/{meta['id']}", f"/v1/files/{meta['id']}/content"):
            assert (await http.get(path, headers=auth("bob"))).status_code == 404
        assert (await http.delete(f"/v1/files/{meta['id']}", headers=auth("bob"))).status_code == 404
        # Limits: the upload size, the tenant's stored bytes, the form's shape.
        too_big = await http.post("/v1/files", headers=auth("alice"), files={"file": ("x", b"x" * 3000)})
        assert too_big.status_code == 413
        assert (await http.post("/v1/files", headers=auth("alice"), files={"file": ("y", b"y" * 990)})).status_code == 201
        full = await http.post("/v1/files", headers=auth("alice"), files={"file": ("z", b"z" * 10)})
        assert full.status_code == 429 and "cap" in full.json()["error"]["message"]
        assert (await http.post("/v1/files", headers=auth("alice"), data={"file": "text"})).status_code == 400
        assert (await http.delete(f"/v1/files/{meta['id']}", headers=auth("alice"))).status_code == 200
        assert (await http.get(f"/v1/files/{meta['id']}", headers=auth("alice"))).status_code == 404
        # Health and metrics need no token.
        health = (await http.get("/healthz")).json()
        assert health == {"status": "ok", "engine": "local processes", "runtime": "none"}
        assert "# TYPE mcp_codeexec_calls_total counter" in (await http.get("/metrics")).text


async def test_mcp_over_http_and_files_into_containers(server: tuple[str, Settings]) -> None:
    url, s = server
    transport = streamable_http_client(f"{url}/mcp", http_client=httpx2.AsyncClient(headers=auth("alice"), timeout=30))
    async with Client(transport) as client, httpx2.AsyncClient(base_url=url, timeout=30) as http:
        session = Session(client)
        assert (await session.bash("echo over http"))["stdout"] == "over http\n"
        cid = session.last_meta["container"]["id"]
        up = (await http.post("/v1/files", headers=auth("alice"), files={"file": ("in.txt", b"hello")})).json()

        async def put(body: Any, tenant: str = "alice", container: str = cid) -> httpx2.Response:
            return await http.post(f"/v1/containers/{container}/files", headers=auth(tenant), json=body)

        put_ok = await put({"file_id": up["id"]})
        assert put_ok.status_code == 201 and put_ok.json()["path"] == f"{s.workdir}/uploads/in.txt"
        assert (await session.bash("cat uploads/in.txt"))["stdout"] == "hello"
        assert (await put({"file_id": up["id"], "path": "sub/copy.txt"})).status_code == 201
        assert (workspace(s) / "sub" / "copy.txt").read_bytes() == b"hello"
        assert (await put({"file_id": up["id"], "path": "../../etc/x"})).status_code == 400
        assert (await put({"path": "x"})).status_code == 400
        assert (await put({"file_id": "file_" + "n" * 24})).status_code == 404
        assert (await put({"file_id": up["id"]}, container="container_" + "n" * 24)).status_code == 404
        assert (await put({"file_id": up["id"]}, tenant="bob")).status_code == 404  # not bob's container (nor file)
        usage = (await http.get("/v1/usage", headers=auth("alice"))).json()
        assert usage["tenant"] == "alice" and usage["code_execution_requests"] == 2
        assert 'mcp_codeexec_calls_total{tool="bash_code_execution",outcome="ok"} 2' in (await http.get("/metrics")).text
    async with httpx2.AsyncClient(base_url=url, timeout=30) as http:
        refused = await http.post("/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "ping"})
        assert refused.status_code == 401


def test_in_workspace() -> None:
    assert _in_workspace("a/b.txt", "/w") and _in_workspace("/w/a", "/w/") and _in_workspace("./x/../y", "/w")
    for bad in ("../x", "/etc/passwd", "/w", "", "a\0b", 5, None, "/wx/a"):
        assert not _in_workspace(bad, "/w"), bad


def test_security_keeps_dns_rebinding_protection() -> None:
    loopback = _security(Settings(host="127.0.0.1"))
    assert loopback is not None and loopback.enable_dns_rebinding_protection
    assert loopback.allowed_hosts == ["127.0.0.1:*", "localhost:*", "[::1]:*"]
    proxied = _security(Settings(host="0.0.0.0", allowed_hosts=("code.example",)))
    assert proxied is not None and proxied.allowed_hosts == ["code.example"]
    assert "https://code.example" in (proxied.allowed_origins or [])
