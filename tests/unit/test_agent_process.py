"""agent/process.py: output buffers, the process table, killing a whole tree (also what
left its session), thread identities, on this host's real processes; and the agent's end of
the bash zygote, fed hostile answers (the zygote itself runs only in the image: e2e tests)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable

import pytest

from mcp_codeexec.agent import process as proc


def test_capped_buffer_keeps_head_and_tail() -> None:
    b = proc.CappedBuffer(10)
    for chunk in (b"abc", b"defgh", b"ijklmnop", b"qrst"):
        b.add(chunk)
    assert (bytes(b.head), bytes(b.tail), b.total) == (b"abcde", b"pqrst", 20)
    text = b.text("stdout")
    assert text.startswith("abcde\n[... 10 bytes of stdout omitted: 20 bytes in all") and text.endswith("...]\npqrst")
    small = proc.CappedBuffer(10)
    small.add("é".encode() * 3)
    assert small.text("stderr") == "ééé"  # nothing omitted: no marker, decoded whole


def test_capped_buffer_never_splits_a_character_into_garbage() -> None:
    b = proc.CappedBuffer(5)
    b.add("ééééé".encode())  # 10 bytes: the cut falls inside characters
    assert "\ufffd" not in b.text("stdout")


def test_descendants() -> None:
    table = [(1, 0, 1, 0), (10, 1, 10, 0), (11, 10, 10, 0), (12, 11, 12, 0), (20, 1, 20, 0)]
    assert proc._descendants(table, {10}) == {10, 11, 12}
    assert proc._descendants(table, {99}) == {99}


def test_proc_table_sees_this_process() -> None:
    table = {pid: (ppid, sid, uid) for pid, ppid, sid, uid in proc._proc_table()}
    assert table[os.getpid()] == (os.getppid(), os.getsid(0), os.getuid())


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def test_kill_tree_reaches_children_that_left_the_session() -> None:
    # Started as the agent starts its spawner (and, without one, commands directly):
    # the sandbox user, a session of its own.
    child = subprocess.Popen(["bash", "-c", "sleep 300 & echo $!; setsid sleep 300 & echo $!; sleep 300"],
                             stdout=subprocess.PIPE, start_new_session=True, **proc.user_spawn_options())
    assert child.stdout is not None
    pids = [int(child.stdout.readline()), int(child.stdout.readline())]
    assert os.getsid(child.pid) == child.pid  # its own session: kill_tree's unit
    if os.geteuid() == 0:
        assert os.stat(f"/proc/{child.pid}").st_uid == proc.SANDBOX_UID  # a root agent's children: the sandbox user
    proc.kill_tree(child.pid)
    assert child.wait(5) == -9
    for _ in range(100):
        if not any(map(alive, pids)):
            break
        time.sleep(0.01)
    assert not any(map(alive, pids))


@pytest.mark.skipif(os.geteuid() != 0, reason="only a root agent switches identities; as another user nothing switches")
def test_as_sandbox_user_switches_one_thread_and_back() -> None:
    seen: list[tuple[int, int]] = []

    def worker() -> None:
        with proc.as_sandbox_user():
            seen.append((os.geteuid(), os.getegid()))
            seen.append((os.geteuid(), os.getegid()))
        seen.append((os.geteuid(), os.getegid()))

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == [(1000, 1000), (1000, 1000), (0, 0)]
    assert os.geteuid() == 0  # the other threads never changed
    assert proc.user_spawn_options() == {"user": 1000, "group": 1000, "extra_groups": []}


def test_without_root_nothing_switches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(proc, "privileged", lambda: False)
    assert proc.user_spawn_options() == {}
    with proc.as_sandbox_user():
        assert os.geteuid() == os.getuid()
    # Not root: only this process's own descendants are killable.
    table = [(os.getpid(), 1, 1, 0), (4242, os.getpid(), 1, 0), (4343, 1, 1, 1000)]
    assert proc._killable(table) == {4242}


def _zygote_end(launcher: proc.Launcher) -> tuple[proc._Zygote, socket.socket]:
    """The agent's end of a zygote whose other end is the test's (no process: the test
    speaks for it, as a hostile one could)."""
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    zygote = object.__new__(proc._Zygote)
    zygote.launcher, zygote.loop, zygote.sock = launcher, asyncio.get_running_loop(), mine
    zygote.proc = subprocess.Popen(["sleep", "60"])
    zygote.gone, zygote.number, zygote.requests = False, 0, {}
    zygote.started = zygote.loop.create_future()
    mine.setblocking(False)
    zygote.loop.add_reader(mine.fileno(), zygote._readable)
    return zygote, theirs


def _answer(sock: socket.socket, kind: int, number: int, value: int, fds: tuple[int, ...] = ()) -> None:
    socket.send_fds(sock, [proc._ANSWER.pack(kind, number, value)], list(fds))


def _open_fds() -> set[int]:
    listed = os.listdir("/proc/self/fd")  # (the fd that listed them is closed by now)
    return {int(fd) for fd in listed if os.path.exists(f"/proc/self/fd/{fd}")}


def test_zygote_answers_are_checked_and_stray_fds_closed() -> None:
    async def scenario() -> None:
        launcher = proc.Launcher({})
        zygote, theirs = _zygote_end(launcher)
        try:
            _answer(theirs, proc.READY, 0, 1)
            await asyncio.wait_for(zygote.started, 1)
            before = _open_fds()
            # A prepared shell comes with its socket...
            child_end, kept = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            preparing = asyncio.ensure_future(zygote.prepare())
            await asyncio.sleep(0.05)
            _answer(theirs, proc.PREPARED, 1, 4_000_000, (child_end.fileno(),))
            shell = await asyncio.wait_for(preparing, 1)
            assert shell.child.pid == 4_000_000 and shell.sock.fileno() >= 0
            shell.sock.close()
            launcher.running.pop(4_000_000, None)
            # ... and nothing else may bring one: a SPAWNED with an fd, a PREPARED without
            # one, an fd with no request: each fd is closed, each such answer refused.
            running = asyncio.ensure_future(zygote.run("true", [launcher.devnull] * 3, "/"))
            await asyncio.sleep(0.05)
            _answer(theirs, proc.SPAWNED, 2, 4_000_001, (kept.fileno(),))
            with pytest.raises(OSError):
                await asyncio.wait_for(running, 1)
            preparing = asyncio.ensure_future(zygote.prepare())
            await asyncio.sleep(0.05)
            _answer(theirs, proc.PREPARED, 3, 4_000_002)
            with pytest.raises(OSError):
                await asyncio.wait_for(preparing, 1)
            _answer(theirs, proc.EXITED, 99, 0, (kept.fileno(), kept.fileno()))
            _answer(theirs, proc.PREPARED, 1, 4_000_003, (kept.fileno(),))  # settled already
            await asyncio.sleep(0.1)
            left = _open_fds() - before - {child_end.fileno(), kept.fileno()}
            assert not left, {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in left}
        finally:
            zygote.stop()
            theirs.close()
            kept.close()
            child_end.close()

    asyncio.run(scenario())


@pytest.mark.anyio
async def test_a_ready_shell_is_usable_only_while_it_runs_and_its_pid_cannot_be_mistaken() -> None:
    """usable() reads the process's stat through an fd opened when the shell was made: a
    stopped, ended or reaped shell is refused, even once its pid is free for another."""
    child = subprocess.Popen(["sleep", "30"])
    mine, theirs = socket.socketpair()
    shell = proc.ReadyShell(proc.Child(child.pid, asyncio.get_running_loop().create_future()), mine)
    try:
        assert shell.usable()
        os.kill(child.pid, signal.SIGSTOP)
        assert _soon(lambda: not shell.usable())
        os.kill(child.pid, signal.SIGCONT)
        assert _soon(shell.usable)
        child.kill()
        child.wait()  # reaped: the fd still names that process, now gone
        assert not shell.usable()
    finally:
        shell.discard()
        theirs.close()
    assert shell.stat == -1 and mine.fileno() == -1  # both closed


def _soon(check: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + 5
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.mark.anyio
async def test_a_directory_that_cannot_be_entered_runs_the_command_in_root_and_says_so(tmp_path) -> None:
    """The direct path (no spawner, no zygote: the agent as a plain user, or before they
    start): a command whose directory is gone runs in / with NO_CWD first on its stderr; the
    zygote's and the spawner's paths say the same (tests/e2e/test_exec_path.py)."""
    launcher = proc.Launcher({})
    gone = str(tmp_path / "gone")
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        child = await launcher.spawn(["bash", "-c", "pwd"], stdout=out_w, stderr=err_w, cwd=gone, env=dict(os.environ))
        os.close(out_w)
        os.close(err_w)
        os.waitpid(child.pid, 0)
        with os.fdopen(out_r) as out, os.fdopen(err_r) as err:
            assert (out.read(), err.read()) == ("/\n", proc.NO_CWD % (gone, "No such file or directory"))
    finally:
        os.close(launcher.devnull)


@pytest.mark.anyio
async def test_a_missing_program_is_still_an_error_not_a_move_to_root(tmp_path) -> None:
    launcher = proc.Launcher({})
    with pytest.raises(OSError) as raised:  # (PermissionError when PATH holds a directory uid 1000 cannot search)
        await launcher.spawn(["no-such-program-xyz"], stdout=1, stderr=2, cwd=str(tmp_path), env=dict(os.environ))
    assert raised.value.filename == "no-such-program-xyz"
    os.close(launcher.devnull)
