"""Limits are real: a bounded process count, and the CPU count seen inside. Real server
over stdio, real Docker, real gVisor. (The memory bomb is in test_bash.py, the workspace
disk quota in test_quota.py.)"""

from __future__ import annotations

import pytest
from conftest import TENANT, connect

from mcp_codeexec.deployment import quota as q

from .test_bash import assert_fork_bomb_result, assert_says_why_it_could_not_run

pytestmark = pytest.mark.anyio


async def test_process_count_is_bounded_and_the_sandbox_survives(engine):
    pids = 256
    async with connect("--timeout", "20", "--memory", "1g", "--pids", str(pids), "--disk", "0") as a:
        r = await a.bash("ulimit -u; echo here > /tmp/marker")  # /tmp is lost if the sandbox restarts
        # Processes are limited inside, below the host's task limit (each gVisor process
        # costs several host tasks), and not so low that ordinary work cannot run.
        nproc = int(r["stdout"])
        assert 8 <= nproc < pids, r
        cid = a.last_meta["container"]["id"]
        started_at = engine.inspect_container(f"mcp-codeexec.{TENANT}.{cid}")["State"]["StartedAt"]
        # Fork until the kernel refuses; count how many we got.
        r = await a.bash(r"""python3 - <<'EOF'
import errno, os, signal, time
kids = []
try:
    while True:
        pid = os.fork()
        if pid == 0:
            time.sleep(60)
            os._exit(0)
        kids.append(pid)
except OSError as e:
    print(len(kids), errno.errorcode[e.errno])
for pid in kids:
    os.kill(pid, signal.SIGKILL)
for pid in kids:
    os.waitpid(pid, 0)
EOF""")
        count, code = r["stdout"].split()
        # The limit counts every process of the sandbox's user: the few already running
        # (the agent, the shell, this python) take some of it.
        assert code == "EAGAIN" and nproc - 10 <= int(count) < nproc, r
        # Refused inside: the sandbox is the same one, not killed and restarted.
        r = await a.bash("cat /tmp/marker; echo keep > keep.txt")
        assert r["stdout"] == "here\n", r
        info = engine.inspect_container(f"mcp-codeexec.{TENANT}.{cid}")
        assert info["State"]["StartedAt"] == started_at and info["State"]["Running"]
        assert info["HostConfig"]["PidsLimit"] == pids
        # A real fork bomb: its call ends; the bomb (in the background) holds every process
        # slot, so the sandbox may have to be restarted to run anything again; either way
        # the server answers, the workspace is intact, and the host limit was never reached.
        assert_fork_bomb_result(await a.bash(":(){ :|:& };:"))
        for _ in range(3):
            r = await a.bash("cat keep.txt")
            if r["stdout"] == "keep\n":
                break
            assert_says_why_it_could_not_run(r)
        assert r["stdout"] == "keep\n", r
        assert (await a.bash("echo alive"))["stdout"] == "alive\n"


@pytest.mark.parametrize("cpus, seen", [("1", 1), ("0.5", 1), ("2", 2)])
async def test_cpu_count_seen_inside_is_the_configured_one(engine, cpus, seen):
    host = len(q.host_cpus())
    expected = min(seen, host)
    async with connect("--timeout", "20", "--memory", "1g", "--cpus", cpus, "--disk", "0") as a:
        r = await a.bash("nproc; python3 -c 'import os; print(os.cpu_count(), len(os.sched_getaffinity(0)))'")
        assert r["stdout"] == f"{expected}\n{expected} {expected}\n", r
        cid = a.last_meta["container"]["id"]
        hc = engine.inspect_container(f"mcp-codeexec.{TENANT}.{cid}")["HostConfig"]
        assert hc["NanoCpus"] == int(float(cpus) * 1e9)
        # Pinned to as many cores as it may use; not pinned when that is every core.
        pinned = hc["CpusetCpus"].split(",") if hc["CpusetCpus"] else []
        assert len(pinned) == (expected if expected < host else 0), hc["CpusetCpus"]


def test_cpusets_rotate_across_cores():
    cores = [0, 1, 2, 3]
    picks = [q.pick_cpuset(1, cores) for _ in range(8)]
    assert set(picks) == {"0", "1", "2", "3"}  # every core used, in turn
    assert all(picks[i] != picks[i + 1] for i in range(7))
    pairs = {q.pick_cpuset(1.5, cores) for _ in range(4)}
    assert all(len(p.split(",")) == 2 for p in pairs) and len(pairs) == 2
    assert q.pick_cpuset(4, cores) is None and q.pick_cpuset(8, cores) is None
