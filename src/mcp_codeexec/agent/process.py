"""Processes inside the sandbox: who runs what, output buffers, and killing (stdlib only).

Identities. The agent runs as root inside gVisor with only CAP_SETUID, CAP_SETGID and
CAP_KILL (and no-new-privileges). Everything done for the user runs as the sandbox user
(uid/gid 1000, no supplementary groups): commands and the REPL are started under it, and
file operations switch the calling *thread* to it for their duration. A process of the
sandbox user can therefore not signal, trace, or open the file descriptors of the agent
(or of anything else the server started), and whatever the user creates is the user's.

Thread credentials: Linux (and gVisor) keep credentials per thread; glibc's setresuid()
changes every thread of the process, so the raw system call is used to switch one worker
thread only, keeping the real and saved uid at 0 so that it can switch back. Such a thread
is still not the user's to signal: the kernel compares against the real and saved uid.
"""

from __future__ import annotations

import ctypes
import os
import platform
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

SANDBOX_UID = 1000
SANDBOX_GID = 1000

# (setresuid, setresgid) system call numbers.
_SYSCALLS = {"x86_64": (117, 119), "aarch64": (147, 149)}
_libc = ctypes.CDLL(None, use_errno=True)


class CappedBuffer:
    """Keeps the head and the tail of a stream, counts what falls in between."""

    def __init__(self, cap: int) -> None:
        self.head_cap = cap // 2
        self.tail_cap = cap - self.head_cap
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def add(self, data: bytes) -> None:
        self.total += len(data)
        room = self.head_cap - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if data:
            self.tail += data
            if len(self.tail) > self.tail_cap:
                del self.tail[: len(self.tail) - self.tail_cap]

    def text(self, name: str) -> str:
        kept = len(self.head) + len(self.tail)
        if self.total <= kept:
            return (bytes(self.head) + bytes(self.tail)).decode("utf-8", "replace")
        omitted = self.total - kept
        head = bytes(self.head).decode("utf-8", "ignore")
        tail = bytes(self.tail).decode("utf-8", "ignore")
        marker = (
            f"\n[... {omitted} bytes of {name} omitted: {self.total} bytes in all, the sandbox keeps "
            f"the first {len(self.head)} and the last {len(self.tail)}. Redirect large output to a "
            f"file and read it in parts (head, tail, grep) ...]\n"
        )
        return head + marker + tail


# --- identities ------------------------------------------------------------------------


def privileged() -> bool:
    """True when the agent runs as root (the normal case); False where it runs as the
    sandbox user itself (a local test backend without root): then nothing switches."""
    return os.geteuid() == 0


def _set_thread_ids(uid: int, gid: int) -> None:
    calls = _SYSCALLS.get(platform.machine())
    if calls is None:
        raise OSError(f"no thread credential switch for {platform.machine()}")
    setresuid, setresgid = calls
    # Group first while still root; on the way back, uid first (root again), then group.
    order = ((setresgid, gid), (setresuid, uid)) if uid else ((setresuid, uid), (setresgid, gid))
    for number, value in order:
        if _libc.syscall(number, -1, value, -1) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"cannot switch this thread's credentials: {os.strerror(errno)}")


@contextmanager
def as_sandbox_user() -> Iterator[None]:
    """Run the body (in a worker thread) with the sandbox user's effective uid and gid."""
    if not privileged():
        yield
        return
    _set_thread_ids(SANDBOX_UID, SANDBOX_GID)
    try:
        yield
    finally:
        try:
            _set_thread_ids(0, 0)
        except OSError:
            # A worker thread that cannot become root again must not serve another call.
            os._exit(70)


def user_spawn_options() -> dict[str, Any]:
    """Popen options that start a child as the sandbox user, with no supplementary groups."""
    if not privileged():
        return {}
    return {"user": SANDBOX_UID, "group": SANDBOX_GID, "extra_groups": []}


# --- finding and killing the user's processes -------------------------------------------


def _proc_table() -> list[tuple[int, int, int, int]]:
    """(pid, ppid, session, uid) of every live process (zombies left out: they cannot be
    killed and are already dying). os.listdir works on gVisor's /proc."""
    table = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            uid = os.stat(f"/proc/{name}").st_uid
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name may contain spaces and parens: split after its last ')'.
        fields = stat[stat.rfind(b")") + 2 :].split()
        if fields and fields[0] != b"Z":
            table.append((int(name), int(fields[1]), int(fields[3]), uid))
    return table


def _descendants(table: list[tuple[int, int, int, int]], roots: set[int]) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, ppid, _, _ in table:
        children.setdefault(ppid, []).append(pid)
    found, stack = set(roots), list(roots)
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def _killable(table: list[tuple[int, int, int, int]]) -> set[int]:
    """The processes the agent may kill: the sandbox user's (the agent, PID 1 and the
    server's relays run as root). An agent that is not root (a local test backend) shares
    /proc with its host: there, only its own descendants."""
    if privileged():
        return {pid for pid, _, _, uid in table if uid != 0}
    return _descendants(table, {os.getpid()}) - {os.getpid()}


def _stop_then_kill(pids: set[int]) -> None:
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass


def kill_tree(root: int) -> None:
    """Kill the process `root`'s session and every descendant (also those that left the
    session). Each round stops them all before killing, so a fork bomb cannot outrun it;
    rounds go on until nothing is left, for up to 5 seconds, then every process of the
    sandbox user is killed."""
    me = os.getpid()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        # Stop (not kill) the process group in one atomic step, so a fork bomb in it cannot
        # outrun us. Killing it here would orphan the children that left the group (setsid)
        # before the table below is read: adopted by PID 1, they would escape.
        try:
            os.killpg(root, signal.SIGSTOP)
        except (ProcessLookupError, PermissionError):
            pass
        table = _proc_table()
        doomed = _descendants(table, {pid for pid, _, sid, _ in table if sid == root} | {root})
        alive = doomed & _killable(table) - {me, 1}
        if not alive:
            return
        _stop_then_kill(alive)
        time.sleep(0.01)
    kill_user_processes()


def kill_user_processes() -> None:
    """Stop, then kill, every process of the sandbox user, until none is left (a few
    rounds: what runs may fork meanwhile)."""
    spared = {1, os.getpid()}
    for _ in range(20):
        doomed = _killable(_proc_table()) - spared
        if not doomed:
            return
        _stop_then_kill(doomed)
        time.sleep(0.02)


def spawn(argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    """Start a child as the sandbox user in its own session (kill_tree's unit)."""
    # No preexec_fn: it would force fork() over vfork(). (Changing the uid forces fork()
    # anyway in CPython 3.11; bench/ measures what that costs per call.)
    return subprocess.Popen(argv, start_new_session=True, **user_spawn_options(), **kwargs)
