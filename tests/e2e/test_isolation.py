"""The sandbox's isolation, proven by inspection (never by trying to reach the network)."""

from __future__ import annotations

import pytest
from conftest import TENANT, connect

pytestmark = pytest.mark.anyio


def container_of(engine, sandbox) -> dict:
    cid = sandbox.last_meta["container"]["id"]
    return engine.inspect_container(f"mcp-codeexec.{TENANT}.{cid}")


async def test_only_loopback_inside_and_no_network_in_engine(sandbox, engine):
    r = await sandbox.bash("python3 -c 'import socket; print([n for _, n in socket.if_nameindex()])'")
    assert r["stdout"] == "['lo']\n"
    info = container_of(engine, sandbox)
    assert info["HostConfig"]["NetworkMode"] == "none"
    assert info["HostConfig"]["Runtime"] == "runsc"


async def test_unprivileged(sandbox, engine):
    # gVisor's /proc has no NoNewPrivs line: ask the kernel (prctl PR_GET_NO_NEW_PRIVS = 39).
    r = await sandbox.bash(
        "id -u; python3 -c 'import ctypes; print(ctypes.CDLL(None).prctl(39, 0, 0, 0, 0))'; "
        "grep -E '^(CapEff|CapPrm)' /proc/self/status"
    )
    lines = r["stdout"].split("\n")
    assert lines[0] == "1000" and lines[1] == "1"
    status = dict(line.split(":\t") for line in lines[2:] if line)
    assert status["CapEff"] == status["CapPrm"] == "0000000000000000"
    info = container_of(engine, sandbox)
    hc = info["HostConfig"]
    # The sandbox's own processes (init, agent) keep what starting and killing the user's
    # processes needs; commands have none (above).
    assert hc["CapDrop"] == ["ALL"] and sorted(hc["CapAdd"]) == ["KILL", "SETGID", "SETUID"]
    assert "no-new-privileges" in hc["SecurityOpt"]
    assert hc["ReadonlyRootfs"] is True and hc["PidsLimit"] == 512 and hc["Memory"] == 1 << 30


async def test_read_only_root_and_no_host_files(sandbox, engine):
    r = await sandbox.bash("awk '$2 == \"/\" {print $4}' /proc/mounts; touch /tmp/ok && echo tmp-ok; touch $HOME/ok && echo home-ok")
    root_options, tmp, home = r["stdout"].split()
    assert root_options.split(",")[0] == "ro" and tmp == "tmp-ok" and home == "home-ok"
    info = container_of(engine, sandbox)
    # Nothing of the host is mounted: only the workspace volume (tmpfs mounts are not binds).
    assert [m["Type"] for m in info["Mounts"]] == ["volume"]
    # nocopy: nothing of the image is copied onto the volume (its root is the sandbox user's).
    assert info["HostConfig"]["Binds"] == [f"mcp-codeexec-ws.{sandbox.last_meta['container']['id']}:/workspace:rw,nocopy"]


async def test_runs_under_gvisor_kernel(sandbox):
    r = await sandbox.bash("dmesg 2>/dev/null | head -1; cat /proc/version")
    assert "gVisor" in r["stdout"] or "Starting gVisor" in r["stdout"] or r["stdout"].startswith("Linux version 4.4.0")


async def test_two_sandboxes_see_nothing_of_each_other(sandbox, engine):
    """Two sessions, two sandboxes: files, /tmp, processes and storage are each their own."""
    a = sandbox
    await a.bash("echo a-secret > /workspace/a-only.txt; echo a-tmp > /tmp/a-only.txt; (exec -a sleep-in-a sleep 777) &")
    async with connect("--timeout", "5", "--memory", "1g", "--no-prepare") as b:
        r = await b.bash(
            "ls /workspace/a-only.txt /tmp/a-only.txt 2>&1; ps -eo args | grep -c '^sleep-in-a' || true; "
            "echo b > /workspace/b-only.txt"
        )
        assert r["stdout"] == (
            "ls: cannot access '/workspace/a-only.txt': No such file or directory\n"
            "ls: cannot access '/tmp/a-only.txt': No such file or directory\n0\n"
        ), r
        assert (await b.edit(command="view", path="/workspace/a-only.txt"))["error_code"] == "file_not_found"
        assert b.last_meta["container"]["id"] != a.last_meta["container"]["id"]
        mine, theirs = container_of(engine, a), container_of(engine, b)
        assert [m["Name"] for m in mine["Mounts"]] != [m["Name"] for m in theirs["Mounts"]]
    r = await a.bash("ls /workspace/b-only.txt 2>&1; ps -eo args | grep -c '^sleep-in-a'; pkill -f sleep-in-a")
    assert r["stdout"] == "ls: cannot access '/workspace/b-only.txt': No such file or directory\n1\n", r
