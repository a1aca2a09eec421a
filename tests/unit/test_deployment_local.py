"""deployment/local.py, and the whole server on it. First the real server process over stdio
(cli → serve_stdio → app → local backend), driven by the `mcp` SDK's
client, with `--backend local --allow-weak-isolation`, so the real agent runs as plain local
processes (deployment/local.py). They cover everything above the backend (protocol, tools,
containers, sessions, limits, files) in seconds, without Docker.

They are beside, never instead of, the e2e suite in tests/ on real Docker and gVisor: nothing
here says anything about isolation, limits the kernel enforces, or the Docker backend.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import anyio
import pytest
from conftest import TENANT, Session, connect

from mcp_codeexec.config import Settings
from mcp_codeexec.deployment.base import VOLUME_LABEL, BackendUnavailable, NameTaken, SandboxGone, SandboxSpec, remove_all
from mcp_codeexec.deployment.local import LocalDeployment
from unit.conftest import local_settings, mcp_session, sandbox_dir

pytestmark = pytest.mark.anyio

ARGS = ("--timeout", "3", "--max-output", "20000", "--memory", "1g", "--disk", "0")


@pytest.fixture(scope="module")
def base() -> Iterator[str]:
    """One base for the module's server (sandbox_dir: short, reachable by uid 1000, cleaned)."""
    yield from sandbox_dir()


def local(base: str, *args: str):  # noqa: ANN201 - conftest.connect's context manager
    return connect("--backend", "local", "--allow-weak-isolation", "--local-dir", base, *ARGS, *args)


@pytest.fixture(scope="module")
async def sandbox(base: str) -> AsyncIterator[Session]:
    async with local(base) as session:
        yield session


def workspace(base: str) -> Path:
    return Path(os.path.realpath(base)) / "workspace"


async def test_bash_result_is_exact(sandbox: Session, base: str) -> None:
    assert await sandbox.bash("echo hello; pwd") == {
        "type": "bash_code_execution_result",
        "stdout": f"hello\n{workspace(base)}\n",
        "stderr": "",
        "return_code": 0,
        "content": [],
    }


async def test_exit_code_and_stderr(sandbox: Session) -> None:
    r = await sandbox.bash("echo out; echo err >&2; exit 3")
    assert (r["stdout"], r["stderr"], r["return_code"]) == ("out\n", "err\n", 3)
    assert (await sandbox.bash("kill -9 $$"))["return_code"] == 137


async def test_time_limit_kills_the_whole_tree(base: str) -> None:
    # In process, with a short limit. A child in the background, and one that left the
    # command's session: both die.
    async with mcp_session(local_settings(base, timeout=1)) as s:
        r = await s.bash("sleep 300 & echo $! > .bg.pids; setsid sleep 300 & echo $! >> .bg.pids; sleep 300")
        assert r == {"type": "bash_code_execution_tool_result_error", "error_code": "execution_time_exceeded"}
        pids = [int(line) for line in (workspace(base) / ".bg.pids").read_text().split()]
        assert len(pids) == 2
        for _ in range(50):  # the agent kills them before answering; /proc may lag a moment
            if not any(map(_alive, pids)):
                break
            await anyio.sleep(0.02)
        assert not any(map(_alive, pids)), "a process of the timed-out command survived"
        assert (await s.bash("echo still here"))["stdout"] == "still here\n"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


async def test_output_cap_keeps_head_and_tail(sandbox: Session) -> None:
    r = await sandbox.bash("printf 'H%.0s' $(seq 15000); printf 'T%.0s' $(seq 15000)")
    out = r["stdout"]
    assert out.startswith("H" * 10000) and out.endswith("T" * 10000)
    assert "[... 10000 bytes of stdout omitted: 30000 bytes in all" in out


async def test_editor_create_view_str_replace(sandbox: Session, base: str) -> None:
    created = await sandbox.edit(command="create", path="notes/a.txt", file_text="one\ntwo\n")
    assert created == {"type": "text_editor_code_execution_create_result", "is_file_update": False}
    assert (workspace(base) / "notes/a.txt").read_text() == "one\ntwo\n"
    replaced = await sandbox.edit(command="str_replace", path="notes/a.txt", old_str="two", new_str="2")
    assert replaced["type"] == "text_editor_code_execution_str_replace_result"
    viewed = await sandbox.edit(command="view", path=str(workspace(base) / "notes/a.txt"))
    assert viewed == {
        "type": "text_editor_code_execution_view_result",
        "file_type": "text",
        "content": "one\n2\n",
        "num_lines": 2,
        "start_line": 1,
        "total_lines": 2,
    }
    missing = await sandbox.edit(command="str_replace", path="notes/a.txt", old_str="three", new_str="3")
    assert missing["error_code"] == "string_not_found"
    outside = await sandbox.edit(command="view", path="/etc/passwd")
    assert outside["type"] == "text_editor_code_execution_tool_result_error"


async def test_output_files_are_registered(sandbox: Session) -> None:
    r, full = await sandbox.call_full("bash_code_execution", {"command": "printf 'a,b\\n1,2\\n' > table.csv"})
    [entry] = r["content"]
    assert entry["type"] == "bash_code_execution_output" and entry["file_id"].startswith("file_")
    resource = await sandbox.client.read_resource(f"codeexec://files/{entry['file_id']}")
    assert base64.b64decode(resource.contents[0].blob) == b"a,b\n1,2\n"


async def test_container_reuse_by_id_and_meta_errors(sandbox: Session, base: str) -> None:
    await sandbox.bash("true")
    cid = sandbox.last_meta["container"]["id"]
    assert (await sandbox.bash("echo same", meta={"container": cid}))["stdout"] == "same\n"
    assert sandbox.last_meta["container"]["id"] == cid
    assert (await sandbox.bash("echo same", meta={"container": {"id": cid}}))["return_code"] == 0
    unknown = "container_" + "x" * 24
    assert (await sandbox.bash("true", meta={"container": unknown}))["error_code"] == "container_expired"
    assert (await sandbox.bash("true", meta={"container": 42}))["error_code"] == "invalid_tool_input"
    # Another server takes the container over by id (in process: the stdio path is above).
    # Its settings differ (memory, so the rlimit): the agent reloads, under the old hard limit.
    async with mcp_session(local_settings(base, container=cid, tenant=TENANT)) as other:
        there = await other.bash("echo there")
        assert there.get("stdout") == "there\n", there
        assert other.last_meta["container"]["id"] == cid


async def test_repl_profile_keeps_state(base: str) -> None:
    async with mcp_session(local_settings(base, profile="20260120")) as s:
        assert (await s.python("x = 41"))["return_code"] == 0  # type: ignore[attr-defined]
        r = await s.python("print(x + 1)")  # type: ignore[attr-defined]
        assert (r["stdout"], r["return_code"]) == ("42\n", 0)
        cid = s.last_meta["container"]["id"]
        # A second server on the same container (same agent) sees the same interpreter.
        async with mcp_session(local_settings(base, profile="20260120", container=cid)) as t:
            assert (await t.python("print(x)"))["stdout"] == "41\n"  # type: ignore[attr-defined]


async def test_system_prompt_says_there_is_no_isolation(sandbox: Session) -> None:
    prompt = await sandbox.client.read_resource("codeexec://system-prompt")
    assert "NO isolation" in prompt.contents[0].text


def test_local_path_never_imports_docker() -> None:
    code = (
        "import sys, mcp_codeexec.server, mcp_codeexec.cli\n"
        "from mcp_codeexec.config import Settings\n"
        "from mcp_codeexec.deployment import make_backend\n"
        "make_backend(Settings(backend='local'))\n"
        "assert 'docker' not in sys.modules, 'docker imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


async def test_code_calls_upstream_tools(base: str, tmp_path: Path) -> None:
    """Programmatic tool calling on the local backend: the agent (not root here) ships
    mcp_tools and mcp-tool into its sandbox's own $HOME, nothing into the host's /tmp."""
    from .test_tool_calls import memory_server

    config = tmp_path / "tools.json"
    config.write_text(json.dumps({"servers": {"memory": memory_server(tmp_path)}}))
    before = {n for n in os.listdir("/tmp") if n.startswith(".mcp-codeexec-tools-")}
    async with local(base, "--tools-config", str(config), "--profile", "20260120") as session:
        cli = await session.bash("mcp-tool memory read_graph '{}'")
        assert json.loads(cli["stdout"]) == {"entities": [], "relations": []}, cli
        cell = await session.python("from mcp_tools import memory\nprint(await memory.read_graph())")
        assert cell["stdout"] == "{'entities': [], 'relations': []}\n", cell
    assert {n for n in os.listdir("/tmp") if n.startswith(".mcp-codeexec-tools-")} == before


# --- the backend's verbs, directly ------------------------------------------------------


@pytest.fixture
def own() -> Iterator[str]:
    """A base of this test's own (the module's is shared by the server tests above)."""
    yield from sandbox_dir()


def spec(own: str, name: str) -> SandboxSpec:
    from mcp_codeexec.sandbox import ContainerInfo, sandbox_spec

    return sandbox_spec(Settings(workdir=str(workspace(own))), name, "vol-" + name, ContainerInfo.new(timedelta(days=1)))


async def test_verbs_create_start_inspect_stop_claim_remove(own: str) -> None:
    d = LocalDeployment(own)
    info = await d.check()
    assert (info.engine, info.runtime) == ("local processes", "none") and "NO isolation" in info.isolation
    a = spec(own, "mcp-codeexec-pool.a")
    await d.create(a)
    with pytest.raises(NameTaken):
        await d.create(a)
    record = await d.inspect(a.name)
    assert (record.running, record.status, record.in_use) == (False, "created", 0)
    assert record.labels[VOLUME_LABEL] == "vol-" + a.name and record.labels["org.mcp-codeexec.layout"]
    await d.start(a)
    await d.start(a)  # running already: nothing
    assert (await d.inspect(a.name)).status == "running"
    stream = await d.connect(a.name, [])
    record = await d.inspect(a.name)
    assert record.in_use == 1
    await stream.aclose()
    # Claimed under a tenant's name while running; the old name is gone, the new one taken.
    await d.create(spec(own, "mcp-codeexec.t.b"))
    with pytest.raises(NameTaken):
        await d.claim(a.name, "mcp-codeexec.t.b")
    await d.claim(a.name, "mcp-codeexec.t.a")
    with pytest.raises(SandboxGone):
        await d.claim(a.name, "mcp-codeexec.t.c")
    with pytest.raises(SandboxGone):
        await d.inspect(a.name)
    listed = await d.list("mcp-codeexec.t.", sizes=True)
    assert [(r.name, r.running) for r in listed] == [("mcp-codeexec.t.a", True), ("mcp-codeexec.t.b", False)]
    assert all(isinstance(r.size_bytes, int) for r in listed)
    await d.stop("mcp-codeexec.t.a")
    stopped = await d.inspect("mcp-codeexec.t.a")
    assert (stopped.running, stopped.status, stopped.exit_code) == (False, "exited", 137)
    assert await remove_all(d, "mcp-codeexec.t.") == 2
    await d.remove("mcp-codeexec.t.a")  # missing: not an error
    assert await d.list("") == []


async def test_names_that_are_not_sandboxes(own: str) -> None:
    d = LocalDeployment(own)
    (Path(own) / "stray-file").write_text("not a sandbox")
    assert await d.list("") == []  # a stray file in the base is skipped, not a crash
    for name in ("", "../x", ".hidden", "a/b", "stray-file"):
        with pytest.raises(SandboxGone):
            await d.inspect(name)
    with pytest.raises(SandboxGone):
        await d.connect("absent", [])


async def test_refusals(own: str, tmp_path: Path) -> None:
    with pytest.raises(BackendUnavailable, match="too long for a socket path"):
        await LocalDeployment(os.path.join(own, "x" * 100)).create(spec(own, "mcp-codeexec.t.long"))
    (tmp_path / "file").write_text("")
    with pytest.raises(BackendUnavailable, match="cannot make"):
        await LocalDeployment(str(tmp_path / "file" / "sub")).check()
    if os.geteuid() == 0:
        foreign = tmp_path / "foreign"
        foreign.mkdir()
        os.chown(foreign, 1000, 1000)
        with pytest.raises(BackendUnavailable, match="belongs to another user"):
            await LocalDeployment(str(foreign)).check()


async def test_a_loader_that_dies_at_start_says_why(own: str) -> None:
    d = LocalDeployment(own)
    broken = replace(spec(own, "mcp-codeexec.t.x"), env={"PATH": "/nonexistent"})
    await d.create(broken)
    with pytest.raises((BackendUnavailable, FileNotFoundError)):
        await d.start(broken)
