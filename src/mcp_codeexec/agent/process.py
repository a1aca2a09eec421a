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

import asyncio
import codecs
import ctypes
import errno
import marshal
import os
import platform
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from mcp_codeexec.agent import protocol as p

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


def _group_is_users(pgid: int) -> bool:
    """Whether stopping process group `pgid` as a whole is safe: not PID 1's or ours, and
    its leader, if it still runs, is not root's. (The pid comes from the spawner, which
    the user controls: it must not make the agent stop its own group.)"""
    if pgid in (1, os.getpid(), os.getpgrp()):
        return False
    try:
        return os.stat(f"/proc/{pgid}").st_uid != 0
    except OSError:
        return True  # the leader is gone; what is left of its group is the user's


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
        if _group_is_users(root):
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


# --- starting the user's processes ------------------------------------------------------

# In an argument of spawn(), stands for the number the extra fd has in the child (no
# argument can contain a NUL byte, so this cannot clash with a real one).
CHILD_FD = "\0fd"
_CHUNK = 65536
_READ_BUFFER = bytearray(_CHUNK)  # the event loop's thread reads every pipe through it
_READ_VIEW = memoryview(_READ_BUFFER)
_PR_SET_CHILD_SUBREAPER = 36
_SPAWNER_ANSWER = 1.0  # seconds the spawner has to answer a spawn request
_SPAWNER_REPORT = 0.5  # seconds it has to report an exit once the child's outputs closed
_SPAWNER_RESTART = 1.0  # at most one new spawner per this many seconds
_MAX_REQUEST = 1 << 20  # a larger request (a huge environment) takes the direct path
_KILLED = -signal.SIGKILL
_UNCLAIMED = 256
_CLAIM_TRIES = 5  # 50 ms apart

# The spawner: a small Python process of the sandbox user, started once per sandbox. The
# agent (root) could only start a uid-1000 command with fork() + setuid(), and under
# gVisor's ptrace platform a fork of the agent costs a copy of its whole address space;
# the spawner needs no identity change, so it starts commands with posix_spawn (vfork),
# at the cost of any process starting another. It runs as `python3 -I -S -c SPAWNER <fd>`
# on one end of a SOCK_SEQPACKET pair. A request is one message: marshal of
# (number, cwd, argv, env), with fds for the child's 0, 1, 2 (and 3) as SCM_RIGHTS. Every
# answer is 12 bytes (kind, request number, value): READY once, then SPAWNED (pid) or
# FAILED (errno) per request, and EXITED (wait status) when that child ends. It is the
# user's process: the agent checks its answers like any input, kills it when it stops
# answering, and starts another (the agent is the children's subreaper, so a command whose
# spawner died is still reaped, and its status known, by the agent).
READY, SPAWNED, FAILED, EXITED = 1, 2, 3, 4
PREPARED = 5  # the zygote's only: a shell forked ahead of a command, with a socket to it
_ANSWER = struct.Struct("=iii")
# Its command line stays short (ps shows it): the code comes as the first message.
# The zygote's builtin, in the image (an image without it: commands go to the Python spawner).
BASH_RUN = "/usr/lib/mcp-codeexec/bash-run.so"
ZYGOTE_ROOM = 1024  # bytes of command line a command's shell has (a longer one: the Python spawner)
_ZYGOTE_FAILURES = 3  # zygotes that died before they were ready: then none for the agent's life
# A command whose directory cannot be entered (the user made it unusable, say with chmod
# 000) runs in / instead, its stderr saying so first; failing would leave no command to undo
# it with. Every starter says the same (sandbox/bash_run.c: enter_dir).
NO_CWD = "mcp-codeexec: cannot enter %s: %s; this command runs in /\n"
_S = TypeVar("_S", bound="_Spawner")
_SPAWNER_BOOT = "import socket, sys; sock = socket.socket(fileno=int(sys.argv[1])); exec(sock.recv(1 << 16))"
SPAWNER = r"""
import marshal, os, signal, struct
os.set_inheritable(sock.fileno(), False)
# Its 0, 1, 2 become a directory: what the user opens through /proc/<pid>/fd/N cannot be
# written (a /dev/null could: a flood into it would only burn the sandbox's CPU).
root = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
for fd in (0, 1, 2):
    os.dup2(root, fd, inheritable=False)
os.close(root)
answer = struct.Struct("=iii").pack
buf = bytearray(%(size)d + 1)
ancillary = socket.CMSG_SPACE(4 * 4)
dup2 = os.POSIX_SPAWN_DUP2
defaults = (signal.SIGPIPE, signal.SIGXFSZ)  # ignored by Python; a command gets them at default
running = {}  # pid -> request number
early = {}  # pid -> status, for a child that ended before it was entered in running

def send(kind, number, value):
    try:
        sock.send(answer(kind, number, value))
    except OSError:
        os._exit(0)  # the agent is gone

def reap(*_):
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if not pid:
            return
        number = running.pop(pid, None)
        if number is None:
            early[pid] = status
        else:
            send(%(exited)d, number, status)

def spawn(argv, env, fds):
    actions = [(dup2, fd, i) for i, fd in enumerate(fds)]
    name, error = argv[0], FileNotFoundError(2, "No such file or directory")
    paths = [name] if "/" in name else [os.path.join(d or ".", name) for d in (env.get("PATH") or os.defpath).split(":")]
    for path in paths:  # as subprocess does: the child's PATH
        if os.access(path, os.X_OK):
            try:
                return os.posix_spawn(path, argv, env, file_actions=actions, setsid=True, setsigdef=defaults)
            except (FileNotFoundError, PermissionError, NotADirectoryError) as e:
                error = e
    raise error

signal.signal(signal.SIGCHLD, reap)
send(%(ready)d, 0, os.getpid())
while True:
    n, anc, flags, _ = sock.recvmsg_into([buf], ancillary, socket.MSG_CMSG_CLOEXEC)
    if not n:
        os._exit(0)
    fds = []
    for level, kind, data in anc:
        if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
            fds += [int.from_bytes(data[i : i + 4], sys.byteorder) for i in range(0, len(data) - 3, 4)]
    number = 0
    try:
        number, cwd, argv, env = marshal.loads(memoryview(buf)[:n])
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or len(fds) < 3:
            raise OSError(7, "request too large")
        if cwd:
            try:
                os.chdir(cwd)
            except OSError as e:
                os.chdir("/")
                os.write(fds[2], (%(no_cwd)r %% (cwd, e.strerror)).encode("utf-8", "surrogateescape"))
        pid = spawn(argv, env, fds)
        running[pid] = number
        send(%(spawned)d, number, pid)
        status = early.pop(pid, None)
        if status is not None and running.pop(pid, None) is not None:
            send(%(exited)d, number, status)
    except OSError as e:
        send(%(failed)d, number, e.errno or 5)
    except Exception:
        send(%(failed)d, number, 22)
    finally:
        for fd in fds:
            os.close(fd)
""" % {"size": _MAX_REQUEST, "ready": READY, "spawned": SPAWNED, "failed": FAILED, "exited": EXITED, "no_cwd": NO_CWD}


class Child:
    """A started process: its pid, a future for its exit code (negative: killed by that
    signal, as Popen.returncode), and the spawner that started it (None: the agent)."""

    __slots__ = ("pid", "exited", "via")

    def __init__(self, pid: int, exited: asyncio.Future[int], via: _Spawner | None = None) -> None:
        self.pid = pid
        self.exited = exited
        self.via = via


class _Request:
    __slots__ = ("spawned", "exited", "pid", "abandoned", "watermark", "sent", "fd")

    def __init__(self, loop: asyncio.AbstractEventLoop, watermark: int) -> None:
        self.fd = -1  # what came with a PREPARED answer (then the ReadyShell's)
        self.spawned: asyncio.Future[int] = loop.create_future()
        self.exited: asyncio.Future[int] = loop.create_future()
        self.pid = 0
        self.watermark = watermark  # the newest pid started before it: its child's is higher
        self.sent = time.monotonic()
        self.abandoned = False  # its call was cancelled before the answer: kill what it started


class SpawnerBroken(Exception):
    """The request never reached the spawner: safe to start the command another way."""


class _Spawner:
    """The agent's end of one spawner process (the Python one: any argv, any environment)."""

    brings_fds = False  # may an answer bring an fd (only the zygote's PREPARED)

    def __init__(self, launcher: Launcher) -> None:
        self.launcher = launcher
        self.loop = asyncio.get_running_loop()
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            mine.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _MAX_REQUEST + 65536)
            self.proc = subprocess.Popen(
                self.argv(theirs.fileno()),
                pass_fds=(theirs.fileno(),),
                stdin=launcher.devnull,
                stdout=launcher.devnull,
                stderr=launcher.devnull,
                cwd="/",  # each request names its directory: a workspace made unusable cannot stop it
                env=self.environment(),
                start_new_session=True,
                **user_spawn_options(),
            )
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        self.introduce(mine)
        mine.setblocking(False)
        self.sock = mine
        self.started: asyncio.Future[None] = self.loop.create_future()  # done at READY
        self.gone = False
        self.number = 0
        self.requests: dict[int, _Request] = {}
        self.loop.add_reader(mine.fileno(), self._readable)

    @property
    def ready(self) -> bool:
        return self.started.done()

    def argv(self, fd: int) -> list[str]:
        return [sys.executable, "-I", "-S", "-c", _SPAWNER_BOOT, str(fd), "mcp-codeexec-spawner"]

    def environment(self) -> dict[str, str] | None:
        return None  # the agent's (a command's own comes with its request)

    def introduce(self, sock: socket.socket) -> None:
        sock.send(SPAWNER.encode())  # its code: its command line stays short

    async def spawn(self, argv: list[str], fds: list[int], cwd: str | None, env: dict[str, str]) -> Child:
        self.number += 1
        return await self.request(self.number, marshal.dumps((self.number, cwd or "", argv, env)), fds)

    async def request(self, number: int, message: bytes, fds: list[int]) -> Child:
        request = await self._send(number, message, fds)
        return Child(request.pid, request.exited, self)

    async def _send(self, number: int, message: bytes, fds: list[int]) -> _Request:
        """Send one request; its _Request once the child is started (its pid known)."""
        if len(message) > _MAX_REQUEST:
            raise SpawnerBroken("request too large")
        try:
            socket.send_fds(self.sock, [message], fds)
        except OSError as exc:  # full (it stopped reading) or gone: nothing was delivered
            self.stop()
            raise SpawnerBroken(str(exc)) from exc
        request = self.requests[number] = _Request(self.loop, self.launcher.last_pid)
        try:
            if not await within([request.spawned], _SPAWNER_ANSWER):
                # Stopped (the user can), or starved: kill it. Its child, if it made one, is
                # claimed among the orphans; if it made none, SpawnerBroken: start directly.
                self.stop()
                await within([request.spawned], None)
            request.spawned.result()
        except BaseException:
            request.abandoned = True
            self._settle(number)
            raise
        return request

    def _readable(self) -> None:
        try:
            data, fds, _, _ = socket.recv_fds(self.sock, 64, 1)
        except BlockingIOError:
            return
        except OSError:
            data, fds = b"", []
        fd = fds[0] if fds else -1
        if fd >= 0:
            os.set_inheritable(fd, False)
        taken = False
        try:
            taken = self._answer(data, fd)
        finally:
            if fd >= 0 and not taken:
                os.close(fd)  # only a PREPARED answer brings one, and only once

    def _answer(self, data: bytes, fd: int) -> bool:
        """Act on one answer; True if its request took `fd`."""
        if not data:
            self.stop()
            return False
        if len(data) != _ANSWER.size:
            return False  # not an answer: ignored
        kind, number, value = _ANSWER.unpack(data)
        if kind == READY:
            if not self.started.done():
                self.started.set_result(None)
            return False
        request = self.requests.get(number)
        if request is None:
            return False
        taken = False
        if kind in (SPAWNED, PREPARED) and not request.spawned.done():
            if value <= 1 or value in self.launcher.running or (kind == PREPARED) != (fd >= 0 and self.brings_fds):
                request.spawned.set_exception(OSError(errno.EIO, f"the process spawner answered pid {value}"))
            else:
                if not request.abandoned:  # (an abandoned one's fd is closed, its child killed)
                    request.fd, taken = fd, fd >= 0
                request.pid = value
                self.launcher.last_pid = max(self.launcher.last_pid, value)
                request.spawned.set_result(value)
                if not request.exited.done():
                    self.launcher.running[value] = (None, request.exited)
                if request.abandoned and _group_is_users(value):
                    try:
                        os.killpg(value, signal.SIGKILL)
                    except OSError:
                        pass
        elif kind == FAILED and not request.spawned.done():
            value = value if 0 < value < 4096 else errno.EIO
            request.spawned.set_exception(OSError(value, os.strerror(value)))
        elif kind == EXITED and not request.exited.done():
            try:
                code = os.waitstatus_to_exitcode(value)
            except ValueError:
                return False
            request.exited.set_result(code)
            if request.pid:
                self.launcher.running.pop(request.pid, None)
        self._settle(number)
        return taken

    def _settle(self, number: int) -> None:
        request = self.requests.get(number)
        if request is not None and request.spawned.done() and (request.exited.done() or request.spawned.exception()):
            del self.requests[number]

    def stop(self) -> None:
        """Kill it (it died, stopped answering, or lied) and settle what it owes: requests
        without an answer fail; children it started, now ours, are reaped by the agent."""
        if self.gone:
            return
        self.gone = True
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        try:
            os.kill(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        orphans = []
        unanswered = [r for r in self.requests.values() if not r.spawned.done()]
        for request in self.requests.values():
            if len(unanswered) == 1 and request is unanswered[0] and not request.abandoned:
                # Killed right after it started this one (`kill -9 -1` in the command itself
                # can win that race): find the child among the orphans it left us.
                self.launcher.claim(request, self.proc.pid, _CLAIM_TRIES)
            elif not request.spawned.done():
                request.spawned.set_exception(OSError(errno.EIO, "the process spawner exited before it answered"))
                if request.abandoned:
                    request.spawned.exception()  # nobody waits for it: retrieved here
            elif request.pid and not request.exited.done():
                orphans.append(request.pid)
        self.requests.clear()
        self.launcher.spawner_gone(self, orphans)


class _Zygote(_Spawner):
    """The agent's end of the bash zygote (sandbox/bash_run.c): a bash started once, as the
    sandbox user, that forks a copy of itself per command and makes the copy what `bash -c
    COMMAND` would have been (its variables, its command line as ps shows it, `-c` in error
    messages, a last simple command exec'd without a fork). Under gVisor that fork costs ~3
    ms where exec'ing bash costs ~10. Same answers as the Python spawner; a request is the
    request number, the directory and the command, with the child's stdin, stdout and
    stderr. It starts only commands in its own environment (the agent's), and only those
    short enough for its command-line room; anything else goes to the Python spawner."""

    brings_fds = True

    def argv(self, fd: int) -> list[str]:
        return ["bash", "-c", f"enable -f {BASH_RUN} mcp_run && mcp_run {fd} {ZYGOTE_ROOM}", "mcp-codeexec-zygote", "-" * ZYGOTE_ROOM]

    def environment(self) -> dict[str, str] | None:
        return self.launcher.env

    def introduce(self, sock: socket.socket) -> None:
        pass

    def fits(self, command: str) -> bool:
        return len(command.encode("utf-8", "surrogateescape")) < ZYGOTE_ROOM and "\0" not in command

    async def run(self, command: str, fds: list[int], cwd: str) -> Child:
        self.number += 1
        message = struct.pack("=ic", self.number, b"R") + _command_message(command, cwd)
        return await self.request(self.number, message, fds)

    async def prepare(self) -> ReadyShell:
        """A shell forked ahead of the next command (see ReadyShell)."""
        self.number += 1
        request = await self._send(self.number, struct.pack("=ic", self.number, b"P"), [])
        return ReadyShell(Child(request.pid, request.exited, self), socket.socket(fileno=request.fd))


def _command_message(command: str, cwd: str) -> bytes:
    return os.fsencode(cwd) + b"\0" + command.encode("utf-8", "surrogateescape")


class ReadyShell:
    """A bash the zygote forked ahead of the next command, waiting on `sock` for one
    message: the directory and the command with its stdin, stdout and stderr. Giving it a
    command is one message: no fork on the call's path (under gVisor a fork of even a small
    bash is ~3 ms of page-table copying). Given up, it is killed, never left to run something."""

    __slots__ = ("child", "sock", "stat")

    def __init__(self, child: Child, sock: socket.socket) -> None:
        self.child = child
        self.sock = sock
        try:  # opened now, off the call's path: usable() is then one pread, not an open and a read
            self.stat = os.open(f"/proc/{child.pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self.stat = -1

    def usable(self) -> bool:
        """Not ended, not stopped or traced (the user can do either to it). The fd stays
        this process's, whatever pid is reused: an ended one reads as state X."""
        if self.child.exited.done() or self.stat < 0:
            return False
        try:
            state = os.pread(self.stat, 512, 0).rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            return False
        return state not in (b"T", b"t", b"Z", b"X")

    def give(self, command: str, fds: list[int], cwd: str) -> bool:
        try:
            socket.send_fds(self.sock, [_command_message(command, cwd)], fds)
        except OSError:
            return False
        finally:
            self._close()
        return True

    def discard(self) -> None:
        self._close()
        if not self.child.exited.done():
            try:
                os.kill(self.child.pid, signal.SIGKILL)
            except OSError:
                pass

    def _close(self) -> None:
        self.sock.close()
        if self.stat >= 0:
            os.close(self.stat)
            self.stat = -1


class Launcher:
    """Starts the user's processes (as the sandbox user, each in a session of its own:
    kill_tree's unit, stdin /dev/null) and learns how they end. A `bash -c COMMAND` in the
    agent's environment through the zygote when it is ready, anything else through the
    spawner when it is, else directly (fork + setuid as root; vfork when the agent is not root)."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        self.env = env  # the environment commands start with (the zygote's own)
        # pid -> (its Popen if a direct child, the future for its exit code)
        self.running: dict[int, tuple[subprocess.Popen[bytes] | None, asyncio.Future[int]]] = {}
        self.spawner: _Spawner | None = None
        self.spawner_started = -_SPAWNER_RESTART
        self.zygote: _Zygote | None = None
        self.zygote_started = -_SPAWNER_RESTART
        self.zygote_failures = 0
        self.use_zygote = True  # the server's --no-zygote makes it False
        self.ready_shell: ReadyShell | None = None  # the next plain command's bash, forked ahead
        self.preparing: asyncio.Task[None] | None = None
        self.cwd = os.getcwd()  # the agent's, where a child starts unless told otherwise
        self.last_pid = 0  # the newest child's pid
        self.unclaimed: dict[int, tuple[int, float]] = {}  # the latest orphans reaped: exit code, when (bounded)

    def start(self) -> None:
        """In the running loop: reap on SIGCHLD; as root, become the subreaper of what the
        user starts (so nothing the spawner started is lost with it)."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGCHLD, self.reap)
        if privileged():
            _libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)

    def warm(self) -> None:
        """Start the spawner and the zygote if they do not run (each at most once per
        _SPAWNER_RESTART seconds: one the user keeps killing costs the agent little; no
        zygote after _ZYGOTE_FAILURES that never got ready, or without its builtin).
        Called between calls, off their path."""
        if not privileged():
            return
        now = time.monotonic()
        if self.spawner is None and now - self.spawner_started >= _SPAWNER_RESTART:
            self.spawner_started = now
            self.spawner = self._start(_Spawner)
        if (
            self.zygote is None
            and self.use_zygote
            and self.env is not None
            and self.zygote_failures < _ZYGOTE_FAILURES
            and now - self.zygote_started >= _SPAWNER_RESTART
            and os.path.exists(BASH_RUN)
        ):
            self.zygote_started = now
            self.zygote = self._start(_Zygote)
        if self.zygote is not None and self.ready_shell is None and self.preparing is None:
            self.preparing = asyncio.get_running_loop().create_task(self._prepare(self.zygote))

    async def _prepare(self, zygote: _Zygote) -> None:
        try:
            if await within([zygote.started], _SPAWNER_ANSWER) and not zygote.gone:
                self.ready_shell = await zygote.prepare()
        except (OSError, SpawnerBroken):
            pass  # the next warm() tries again
        finally:
            self.preparing = None

    def _start(self, kind: type[_S]) -> _S | None:
        try:
            spawner = kind(self)
        except OSError:
            return None  # the process limit is full: direct starts meanwhile
        self.running[spawner.proc.pid] = (spawner.proc, asyncio.get_running_loop().create_future())
        return spawner

    def spawner_gone(self, spawner: _Spawner, orphans: list[int]) -> None:
        if self.spawner is spawner:
            self.spawner = None
        if self.zygote is spawner:
            self.zygote = None
            if not spawner.ready:  # its builtin would not load (or it was killed that early)
                self.zygote_failures += 1
        # Its children are ours now (subreaper) and reaped as they end; one it had reaped
        # itself but not reported is gone for good: sweep() settles it as killed.
        loop = asyncio.get_running_loop()
        for delay in (0.05, 0.25, 1.0, 3.0):
            loop.call_later(delay, self.sweep, orphans, delay == 3.0)

    def sweep(self, pids: list[int], last: bool) -> None:
        self.reap()
        for pid in pids:
            entry = self.running.get(pid)
            if entry is None or entry[1].done():
                continue
            try:
                os.waitpid(pid, os.WNOHANG)  # ours: reap() settles it when it ends
            except ChildProcessError:
                if last or not os.path.exists(f"/proc/{pid}"):
                    del self.running[pid]
                    entry[1].set_result(_KILLED)  # its status is lost: reported as killed

    def reap(self) -> None:
        """On SIGCHLD: collect every ended child without blocking (ours, and orphans the
        user's commands left, which come to us as their subreaper). A signal handler, not
        a waiter thread per command: threads are costly under gVisor's ptrace platform."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if not pid:
                return
            entry = self.running.pop(pid, None)
            if entry is None:  # an orphan: kept a while, in case claim() looks for it
                self.unclaimed[pid] = (os.waitstatus_to_exitcode(status), time.monotonic())
                if len(self.unclaimed) > _UNCLAIMED:
                    del self.unclaimed[next(iter(self.unclaimed))]
                continue
            proc, exited = entry
            code = os.waitstatus_to_exitcode(status)
            if proc is not None:
                proc.returncode = code
            if not exited.done():
                exited.set_result(code)
            for spawner in (self.spawner, self.zygote):
                if spawner is not None and proc is spawner.proc:
                    spawner.stop()

    def claim(self, request: _Request, spawner: int, tries: int) -> None:
        """Settle a request whose spawner died before answering: its child, if any, is the
        one new session leader the spawner left us (alive, a zombie, or reaped); if there
        is not exactly one, the request fails."""
        if request.spawned.done():
            return
        self.reap()
        me = os.getpid()
        found: list[tuple[int, int | None]] = [
            (pid, code) for pid, (code, when) in self.unclaimed.items() if pid > request.watermark and when > request.sent
        ]
        for name in os.listdir("/proc"):
            if not name.isdigit() or int(name) <= request.watermark or int(name) in self.running:
                continue
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[1]) in (me, spawner) and int(fields[3]) == int(name):
                found.append((int(name), None))
        if not found and tries > 1:
            asyncio.get_running_loop().call_later(0.05, self.claim, request, spawner, tries - 1)
            return
        if not found:  # it never started one: the request can go another way
            request.spawned.set_exception(SpawnerBroken("the process spawner exited before it started anything"))
            return
        if len(found) > 1:
            request.spawned.set_exception(OSError(errno.EIO, "the process spawner exited before it answered"))
            return
        pid, code = found[0]
        request.pid = pid
        self.last_pid = max(self.last_pid, pid)
        if code is None:
            self.running[pid] = (None, request.exited)
            self.sweep([pid], last=False)
        else:
            del self.unclaimed[pid]
            request.exited.set_result(code)
        request.spawned.set_result(pid)

    async def spawn(
        self, argv: list[str], *, stdout: int, stderr: int, cwd: str | None, env: dict[str, str], extra_fd: int | None = None
    ) -> Child:
        """Start argv (a name looked up in env's PATH) with stdin /dev/null, stdout and
        stderr on the given fds, and `extra_fd` as the child's fd CHILD_FD stands for.
        Raises OSError as Popen does (BlockingIOError: the process limit is full)."""
        zygote = self.zygote
        if zygote is not None and env is self.env and extra_fd is None and len(argv) == 3 and argv[:2] == ["bash", "-c"]:
            if zygote.fits(argv[2]):
                fds = [self.devnull, stdout, stderr]
                if self.ready_shell is None and self.preparing is not None:
                    await within([self.preparing], _SPAWNER_ANSWER)  # sooner than a fork queued behind it
                shell, self.ready_shell = self.ready_shell, None
                if shell is not None:
                    if shell.usable() and shell.give(argv[2], fds, cwd or self.cwd):
                        return shell.child
                    shell.discard()
                if zygote.ready:
                    try:
                        return await zygote.run(argv[2], fds, cwd or self.cwd)
                    except SpawnerBroken:
                        pass
        spawner = self.spawner
        if spawner is not None and spawner.ready:
            fds = [self.devnull, stdout, stderr] + ([extra_fd] if extra_fd is not None else [])
            try:
                return await spawner.spawn([a.replace(CHILD_FD, "3") for a in argv], fds, cwd or self.cwd, env)
            except SpawnerBroken:
                pass
        options: dict[str, Any] = dict(
            pass_fds=(extra_fd,) if extra_fd is not None else (),
            stdin=self.devnull,
            stdout=stdout,
            stderr=stderr,
            env=env,
            start_new_session=True,
            **user_spawn_options(),
        )
        command = [a.replace(CHILD_FD, str(extra_fd)) for a in argv]
        try:
            proc = subprocess.Popen(command, cwd=cwd, **options)
        except (PermissionError, FileNotFoundError, NotADirectoryError) as exc:
            if cwd is None or exc.filename != cwd:  # not the directory: bash itself is missing, say
                raise
            os.write(stderr, (NO_CWD % (cwd, exc.strerror)).encode("utf-8", "surrogateescape"))
            proc = subprocess.Popen(command, cwd="/", **options)
        exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.running[proc.pid] = (proc, exited)
        self.last_pid = max(self.last_pid, proc.pid)
        return Child(proc.pid, exited)

    def watch(self, child: Child, outputs: list[asyncio.Future[None]]) -> None:
        """Once `outputs` (the child's pipes) are closed, its spawner has _SPAWNER_REPORT
        seconds to report its exit, or is killed (stopped by the user?): the child is then
        ours to reap. Timers only, nothing on the way of a call that goes well."""
        loop = asyncio.get_running_loop()
        left = [len(outputs)]

        def overdue() -> None:
            entry = self.running.get(child.pid)
            if not child.exited.done() and entry is not None and entry[0] is None and child.via is not None:
                child.via.stop()

        def closed(_: asyncio.Future[None]) -> None:
            left[0] -= 1
            if not left[0] and not child.exited.done():
                timer = loop.call_later(_SPAWNER_REPORT, overdue)
                child.exited.add_done_callback(lambda _: timer.cancel())

        for output in outputs:
            output.add_done_callback(closed)

    async def killed(self, child: Child, grace: float = 2.0) -> int:
        """After kill_tree(child.pid): its exit code, within a bound. A spawner that does
        not report it (stopped, or lying) is killed: the child is then ours to reap."""
        for _ in range(2):
            try:
                return await asyncio.wait_for(asyncio.shield(child.exited), grace)
            except TimeoutError:
                if child.via is not None:
                    child.via.stop()
        self.running.pop(child.pid, None)
        if not child.exited.done():
            child.exited.set_result(_KILLED)
        return child.exited.result()


def read_some(fd: int) -> bytes | None:
    """One read of `fd`: the bytes, b"" at its end (or on an error), None if nothing is
    there yet. Through one buffer, not a fresh 64 KiB one per read (an mmap and munmap)."""
    try:
        n = os.readv(fd, [_READ_BUFFER])
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b""
    return bytes(_READ_VIEW[:n])


async def within(futures: list[asyncio.Future[Any]], timeout: float | None) -> bool:
    """Wait until `futures` are done, for at most `timeout` seconds, without cancelling
    them; True if they are. (No task, no wrapper futures: fewer event-loop turns per call
    than wait_for(shield(...)).)"""
    if not all(f.done() for f in futures):
        await asyncio.wait(futures, timeout=timeout)
    return all(f.done() for f in futures)


def output_events(call: Any, name: str) -> Callable[[bytes], None]:
    """Sends each chunk of one output stream as an Output event on `call` (anything with
    send()): progress while a long command or cell runs."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    return lambda chunk: call.send(p.Output(name, decoder.decode(chunk)))


def pump(fd: int, buffer: CappedBuffer, on_chunk: Callable[[bytes], None] | None = None) -> asyncio.Future[None]:
    """Read the pipe `fd` (taken over: closed at its end) into `buffer` until EOF, passing
    each chunk to `on_chunk` too; the future ends then (cancel it to stop reading). One
    read per wake-up, straight from the event loop: no task, no stream objects."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        chunk = read_some(fd)
        if chunk is None:
            return
        if chunk:
            buffer.add(chunk)
            if on_chunk is not None:
                on_chunk(chunk)
        elif not done.done():
            done.set_result(None)

    def finished(_: asyncio.Future[None]) -> None:
        loop.remove_reader(fd)
        os.close(fd)

    loop.add_reader(fd, readable)
    done.add_done_callback(finished)
    return done
