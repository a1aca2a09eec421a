"""Containers as durable workspaces: reuse by id across servers, restarts, expiry, idle
stop, the warm pool, the running cap. Real server processes, real Docker, real gVisor."""

from __future__ import annotations

import json
import os
import signal
import time

import anyio
import pytest

from conftest import TENANT, connect
from mcp_codeexec.config import Settings
from mcp_codeexec.containers import ContainerManager
from mcp_codeexec.deployment.docker import DockerDeployment

pytestmark = pytest.mark.anyio

FAST = ("--timeout", "20", "--memory", "1g", "--reap-interval", "1s")


def name_of(container_id: str) -> str:
    return f"mcp-codeexec.{TENANT}.{container_id}"


async def test_reuse_across_servers_by_flag_and_by_meta(engine):
    async with connect(*FAST) as a:
        await a.bash("echo from-a > note.txt")
        cid = a.last_meta["container"]["id"]
    # The container outlives its server; stopped, since no server uses it (files stay).
    assert engine.inspect_container(name_of(cid))["State"]["Running"] is False
    async with connect(*FAST, "--container", cid) as b:
        assert (await b.bash("cat note.txt"))["stdout"] == "from-a\n"
        assert b.last_meta["container"]["id"] == cid
    async with connect(*FAST, "--no-prepare") as c:
        r = await c.bash("cat note.txt", meta={"container": cid})
        assert r["stdout"] == "from-a\n" and c.last_meta["container"]["id"] == cid
        r = await c.edit(command="view", path="note.txt")  # no _meta: the session's own container
        assert r["error_code"] == "file_not_found" and c.last_meta["container"]["id"] != cid
        r = await c.call("bash_code_execution", {"command": "cat note.txt"}, meta={"container": {"id": cid}})
        assert r["stdout"] == "from-a\n"


def server_pids(marker: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = open(f"/proc/{entry}/cmdline", "rb").read().split(b"\0")
            except OSError:
                continue
            if b"mcp_codeexec" in cmdline and marker.encode() in cmdline:
                pids.append(int(entry))
    return pids


async def test_files_survive_kill_9_of_the_server_and_of_the_container(engine):
    marker = "97s"  # an unusual --idle-stop value finds this server's process
    async with connect(*FAST, "--idle-stop", marker) as a:
        await a.bash("echo precious > keep.txt")
        cid = a.last_meta["container"]["id"]
        pids = server_pids(marker)
        assert pids
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        while server_pids(marker):
            await anyio.sleep(0.1)
    async with connect(*FAST, "--container", cid) as b:
        assert (await b.bash("cat keep.txt"))["stdout"] == "precious\n"
        engine.kill(name_of(cid))  # every process in the sandbox dies
        r = await b.bash("cat keep.txt")
        if r["return_code"] == 137:  # the call met the dead sandbox: it says so and restarts it
            assert "killed" in r["stderr"] and "files in the workspace are intact" in r["stderr"]
            r = await b.bash("cat keep.txt")
        assert r["stdout"] == "precious\n", r


async def test_expiry_answers_container_expired_and_reaper_frees_storage(engine):
    async with connect(*FAST, "--lifetime", "4s") as a:
        await a.bash("echo x > f")
        cid = a.last_meta["container"]["id"]
        volume = engine.inspect_container(name_of(cid))["Config"]["Labels"]["org.mcp-codeexec.volume"]
        await anyio.sleep(4.5)
        r = await a.bash("cat f")
        assert r == {"type": "bash_code_execution_tool_result_error", "error_code": "container_expired"}
        r = await a.edit(command="view", path="f")
        assert r["error_code"] == "container_expired" and r["error_message"]
        for _ in range(20):
            if not engine.containers(all=True, filters={"name": name_of(cid)}):
                break
            await anyio.sleep(0.5)
        assert not engine.containers(all=True, filters={"name": name_of(cid)})
        assert volume not in {v["Name"] for v in engine.volumes()["Volumes"] or []}
    async with connect(*FAST, "--container", cid) as b:  # gone for good, also for a new server
        assert (await b.bash("true"))["error_code"] == "container_expired"


@pytest.mark.parametrize("bad", ["container_" + "Z" * 24, "../../etc", "", "container_x"])
async def test_unknown_ids_are_expired_not_new(sandbox, bad):
    r = await sandbox.bash("true", meta={"container": bad})
    assert r == {"type": "bash_code_execution_tool_result_error", "error_code": "container_expired"}


async def test_other_tenants_container_is_not_found(engine):
    async with connect(*FAST) as a:
        await a.bash("true")
        cid = a.last_meta["container"]["id"]
    async with connect(*FAST, "--tenant", "someone-else", "--no-prepare") as other:
        assert (await other.bash("true", meta={"container": cid}))["error_code"] == "container_expired"
        listing = json.loads((await other.client.read_resource("codeexec://containers")).contents[0].text)
        assert listing == {"containers": []}


async def test_idle_container_is_stopped_and_restarted_transparently(engine):
    async with connect(*FAST, "--idle-stop", "2s") as a:
        await a.bash("echo idle > i.txt")
        cid = a.last_meta["container"]["id"]
        for _ in range(20):
            await anyio.sleep(0.5)
            if not engine.inspect_container(name_of(cid))["State"]["Running"]:
                break
        assert not engine.inspect_container(name_of(cid))["State"]["Running"]
        assert (await a.bash("cat i.txt"))["stdout"] == "idle\n"
        listing = json.loads((await a.client.read_resource("codeexec://containers")).contents[0].text)["containers"]
        mine = next(c for c in listing if c["id"] == cid)
        assert mine["state"] == "running" and (mine["size_bytes"] is None or mine["size_bytes"] >= 0)


async def test_two_servers_share_one_container_in_parallel(engine):
    async with connect(*FAST) as a:
        await a.bash("true")
        cid = a.last_meta["container"]["id"]
        async with connect(*FAST, "--container", cid) as b:
            results = {}

            async def run(session, key, command):
                results[key] = await session.bash(command)

            started = time.monotonic()
            async with anyio.create_task_group() as tg:
                tg.start_soon(run, a, "slow", "sleep 2; echo A > shared-a; echo A")
                tg.start_soon(run, b, "fast", "echo B > shared-b; echo B")
            assert results["slow"]["stdout"] == "A\n" and results["fast"]["stdout"] == "B\n"
            assert time.monotonic() - started < 4  # served side by side, not one after the other
            assert (await b.bash("cat shared-a shared-b"))["stdout"] == "A\nB\n"


async def test_running_cap_stops_the_idle_one(engine):
    async with connect(*FAST, "--max-running", "1") as a:
        await a.bash("echo one > f")
        first = a.last_meta["container"]["id"]
        async with connect(*FAST, "--no-prepare") as b:
            await b.bash("echo two > f")
            second = b.last_meta["container"]["id"]
        r = await a.bash("cat f", meta={"container": second})  # starting it stops `first`
        assert r["stdout"] == "two\n"
        assert not engine.inspect_container(name_of(first))["State"]["Running"]
        assert (await a.bash("cat f"))["stdout"] == "one\n"


async def test_pool_never_hands_one_container_to_two_sessions(engine):
    """Component level, on the real engine: many concurrent claims against a warm pool."""
    settings = Settings(tenant=TENANT, pool_size=3, memory_bytes=512 << 20, lifetime=3600)
    async with anyio.create_task_group() as tg:
        manager = ContainerManager(settings, DockerDeployment(), tg)
        tg.start_soon(manager.run_pool)
        for _ in range(60):
            if len(manager._pool) == 3:
                break
            await anyio.sleep(0.5)
        assert len(manager._pool) == 3
        pooled = {s.info.id for s in manager._pool}
        claimed = []

        async def claim():
            claimed.append(await manager.new(TENANT))

        async with anyio.create_task_group() as claims:
            for _ in range(6):
                claims.start_soon(claim)
        ids = [s.info.id for s in claimed]
        assert len(set(ids)) == 6 and pooled <= set(ids)
        for sandbox in claimed:
            assert engine.inspect_container(name_of(sandbox.info.id))["Name"] == f"/{name_of(sandbox.info.id)}"
        await manager.shutdown()
        tg.cancel_scope.cancel()
    assert not engine.containers(all=True, filters={"name": "mcp-codeexec-pool."})
