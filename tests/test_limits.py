"""Limits are real: a workspace disk quota (ENOSPC inside, nothing else affected, survives
a lost loop device), a bounded process count, and the CPU count seen inside. Real server
over stdio, real Docker, real gVisor. (The memory bomb is in test_bash.py.)"""

from __future__ import annotations

import os
import subprocess
import tempfile

import anyio
import pytest

from conftest import TENANT, connect
from test_bash import assert_fork_bomb_result, assert_says_why_it_could_not_run
from mcp_codeexec.deployment import quota as q
from mcp_codeexec.deployment.docker import DockerDeployment

pytestmark = pytest.mark.anyio

QUOTA = ("--timeout", "60", "--memory", "1g", "--disk", "64m")
MiB = 1 << 20


def workspace_volume(engine, session) -> dict:
    cid = session.last_meta["container"]["id"]
    name = engine.inspect_container(f"mcp-codeexec.{TENANT}.{cid}")["Config"]["Labels"]["org.mcp-codeexec.volume"]
    return engine.inspect_volume(name)


# Fill the workspace: write 1 MiB chunks until the filesystem says no.
FILL = r"""python3 - <<'EOF'
import errno
n = 0
try:
    with open("fill.bin", "wb") as f:
        while True:
            f.write(b"x" * (1 << 20)); f.flush(); n += 1
except OSError as e:
    print(n, errno.errorcode[e.errno])
EOF"""


async def test_disk_quota_enospc_inside_and_nothing_else_affected(engine):
    async with connect(*QUOTA) as a:
        await a.bash("echo keep > keep.txt")
        r = await a.bash(FILL)
        written, code = r["stdout"].split()
        assert code == "ENOSPC", r
        # The quota is the filesystem's size; ext4's metadata takes a little of it.
        assert 40 <= int(written) <= 64, r
        df = await a.bash("df -B1 --output=size /workspace | tail -1")
        assert 50 * MiB <= int(df["stdout"]) <= 64 * MiB, df
        # The host: the workspace's file holds at most the quota; nothing else was written.
        volume = workspace_volume(engine, a)
        image = volume["Labels"][q.FILE_LABEL]
        assert volume["Options"]["type"] == "ext4" and volume["Labels"][q.SIZE_LABEL] == str(64 * MiB)
        assert os.stat(image).st_size == 64 * MiB and os.stat(image).st_blocks * 512 <= 64 * MiB
        # The server and the sandbox are fine; files are intact; other paths still write.
        r = await a.bash("cat keep.txt; echo more >> keep.txt || echo refused; echo t > /tmp/t && echo tmp-ok")
        assert r["stdout"].startswith("keep\n") and "tmp-ok" in r["stdout"], r
        # A second sandbox with its own quota is unaffected.
        async with connect(*QUOTA) as b:
            r = await b.bash("head -c 20M /dev/zero > twenty.bin && ls -l twenty.bin | awk '{print $5}'")
            assert r["stdout"] == f"{20 * MiB}\n" and r["return_code"] == 0, r
            assert workspace_volume(engine, b)["Name"] != volume["Name"]
        # Space comes back when files are deleted (and goes back to the host: discard).
        r = await a.bash("rm fill.bin && head -c 10M /dev/zero > ten.bin && echo ok")
        assert r["stdout"] == "ok\n", r
        for _ in range(40):  # ext4 discards freed blocks when its journal commits (5 s)
            if os.stat(image).st_blocks * 512 < 40 * MiB:
                break
            await anyio.sleep(0.5)
        assert os.stat(image).st_blocks * 512 < 40 * MiB, os.stat(image).st_blocks * 512
        name = f"mcp-codeexec.{TENANT}.{a.last_meta['container']['id']}"
    # Removing the sandbox (expiry, or by hand) takes its filesystem and loop device along.
    await DockerDeployment().remove(name)
    assert volume["Name"] not in {v["Name"] for v in engine.volumes()["Volumes"] or []}
    assert not os.path.exists(image) and not os.path.lexists(volume["Options"]["device"])
    assert image not in subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout


async def test_stopped_sandbox_starts_again_after_its_loop_device_is_lost(engine, tmp_path):
    """A host reboot detaches every loop device, and /dev/loopN may then hold another file.
    The next start re-attaches the workspace's own file (never mounts the stranger)."""
    async with connect(*QUOTA, "--idle-stop", "2s", "--reap-interval", "1s") as a:
        await a.bash("echo precious > keep.txt")
        volume = workspace_volume(engine, a)
        image, link = volume["Labels"][q.FILE_LABEL], volume["Options"]["device"]
        old_device = os.readlink(link)
        cid = a.last_meta["container"]["id"]
        for _ in range(40):  # idle stop
            if not engine.inspect_container(f"mcp-codeexec.{TENANT}.{cid}")["State"]["Running"]:
                break
            await anyio.sleep(0.25)
        assert not engine.inspect_container(f"mcp-codeexec.{TENANT}.{cid}")["State"]["Running"]
        # "Reboot": detach it, and put a stranger's filesystem on the same device number.
        subprocess.run(["losetup", "--detach", old_device], check=True)
        stranger = tmp_path / "stranger.img"
        subprocess.run(["truncate", "-s", "16M", str(stranger)], check=True)
        subprocess.run(["mkfs.ext4", "-q", "-F", str(stranger)], check=True)
        subprocess.run(["losetup", old_device, str(stranger)], check=True)
        try:
            assert not q.is_attached(image, link)
            r = await a.bash("cat keep.txt; ls")
            assert r["stdout"] == "precious\nkeep.txt\n", r
            assert q.is_attached(image, link) and os.readlink(link) != old_device
        finally:
            subprocess.run(["losetup", "--detach", old_device], check=False)


async def test_no_quota_with_disk_0(engine):
    async with connect("--timeout", "20", "--memory", "1g", "--disk", "0") as a:
        await a.bash("true")
        volume = workspace_volume(engine, a)
        assert q.FILE_LABEL not in (volume["Labels"] or {}) and not volume["Options"]


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


def test_quota_probe_explains_why_not(tmp_path):
    assert q.workspace_quota(0) is None
    blocked = tmp_path / "file"
    blocked.write_text("")
    reason = q.probe(str(blocked / "sub"))
    if os.geteuid() == 0:  # root: the only thing wrong is the directory
        assert reason is not None and "cannot create" in reason, reason
        assert q.probe(tempfile.mkdtemp()) is None
    else:  # not root: that is what it says, whatever the directory
        assert reason is not None and "root" in reason, reason
        assert "root" in (q.probe(tempfile.mkdtemp()) or "")
