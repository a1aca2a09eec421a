"""The persistent Python REPL of the 20260120/20260521 profiles (standard library only).

One interpreter per container, started on first use as a child of the agent in its own
session (so kill_tree reaches everything a cell starts), with the agent's env, cwd and
rlimits. Cells run one at a time, each in the same `__main__` namespace.

Channel: a Unix socketpair. Per cell the agent sends one marker byte carrying, as
SCM_RIGHTS, the write ends of two fresh pipes, then the cell's source (4-byte length,
UTF-8). The driver dup2()s the pipes onto fds 1 and 2, so the output of C extensions and
subprocesses lands in the cell's stdout/stderr too, not only sys.stdout; after the cell it
points 1 and 2 back at /dev/null (the pipes reach EOF) and answers the return code (4-byte
length, ASCII digits). Fresh pipes per cell also mean that a background child of an old
cell cannot write into a later one.

Semantics (as `python3 -c`, not a notebook):
- only explicit output: the value of a trailing expression is not printed;
- an exception: its traceback on stderr, without the driver's frames, return code 1;
  names are kept; source lines show (cells are registered in linecache as `<cell N>`);
- SystemExit: its code as the return code (None -> 0, an int -> code & 0xFF, else the
  message on stderr and 1), the interpreter keeps running with its state;
- stdin is /dev/null: reads see EOF, input() raises EOFError;
- the cwd is first on sys.path; state includes the cwd (os.chdir persists), sys.modules;
- a forked child that returns from the cell exits instead of becoming a second driver.
When the interpreter dies (os._exit, a crash, a kill) the cell returns what it printed,
the exit status (128+N for signal N) and a note; the next cell starts a fresh one.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from typing import Any

from mcp_codeexec.agent import protocol as p
from mcp_codeexec.agent.process import CHILD_FD, CappedBuffer, Child, Launcher, kill_tree, output_events, pump
from mcp_codeexec.agent.toolchannel import ENV as TOOLS_ENV
from mcp_codeexec.agent.toolchannel import Tools
from mcp_codeexec.agent.watch import OutputFiles

_DRAIN_AFTER_EXIT = 0.2
_MAX_RC_DIGITS = 3  # the driver answers 0..255
TIMEOUT_RETURN_CODE = 124  # timeout_is_result: as coreutils `timeout` reports a limit hit
KILLED_RETURN_CODE = 137  # 128 + SIGKILL

RESET = (
    "its state (variables, imports) was reset; the next cell starts a fresh interpreter. "
    "Files in the workspace are intact."
)

# Runs as `python3 -P -u -c DRIVER <fd>`. It imports only traceback (and what that needs)
# beyond what python3 -c loads anyway: a module it imports is cached in sys.modules, and a
# workspace file of that name (json.py, socket.py) could no longer be imported by a cell,
# as it can under `python3 -c`. -P keeps the cwd off sys.path while it imports; the cwd
# goes first after. Functions it uses are bound once: a cell that patches os cannot break it.
DRIVER = r'''
import os, sys, _socket
import linecache, traceback
try:  # fflush(NULL), for C stdio buffers (printf from extensions), without importing ctypes
    import _ctypes
    class _CFunc(_ctypes.CFuncPtr):
        _flags_, _restype_ = _ctypes.FUNCFLAG_CDECL, None
    _fflush = _CFunc(_ctypes.dlsym(_ctypes.dlopen(None, os.RTLD_NOW), "fflush"))
except Exception:
    _fflush = None
_sock = _socket.socket(fileno=int(sys.argv[1]))
os.set_inheritable(_sock.fileno(), False)
_null = os.open(os.devnull, os.O_RDWR)
_dup2, _close, _write, _exit, _getpid = os.dup2, os.close, os.write, os._exit, os.getpid
_fmt_only, _fmt, _lines = traceback.format_exception_only, traceback.format_exception, linecache.cache
_SCM = (_socket.SOL_SOCKET, _socket.SCM_RIGHTS)
_CMSG = _socket.CMSG_SPACE(8)
_pid = _getpid()
_driver = sys.modules["__main__"]  # keeps this module alive once cells own __main__
_main = type(sys)("__main__")  # a fresh __main__: pickle finds cell classes by name
_main.__dict__["__builtins__"] = __builtins__
_ns = _main.__dict__
sys.modules["__main__"] = _main
sys.argv[:] = ["-c"]
sys.path.insert(0, "")
_dup2(_null, 1)
_dup2(_null, 2)

def _read(n):
    b = b""
    while len(b) < n:
        c = _sock.recv(n - len(b))
        if not c:
            _exit(0)  # the agent went away
        b += c
    return b

def _err(text):
    try:
        sys.stderr.write(text)
    except BaseException:  # the cell broke sys.stderr: write to the fd
        _write(2, text.encode("utf-8", "replace"))

def _flush():
    for f in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            f.flush()
        except BaseException:
            pass
    if _fflush:
        _fflush(None)

_aloop = None

def _exec(compiled):
    global _aloop
    if not compiled.co_flags & 0x80:  # CO_COROUTINE: set only when the cell awaits at top level
        exec(compiled, _ns)
        return
    import asyncio  # only for a cell that awaits (it uses asyncio anyway)
    if _aloop is None or _aloop.is_closed():
        _aloop = asyncio.new_event_loop()  # one loop for the interpreter's life
    _aloop.run_until_complete(eval(compiled, _ns))

def _cell(code, name):
    _lines[name] = (len(code), None, code.splitlines(True), name)
    try:  # 0x2000: PyCF_ALLOW_TOP_LEVEL_AWAIT, so `await tool(...)` works in a cell
        compiled = compile(code, name, "exec", flags=0x2000, dont_inherit=True)
    except Exception as e:
        _err("".join(_fmt_only(type(e), e)))
        return 1
    try:
        _exec(compiled)
    except SystemExit as e:
        c = e.code
        if c is None:
            return 0
        if isinstance(c, int):
            return c & 0xFF
        _err(f"{c}\n")
        return 1
    except BaseException as e:
        tb = e.__traceback__  # drop the driver's frames (and the event loop's): start at the cell
        while tb is not None and tb.tb_frame.f_code.co_filename != name:
            tb = tb.tb_next
        tb = e.__traceback__ = tb or e.__traceback__.tb_next
        sys.last_type, sys.last_value, sys.last_traceback = type(e), e, tb
        try:  # the default hook (C) reads sources from disk only; the traceback module sees cells
            if sys.excepthook is sys.__excepthook__:
                raise LookupError
            sys.excepthook(type(e), e, tb)
        except BaseException:
            _err("".join(_fmt(type(e), e, tb)))
        return 1
    return 0

_n = 0
while True:
    _msg, _anc, _, _ = _sock.recvmsg(1, _CMSG)
    if not _msg:
        _exit(0)
    _data = b"".join(d for lvl, typ, d in _anc if (lvl, typ) == _SCM)
    _fds = [int.from_bytes(_data[i : i + 4], sys.byteorder) for i in range(0, len(_data) - 3, 4)]
    _code = _read(int.from_bytes(_read(4), "big")).decode("utf-8", "surrogatepass")
    _dup2(_fds[0], 1)
    _dup2(_fds[1], 2)
    for _fd in _fds:
        _close(_fd)
    _n += 1
    try:
        _rc = _cell(_code, f"<cell {_n}>")
    except BaseException:
        _rc = 1
    _flush()
    if _getpid() != _pid:
        _exit(_rc)  # a forked child came back out of the cell
    _dup2(_null, 1)
    _dup2(_null, 2)
    _body = str(_rc).encode()
    _sock.sendall(len(_body).to_bytes(4, "big") + _body)
'''


def _status(code: int) -> int:
    return 128 - code if code < 0 else code  # killed by signal N -> 128+N, as bash reports


def _append(text: str, note: str) -> str:
    return f"{text}{'' if not text or text.endswith(chr(10)) else chr(10)}{note}\n"


class Repl:
    """The agent's side: starts the interpreter through the agent's `launcher`, and
    reports the files a cell writes through `outputs`, as for commands."""

    def __init__(self, launcher: Launcher, outputs: OutputFiles) -> None:
        self.launcher = launcher
        self.outputs = outputs
        self.lock = asyncio.Lock()  # cells on one interpreter run one at a time
        self.proc: Child | None = None
        self.exited: asyncio.Future[int] | None = None
        self.sock: socket.socket | None = None
        self.tools: Tools | None = None  # programmatic tool calling, when the server offers it (agent.main)
        # The interpreter's tool channel (toolchannel.py): one for its life, serving the
        # cell that runs and refusing calls between cells.
        self.door: Any = None

    async def _start(self, request: p.Repl) -> None:
        mine, theirs = socket.socketpair()
        self.door = self.tools.door() if request.tools and self.tools is not None else None
        try:
            self.proc = await self.launcher.spawn(
                ["python3", "-P", "-u", "-c", DRIVER, CHILD_FD],
                extra_fd=theirs.fileno(),
                stdout=self.launcher.devnull,
                stderr=2,  # the agent's until the driver is up
                cwd=request.cwd or None,
                env={**os.environ, **request.env, **({TOOLS_ENV: self.door.name} if self.door else {})},
            )
        except BaseException:
            mine.close()
            if self.door is not None:
                self.door.close()
                self.door = None
            raise
        finally:
            theirs.close()
        self.exited = self.proc.exited
        mine.setblocking(False)
        self.sock = mine

    async def _stop(self, proc: Child | None) -> int:
        """Kill `proc`'s tree and wait for it; forget it if it is still the current one."""
        if proc is None:
            return 0
        sock = self.sock
        assert sock is not None
        kill_tree(proc.pid)
        status = _status(await self.launcher.killed(proc))
        if self.proc is proc:
            sock.close()
            self.proc = self.exited = self.sock = None
            if self.door is not None:
                self.door.close()
                self.door = None
        return status

    async def _exchange(self, sock: socket.socket, code: str) -> int | None:
        """Send the cell and wait for its return code; None if the driver went away, or
        answered something that is not a return code: the driver runs as the user and its
        socket is the user's to write into, so its answer is checked like any input."""
        loop = asyncio.get_running_loop()
        body = code.encode("utf-8", "surrogatepass")
        try:
            await loop.sock_sendall(sock, len(body).to_bytes(4, "big") + body)
            data = b""
            while len(data) < 4 or len(data) < 4 + int.from_bytes(data[:4], "big"):
                if len(data) >= 4 and int.from_bytes(data[:4], "big") > _MAX_RC_DIGITS:
                    return None
                chunk = await loop.sock_recv(sock, 4096)
                if not chunk:
                    return None
                data += chunk
        except OSError:
            return None
        text = data[4:].decode("ascii", "replace")
        return int(text) if text.isdigit() and int(text) <= 255 else None

    async def run(self, call: Any, request: p.Repl) -> p.ExecResult:
        """`call` is the request's: its send() carries events and, if cancelled, the result."""
        async with self.lock:
            with self.outputs.tracking() as mark:  # files the cell writes are reported, as for commands
                return await self._run(call, request, mark)

    async def _run(self, call: Any, request: p.Repl, mark: tuple[int, int, float]) -> p.ExecResult:
        started = time.monotonic()
        prefix = ""
        if self.exited is not None and self.exited.done():  # died between cells
            prefix = (
                f"[mcp-codeexec] the Python REPL process had exited since the last cell (status "
                f"{_status(self.exited.result())}); its state was reset and this cell ran in a fresh interpreter.\n"
            )
            await self._stop(self.proc)
        if self.proc is None:
            await self._start(request)
        proc, exited, sock = self.proc, self.exited, self.sock
        assert exited is not None and sock is not None
        if self.door is not None:
            self.door.attach(call)
        buffers = {name: CappedBuffer(request.max_output) for name in ("stdout", "stderr")}
        pumps: list[asyncio.Future[None]] = []
        ends, sent = [], False
        try:
            for name in ("stdout", "stderr"):
                r, w = os.pipe()
                ends.append(w)
                pumps.append(pump(r, buffers[name], output_events(call, name) if request.stream else None))
            socket.send_fds(sock, [b"C"], ends)  # one byte: never blocks on an idle channel
            sent = True
        except OSError:
            pass  # the driver is gone: handled below as a death
        finally:
            for w in ends:
                os.close(w)  # the driver holds the only write ends now: EOF when it lets go
        reply = asyncio.create_task(self._exchange(sock, request.code) if sent else asyncio.sleep(0))
        rc: int | None = None
        timed_out = cancelled = False
        try:
            waited: set[asyncio.Future[Any]] = {reply, exited}
            done, _ = await asyncio.wait(waited, timeout=request.timeout, return_when=asyncio.FIRST_COMPLETED)
            timed_out = not done
            if reply.done():
                rc = reply.result()
        except asyncio.CancelledError:
            cancelled = True
        if self.door is not None:
            self.door.detach()  # the cell is over: so are its tool calls
        died = rc is None
        if died:
            reply.cancel()
            await asyncio.wait([reply])  # its socket reader is gone before the socket closes
            if not (timed_out or cancelled):  # it is exiting: report its own status, not our kill's
                await asyncio.wait([exited], timeout=1)
            status = await self._stop(proc)
        await asyncio.wait(pumps, timeout=_DRAIN_AFTER_EXIT)  # background children may hold the pipes
        for task in pumps:
            task.cancel()
        stderr = buffers["stderr"].text("stderr")
        overran = f"the cell ran past its {request.timeout:g}-second limit and the Python REPL was stopped"
        if timed_out and request.timeout_is_result:
            rc, note = TIMEOUT_RETURN_CODE, f"detection_timeout: {overran}"
        elif timed_out:
            rc, note = KILLED_RETURN_CODE, overran
        elif cancelled:
            rc, note = KILLED_RETURN_CODE, "the cell was cancelled and the Python REPL was stopped"
        elif died:
            rc, note = status, "the Python REPL process exited"
        if died:
            stderr = _append(stderr, f"[mcp-codeexec] {note}; {RESET}")
        assert rc is not None
        files, files_note = self.outputs.written(mark)
        result = p.ExecResult(
            stdout=buffers["stdout"].text("stdout"),
            stderr=prefix + stderr,
            return_code=rc,
            timed_out=timed_out and not request.timeout_is_result,  # that profile wants a normal result
            cancelled=cancelled,
            stdout_bytes=buffers["stdout"].total,
            stderr_bytes=buffers["stderr"].total,
            duration=time.monotonic() - started,
            state_reset=died or bool(prefix),
            files=files[: p.MAX_REPORTED_FILES],
            files_note=files_note,
            files_total=len(files),
        )
        if cancelled:
            call.send(result)
            raise asyncio.CancelledError
        return result

    async def reset(self) -> p.ExecResult:
        """Kill the interpreter (a running cell ends as a crash); the next cell starts fresh."""
        started = time.monotonic()
        was_running = self.exited is not None and not self.exited.done()
        if self.proc is not None:
            kill_tree(self.proc.pid)
        async with self.lock:
            await self._stop(self.proc)
        return p.ExecResult("", "", 0, False, False, 0, 0, time.monotonic() - started, state_reset=was_running)
