"""sandbox.py: one sandbox's records, its agent connection, file transfer, and recovery
when the sandbox dies or stops answering, on the local backend (the real agent)."""

from __future__ import annotations

import os
import re
import signal
from datetime import UTC, datetime, timedelta

import pytest

from mcp_codeexec.agent import protocol as p
from mcp_codeexec.errors import ExecutionTimeExceeded, FileNotFound, OutputFileTooLarge, SandboxDied
from mcp_codeexec.sandbox import LABEL, LAYOUT, ContainerInfo, iso, new_container_id, sandbox_spec
from unit.conftest import local_settings, manager, workspace

pytestmark = pytest.mark.anyio


def test_container_ids_and_times() -> None:
    assert re.fullmatch(r"container_[A-Za-z0-9]{24}", new_container_id())
    info = ContainerInfo.new(timedelta(hours=1))
    assert info.expires_at - info.created_at == timedelta(hours=1) and info.created_at.microsecond == 0
    assert not info.expired
    assert ContainerInfo.from_labels(info.id, info.labels()) == info
    assert info.meta() == {"id": info.id, "expires_at": iso(info.expires_at)} and iso(info.expires_at).endswith("Z")
    past = ContainerInfo("container_x", datetime(2020, 1, 1, tzinfo=UTC), datetime(2020, 1, 2, tzinfo=UTC))
    assert past.expired and past.labels() == {f"{LABEL}.created_at": "2020-01-01T00:00:00Z",
                                              f"{LABEL}.expires_at": "2020-01-02T00:00:00Z"}


def test_spec_carries_the_settings_and_labels(base: str) -> None:
    s = local_settings(base, memory_bytes=1 << 30, cpus=2, pids_limit=77, tmp_bytes=1 << 20)
    info = ContainerInfo.new(timedelta(days=1))
    spec = sandbox_spec(s, "mcp-codeexec.t." + info.id, "vol", info, {"extra": "1"})
    assert (spec.memory_bytes, spec.cpus, spec.pids_limit, spec.tmp_bytes, spec.workdir) == (1 << 30, 2.0, 77, 1 << 20, s.workdir)
    assert spec.labels == {f"{LABEL}.managed": "1", f"{LABEL}.layout": LAYOUT, **info.labels(), "extra": "1"}
    assert spec.command[:3] == ("python3", "-I", "-u") and spec.env["HOME"] == "/home/sandbox"


async def test_tenant_from_the_name_and_a_ping(base: str) -> None:
    async with manager(local_settings(base)) as m:
        sandbox = await m.new("alice")
        assert sandbox.tenant == "alice" and not sandbox.running
        reply = await sandbox.request(p.Ping(), 5)
        assert isinstance(reply, p.PingResult) and reply.protocol == p.PROTOCOL_VERSION
        assert sandbox.running and sandbox.in_flight == 0
        assert reply.uid == (1000 if os.geteuid() == 0 else os.geteuid())  # a root server's agent: the sandbox user


async def test_files_in_and_out_in_chunks(base: str) -> None:
    s = local_settings(base)
    async with manager(s) as m:
        sandbox = await m.new("t")
        data = os.urandom(p.READ_CHUNK + 5000)  # read back in two chunks
        await sandbox.write_file(f"{s.workdir}/in/blob.bin", data, 0o444)
        target = workspace(s) / "in" / "blob.bin"
        assert target.read_bytes() == data and target.stat().st_mode & 0o777 == 0o444
        assert await sandbox.read_file(str(target), len(data)) == data
        await sandbox.write_file(f"{s.workdir}/empty", b"")
        assert await sandbox.read_file(f"{s.workdir}/empty", 10) == b""
        with pytest.raises(OutputFileTooLarge, match=f"{len(data) - 1}-byte limit"):
            await sandbox.read_file(str(target), len(data) - 1)
        with pytest.raises(FileNotFound):
            await sandbox.read_file(f"{s.workdir}/absent", 10)


async def test_a_dead_sandbox_is_reported_and_restarted_with_files_intact(base: str) -> None:
    s = local_settings(base)
    async with manager(s) as m:
        sandbox = await m.new("t")
        await sandbox.write_file(f"{s.workdir}/keep.txt", b"kept")
        state = await m.deployment.inspect(sandbox.name)
        assert state.running
        # The whole sandbox dies (as when the host kills it for memory): its loader and agent.
        pid = int((await sandbox.request(p.Exec(command="echo $PPID", cwd=s.workdir, timeout=5, max_output=100), 5)).stdout)
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(SandboxDied, match="the sandbox was killed \\(SIGKILL\\)|the sandbox's agent died"):
            await sandbox.request(p.Exec(command="sleep 5", cwd=s.workdir, timeout=10, max_output=100), 10)
        assert not sandbox.running
        reply = await sandbox.request(p.Exec(command="cat keep.txt", cwd=s.workdir, timeout=5, max_output=100), 5)
        assert reply.stdout == "kept"


async def test_backstop_restarts_a_sandbox_that_does_not_answer(base: str) -> None:
    s = local_settings(base, backstop_grace=0.3)
    async with manager(s) as m:
        sandbox = await m.new("t")
        # The agent's own limit (10 s) is past the server's (0.2 s + grace): the server gives up.
        with pytest.raises(ExecutionTimeExceeded, match="did not answer in time"):
            await sandbox.request(p.Exec(command="sleep 10", cwd=s.workdir, timeout=10, max_output=100), 0.2)
        assert not (await m.deployment.inspect(sandbox.name)).running  # stopped; the next call starts it
        reply = await sandbox.request(p.Ping(), 5)
        assert isinstance(reply, p.PingResult)
