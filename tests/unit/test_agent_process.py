"""agent/process.py: output buffers, the process table, killing a whole tree (also what
left its session), and thread identities, on this host's real processes."""

from __future__ import annotations

import os
import subprocess
import threading
import time

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
