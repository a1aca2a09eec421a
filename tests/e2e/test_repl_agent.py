"""The persistent Python REPL (agent/repl.py), driven through the real agent in a real
gVisor sandbox, without the MCP layer. Without Docker these tests FAIL (never skip)."""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

from mcp_codeexec.agent import client as c
from mcp_codeexec.agent import protocol as p
from mcp_codeexec.agent.bootstrap import loader_argv
from mcp_codeexec.deployment.base import SandboxSpec
from mcp_codeexec.deployment.docker import DockerDeployment

pytestmark = pytest.mark.anyio

IMAGE = os.environ.get("MCP_CODEEXEC_IMAGE", "mcp-codeexec-sandbox:latest")
WORKDIR = "/workspace"
MEMORY = 1 << 30


async def start_sandbox(deployment: DockerDeployment, name: str) -> None:
    """A container like the server's (same limits shape), started."""
    spec = SandboxSpec(
        name=name,
        volume=name,
        image=IMAGE,
        runtime="runsc",
        memory_bytes=MEMORY,
        cpus=1,
        pids_limit=256,
        workdir=WORKDIR,
        tmp_bytes=64 << 20,
        command=tuple(loader_argv(p.PROTOCOL_VERSION)),
        env={"HOME": "/home/sandbox", "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1"},
    )
    await deployment.create(spec)
    await deployment.start(spec)


@pytest.fixture(scope="module")
async def agent() -> AsyncIterator[c.AgentClient]:
    deployment = DockerDeployment()
    try:
        await deployment.check(IMAGE)
    except Exception as exc:  # noqa: BLE001 - any failure here means no usable engine
        pytest.fail(f"Docker Engine with gVisor and {IMAGE} is required: {exc}")
    name = f"mcp-codeexec-test-repl-{secrets.token_hex(4)}"
    try:
        await start_sandbox(deployment, name)
        async with anyio.create_task_group() as tg:
            client = await c.connect_agent(deployment, name, tg, {"root": WORKDIR, "rlimit_as": MEMORY})
            yield client
            await client.aclose()
            tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await deployment.remove(name)


async def cell(agent: c.AgentClient, code: str, timeout: float = 20, **kwargs: Any) -> p.ExecResult:
    kwargs.setdefault("max_output", 20000)
    reply = await agent.request(p.Repl(code=code, timeout=timeout, **kwargs))
    assert isinstance(reply, p.ExecResult), reply
    return reply


async def bash(agent: c.AgentClient, command: str) -> p.ExecResult:
    reply = await agent.request(p.Exec(command=command, cwd=WORKDIR, timeout=10, max_output=1000))
    assert isinstance(reply, p.ExecResult), reply
    return reply


async def fresh(agent: c.AgentClient) -> None:
    reply = await agent.request(p.ReplReset())
    assert isinstance(reply, p.ExecResult) and reply.return_code == 0


async def test_state_carries_across_cells(agent: c.AgentClient) -> None:
    await fresh(agent)
    r = await cell(agent, "import math\nx = 41\ndef inc(v):\n    return v + 1\nclass Box:\n    n = 7")
    assert (r.stdout, r.stderr, r.return_code, r.state_reset) == ("", "", 0, False)
    r = await cell(agent, "print(inc(x), math.pi > 3, Box.n)")
    assert (r.stdout, r.stderr, r.return_code) == ("42 True 7\n", "", 0)
    # A trailing expression is not echoed: only explicit output, as `python3 -c`.
    r = await cell(agent, "x + 1")
    assert (r.stdout, r.return_code) == ("", 0)
    # Classes defined in cells live in __main__, so pickle finds them.
    r = await cell(agent, "import pickle\nprint(type(pickle.loads(pickle.dumps(Box()))).__name__, __name__)")
    assert r.stdout == "Box __main__\n", r.stderr


async def test_exception_keeps_state(agent: c.AgentClient) -> None:
    await fresh(agent)
    await cell(agent, "y = 5")
    r = await cell(agent, "def boom():\n    return 1 / 0\nz = 2\nboom()")
    assert r.return_code == 1 and not r.state_reset
    assert r.stderr.startswith("Traceback (most recent call last):\n"), r.stderr
    assert r.stderr.rstrip().endswith("ZeroDivisionError: division by zero")
    assert 'File "<cell ' in r.stderr and "return 1 / 0" in r.stderr  # cell source lines show
    assert "_cell" not in r.stderr and '"<string>"' not in r.stderr  # none of the driver's frames
    r = await cell(agent, "print(y, z)")
    assert (r.stdout, r.return_code) == ("5 2\n", 0)
    r = await cell(agent, "def f(:\n  pass")
    assert r.return_code == 1 and "SyntaxError" in r.stderr and "Traceback" not in r.stderr
    r = await cell(agent, "print(y)")
    assert r.stdout == "5\n"


async def test_print_without_newline(agent: c.AgentClient) -> None:
    r = await cell(agent, "print('no newline', end='')")
    assert (r.stdout, r.stderr, r.return_code) == ("no newline", "", 0)
    r = await cell(agent, "import sys\nsys.stdout.write('a'); sys.stderr.write('b')")
    assert (r.stdout, r.stderr) == ("a", "b")


async def test_stdin_is_empty(agent: c.AgentClient) -> None:
    r = await cell(agent, "import sys\nprint(repr(sys.stdin.read()))")
    assert (r.stdout, r.return_code) == ("''\n", 0)
    r = await cell(agent, "input('prompt> ')")
    assert r.return_code == 1 and "EOFError" in r.stderr and r.stdout == "prompt> "


async def test_system_exit_keeps_state(agent: c.AgentClient) -> None:
    await fresh(agent)
    await cell(agent, "kept = 'yes'")
    r = await cell(agent, "import sys\nprint('before')\nsys.exit(3)\nprint('after')")
    assert (r.stdout, r.return_code, r.state_reset) == ("before\n", 3, False)
    r = await cell(agent, "raise SystemExit('bad input')")
    assert (r.return_code, r.stderr) == (1, "bad input\n")
    r = await cell(agent, "exit()")
    assert r.return_code == 0
    r = await cell(agent, "print(kept)")
    assert (r.stdout, r.return_code) == ("yes\n", 0)


async def test_os_exit_resets(agent: c.AgentClient) -> None:
    await fresh(agent)
    await cell(agent, "lost = 1")
    r = await cell(agent, "import os\nprint('bye', flush=True)\nos._exit(5)")
    assert (r.stdout, r.return_code, r.state_reset) == ("bye\n", 5, True)
    assert "[mcp-codeexec] the Python REPL process exited; its state (variables, imports) was reset" in r.stderr
    r = await cell(agent, "print('lost' in globals())")
    assert (r.stdout, r.return_code, r.state_reset) == ("False\n", 0, False)


async def test_crash_by_signal(agent: c.AgentClient) -> None:
    await fresh(agent)
    r = await cell(agent, "import ctypes\nctypes.string_at(0)")
    assert r.return_code == 139 and r.state_reset  # 128 + SIGSEGV
    assert "the next cell starts a fresh interpreter" in r.stderr
    r = await cell(agent, "print(1 + 1)")
    assert (r.stdout, r.return_code) == ("2\n", 0)


async def test_hang_times_out_and_next_cell_works(agent: c.AgentClient) -> None:
    await fresh(agent)
    await cell(agent, "gone = 1")
    code = "import subprocess, time\nsubprocess.Popen(['sleep', '301'])\nprint('started', flush=True)\ntime.sleep(60)"
    started = time.monotonic()
    r = await cell(agent, code, timeout=2)
    elapsed = time.monotonic() - started  # measured here, not the agent's own account
    assert r.timed_out and r.state_reset and r.return_code == 137
    assert r.stdout == "started\n" and 2 <= elapsed < 20, elapsed
    r = await cell(agent, "print('gone' in globals())")
    assert (r.stdout, r.return_code, r.timed_out) == ("False\n", 0, False)
    # The hung cell's child went with it.
    r = await bash(agent, "pgrep -fx 'sleep 301' || echo none")
    assert r.stdout == "none\n"


async def test_timeout_is_result(agent: c.AgentClient) -> None:
    await fresh(agent)
    r = await cell(agent, "print('working')\nwhile True: pass", timeout=2, timeout_is_result=True)
    assert not r.timed_out and r.state_reset and r.return_code == 124
    assert r.stdout == "working\n"
    assert "detection_timeout" in r.stderr and "state (variables, imports) was reset" in r.stderr
    r = await cell(agent, "print('alive')")
    assert (r.stdout, r.return_code) == ("alive\n", 0)


async def test_subprocess_and_c_level_output_captured(agent: c.AgentClient) -> None:
    r = await cell(agent, "import os\nprint('py', flush=True)\nos.system('echo hi; echo oops >&2')")
    assert (r.stdout, r.stderr, r.return_code) == ("py\nhi\n", "oops\n", 0)
    r = await cell(agent, "import ctypes\nctypes.CDLL(None).printf(b'from C')")  # libc-buffered, flushed at cell end
    assert r.stdout == "from C"
    r = await cell(agent, "import subprocess\nsubprocess.run(['python3', '-c', 'import os; os.write(2, b\"child\")'])")
    assert r.stderr == "child"


async def test_large_output_capped(agent: c.AgentClient) -> None:
    r = await cell(agent, "print('x' * 1_000_000)\nprint('END')", max_output=10_000)
    assert r.stdout_bytes == 1_000_005 and r.return_code == 0
    assert len(r.stdout) < 11_000 and r.stdout.endswith("END\n") and "bytes of stdout omitted" in r.stdout


async def test_files_shared_with_exec(agent: c.AgentClient) -> None:
    r = await bash(agent, "echo from-bash > shared.txt")
    assert r.return_code == 0
    code = "import os\nprint(os.getcwd(), open('shared.txt').read().strip())\nopen('from_py.txt', 'w').write('py')"
    r = await cell(agent, code)
    assert (r.stdout, r.return_code) == (f"{WORKDIR} from-bash\n", 0)
    assert [WORKDIR + "/from_py.txt", 2] in r.files
    r = await bash(agent, "cat from_py.txt")
    assert r.stdout == "py"


async def test_workspace_module_shadowing_stdlib(agent: c.AgentClient) -> None:
    # A workspace file named like a stdlib module neither breaks a fresh interpreter nor is
    # hidden from cells (the cwd is first on sys.path, as for `python3 -c`).
    await bash(agent, "echo 'X = 99' > json.py")
    try:
        await fresh(agent)
        r = await cell(agent, "import json\nprint(json.X)")
        assert (r.stdout, r.return_code) == ("99\n", 0), r.stderr
    finally:
        await bash(agent, "rm -f json.py")
        await fresh(agent)


async def test_cells_are_serialized(agent: c.AgentClient) -> None:
    await fresh(agent)
    await cell(agent, "log = []")
    results: list[p.ExecResult] = []

    async def one(i: int) -> None:
        results.append(await cell(agent, f"import time\nlog.append({i}); time.sleep(0.2); log.append({i})"))

    async with anyio.create_task_group() as tg:
        for i in range(3):
            tg.start_soon(one, i)
    assert all(r.return_code == 0 for r in results)
    r = await cell(agent, "print(all(log[k] == log[k + 1] for k in range(0, len(log), 2)), len(log))")
    assert r.stdout == "True 6\n"


@pytest.mark.timeout(120)
async def test_cancel_kills_cell(agent: c.AgentClient) -> None:
    await fresh(agent)
    await cell(agent, "c = 1")
    # The cell would sleep 90 s under a 300 s limit: only the cancellation can end it within
    # the 30 s allowed below. Cells are serialized, so the next cell waits for it to be gone.
    with anyio.move_on_after(2) as scope:
        await cell(agent, "import time\ntime.sleep(90)", timeout=300)
    assert scope.cancelled_caught
    with anyio.fail_after(30):
        r = await cell(agent, "print('c' in globals())")
    assert (r.stdout, r.return_code) == ("False\n", 0)


async def test_env_cwd_and_limits_as_commands(agent: c.AgentClient) -> None:
    code = (
        "import os, resource\n"
        "print(os.getcwd(), os.environ['HOME'], resource.getrlimit(resource.RLIMIT_AS)[0], os.getsid(0) == os.getpid())"
    )
    r = await cell(agent, code)
    assert (r.stdout, r.return_code) == (f"{WORKDIR} /home/sandbox {MEMORY} True\n", 0), r.stderr


async def test_reset_while_idle_and_between_cells_death(agent: c.AgentClient) -> None:
    await fresh(agent)
    await cell(agent, "a = 1")
    # The interpreter dies between cells (a thread calls os._exit after the cell returned).
    await cell(
        agent, "import os, threading, time\nthreading.Thread(target=lambda: (time.sleep(0.3), os._exit(9))).start()"
    )
    await anyio.sleep(1)
    r = await cell(agent, "print('a' in globals())")
    assert (r.stdout, r.return_code, r.state_reset) == ("False\n", 0, True)
    assert "had exited since the last cell (status 9)" in r.stderr
    reply = await agent.request(p.ReplReset())
    assert reply.state_reset  # one was running
    reply = await agent.request(p.ReplReset())
    assert not reply.state_reset
