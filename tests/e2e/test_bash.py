"""bash_code_execution end to end: real server over stdio, real Docker, real gVisor."""

from __future__ import annotations

import re

import pytest
from conftest import DEFAULT_ARGS, connect

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
    # Not UTF-8: each invalid byte becomes U+FFFD, the valid text around it stays.
    r = await sandbox.bash(r"printf 'a\xffb\xfe\xfdc\n'; printf '\xc3(' >&2")
    assert (r["stdout"], r["stderr"], r["return_code"]) == ("a\ufffdb\ufffd\ufffdc\n", "\ufffd(", 0)


async def test_timeout_kills_the_whole_tree(engine):
    exceeded = {"type": "bash_code_execution_tool_result_error", "error_code": "execution_time_exceeded"}
    async with connect("--timeout", "4", "--memory", "1g") as s:
        # /tmp is a tmpfs: its marker is lost if the sandbox is restarted, which tells "the
        # command's tree was killed" apart from "the whole sandbox was". The 60 bystanders
        # (background processes outlive their call) must outlive the kill too; they also
        # slow the agent's look at the process table, which once let a setsid child that
        # lost its parent escape (in 7 rounds of 10 before that was fixed).
        r = await s.bash("echo same-sandbox > /tmp/tree-marker; for i in $(seq 60); do sleep 999 & done")
        assert r["return_code"] == 0, r
        for _ in range(3):
            r = await s.bash("sleep 1000 & setsid sleep 1001 & (trap '' TERM HUP; sleep 1003) & sleep 1002")
            assert r == exceeded
            r = await s.bash("ps -eo args | grep -c '^sleep 100[0-3]' || true; ps -eo args | grep -c '^sleep 999'; cat /tmp/tree-marker")
            assert r["stdout"] == "0\n60\nsame-sandbox\n", r


async def test_timeout_with_output_flood(sandbox):
    r = await sandbox.bash("yes")
    assert r["error_code"] == "execution_time_exceeded"
    assert (await sandbox.bash("echo alive"))["stdout"] == "alive\n"


MARKER = re.compile(
    r"\[\.\.\. (\d+) bytes of (stdout|stderr) omitted: (\d+) bytes in all, the sandbox keeps the first (\d+) and the last (\d+)\b[^\]]*\.\.\.\]"
)


def split_capped(text: str) -> tuple[str, tuple[int, str, int, int, int], str]:
    """(head, marker numbers, tail) of capped output; exactly one marker."""
    found = list(MARKER.finditer(text))
    assert len(found) == 1, text[:300]
    m = found[0]
    numbers = (int(m[1]), m[2], int(m[3]), int(m[4]), int(m[5]))
    return text[: m.start()].removesuffix("\n"), numbers, text[m.end() :].removeprefix("\n")


async def test_output_is_capped_head_and_tail_with_marker(sandbox):
    # 6 + 50_000_000 + 1 + 4 = 50_000_011 bytes of stdout; the cap is 20000: 10000 + 10000 kept.
    r = await sandbox.bash("echo START; head -c 50000000 /dev/zero | tr '\\0' x; echo; echo END; echo err >&2")
    head, numbers, tail = split_capped(r["stdout"])
    assert numbers == (50_000_011 - 20_000, "stdout", 50_000_011, 10_000, 10_000)
    assert head == "START\n" + "x" * 9_994
    assert tail == "x" * 9_995 + "\nEND\n"
    assert r["stderr"] == "err\n" and r["return_code"] == 0


async def test_stderr_is_capped_too(sandbox):
    # stderr: 100_000 'e' bytes and a newline; stdout stays whole and apart.
    r = await sandbox.bash("echo out; head -c 100000 /dev/zero | tr '\\0' e >&2; echo >&2")
    head, numbers, tail = split_capped(r["stderr"])
    assert numbers == (100_001 - 20_000, "stderr", 100_001, 10_000, 10_000)
    assert head == "e" * 10_000 and tail == "e" * 9_999 + "\n"
    assert r["stdout"] == "out\n" and r["return_code"] == 0


async def test_background_process_does_not_hold_the_call(sandbox):
    r = await sandbox.bash("(sleep 3; echo late) & echo now")
    assert r["stdout"] == "now\n" and r["return_code"] == 0


def assert_fork_bomb_result(r: dict) -> None:
    """The bomb's own call: its shell backgrounds the bomb and exits at once (return code 0);
    the bomb's processes, refused by the process limit, say so on the shared stderr."""
    assert r["type"] == "bash_code_execution_result" and r["return_code"] == 0 and r["stdout"] == "", r
    assert all("fork" in line and "Resource temporarily unavailable" in line for line in r["stderr"].splitlines()), r


def assert_says_why_it_could_not_run(r: dict) -> None:
    """A call made while a bomb holds every process slot: either bash could not be started
    (126) or the sandbox had to be restarted (137); either way the result says so."""
    refused = r["return_code"] == 126 and r["stderr"].startswith("mcp-codeexec: cannot start bash")
    restarted = r["return_code"] == 137 and "[mcp-codeexec]" in r["stderr"] and "files in the workspace are intact" in r["stderr"]
    assert r["stdout"] == "" and (refused or restarted), r


async def test_fork_bomb_is_bounded(engine):
    # A sandbox of its own: after a bomb, gVisor frees its host tasks slowly, and a later
    # burst of processes in the same sandbox could still find the pids limit full.
    async with connect(*DEFAULT_ARGS) as sandbox:
        await _fork_bomb(sandbox)


async def _fork_bomb(sandbox):
    await sandbox.bash("echo keep > before-bomb.txt")
    assert_fork_bomb_result(await sandbox.bash(":(){ :|:& };:"))
    # The bomb fills the process limit (and may take the sandbox down with it): the next
    # calls say what happened, clear or restart the sandbox, and it serves again.
    for _ in range(3):
        r = await sandbox.bash("echo alive; cat before-bomb.txt")
        if r["stdout"] == "alive\nkeep\n":
            break
        assert_says_why_it_could_not_run(r)
    assert r["stdout"] == "alive\nkeep\n", r


async def test_memory_hog_gets_memoryerror_not_a_dead_sandbox(sandbox):
    await sandbox.bash("echo keep > survivor.txt")
    r = await sandbox.bash("python3 -c 'x = bytearray(3 * 1024**3)'")
    assert r["return_code"] == 1 and "MemoryError" in r["stderr"]
    after = await sandbox.bash("cat survivor.txt")
    assert after["stdout"] == "keep\n", after


async def test_sandbox_killed_for_memory_is_restarted_with_files(engine):
    # A sandbox of its own, with time to fill its memory on a loaded machine (filling
    # 1 GiB under gVisor took over the shared sandbox's 5 s limit in CI), and so that its
    # death cannot spill into the next test's calls.
    async with connect(*DEFAULT_ARGS, "--timeout", "60") as sandbox:
        await _killed_for_memory(sandbox)


async def _killed_for_memory(sandbox):
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
    assert r["stdout"].strip() == "1000001", {k: str(v)[-300:] for k, v in r.items()}


async def test_empty_command(sandbox):
    r = await sandbox.bash("")
    assert r["return_code"] == 0 and r["stdout"] == ""


async def test_stdin_is_empty(sandbox):
    r = await sandbox.bash("cat; read x; echo rc=$?")
    assert r["stdout"] == "rc=1\n"
