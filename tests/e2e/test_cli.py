"""Command-line flags the README documents, each seen doing what it says from the outside:
the real server process over stdio (or `doctor`, `--version`), real Docker, real gVisor."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import time

import anyio
import pytest
from conftest import IMAGE, TENANT, connect

from mcp_codeexec.deployment import quota as q

pytestmark = pytest.mark.anyio

SMALL = ("--timeout", "20", "--memory", "1g")


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mcp_codeexec", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_version():
    r = run_cli("--version")
    assert (r.returncode, r.stdout) == (0, f"mcp-codeexec {importlib.metadata.version('mcp-codeexec')}\n")


@pytest.mark.timeout(300)
def test_doctor_checks_and_exit_status(engine, tmp_path):
    quota_dir = str(tmp_path / "quota")
    ready = run_cli("doctor", "--image", IMAGE, "--quota-dir", quota_dir, "--disk", "64m", timeout=240)
    assert ready.returncode == 0, ready.stdout + ready.stderr
    lines = ready.stdout.splitlines()
    for check in ("engine", "runtime", "image", "manifest", "sandbox", "disk quota"):
        assert any(line.startswith(f"ok    {check}: ") for line in lines), (check, ready.stdout)
    assert any("runsc" in line for line in lines if line.startswith("ok    runtime"))
    assert lines[-1].startswith("ready")
    # What is missing is a failure (exit 1) with the command that fixes it.
    missing = run_cli("doctor", "--quick", "--image", "mcp-codeexec-no-such-image:0", "--disk", "0")
    assert missing.returncode == 1, missing.stdout
    assert "FAIL  image: mcp-codeexec-no-such-image:0 not found" in missing.stdout
    assert "      fix: build it: sandbox/build.sh" in missing.stdout
    assert "1 essential problem(s)" in missing.stdout
    no_runtime = run_cli("doctor", "--quick", "--image", IMAGE, "--runtime", "no-such-runtime", "--disk", "0")
    assert no_runtime.returncode == 1 and "FAIL  runtime: the engine has no runtime 'no-such-runtime'" in no_runtime.stdout
    no_engine = run_cli("doctor", "--quick", "--disk", "0", env={"DOCKER_HOST": "unix:///nonexistent/docker.sock"})
    assert no_engine.returncode == 1 and "FAIL  engine: Docker Engine not reachable" in no_engine.stdout
    # A warning alone (no quota) still lets the server run: exit 0.
    warned = run_cli("doctor", "--quick", "--image", IMAGE, "--disk", "0")
    assert warned.returncode == 0 and "WARN  disk quota: off" in warned.stdout and "warning(s)" in warned.stdout


async def test_weak_isolation_is_warned_and_told_to_the_model(engine, tmp_path):
    refused = run_cli("--runtime", "runc")
    assert refused.returncode != 0 and "--allow-weak-isolation" in refused.stderr
    log = tmp_path / "server.log"
    with open(log, "w") as errlog:
        async with connect("--runtime", "runc", "--allow-weak-isolation", "--no-prepare", errlog=errlog) as s:
            prompt = (await s.client.read_resource("codeexec://system-prompt")).contents[0].text
    assert "Runs as an unprivileged user under runc: containers share the host kernel" in prompt
    assert "gVisor" not in prompt
    assert "WARNING mcp_codeexec.app: runtime 'runc': sandboxes share the host kernel" in log.read_text()


def running_of(engine, tenant: str) -> list[str]:
    return [c["Names"][0] for c in engine.containers(filters={"name": f"mcp-codeexec.{tenant}."})]


async def test_stdio_prepares_the_container_at_launch_unless_no_prepare(engine):
    tenant = f"{TENANT}-prep"
    started = time.monotonic()
    async with connect("--tenant", tenant, *SMALL):
        while not running_of(engine, tenant):  # no call made: the server started it itself
            assert time.monotonic() - started < 60
            await anyio.sleep(0.2)
        took = time.monotonic() - started
    tenant = f"{TENANT}-noprep"
    async with connect("--tenant", tenant, *SMALL, "--no-prepare") as s:
        await anyio.sleep(2 * took + 2)  # twice as long as the prepared one needed
        assert running_of(engine, tenant) == []
        await s.bash("true")
        assert running_of(engine, tenant) == [f"/mcp-codeexec.{tenant}.{s.last_meta['container']['id']}"]


@pytest.mark.parametrize("disk", [(), ("--disk", "0")], ids=["quota", "plain-volume"])
async def test_workdir(engine, disk):
    """A working directory the image does not have: the workspace there is the sandbox
    user's, on a quota filesystem and on a plain volume."""
    async with connect("--workdir", "/work", *SMALL, *disk) as s:
        r = await s.bash("pwd; echo hi > made.txt")
        assert (r["stdout"], r["stderr"], r["return_code"]) == ("/work\n", "", 0), r
        files = json.loads((await s.client.read_resource("codeexec://files")).contents[0].text)["files"]
        assert [f["path"] for f in files if f["id"] == r["content"][0]["file_id"]] == ["/work/made.txt"]
        assert (await s.edit(command="view", path="made.txt"))["content"] == "hi\n"
        await s.edit(command="create", path="by-editor.txt", file_text="x")
        assert (await s.bash("cat /work/by-editor.txt"))["stdout"] == "x"
        r = await s.edit(command="view", path="/workspace")
        assert r["error_code"] == "invalid_tool_input", r  # outside the working directory
        prompt = (await s.client.read_resource("codeexec://system-prompt")).contents[0].text
        assert "Working directory: `/work`" in prompt and "/workspace" not in prompt


async def test_tmp_size(engine):
    async with connect("--tmp-size", "16m", *SMALL) as s:
        r = await s.bash("df -B1 --output=size /tmp $HOME | tail -2")
        assert r["stdout"].split() == [str(16 << 20)] * 2, r
        r = await s.bash("head -c 20M /dev/zero > /tmp/big 2>&1; echo $?; rm -f /tmp/big")
        assert r["stdout"] != "0\n", r


async def test_max_file_size(engine):
    async with connect("--max-file-size", "1k", *SMALL) as s:
        r = await s.bash("head -c 1024 /dev/zero > at-limit.bin; head -c 1025 /dev/zero > over.bin")
        assert len(r["content"]) == 1
        listing = json.loads((await s.client.read_resource("codeexec://files")).contents[0].text)["files"]
        assert [f["filename"] for f in listing if f["id"] == r["content"][0]["file_id"]] == ["at-limit.bin"]
        assert r["stderr"] == "[mcp-codeexec] /workspace/over.bin (1025 bytes) is over the 1024-byte output-file limit: not registered\n"


async def test_file_retention(engine):
    async with connect("--file-retention", "3s", "--reap-interval", "1s", *SMALL) as s:
        file_id = (await s.bash("echo short-lived > r.txt"))["content"][0]["file_id"]
        kept = await s.client.read_resource(f"codeexec://files/{file_id}")  # there now
        assert kept.contents[0].mime_type == "text/plain"
        for _ in range(40):
            await anyio.sleep(0.5)
            listing = json.loads((await s.client.read_resource("codeexec://files")).contents[0].text)["files"]
            if file_id not in {f["id"] for f in listing}:
                break
        assert file_id not in {f["id"] for f in listing}
        with pytest.raises(Exception, match=file_id):
            await s.client.read_resource(f"codeexec://files/{file_id}")


async def test_quota_dir(engine, tmp_path):
    quota_dir = tmp_path / "workspaces"
    async with connect("--quota-dir", str(quota_dir), "--disk", "32m", *SMALL) as s:
        await s.bash("true")
        cid = s.last_meta["container"]["id"]
        volume = engine.inspect_container(f"mcp-codeexec.{TENANT}.{cid}")["Config"]["Labels"]["org.mcp-codeexec.volume"]
        image = engine.inspect_volume(volume)["Labels"][q.FILE_LABEL]
        assert os.path.dirname(image) == str(quota_dir) and os.stat(image).st_size == 32 << 20
        r = await s.bash("df -B1 --output=size /workspace | tail -1")
        assert 24 << 20 <= int(r["stdout"]) <= 32 << 20
