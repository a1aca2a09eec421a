"""Operations: health with and without an engine, `unavailable` with the engine down,
every metric family, the per-call log line (never a token), metering as a resource and
across a restart, and the Host headers a server behind a proxy accepts. Real server
processes; real Docker and gVisor where an engine is meant to be there."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import httpx2
import pytest
from conftest import TENANT, Session, connect, http_server
from mcp.client import Client
from mcp.client.streamable_http import streamable_http_client

pytestmark = pytest.mark.anyio

# An engine socket where nothing listens: to the server, the engine is down.
NO_ENGINE = {"DOCKER_HOST": "unix:///nonexistent/docker.sock"}


async def test_engine_down_answers_unavailable_and_health_503(engine, tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", NO_ENGINE["DOCKER_HOST"])  # the stdio server inherits it
    async with connect("--no-prepare") as s:
        assert await s.bash("true") == {"type": "bash_code_execution_tool_result_error", "error_code": "unavailable"}
        r = await s.edit(command="view", path=".")
        assert r["error_code"] == "unavailable" and "Docker Engine not reachable" in r["error_message"], r
        assert (await s.bash("true"))["error_code"] == "unavailable"  # and it keeps serving
    monkeypatch.delenv("DOCKER_HOST")
    with http_server(env=NO_ENGINE) as base:
        r = httpx2.get(f"{base}/healthz", timeout=30)
        assert r.status_code == 503 and r.json()["status"] == "unavailable", r.text
    with http_server() as base:
        r = httpx2.get(f"{base}/healthz", timeout=30)
        assert r.status_code == 200 and r.json() == {"status": "ok", "engine": r.json()["engine"], "runtime": "runsc"}


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text; fails if absent."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = "^" + re.escape(name) + (r"\{" + re.escape(want) + r"\}" if want else "") + r" (\S+)$"
    found = re.findall(pattern, text, re.MULTILINE)
    assert len(found) == 1, f"{name}{{{want}}} in:\n{text}"
    return float(found[0])


@pytest.mark.timeout(180)
async def test_metrics_and_the_per_call_log_line(engine, tmp_path: Path):
    token = "ops-token-" + "z" * 30
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"tenants": {f"{TENANT}-ops": {"token_sha256": hashlib.sha256(token.encode()).hexdigest()}}}))
    log = tmp_path / "server.log"
    with http_server("--tokens", str(tokens), "--pool", "1", "--timeout", "20", "--memory", "1g", log=log) as base:
        http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=60)
        async with Client(streamable_http_client(f"{base}/mcp", http_client=http)) as client:
            s = Session(client)
            assert (await s.bash("sleep 0.3; echo one"))["stdout"] == "one\n"
            assert (await s.bash("echo two"))["stdout"] == "two\n"
            assert (await s.call("bash_code_execution", {}))["error_code"] == "invalid_tool_input"
            assert (await s.edit(command="view", path="nope.txt"))["error_code"] == "file_not_found"
            cid = s.last_meta["container"]["id"]
            for _ in range(100):  # the pool refills after the claim
                text = httpx2.get(f"{base}/metrics", timeout=30).text
                if metric(text, "mcp_codeexec_pool_size") == 1:
                    break
        bash, editor = {"tool": "bash_code_execution"}, {"tool": "text_editor_code_execution"}
        assert metric(text, "mcp_codeexec_calls_total", **bash, outcome="ok") == 2
        assert metric(text, "mcp_codeexec_calls_total", **bash, outcome="error") == 1
        assert metric(text, "mcp_codeexec_calls_total", **editor, outcome="error") == 1
        assert metric(text, "mcp_codeexec_errors_total", **bash, code="invalid_tool_input") == 1
        assert metric(text, "mcp_codeexec_errors_total", **editor, code="file_not_found") == 1
        # The latency histogram: cumulative buckets, +Inf = count = calls; the sum is at
        # least the 0.3 s one call slept.
        buckets = [(le, metric(text, "mcp_codeexec_call_seconds_bucket", **bash, le=le))
                   for le in re.findall(r'mcp_codeexec_call_seconds_bucket\{tool="bash_code_execution",le="([^"]+)"\}', text)]
        assert buckets[-1] == ("+Inf", 3) and [n for _, n in buckets] == sorted(n for _, n in buckets)
        assert metric(text, "mcp_codeexec_call_seconds_count", **bash) == 3
        assert 0.3 <= metric(text, "mcp_codeexec_call_seconds_sum", **bash) < 30
        assert metric(text, "mcp_codeexec_running_containers") == 2  # the default container and the pool's
        assert metric(text, "mcp_codeexec_pool_size") == 1
        for family in ("calls_total", "errors_total", "call_seconds"):
            assert f"# TYPE mcp_codeexec_{family} " in text
    # One line per call: request id, tenant, tool, container, outcome, duration; no token.
    lines = log.read_text()
    calls = re.findall(r"call (\S+) tenant=(\S+) tool=(\S+) container=(\S+) outcome=(\S+) ([\d.]+) ms", lines)
    assert [(t, tool, c, o) for _, t, tool, c, o, _ in calls] == [
        (f"{TENANT}-ops", "bash_code_execution", cid, "ok"),
        (f"{TENANT}-ops", "bash_code_execution", cid, "ok"),
        (f"{TENANT}-ops", "bash_code_execution", "None", "invalid_tool_input"),
        (f"{TENANT}-ops", "text_editor_code_execution", cid, "file_not_found"),
    ], lines
    assert float(calls[0][5]) >= 300
    assert token not in lines and hashlib.sha256(token.encode()).hexdigest() not in lines


async def test_usage_resource_and_usage_json_across_a_restart(engine, tmp_path: Path):
    data = tmp_path / "data"
    async with connect("--data-dir", str(data), "--timeout", "20", "--memory", "1g") as s:
        await s.bash("sleep 1")
        await s.edit(command="view", path=".")
        cid = s.last_meta["container"]["id"]
        usage = json.loads((await s.client.read_resource("codeexec://usage")).contents[0].text)
    assert usage["tenant"] == TENANT and usage["code_execution_requests"] == 2
    [mine] = usage["containers"]
    assert mine["id"] == cid and 1.0 <= mine["execution_seconds"] < 30 and mine["billed_seconds"] == 300.0
    assert (usage["execution_seconds"], usage["billed_seconds"]) == (mine["execution_seconds"], 300.0)
    assert (data / "usage.json").is_file()
    async with connect("--data-dir", str(data), "--no-prepare") as s:  # a new server process
        again = json.loads((await s.client.read_resource("codeexec://usage")).contents[0].text)
        assert again == usage
        await s.bash("true", meta={"container": cid})
        after = json.loads((await s.client.read_resource("codeexec://usage")).contents[0].text)
        assert after["code_execution_requests"] == 3 and after["containers"][0]["execution_seconds"] > mine["execution_seconds"]


async def test_allowed_host_behind_a_proxy(engine):
    """Bound to loopback, only loopback Host headers pass the DNS-rebinding protection;
    --allowed-host adds the public name a reverse proxy forwards."""
    ping = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
    json_headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
    with http_server("--allowed-host", "mcp.example.org") as base:
        for host, status in (("mcp.example.org", 200), ("127.0.0.1:8000", 200), ("evil.example.net", 421)):
            r = httpx2.post(f"{base}/mcp", json=ping, headers={**json_headers, "Host": host}, timeout=30)
            assert (r.status_code == 421) == (status == 421), (host, r.status_code, r.text)
    with http_server() as base:
        r = httpx2.post(f"{base}/mcp", json=ping, headers={**json_headers, "Host": "mcp.example.org"}, timeout=30)
        assert r.status_code == 421
