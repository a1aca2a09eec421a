"""agent/repl.py: the persistent interpreter's semantics, through the real agent (local
backend)."""

from __future__ import annotations

import pytest

from mcp_codeexec.agent import protocol as p
from mcp_codeexec.agent.repl import KILLED_RETURN_CODE, TIMEOUT_RETURN_CODE
from unit.conftest import local_settings, manager

pytestmark = pytest.mark.anyio


async def test_cells_share_state_and_behave_like_python_c(base: str) -> None:
    s = local_settings(base)
    async with manager(s) as m:
        sandbox = await m.new("t")

        async def cell(code: str, timeout: float = 5, **kwargs: object) -> p.ExecResult:
            reply = await sandbox.request(p.Repl(code=code, timeout=timeout, max_output=10000, cwd=s.workdir, **kwargs), 10)
            assert isinstance(reply, p.ExecResult), reply
            return reply

        assert (await cell("x = 41\nimport os")).return_code == 0
        r = await cell("print(x + 1, os.getcwd())\nx")  # a trailing expression is not printed
        assert (r.stdout, r.return_code) == (f"42 {s.workdir}\n", 0)
        r = await cell("y = 1\n1/0")
        assert r.return_code == 1 and "ZeroDivisionError" in r.stderr and "1/0" in r.stderr and "driver" not in r.stderr
        assert (await cell("print(y)")).stdout == "1\n"  # names before the error are kept
        assert (await cell("raise SystemExit(3)")).return_code == 3
        assert (await cell("raise SystemExit('bye')")).return_code == 1
        assert (await cell("import os; os.system('echo from a child')")).stdout == "from a child\n"
        r = await cell("input()")
        assert r.return_code == 1 and "EOFError" in r.stderr
        r = await cell("import os; os._exit(5)")
        assert (r.return_code, r.state_reset) == (5, True)
        r = await cell("print(x)")  # a fresh interpreter
        assert r.return_code == 1 and "NameError" in r.stderr
        await cell("z = 1")
        r = await cell("import time; time.sleep(30)", timeout=0.5, timeout_is_result=True)
        assert (r.return_code, r.timed_out, r.state_reset) == (TIMEOUT_RETURN_CODE, False, True)
        assert "detection_timeout" in r.stderr
        await cell("z = 1")
        r = await cell("import time; time.sleep(30)", timeout=0.5)
        assert r.timed_out and r.state_reset
        await cell("w = 1")
        reset = await sandbox.request(p.ReplReset(), 5)
        assert isinstance(reset, p.ExecResult) and reset.state_reset
        assert "NameError" in (await cell("w")).stderr
        r = await cell("import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
        assert (r.return_code, r.state_reset) == (KILLED_RETURN_CODE, True)
