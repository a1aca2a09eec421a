"""Containers as durable workspaces: reuse by id across servers, restarts, expiry, idle
stop, the warm pool, the running cap. Real server processes, real Docker, real gVisor."""

from __future__ import annotations

import json
import os
import signal
from datetime import datetime, timedelta

import anyio
import pytest
from conftest import TENANT, both, connect, server_pids, wait_for

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
    async with connect(*FAST, "--tenant", f"{TENANT}-other", "--no-prepare") as other:
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
        assert [c["state"] for c in listing if c["id"] == cid] == ["running"]


async def test_two_servers_share_one_container_in_parallel(engine):
    async with connect(*FAST) as a:
        await a.bash("true")
        cid = a.last_meta["container"]["id"]
        async with connect(*FAST, "--container", cid) as b:
            # Each call waits (up to 8 s) for a file only the other call writes: if the two
            # were run one after the other, in either order, the first would not see it.
            results = await both(
                (a, "echo A > a-started; " + wait_for("b-started") + " && echo A-saw-B"),
                (b, "echo B > b-started; " + wait_for("a-started") + " && echo B-saw-A"),
            )
            assert [r["stdout"] for r in results] == ["A-saw-B\n", "B-saw-A\n"], results
            assert (await b.bash("cat a-started b-started"))["stdout"] == "A\nB\n"


async def test_parallel_calls_in_one_session(sandbox):
    """One client, two calls in flight at once on its one container (the handshake below
    cannot complete if the server or the agent runs them one after the other)."""
    await sandbox.bash("rm -f p-one p-two")
    results = await both(
        (sandbox, "touch p-one; " + wait_for("p-two") + " && echo one-saw-two"),
        (sandbox, "touch p-two; " + wait_for("p-one") + " && echo two-saw-one"),
    )
    assert [r["stdout"] for r in results] == ["one-saw-two\n", "two-saw-one\n"], results


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


def parse_time(text: str) -> datetime:
    assert text.endswith("Z"), text
    return datetime.fromisoformat(text[:-1] + "+00:00")


async def containers_listing(session) -> dict[str, dict]:
    text = (await session.client.read_resource("codeexec://containers")).contents[0].text
    return {c["id"]: c for c in json.loads(text)["containers"]}


@pytest.mark.timeout(180)
async def test_containers_resource_states_times_and_size(engine):
    """codeexec://containers: id, created, expires, state (running, stopped, expired), size."""
    lifetime = 20
    # The default reap interval (60 s) leaves an expired container listed as such for a while.
    args = ("--timeout", "20", "--memory", "1g", "--disk", "0", "--lifetime", f"{lifetime}s")
    before = datetime.now().astimezone().replace(microsecond=0)
    async with connect(*args) as a:
        await a.bash("head -c 3000000 /dev/zero > three-mb.bin")
        cid, expires_at = a.last_meta["container"]["id"], a.last_meta["container"]["expires_at"]
        after = datetime.now().astimezone()
        mine = (await containers_listing(a))[cid]
        assert set(mine) == {"id", "created_at", "expires_at", "state", "size_bytes", "checkpoint_bytes"}
        assert mine["checkpoint_bytes"] == 0
        assert mine["state"] == "running" and mine["expires_at"] == expires_at
        created = parse_time(mine["created_at"])
        assert before <= created <= after
        assert parse_time(mine["expires_at"]) - created == timedelta(seconds=lifetime)
        # The engine measures the workspace volume: the 3 MB file, and not much more.
        assert 3_000_000 <= mine["size_bytes"] < 3_500_000, mine
    # Its server is gone: the container is checkpointed (asleep with its memory), files kept. (Its "expired" state is
    # checked in test_containers_listing_says_expired: any server on the engine reaps an
    # expired container, so here it could be gone before it is listed.)
    async with connect(*args, "--no-prepare") as b:
        listing = await containers_listing(b)
        assert listing[cid]["state"] == "checkpointed" and listing[cid]["size_bytes"] >= 3_000_000, listing[cid]
        assert listing[cid]["checkpoint_bytes"] > 1_000_000, listing[cid]  # a Python and a shell, at least
