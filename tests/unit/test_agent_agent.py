"""agent/agent.py: requests served by the real agent (local backend): commands, streaming,
cancellation, concurrent calls, several connections, bad requests, and the workspace bound."""

from __future__ import annotations

import os
import subprocess

import anyio
import pytest

from mcp_codeexec.agent import protocol as p
from mcp_codeexec.agent.bootstrap import relay_argv
from mcp_codeexec.agent.client import connect_agent
from unit.conftest import local_settings, manager, workspace

pytestmark = pytest.mark.anyio


def run(command: str, workdir: str, **kwargs: object) -> p.Exec:
    return p.Exec(command=command, cwd=workdir, timeout=kwargs.pop("timeout", 5), max_output=1000, **kwargs)  # type: ignore[arg-type]


async def test_commands_streams_files_and_cancellation(base: str) -> None:
    s = local_settings(base)
    async with manager(s) as m:
        sandbox = await m.new("t")
        agent = await sandbox.agent()
        r = await agent.request(run("echo $FOO; echo err >&2; echo data > out.txt; exit 4", s.workdir, env={"FOO": "bar"}))
        assert (r.stdout, r.stderr, r.return_code, r.timed_out) == ("bar\n", "err\n", 4, False)
        assert r.files == [[f"{s.workdir}/out.txt", 5]] and r.files_total == 1
        events: list[p.Output] = []
        r = await agent.request(run("echo one; sleep 0.2; echo two", s.workdir, stream=True), events.append)
        assert "".join(e.data for e in events) == "one\ntwo\n" == r.stdout
        long = "x" * 150_000  # past one argv string's limit: run from a memory file
        r = await agent.request(run(f"echo ${{#LONG}} # {long}", s.workdir))
        assert r.return_code == 0
        # Two calls at once on one connection; one is cancelled (its client went away).
        results: dict[str, object] = {}

        async def call(name: str, command: str) -> None:
            results[name] = await agent.request(run(command, s.workdir))

        async with anyio.create_task_group() as tg:
            tg.start_soon(call, "slow", "sleep 30")
            tg.start_soon(call, "fast", "echo fast")
            while "fast" not in results:
                await anyio.sleep(0.01)
            [slow_id] = [i for i, (req, _, _) in agent._waiting.items() if isinstance(req, p.Exec)]
            await agent._send(p.request_frame(agent._new_id(), p.Cancel(target=slow_id)))
        assert results["fast"].stdout == "fast\n"  # type: ignore[attr-defined]
        assert results["slow"].cancelled and results["slow"].return_code == 137  # type: ignore[attr-defined]
        r = await agent.request(run("sleep 5", s.workdir, timeout=0.2))
        assert r.timed_out


async def test_bad_requests_and_the_workspace_bound(base: str) -> None:
    s = local_settings(base)
    async with manager(s) as m:
        sandbox = await m.new("t")
        agent = await sandbox.agent()
        unknown = await agent.request(p.Edit(command="delete", path="x"))
        assert unknown == p.Failure("invalid_tool_input", "unknown command 'delete'")
        outside = await agent.request(p.ReadFile(path="/etc/hostname"))
        assert isinstance(outside, p.Failure)
        written = await agent.request(p.WriteFile(path=f"{s.workdir}/w.txt", data="aGk="))
        assert written == p.Written(2) and (workspace(s) / "w.txt").read_text() == "hi"
        # A malformed request gets a failure; the connection goes on.
        frame = p.encode({"id": 5, "op": "exec", "args": {"bogus": 1}})
        await agent._send(frame)
        assert isinstance(await agent.request(p.Ping()), p.PingResult)


async def test_several_connections_to_one_agent(base: str) -> None:
    s = local_settings(base)
    async with manager(s) as m:
        sandbox = await m.new("t")
        first = await sandbox.agent()
        config = {"root": s.workdir, "rlimit_as": s.rlimit_as}
        second = await connect_agent(m.deployment, sandbox.name, m.task_group, config)
        a, b = await first.request(p.Ping()), await second.request(p.Ping())
        assert a.pid == b.pid  # one agent serves both
        await second.aclose()
        assert isinstance(await first.request(p.Ping()), p.PingResult)  # the other connection is unaffected


def _links(pid: int) -> set[str]:
    """What a process's fds point at (pipe:[inode] for a pipe)."""
    links = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            links.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass  # closed meanwhile
    return links


async def test_a_connection_that_ends_leaves_none_of_its_fds_in_the_agent(base: str) -> None:
    """The relay's stdin and stdout are the engine exec's: once the relay has exited (the
    engine then counts the exec as ended and may checkpoint), the agent must hold neither
    (gVisor cannot restore a sandbox that holds an exec's fd). Both ways a connection
    ends: its server closes it, and its server is gone before the agent's hello."""
    s = local_settings(base)
    async with manager(s) as m:
        sandbox = await m.new("t")
        first = await sandbox.agent()
        agent_pid = (await first.request(p.Ping())).pid
        config = {"root": s.workdir, "rlimit_as": s.rlimit_as}
        before = _links(agent_pid)
        second = await connect_agent(m.deployment, sandbox.name, m.task_group, config)
        await second.request(p.Ping())
        theirs = {link for link in _links(agent_pid) - before if link.startswith("pipe:")}
        assert len(theirs) == 2  # the agent reads and writes the relay's own stdin and stdout
        await second.aclose()
        assert second.stream._process.returncode is not None  # type: ignore[attr-defined]
        assert not theirs & _links(agent_pid)

        # A relay whose reader is gone before the hello: the agent's write fails (EPIPE).
        stdin_r, stdin_w = os.pipe()
        stdout_r, stdout_w = os.pipe()
        os.close(stdout_r)
        gone = {os.readlink(f"/proc/self/fd/{fd}") for fd in (stdin_r, stdout_w)}
        proc = subprocess.Popen(relay_argv(m.deployment._socket(sandbox.name)), stdin=stdin_r, stdout=stdout_w)
        os.close(stdin_r)
        os.close(stdout_w)
        try:
            await anyio.to_thread.run_sync(proc.wait, 10)
            assert not gone & _links(agent_pid)
        finally:
            os.close(stdin_w)
            proc.kill()
            proc.wait()
        assert isinstance(await first.request(p.Ping()), p.PingResult)  # the agent serves on
