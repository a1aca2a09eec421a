"""The exec path's bash zygote (agent/process.py, sandbox/bash_run.c): a command started from
it is the `bash -c COMMAND` that exec'ing bash would have started, and what the user does to
the zygote or the shell it forked ahead costs at most a slower call, never a wrong result.
Real server over stdio, real Docker, real gVisor."""

from __future__ import annotations

import time

import anyio
import pytest
from conftest import connect

pytestmark = pytest.mark.anyio

# Commands whose every byte of output must be the same from the zygote and from an exec'd
# bash (nothing here prints a pid, a random number or a time: SECONDS counts wall-clock
# seconds since the shell started, 1 when a fast command straddles a second's turn).
PROBES = [
    'echo "$0|$#|$@|$_|$LINENO|$-|$BASH_SUBSHELL|$SHLVL|${#BASH_SOURCE[@]}|${FUNCNAME[*]}|$((SECONDS <= 1))|${BASH_ARGV0}"',
    'echo "$BASH_EXECUTION_STRING"',
    "if",
    "echo (",
    "fi",
    'echo "',
    "no-such-command-xyz",
    "echo a\nno-such-command-xyz\necho $LINENO",
    "exit 3",
    "return 4",
    "false",
    "kill -9 $$",
    "exec true",
    "set -e; false; echo not-reached",
    'trap "echo bye \\$?" EXIT; false',
    'trap "echo err" ERR; false',
    "declare -p | grep -v -e BASHPID -e EPOCH -e SRANDOM -e RANDOM -e PPID -e 'declare -- _='",
    "set -o; shopt; trap -p; umask; ulimit -a",
    "enable | md5sum; compgen -b | wc -l; type mcp_run; help | head -3",
    "caller; echo $?",
    "f() { echo ${FUNCNAME[*]} ${BASH_LINENO[*]} ${BASH_SOURCE[*]}; }; f",
    "local x",
    "break",
    "shift; echo $?",
    'echo "${PIPESTATUS[*]}"; true | false; echo "${PIPESTATUS[*]}"',
    "read x; echo $? x=$x; cat; echo $?",
    "cd /proc/$$/fd && echo *",  # bash's own fds, by its own glob (ls in a pipeline would race bash closing the pipe)
    "ps -o args= -p $$; true",
    "ps -o pgid=,sid= -p $$ | awk -v p=$$ '{ print ($1 == p && $2 == p) }'",
    "grep -e Uid -e Gid -e Cap -e NoNewPrivs -e Seccomp -e SigIgn -e SigBlk -e SigCgt /proc/$$/status",
    "env | sort",
    "cd /tmp && pwd && echo $OLDPWD",
    "set -u; echo $undefined_var; echo after",
    'echo "héllo 世界 🎉"; printf "a\\xffb"',
    '[ "$RANDOM" != "$RANDOM" ] || [ "$RANDOM" != "$RANDOM" ]; echo $?',
    "x=$(echo inner); echo $x; (exit 7); echo $?",
    "sleep 0.1 & jobs | wc -l; wait; echo waited",
    "python3 -c 'import sys; print(sys.argv)' a 'b c'",
    "echo hello | tr a-z A-Z | wc -c",
    "echo long " + "x" * 2000,  # longer than the zygote's room: the Python spawner in both
]


async def test_a_command_from_the_zygote_is_what_an_exec_d_bash_would_run(engine):
    async with connect("--memory", "1g") as fast, connect("--memory", "1g", "--no-zygote") as slow:
        await fast.bash("true")
        await slow.bash("true")
        await anyio.sleep(1.0)  # the zygote is up and has a shell ready
        for probe in PROBES:
            a, b = await fast.bash(probe), await slow.bash(probe)
            assert a == b, (probe, a, b)
        # Which paths ran: the zygote's children are its; --no-zygote has none.
        parent = "cat /proc/$PPID/cmdline | tr '\\0' '\\n' | grep -c -- mcp-codeexec-zygote; true"
        assert (await fast.bash(parent))["stdout"] == "1\n"
        assert (await slow.bash(parent))["stdout"] == "0\n"


async def test_stopping_or_killing_the_zygote_and_its_ready_shell_costs_a_slower_call(engine):
    """The user can signal both (they are the user's processes): a stopped one is given up
    (the ready shell at once, the zygote after its one-second answer deadline) and both are
    started again; every call in between still gets its exact result."""
    async with connect("--memory", "1g") as s:
        await s.bash("true")
        await anyio.sleep(1.0)
        for signal in ("STOP", "KILL", "STOP"):
            r = await s.bash(f"pkill -{signal} -f mcp-codeexec-zygot[e]; echo sent")
            assert (r["stdout"], r["return_code"]) == ("sent\n", 0), r
            for _ in range(4):
                started = time.monotonic()
                r = await s.bash("echo $0 ok; exit 5")
                assert (r["stdout"], r["stderr"], r["return_code"]) == ("bash ok\n", "", 5), r
                assert time.monotonic() - started < 5
            await anyio.sleep(1.5)  # (a new zygote at most once a second)
        r = await s.bash("pgrep -c -f mcp-codeexec-zygot[e]; pgrep -f mcp-codeexec-zygot[e] | xargs ps -o stat= -p")
        assert r["stdout"].split()[0] in ("1", "2") and "T" not in r["stdout"], r  # the zygote (and a ready shell), running


async def test_the_zygote_cannot_be_traced_or_read_by_the_user(engine):
    """It is the user's process, but not dumpable: no ptrace, no /proc/PID/mem (what it
    would give is the user's own rights anyway; this keeps later commands' start clean)."""
    probe = r"""
import ctypes, os, subprocess
pids = subprocess.run(["pgrep", "-f", "mcp-codeexec-zygot[e]"], capture_output=True, text=True).stdout.split()
libc = ctypes.CDLL(None, use_errno=True)
for pid in pids[:1]:
    traced = libc.ptrace(16, int(pid), 0, 0)  # PTRACE_ATTACH
    try:
        open(f"/proc/{pid}/mem", "rb").close()
        mem = True
    except OSError:
        mem = False
    print(len(pids) >= 1, traced, mem)
"""
    async with connect("--memory", "1g") as s:
        await s.bash("true")
        await anyio.sleep(1.0)
        r = await s.bash(f"python3 - <<'EOF'\n{probe}\nEOF")
        assert r["stdout"] == "True -1 False\n", r


async def test_a_workspace_the_user_made_unusable_runs_commands_in_root_and_can_be_undone(engine):
    """chmod 000 on the workspace used to end every later command with "cannot start bash"
    (and blame the process limit), with no command left to undo it. Now each starter (the
    shell forked ahead, the zygote, the Python spawner with --no-zygote) runs the command in /
    with one line of stderr saying why, and `chmod` from there gives the workspace back. A
    zygote restarted while it is locked starts too (it runs in /, each command enters its
    directory)."""
    notice = "mcp-codeexec: cannot enter /workspace: Permission denied; this command runs in /\n"
    async with connect("--memory", "1g") as fast, connect("--memory", "1g", "--no-zygote") as slow:
        for s in (fast, slow):
            await s.bash("true")
        await anyio.sleep(1.0)  # the zygote is up and has a shell ready
        for s in (fast, slow):
            r = await s.bash("chmod 000 /workspace && echo locked")
            assert (r["stdout"], r["return_code"]) == ("locked\n", 0), r
            for _ in range(3):  # the shell forked ahead, then the next ones
                r = await s.bash('pwd; echo "$PWD" "$0"')
                assert (r["stdout"], r["stderr"], r["return_code"]) == ("/\n/ bash\n", notice, 0), r
            if s is fast:  # a zygote restarted meanwhile starts all the same (it runs in /)
                await s.bash("pkill -KILL -f mcp-codeexec-zygot[e]; true")
                await anyio.sleep(1.5)
                await s.bash("true")  # (it starts between calls)
                await anyio.sleep(1.0)
                parent = "cat /proc/$PPID/cmdline | tr '\\0' '\\n' | grep -c -- mcp-codeexec-zygote; true"
                r = await s.bash(parent)
                assert (r["stdout"], r["stderr"]) == ("1\n", notice), r
            r = await s.bash("chmod 755 /workspace && echo unlocked")
            assert (r["stdout"], r["stderr"]) == ("unlocked\n", notice), r
            r = await s.bash("pwd")
            assert (r["stdout"], r["stderr"]) == ("/workspace\n", ""), r
