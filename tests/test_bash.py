"""bash_code_execution end to end: real server over stdio, real Docker, real gVisor."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.anyio


async def test_docs_example_and_streams_kept_apart(sandbox):
    r = await sandbox.bash("echo 'Hello, World!'; echo oops >&2; exit 3")
    assert r == {
        "type": "bash_code_execution_result",
        "stdout": "Hello, World!\n",
        "stderr": "oops\n",
        "return_code": 3,
        "content": [],
    }


async def test_runs_in_workdir_files_persist_shell_state_does_not(sandbox):
    r = await sandbox.bash("pwd; export FOO=1; cd /tmp; echo data > /workspace/persist.txt")
    assert r["stdout"] == "/workspace\n"
    r = await sandbox.bash("pwd; echo ${FOO:-unset}; cat persist.txt")
    assert r["stdout"] == "/workspace\nunset\ndata\n"


async def test_exit_codes_exact(sandbox):
    for code in (0, 1, 2, 42, 255):
        assert (await sandbox.bash(f"exit {code}"))["return_code"] == code
    assert (await sandbox.bash("kill -TERM $$"))["return_code"] == 143
    assert (await sandbox.bash("nonexistent-command-xyz"))["return_code"] == 127


async def test_python_available(sandbox):
    r = await sandbox.bash("python3 -c 'import sys; print(sys.version_info[:2])'")
    assert r["stdout"] == "(3, 11)\n"


async def test_unicode_and_binary_output(sandbox):
    r = await sandbox.bash("echo 'héllo 世界 🎉'; printf 'ok'")
    assert r["stdout"] == "héllo 世界 🎉\nok"
    r = await sandbox.bash("head -c 3000 /dev/urandom")  # not UTF-8: replaced, still a string
    assert isinstance(r["stdout"], str) and r["return_code"] == 0


async def test_timeout_kills_the_whole_tree(sandbox):
    r = await sandbox.bash("sleep 1000 & setsid sleep 1001 & sleep 1002")
    assert r == {"type": "bash_code_execution_tool_result_error", "error_code": "execution_time_exceeded"}
    r = await sandbox.bash("ps -eo args | grep -c '^sleep 100[0-2]' || true")
    assert r["stdout"].strip() == "0", r


async def test_timeout_with_output_flood(sandbox):
    r = await sandbox.bash("yes")
    assert r["error_code"] == "execution_time_exceeded"
    assert (await sandbox.bash("echo alive"))["stdout"] == "alive\n"


async def test_output_is_capped_head_and_tail_with_marker(sandbox):
    r = await sandbox.bash("echo START; head -c 50000000 /dev/zero | tr '\\0' x; echo; echo END; echo err >&2")
    out = r["stdout"]
    assert out.startswith("START\n") and out.endswith("END\n")
    assert "bytes of stdout omitted" in out
    assert len(out.encode()) < 20000 + 500  # the cap (20000 bytes) plus the marker
    assert r["stderr"] == "err\n" and r["return_code"] == 0


async def test_background_process_does_not_hold_the_call(sandbox):
    r = await sandbox.bash("(sleep 3; echo late) & echo now")
    assert r["stdout"] == "now\n" and r["return_code"] == 0


async def test_fork_bomb_is_bounded(sandbox):
    await sandbox.bash("echo keep > before-bomb.txt")
    r = await sandbox.bash(":(){ :|:& };:")
    assert r["type"] in ("bash_code_execution_result", "bash_code_execution_tool_result_error")
    # The bomb fills the process limit (and may take the sandbox down with it): the next
    # calls say what happened, clear or restart the sandbox, and it serves again.
    for _ in range(3):
        r = await sandbox.bash("echo alive; cat before-bomb.txt")
        if r["stdout"] == "alive\nkeep\n":
            break
        assert r["return_code"] in (126, 137) and "[mcp-codeexec]" in r["stderr"] or "mcp-codeexec:" in r["stderr"], r
    assert r["stdout"] == "alive\nkeep\n", r


async def test_memory_hog_gets_memoryerror_not_a_dead_sandbox(sandbox):
    await sandbox.bash("echo keep > survivor.txt")
    r = await sandbox.bash("python3 -c 'x = bytearray(3 * 1024**3)'")
    assert r["return_code"] == 1 and "MemoryError" in r["stderr"]
    after = await sandbox.bash("cat survivor.txt")
    assert after["stdout"] == "keep\n", after


async def test_sandbox_killed_for_memory_is_restarted_with_files(sandbox):
    await sandbox.bash("echo keep > survivor2.txt")
    # Many processes, each under the per-process cap, together past the sandbox's limit.
    hog = "python3 -c 'import time; x = bytearray(400 * 1024**2); x[::4096] = b\"x\" * len(x[::4096]); time.sleep(30)'"
    r = await sandbox.bash(f"for i in 1 2 3 4; do {hog} & done; wait")
    assert r["return_code"] == 137 and r["stdout"] == ""
    assert "out of memory" in r["stderr"] and "files in the workspace are intact" in r["stderr"]
    assert (await sandbox.bash("cat survivor2.txt"))["stdout"] == "keep\n"


@pytest.mark.parametrize(
    "arguments",
    [{"command": 5}, {"command": None}, {}, {"command": ["ls"]}, {"command": "echo \x00"}],
    ids=["int", "null", "missing", "list", "nul-byte"],
)
async def test_invalid_input(sandbox, arguments):
    r = await sandbox.call("bash_code_execution", arguments)
    assert r == {"type": "bash_code_execution_tool_result_error", "error_code": "invalid_tool_input"}


async def test_huge_command(sandbox):
    payload = "x" * 1_000_000
    r = await sandbox.bash(f"echo {payload} | wc -c")
    assert r["stdout"].strip() == "1000001"


async def test_empty_command(sandbox):
    r = await sandbox.bash("")
    assert r["return_code"] == 0 and r["stdout"] == ""


async def test_stdin_is_empty(sandbox):
    r = await sandbox.bash("cat; read x; echo rc=$?")
    assert r["stdout"] == "rc=1\n"
