"""Tool version profiles: 20260120 (persistent Python REPL), 20260521 (per-cell limit),
20250522 (legacy single tool). Through the real server over stdio."""

from __future__ import annotations

import pytest
from conftest import connect
from mcp.shared.exceptions import MCPError
from mcp_types import INVALID_PARAMS

from .test_bash import split_capped

pytestmark = pytest.mark.anyio


async def tool_names(session) -> set[str]:
    return {t.name for t in (await session.client.list_tools()).tools}


async def test_20260120_state_carries_and_survives_errors(engine):
    async with connect("--profile", "20260120", "--timeout", "4", "--memory", "1g") as s:
        assert await tool_names(s) == {"bash_code_execution", "text_editor_code_execution", "code_execution"}
        r = await s.python("import math\nx = 21\ndef double(v):\n    return v * 2")
        assert r == {"type": "code_execution_result", "stdout": "", "stderr": "", "return_code": 0, "content": []}
        assert (await s.python("print(double(x), math.pi > 3)"))["stdout"] == "42 True\n"
        r = await s.python("1 / 0")
        assert r["return_code"] == 1 and "ZeroDivisionError" in r["stderr"] and "Traceback" in r["stderr"]
        assert (await s.python("print(x)"))["stdout"] == "21\n"  # state kept after an exception
        assert (await s.python("print('no newline', end='')"))["stdout"] == "no newline"
        r = await s.python("import sys\nprint(repr(sys.stdin.read()))")
        assert r["stdout"] == "''\n"
        # Files are shared with bash and the editor.
        await s.bash("echo from-bash > shared.txt")
        assert (await s.python("print(open('shared.txt').read().strip())"))["stdout"] == "from-bash\n"
        await s.python("open('made-by-python.csv', 'w').write('a,b\\n1,2\\n')")
        assert (await s.edit(command="view", path="made-by-python.csv"))["content"] == "a,b\n1,2\n"


async def test_20260120_dead_or_hung_interpreter_is_recovered(engine):
    async with connect("--profile", "20260120", "--timeout", "3", "--memory", "1g") as s:
        await s.python("y = 5")
        r = await s.python("import os\nprint('bye', flush=True)\nos._exit(7)")
        assert r["return_code"] == 7 and r["stdout"] == "bye\n" and "state" in r["stderr"] and "reset" in r["stderr"]
        r = await s.python("print('y' in globals())")
        assert r["stdout"] == "False\n"  # a fresh interpreter, and the model was told
        r = await s.python("import time\ntime.sleep(100)")
        assert r == {"type": "code_execution_tool_result_error", "error_code": "execution_time_exceeded"}
        assert (await s.python("print('serving')"))["stdout"] == "serving\n"


async def test_20260521_per_cell_limit_is_a_normal_result(engine):
    async with connect("--profile", "20260521", "--cell-timeout", "2", "--memory", "1g") as s:
        tools = {t.name: t for t in (await s.client.list_tools()).tools}
        assert "2 s of wall-clock time" in tools["code_execution"].description
        await s.python("z = 1")
        r = await s.python("import time\nprint('started', flush=True)\ntime.sleep(30)")
        assert r["type"] == "code_execution_result" and r["return_code"] == 124
        assert "detection_timeout" in r["stderr"] and r["stdout"] == "started\n"
        assert (await s.python("print('z' in globals())"))["stdout"] == "False\n"
        prompt = (await s.client.read_resource("codeexec://system-prompt")).contents[0].text
        assert "detection_timeout" in prompt and "20260521" in prompt


async def test_20250522_legacy_single_tool_fresh_interpreter(engine):
    async with connect("--profile", "20250522", "--memory", "1g") as s:
        assert await tool_names(s) == {"code_execution"}
        assert (await s.python("a = 1\nprint(a)"))["stdout"] == "1\n"
        r = await s.python("print(a)")
        assert r["return_code"] == 1 and "NameError" in r["stderr"]  # nothing carried over
        await s.python("open('kept.txt', 'w').write('files do')")
        assert (await s.python("print(open('kept.txt').read())"))["stdout"] == "files do\n"
        with pytest.raises(MCPError) as caught:  # the legacy profile has no bash tool at all
            await s.client.call_tool("bash_code_execution", {"command": "true"})
        assert caught.value.code == INVALID_PARAMS and "bash_code_execution" in caught.value.message


@pytest.mark.parametrize("arguments", [{"code": 1}, {}, {"code": "x\x00"}, {"code": ["print(1)"]}])
async def test_code_invalid_input(engine, arguments):
    async with connect("--profile", "20260120", "--no-prepare") as s:
        r = await s.call("code_execution", arguments)
        assert r == {"type": "code_execution_tool_result_error", "error_code": "invalid_tool_input"}


async def test_repl_output_is_capped_like_bash(engine):
    async with connect("--profile", "20260120", "--max-output", "10000", "--memory", "1g") as s:
        # 100_000 'x' and a newline on stdout, 30_000 'e' on stderr: each capped at 10_000.
        r = await s.python("import sys\nprint('x' * 100_000)\nsys.stderr.write('e' * 30_000)")
        head, numbers, tail = split_capped(r["stdout"])
        assert numbers == (100_001 - 10_000, "stdout", 100_001, 5_000, 5_000)
        assert head == "x" * 5_000 and tail == "x" * 4_999 + "\n"
        head, numbers, tail = split_capped(r["stderr"])
        assert numbers == (30_000 - 10_000, "stderr", 30_000, 5_000, 5_000) and head + tail == "e" * 10_000
        assert r["return_code"] == 0
