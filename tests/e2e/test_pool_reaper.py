"""The warm pool end to end (claimed by a session, refilled, removed on exit), the reaper
cleaning up after a server that was killed (its running containers stopped, its pool
removed), and the engine's rename, on which "never handed to two sessions, even by two
server processes" rests. Real server processes, real Docker, real gVisor."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import anyio
import httpx2
import pytest
from conftest import TENANT, Session, connect, http_server, server_pids
from mcp.client import Client
from mcp.client.streamable_http import streamable_http_client

from .test_operations import metric

pytestmark = pytest.mark.anyio

POOL = "mcp-codeexec-pool."
OWNER = "org.mcp-codeexec.pool-owner"


def server_pid(marker: str) -> int:
    [pid] = server_pids(marker)
    return pid


def pool_of(engine, pid: int) -> list[str]:
    """Ids of the pool containers owned by the server process `pid`."""
    return [
        c["Names"][0].lstrip("/")[len(POOL):]
        for c in engine.containers(all=True, filters={"name": POOL})
        if (c.get("Labels") or {}).get(OWNER, "").split(":")[0] == str(pid)
    ]


async def pool_size(base: str) -> float:
    return metric((await anyio.to_thread.run_sync(lambda: httpx2.get(f"{base}/metrics", timeout=30))).text,
                  "mcp_codeexec_pool_size")


async def wait_until(condition, timeout: float = 90, step: float = 0.25):
    deadline = time.monotonic() + timeout
    while True:
        value = await condition() if callable(condition) else condition
        if value:
            return value
        assert time.monotonic() < deadline, "timed out"
        await anyio.sleep(step)


@pytest.mark.timeout(240)
async def test_pool_is_claimed_refilled_and_removed_on_exit(engine):
    with http_server("--pool", "1", "--timeout", "20", "--memory", "1g") as base:
        pid = server_pid(base.rsplit(":", 1)[1])  # its --port
        await wait_until(lambda: _eq(pool_size(base), 1))  # started, agent up, ready to hand out
        [pooled] = pool_of(engine, pid)
        async with Client(streamable_http_client(f"{base}/mcp", http_client=httpx2.AsyncClient(timeout=60))) as client:
            s = Session(client)
            assert (await s.bash("echo warm"))["stdout"] == "warm\n"
            # The session got the pool's container, renamed into the tenant's namespace.
            assert s.last_meta["container"]["id"] == pooled
            assert engine.inspect_container(f"mcp-codeexec.{TENANT}.{pooled}")["State"]["Running"]
            assert pooled not in pool_of(engine, pid)
            # The pool refills in the background with a new container.
            await wait_until(lambda: _eq(pool_size(base), 1))
            [refill] = pool_of(engine, pid)
            assert refill != pooled
    # On exit the server removes its unclaimed pool container.
    assert pool_of(engine, pid) == []


async def _eq(value, expected) -> bool:
    return (await value) == expected


@pytest.mark.timeout(240)
async def test_reaper_stops_a_dead_servers_containers_and_removes_its_pool(engine, tmp_path: Path):
    marker = "83s"  # an unusual --idle-stop value finds server A's process
    async with connect("--pool", "1", "--idle-stop", marker, "--timeout", "20", "--memory", "1g") as a:
        await a.bash("echo kept > kept.txt")
        mine = f"mcp-codeexec.{TENANT}.{a.last_meta['container']['id']}"
        pid = server_pid(marker)
        [pooled] = await wait_until(lambda: _ready_pool(engine, pid))
        os.kill(pid, signal.SIGKILL)  # no shutdown: its containers stay as they were
        await wait_until(lambda: _gone(pid), timeout=30)
    assert engine.inspect_container(mine)["State"]["Running"]
    assert engine.inspect_container(POOL + pooled)["State"]["Running"]
    log = tmp_path / "b.log"
    with open(log, "w") as errlog:
        async with connect("--reap-interval", "1s", "--no-prepare", "--timeout", "20", "--memory", "1g", errlog=errlog) as b:
            await wait_until(lambda: _stopped_and_removed(engine, mine, POOL + pooled), timeout=60)
            # Asleep (checkpointed or stopped), not removed: the files are there for its next use.
            r = await b.bash("cat kept.txt", meta={"container": mine.rsplit(".", 1)[1]})
            assert r["stdout"] == "kept\n", r
    text = log.read_text()
    # (Checkpointed where the engine can, memory and all: tests/e2e/test_checkpoint.py.)
    assert f"reaper: {mine}: no server uses it" in text, text
    assert f"reaper: removing {POOL + pooled} (orphaned pool)" in text, text


async def _ready_pool(engine, pid: int) -> list[str] | None:
    ids = pool_of(engine, pid)
    return ids if ids and engine.inspect_container(POOL + ids[0])["State"]["Running"] else None


async def _gone(pid: int) -> bool:
    try:  # gone, or a zombie; it may vanish between any two looks
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] == "Z"
    except OSError:
        return True


async def _stopped_and_removed(engine, running: str, pooled: str) -> bool:
    stopped = not engine.inspect_container(running)["State"]["Running"]
    removed = not engine.containers(all=True, filters={"name": pooled})
    return stopped and removed


@pytest.mark.timeout(300)
async def test_two_servers_hand_out_only_their_own_pool_each_container_once(engine):
    """Two server processes with warm pools on one engine, sessions on both at once: each
    session gets a container of its own server's pool, and no container goes to two
    sessions. (Each server hands out only what it created; the engine's rename is not
    what keeps them apart: two processes renaming one container at once both succeed
    on Docker 20.10, which this project's first version of this test found.)"""
    args = ("--pool", "2", "--timeout", "20", "--memory", "1g")
    with http_server(*args) as one, http_server(*args) as two:
        pools = {}
        for base in (one, two):
            await wait_until(lambda base=base: _eq(pool_size(base), 2), timeout=120)
            pools[base] = set(pool_of(engine, server_pid(base.rsplit(":", 1)[1])))
        got: dict[str, list[str]] = {one: [], two: []}

        async def session(base: str) -> None:
            http = httpx2.AsyncClient(timeout=60)
            async with Client(streamable_http_client(f"{base}/mcp", http_client=http), mode="legacy") as client:
                s = Session(client)
                await s.bash("true")
                got[base].append(s.last_meta["container"]["id"])

        async with anyio.create_task_group() as tg:
            for base in (one, two, one, two):
                tg.start_soon(session, base)
        claimed = got[one] + got[two]
        assert len(set(claimed)) == 4, got
        assert set(got[one]) == pools[one] and set(got[two]) == pools[two], (got, pools)
