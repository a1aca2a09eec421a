"""Long calls over stdio: progress notifications, a client's cancellation (bash and
code_execution), the running-container cap when every container is busy, and the server's
backstop when a sandbox stops answering. Real server, real Docker, real gVisor."""

from __future__ import annotations

import time

import anyio
import docker
import pytest
from conftest import TENANT, connect, wait_for

pytestmark = pytest.mark.anyio


def name_of(container_id: str) -> str:
    return f"mcp-codeexec.{TENANT}.{container_id}"


async def count_processes(session, pattern: str) -> int:
    r = await session.bash(f"ps -eo args | grep -c '{pattern}' || true")
    return int(r["stdout"])


async def test_progress_over_stdio(engine):
    async with connect("--timeout", "20", "--memory", "1g") as s:
        seen: list[tuple[float, str]] = []

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            seen.append((progress, message or ""))

        r = await s.bash("for i in 1 2 3 4 5; do echo tick $i; sleep 1; done", progress_callback=on_progress)
        assert r["stdout"] == "".join(f"tick {i}\n" for i in range(1, 6))
        # About one a second while it runs, counting up, carrying the latest output.
        assert len(seen) >= 3, seen
        assert [p for p, _ in seen] == sorted({p for p, _ in seen}), seen
        assert any("tick" in m for _, m in seen), seen
        # Without a progress token, no notification is sent (and the call is the same).
        assert (await s.bash("sleep 2; echo quiet"))["stdout"] == "quiet\n"


async def test_cancellation_over_stdio_kills_the_command(engine):
    async with connect("--timeout", "300", "--memory", "1g") as s:
        await s.bash("rm -f cancelled-marker")
        with anyio.move_on_after(2) as scope:
            await s.bash("sleep 600; touch cancelled-marker")
        assert scope.cancelled_caught
        # Without the cancellation the command would run for 10 minutes.
        for _ in range(50):
            if await count_processes(s, "^sleep 600") == 0:
                break
            await anyio.sleep(0.2)
        assert await count_processes(s, "^sleep 600") == 0
        r = await s.bash("ls cancelled-marker 2>&1; echo still-serving")
        assert r["stdout"] == "ls: cannot access 'cancelled-marker': No such file or directory\nstill-serving\n", r


async def test_cancellation_of_code_execution(engine):
    async with connect("--profile", "20260120", "--timeout", "300", "--memory", "1g") as s:
        await s.python("kept = 1")
        with anyio.move_on_after(2) as scope:
            await s.python("import time\ntime.sleep(600)")
        assert scope.cancelled_caught
        # Cells run one at a time: the next one gets its turn only once the cancelled cell
        # is gone (its 300 s limit is far away). Its interpreter went with it.
        with anyio.fail_after(30):
            r = await s.python("print('kept' in globals())")
        assert (r["stdout"], r["return_code"]) == ("False\n", 0), r


async def test_running_cap_with_every_container_busy_is_too_many_requests(engine):
    async with connect("--timeout", "20", "--memory", "1g") as a:  # makes a container, then stops it on exit
        await a.bash("echo other > f")
        other = a.last_meta["container"]["id"]
    async with connect("--timeout", "20", "--memory", "1g", "--max-running", "1") as s:
        await s.bash("echo mine > f")

        async def busy() -> None:
            r = await s.bash("touch busy-started; " + wait_for("let-go", 15) + "; echo released")
            assert r["stdout"] == "released\n", r

        async with anyio.create_task_group() as tg:
            tg.start_soon(busy)
            r = await s.bash(wait_for("busy-started") + " && echo busy")  # (calls run side by side)
            assert r["stdout"] == "busy\n", r
            # Starting `other` needs a running slot; the only one is busy: refused.
            r = await s.bash("cat f", meta={"container": other})
            assert r == {"type": "bash_code_execution_tool_result_error", "error_code": "too_many_requests"}
            r = await s.call("text_editor_code_execution", {"command": "view", "path": "f"}, meta={"container": other})
            assert r["error_code"] == "too_many_requests" and "busy" in r["error_message"], r
            await s.bash("touch let-go")
        # Once it is idle, the same call stops it to make room.
        assert (await s.bash("cat f", meta={"container": other}))["stdout"] == "other\n"


@pytest.mark.timeout(180)
async def test_backstop_restarts_a_sandbox_that_stops_answering(engine):
    """The agent enforces the time limit; if the whole sandbox stops answering, the
    server waits the limit plus 10 s, restarts the sandbox (files kept) and answers
    execution_time_exceeded."""
    limit = 2
    async with connect("--timeout", str(limit), "--memory", "1g") as s:
        await s.bash("echo kept > kept.txt; echo lost-on-restart > /tmp/marker")
        name = name_of(s.last_meta["container"]["id"])
        # Freeze every process in the sandbox (the agent with them), as a hung sandbox
        # would be: the engine's root, with every capability, stops them all.
        api = docker.APIClient(version="auto")
        exec_id = api.exec_create(name, ["sh", "-c", "kill -STOP -1"], user="root", privileged=True)["Id"]
        api.exec_start(exec_id)
        assert api.exec_inspect(exec_id)["ExitCode"] == 0
        started = time.monotonic()
        r = await s.bash("echo never")
        elapsed = time.monotonic() - started
        assert r == {"type": "bash_code_execution_tool_result_error", "error_code": "execution_time_exceeded"}
        assert limit + 10 - 0.5 <= elapsed < limit + 10 + 20, elapsed
        r = await s.bash("cat kept.txt; cat /tmp/marker 2>&1 || true")
        assert r["stdout"] == "kept\ncat: /tmp/marker: No such file or directory\n", r  # restarted, files kept
