"""Sandboxes sleep and wake with their memory (issue 13): a Python variable (the persistent
REPL of tool version 20260120), a background process writing a file every 100 ms, and a
200 MB object in memory survive an idle checkpoint, a kill -9 of the server and an engine
restart; a corrupted checkpoint falls back to a cold start with the files intact and one
line on stderr saying so. Real server processes, real Docker (experimental), real gVisor.

test_engine_restart_keeps_a_checkpointed_sandbox RESTARTS dockerd: every container on the
engine that is running then stops (other test runs on the same machine fail their calls in
flight). conftest runs it last; CI runs alone, so there it costs nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import anyio
import docker
import pytest
from conftest import IMAGE, TENANT, Session, connect, server_pids

from mcp_codeexec.deployment import restore_copies

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(300)]

ARGS = ("--profile", "20260120", "--memory", "1g", "--timeout", "60", "--reap-interval", "1s")
IDLE = ("--idle-checkpoint", "2s")
# Python state: a variable, and 200 MB of random bytes (random: no compression hides them).
SETUP_PY = "import hashlib, os\nx = 12345\nblob = os.urandom(200 << 20)\ndigest = hashlib.sha256(blob).hexdigest()\nprint('set')"
CHECK_PY = "print(x, len(blob), hashlib.sha256(blob).hexdigest() == digest)"
# A background process (outside the REPL) that appends a line to a file every 100 ms.
WRITER = ("nohup bash -c 'while true; do echo tick >> /tmp/ticks; sleep 0.1; done' >/dev/null 2>&1 & "
          "echo $! > /tmp/writer.pid; echo kept > kept.txt; echo home > ~/home.txt")
# The writer is the same process, alive, and still writing.
CHECK_WRITER = ("p=$(cat /tmp/writer.pid); kill -0 $p && a=$(wc -l < /tmp/ticks) && sleep 1 && "
                "b=$(wc -l < /tmp/ticks) && [ $b -gt $((a + 3)) ] && echo writer $p alive")


def name_of(cid: str) -> str:
    return f"mcp-codeexec.{TENANT}.{cid}"


def checkpoints(engine: docker.APIClient, name: str) -> list[str]:
    response = engine._get(engine._url("/containers/{0}/checkpoints", name))
    engine._raise_for_status(response)
    return [c["Name"] for c in response.json() or []]


async def wait_checkpointed(engine: docker.APIClient, name: str, timeout: float = 90) -> Path:
    """The checkpoint image, once written whole (the engine lists a checkpoint, and says
    the container exited, while runsc still writes it: its size then stops changing)."""
    with anyio.fail_after(timeout):
        while engine.inspect_container(name)["State"]["Running"] or not checkpoints(engine, name):
            await anyio.sleep(0.25)
        [checkpoint] = checkpoints(engine, name)
        image = Path(engine.info()["DockerRootDir"], "containers", engine.inspect_container(name)["Id"],
                     "checkpoints", checkpoint, "checkpoint.img")
        size = -1
        while not image.exists() or image.stat().st_size != size:
            size = image.stat().st_size if image.exists() else -1
            await anyio.sleep(1)
    return image


async def set_state(s: Session) -> tuple[str, str]:
    """(container id, the writer's pid) after putting state in the sandbox."""
    r = await s.python(SETUP_PY)
    assert r["stdout"] == "set\n", r
    r = await s.bash(WRITER)
    assert r["return_code"] == 0, r
    pid = (await s.bash("cat /tmp/writer.pid"))["stdout"].strip()
    return s.last_meta["container"]["id"], pid


async def assert_state_kept(s: Session, cid: str, pid: str) -> None:
    meta = {"container": cid}
    r = await s.python(CHECK_PY, meta=meta)
    assert r["stdout"] == f"12345 {200 << 20} True\n" and r["stderr"] == "", r
    r = await s.bash(CHECK_WRITER, meta=meta)
    assert r["stdout"] == f"writer {pid} alive\n", r
    # The workspace volume (quota-backed where the server runs as root) and the tmpfs home.
    assert (await s.bash("cat kept.txt ~/home.txt", meta=meta))["stdout"] == "kept\nhome\n"


async def listing(s: Session) -> dict[str, dict]:
    text = (await s.client.read_resource("codeexec://containers")).contents[0].text
    return {c["id"]: c for c in json.loads(text)["containers"]}


async def no_restore_copy_left(stamp: str) -> None:
    """containerd's unpacked copy of the restored image is removed after the wake (the
    engine leaves one per restore: deployment/restore_copies.py). As root on the engine's
    host, the server clears them in containerd's own temporary directory."""
    dirs = restore_copies.staging_dirs()
    assert dirs, "no containerd process found: is the engine local?"

    def copies() -> list[Path]:
        return [p for d in dirs for p in Path(d).glob("ctrd-checkpoint*/checkpoint.img")
                if restore_copies.image_stamp(str(p)) == stamp]

    with anyio.fail_after(20):
        while copies():
            await anyio.sleep(0.25)


async def test_idle_checkpoint_keeps_memory_and_processes(engine):
    async with connect(*ARGS, *IDLE) as s:
        cid, pid = await set_state(s)
        stamp = restore_copies.image_stamp(str(await wait_checkpointed(engine, name_of(cid))))
        assert stamp
        mine = (await listing(s))[cid]
        assert mine["state"] == "checkpointed", mine
        assert mine["checkpoint_bytes"] > 150 << 20, mine  # the random 200 MB are in it (compressed where it can)
        started = time.monotonic()
        await assert_state_kept(s, cid, pid)
        assert time.monotonic() - started < 30
        assert (await listing(s))[cid]["checkpoint_bytes"] == 0  # restored: the image is gone
        await no_restore_copy_left(stamp)
        # It sleeps again when idle again, and wakes again (a second round trip).
        await wait_checkpointed(engine, name_of(cid))
        await assert_state_kept(s, cid, pid)


async def test_kill_9_of_the_server_loses_nothing(engine, tmp_path: Path):
    marker = "7h"  # an unusual --idle-checkpoint finds server A's process: it never checkpoints
    async with connect(*ARGS, "--idle-checkpoint", marker) as a:
        cid, pid = await set_state(a)
        [server] = server_pids(marker)
        os.kill(server, signal.SIGKILL)  # no shutdown: its sandbox keeps running, unwatched
    assert engine.inspect_container(name_of(cid))["State"]["Running"]
    log = tmp_path / "b.log"
    with open(log, "w") as errlog:
        async with connect(*ARGS, "--no-prepare", errlog=errlog) as b:
            # B's reaper finds it running with no server connected, and checkpoints it.
            await wait_checkpointed(engine, name_of(cid))
            await assert_state_kept(b, cid, pid)
    text = log.read_text()
    assert f"reaper: {name_of(cid)}: no server uses it" in text and f"{name_of(cid)}: checkpointed" in text, text


async def test_server_exit_checkpoints_its_sandboxes(engine):
    """The stdio client gives its server 4 s to exit before SIGKILL; a 200 MB checkpoint
    takes longer here: the engine finishes writing it, and the next restore waits for it.
    (No other server runs this tenant's reaper meanwhile: the exiting server did it.)"""
    async with connect(*ARGS) as a:
        cid, pid = await set_state(a)
    await wait_checkpointed(engine, name_of(cid))
    async with connect(*ARGS, "--no-prepare") as b:
        await assert_state_kept(b, cid, pid)


async def test_corrupted_checkpoint_is_a_cold_start_that_says_so(engine):
    async with connect(*ARGS, *IDLE) as s:
        cid, _ = await set_state(s)
        name = name_of(cid)
        image = await wait_checkpointed(engine, name)
        with open(image, "r+b") as f:  # a disk fault: its first MiB overwritten
            f.write(os.urandom(1 << 20))
        r = await s.python("print(x)", meta={"container": cid})
        lines = r["stderr"].splitlines()
        assert lines[0].startswith("[mcp-codeexec] this sandbox was restarted without its memory: its saved memory "
                                   "could not be restored"), r
        assert sum("without its memory" in line for line in lines) == 1, r
        assert "NameError" in r["stderr"], r  # x is gone, and the call says why first
        # Files intact; /tmp (memory) started afresh; the stale image is gone.
        r = await s.bash("cat kept.txt; [ -e /tmp/writer.pid ] || echo no writer", meta={"container": cid})
        assert r["stdout"] == "kept\nno writer\n" and r["stderr"] == "", r
        assert not checkpoints(engine, name)
        # The notice was said once: the next call is quiet.
        r = await s.python("print(1)", meta={"container": cid})
        assert r["stderr"] == "", r


@pytest.mark.engine_restart
async def test_engine_restart_keeps_a_checkpointed_sandbox(engine):
    """Restarts dockerd (see the module's docstring)."""
    async with connect(*ARGS, *IDLE) as s:
        cid, pid = await set_state(s)
        await wait_checkpointed(engine, name_of(cid))
        await anyio.to_thread.run_sync(restart_dockerd)
        await assert_state_kept(s, cid, pid)


def restart_dockerd() -> None:
    """Stop dockerd and start it again as it was started (systemd, or the same command
    line in its own session); the pid of a daemon scripts/test.sh started is updated."""
    if os.path.isdir("/run/systemd/system"):
        subprocess.run(["systemctl", "restart", "docker"], check=True)
    else:
        old = int(Path("/var/run/docker.pid").read_text())
        argv = Path(f"/proc/{old}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
        os.kill(old, signal.SIGTERM)
        deadline = time.monotonic() + 60
        while os.path.exists(f"/proc/{old}") and time.monotonic() < deadline:
            time.sleep(0.2)
        log_path = Path(__file__).resolve().parents[2] / ".cache" / "dockerd.log"
        log_path.parent.mkdir(exist_ok=True)
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        started = os.environ.get("MCP_CODEEXEC_DOCKERD_STARTED_FILE")
        if started and Path(started).exists() and Path(started).read_text().strip() == str(old):
            Path(started).write_text(f"{proc.pid}\n")  # so test.sh stops this one
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            docker.APIClient(version="auto").ping()
            return
        except Exception:  # noqa: BLE001 - not answering yet
            time.sleep(0.5)
    raise AssertionError("dockerd did not come back within 60 s")


def test_restore_copies_are_cleared_through_the_engine_too(engine, monkeypatch: pytest.MonkeyPatch):
    """A server that cannot reach containerd's directory itself (not root, or in a
    container) clears stale restore copies in the host's /tmp through a helper container;
    a fresh one, another restore's in progress, stays. Component level: the real engine."""
    old = Path(tempfile.mkdtemp(prefix="ctrd-checkpoint", dir="/tmp"))
    fresh = Path(tempfile.mkdtemp(prefix="ctrd-checkpoint", dir="/tmp"))
    try:
        for d in (old, fresh):
            (d / "checkpoint.img").write_bytes(os.urandom(1000))
        os.utime(old, (time.time() - 11 * 60,) * 2)
        monkeypatch.setattr(restore_copies, "staging_dirs", lambda: [])
        removed = restore_copies.sweep(lambda: engine, IMAGE)
        assert f"/host-tmp/{old.name}" in removed and not old.exists()
        assert (fresh / "checkpoint.img").exists()
    finally:
        shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(fresh, ignore_errors=True)
