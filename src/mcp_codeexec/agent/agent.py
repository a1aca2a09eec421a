"""The agent that runs inside every sandbox (standard library only).

It is the sandbox's main process (under its init), started by the loader (bootstrap.py)
as root with only SETUID, SETGID and KILL: the user's processes, which run as uid 1000,
cannot signal it, trace it or open its file descriptors (process.py).

Servers reach it through a Unix socket in a directory only root can enter: for each
connection the server execs a small relay in the sandbox, which hands its stdout (and a
pipe it copies its stdin into) to the agent over that socket (SCM_RIGHTS) and waits; the
agent then reads request frames from the one and writes reply frames straight to the
other (bootstrap.py says why stdin is copied).
Several connections may be open at once (two servers sharing a sandbox); each has its
own request ids. One process serves every call: no `docker exec` per call.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import functools
import os
import resource
import signal
import socket
import struct
import sys
import time
from typing import Any, cast

from mcp_codeexec.agent import protocol as p
from mcp_codeexec.agent.editor import Editor, EditorError
from mcp_codeexec.agent.process import (
    CHILD_FD,
    CappedBuffer,
    Launcher,
    as_sandbox_user,
    kill_tree,
    kill_user_processes,
    output_events,
    privileged,
    pump,
    read_some,
    within,
)
from mcp_codeexec.agent.repl import Repl
from mcp_codeexec.agent.toolchannel import ENV as TOOLS_ENV
from mcp_codeexec.agent.toolchannel import Tools, client_env, install_client
from mcp_codeexec.agent.watch import OutputFiles

# After the shell exits, how long to keep reading pipes that background children still
# hold open before returning (their later output is dropped).
_DRAIN_AFTER_EXIT = 0.2
_ARGV_MAX = 100_000
# A server that stops reading its replies: past this many unsent bytes its connection is
# dropped rather than grow the agent's memory.
_MAX_UNSENT = 64 << 20
_MAX_CONNECTIONS = 16


class Call:
    """One request in flight on one connection: where its replies and events go."""

    def __init__(self, connection: Connection, request_id: int) -> None:
        self.connection = connection
        self.id = request_id

    def send(self, reply: Any) -> None:
        self.connection.send(self.id, reply)


class _Pipe(asyncio.Protocol):
    """The write end of a connection: says when its transport has let go of the fd."""

    def __init__(self) -> None:
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.WriteTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.WriteTransport, transport)  # connect_write_pipe's

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)


class Connection:
    """One server's connection: request frames in, reply frames out (non-blocking)."""

    def __init__(self, agent: Agent, sock: socket.socket, in_fd: int, out_fd: int) -> None:
        self.agent = agent
        self.sock = sock  # the relay waits until this closes
        self.in_fd, self.out_fd = in_fd, out_fd
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.transport: asyncio.WriteTransport | None = None

    def send(self, request_id: int, reply: Any) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return  # the server went away; nobody reads this any more
        transport.write(p.reply_frame(request_id, reply))
        if transport.get_write_buffer_size() > _MAX_UNSENT:
            transport.abort()

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        pipe: _Pipe | None = None
        try:
            # closefd=False: the fd stays ours to close (_let_go), whatever the transport does.
            out = os.fdopen(self.out_fd, "wb", buffering=0, closefd=False)
            self.transport, pipe = await loop.connect_write_pipe(_Pipe, out)
            decoder = p.FrameDecoder()
            ended = loop.create_future()

            def readable() -> None:  # requests are read straight from the event loop (no stream objects)
                chunk = read_some(self.in_fd)
                try:
                    if chunk:
                        for message in decoder.feed(chunk):
                            self.dispatch(message)
                        return
                except p.ProtocolError:
                    pass  # a server that speaks garbage is dropped
                if chunk is not None and not ended.done():
                    ended.set_result(None)

            os.set_blocking(self.in_fd, False)
            loop.add_reader(self.in_fd, readable)
            await ended
        finally:
            # The server went away: what it started dies with its connection.
            for task in list(self.tasks.values()):
                task.cancel()
            loop.remove_reader(self.in_fd)  # (False if never added)
            await self._let_go(pipe)

    async def _let_go(self, pipe: _Pipe | None) -> None:
        """Close the exec's fds, and only then the socket the relay waits on. The engine
        ends the exec when the relay exits, and a checkpoint taken once no exec runs
        cannot be restored if any fd of an exec is still open (gVisor restores the
        container's own stdio only): every path out of a connection comes through here."""
        os.close(self.in_fd)
        if pipe is not None and pipe.transport is not None:
            # The transport lets go of the fd on a later turn of the loop, once its buffer
            # is written; a server that stopped reading has it dropped after a second.
            pipe.transport.close()
            if not await within([pipe.lost], 1.0):
                pipe.transport.abort()
                await within([pipe.lost], 1.0)
        os.close(self.out_fd)
        self.sock.close()

    def dispatch(self, message: Any) -> None:
        try:
            request_id, request = p.parse_request(message)
        except (p.ProtocolError, TypeError, KeyError, ValueError, AttributeError) as exc:
            request_id = message.get("id", 0) if isinstance(message, dict) else 0
            self.send(request_id if type(request_id) is int else 0, p.Failure("internal", f"bad request: {exc}"))
            return
        if isinstance(request, p.Cancel):
            task = self.tasks.get(request.target)
            if task:
                task.cancel()
            return  # fire and forget: the cancelled request answers for itself
        if isinstance(request, p.Reload):
            self.agent.reload()
            return
        if isinstance(request, p.ToolReply):
            if self.agent.tools is not None:
                self.agent.tools.resolve(request)
            return  # the answer to a tool call this agent forwarded: no reply of its own
        task = asyncio.create_task(self.agent.handle(Call(self, request_id), request))
        self.tasks[request_id] = task
        task.add_done_callback(functools.partial(self._forget, request_id))

    def _forget(self, request_id: int, _task: asyncio.Task[None]) -> None:
        self.tasks.pop(request_id, None)


class Agent:
    def __init__(self, root: str, listener: socket.socket) -> None:
        self.editor = Editor(root=root, workdir=os.getcwd())
        self.listener = listener
        self.connections: dict[Connection, asyncio.Task[None]] = {}
        self.env = dict(os.environ)  # what every command starts with, before the request's own
        self.launcher = Launcher(self.env)
        self.outputs = OutputFiles(self.editor.root)
        self.repl = Repl(self.launcher, self.outputs)  # the persistent Python interpreter, started on first use
        self.tools: Tools | None = None  # programmatic tool calling, when the server offers it

    def connect(self, sock: socket.socket, in_fd: int, out_fd: int) -> None:
        if len(self.connections) >= _MAX_CONNECTIONS:
            for fd in (in_fd, out_fd):
                os.close(fd)
            sock.close()
            return
        connection = Connection(self, sock, in_fd, out_fd)
        # The loop keeps only weak references to tasks: this set keeps the connection alive.
        task = asyncio.create_task(connection.serve())
        self.connections[connection] = task
        task.add_done_callback(lambda _t: self.connections.pop(connection, None))

    def hello(self, out_fd: int) -> None:
        frame = p.hello_frame(AGENT_HASH)
        while frame:
            frame = frame[os.write(out_fd, frame) :]

    async def accept(self, listener: socket.socket) -> None:
        """Take new connections: each brings the relay's stdin and stdout as two fds."""
        loop = asyncio.get_running_loop()
        listener.setblocking(False)
        while True:
            sock, _ = await loop.sock_accept(listener)
            try:
                fds = await _receive_fds(sock)
            except (OSError, ValueError):
                sock.close()
                continue
            try:
                self.hello(fds[1])
            except OSError:  # the server is gone already: its exec's fds go before its relay
                for fd in fds:
                    os.close(fd)
                sock.close()
                continue
            self.connect(sock, *fds)

    def reload(self) -> None:
        """Become the loader again (a server with other agent code asked): same process,
        same listening socket; what the user runs now is killed first."""
        kill_user_processes()
        self.listener.setblocking(True)
        os.set_inheritable(self.listener.fileno(), True)
        os.environ[LISTEN_FD_ENV] = str(self.listener.fileno())
        os.execv(sys.executable, sys.orig_argv)  # the loader's own command line

    async def handle(self, call: Call, request: p.Request) -> None:
        try:
            if isinstance(request, p.Ping):
                reply: Any = p.PingResult(p.PROTOCOL_VERSION, sys.version.split()[0], os.getpid(), os.getuid())
            elif isinstance(request, p.Exec):
                reply = await self.run(call, request)
            elif isinstance(request, p.Repl):
                reply = await self.repl.run(call, request)
            elif isinstance(request, p.ReplReset):
                reply = await self.repl.reset()
            elif isinstance(request, p.Edit) and request.command == "view":
                # On the loop's thread: a view is bounded (O_NONBLOCK open, size limits, a
                # capped listing) and a thread hand-off costs more than it under gVisor.
                reply = self.edit(request)
            elif isinstance(request, p.Edit):
                reply = await asyncio.get_running_loop().run_in_executor(None, self.edit, request)
            elif isinstance(request, (p.ReadFile, p.WriteFile)):
                reply = await asyncio.get_running_loop().run_in_executor(None, self.transfer, request)
            else:
                reply = p.Failure("internal", f"unhandled op {request.op}")
        except asyncio.CancelledError:
            return
        except Exception as exc:  # report, never die: one bad call must not end the agent
            reply = p.Failure("internal", f"{type(exc).__name__}: {exc}")
        call.send(reply)
        if isinstance(request, (p.Exec, p.Repl)):
            self.launcher.warm()  # the spawner, for the next call (after this one's reply)

    def edit(self, request: p.Edit) -> p.EditResult | p.Failure:
        with as_sandbox_user():
            return self._edit(request)

    def _edit(self, request: p.Edit) -> p.EditResult | p.Failure:
        try:
            if request.command == "view":
                return p.EditResult(self.editor.view(request.path, request.view_range))
            if request.command == "create":
                return p.EditResult(self.editor.create(request.path, request.file_text))
            if request.command == "str_replace":
                return p.EditResult(self.editor.str_replace(request.path, request.old_str or "", request.new_str or ""))
            return p.Failure("invalid_tool_input", f"unknown command {request.command!r}")
        except EditorError as exc:
            return p.Failure(exc.code, exc.message)

    def transfer(self, request: p.ReadFile | p.WriteFile) -> p.FileChunk | p.Written | p.Failure:
        with as_sandbox_user():  # uploads belong to the user; outputs are read as the user could
            return self._transfer(request)

    def _transfer(self, request: p.ReadFile | p.WriteFile) -> p.FileChunk | p.Written | p.Failure:
        try:
            if isinstance(request, p.ReadFile):
                length = max(0, min(request.length, p.READ_CHUNK))
                data, size = self.editor.read_chunk(request.path, request.offset, length)
                return p.FileChunk(base64.b64encode(data).decode("ascii"), size)
            data = base64.b64decode(request.data)
            return p.Written(self.editor.write_chunk(request.path, data, request.offset, request.final, request.mode))
        except EditorError as exc:
            return p.Failure(exc.code, exc.message)

    async def run(self, call: Call, request: p.Exec) -> p.ExecResult:
        with self.outputs.tracking() as mark:
            return await self._run(call, request, mark)

    async def _run(self, call: Call, request: p.Exec, mark: tuple[int, int, float]) -> p.ExecResult:
        started = time.monotonic()
        argv, script_fd = ["bash", "-c", request.command], None
        if len(request.command) > _ARGV_MAX:
            # Too long for one argv string (the kernel caps each at 128 KiB): source it from
            # an in-memory file instead.
            script_fd = os.memfd_create("command")
            os.write(script_fd, request.command.encode("utf-8", "surrogateescape"))
            argv = ["bash", "-c", f". /proc/self/fd/{CHILD_FD}"]
        # The command's tool channel (toolchannel.py), closed when the command ends.
        door = self.tools.door(call) if request.tools and self.tools is not None else None
        env = {**self.env, **request.env, **({TOOLS_ENV: door.name} if door else {})} if request.env or door else self.env
        notice = ""
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            for wait in (0.3, 1.0, None):
                try:
                    child = await self.launcher.spawn(argv, stdout=out_w, stderr=err_w, cwd=request.cwd, env=env, extra_fd=script_fd)
                    break
                except BlockingIOError:
                    if wait is None:
                        raise
                    # The process limit is full, most likely of what earlier commands left
                    # running in the background (a fork bomb): clear the sandbox and retry,
                    # once more after a longer wait (after a bomb of a few hundred processes,
                    # reaping them and gVisor freeing their slots can take longer than 0.3 s).
                    kill_user_processes()
                    await asyncio.sleep(wait)  # for them to be reaped
                    notice = (
                        "[mcp-codeexec] the sandbox's process limit was full; every process left running by earlier "
                        "commands was killed to run this one\n"
                    )
        except OSError as exc:  # still EAGAIN, or ENOMEM: no memory; or bash cannot be started
            for fd in (out_r, err_r):
                os.close(fd)
            if door is not None:
                door.close()
            why = " (the sandbox's process or memory limit is reached)" if exc.errno in (errno.EAGAIN, errno.ENOMEM) else ""
            message = f"mcp-codeexec: cannot start bash: {exc.strerror or exc}{why}\n"
            return p.ExecResult("", message, 126, False, False, 0, len(message), time.monotonic() - started)
        finally:
            for fd in (out_w, err_w) if script_fd is None else (out_w, err_w, script_fd):
                os.close(fd)
        buffers = {"stdout": CappedBuffer(request.max_output), "stderr": CappedBuffer(request.max_output)}
        pumps = [
            pump(fd, buffers[name], output_events(call, name) if request.stream else None)
            for name, fd in (("stdout", out_r), ("stderr", err_r))
        ]
        self.launcher.watch(child, pumps)
        timed_out = cancelled = False
        try:
            if await within([child.exited], request.timeout):
                # Background children may still hold the pipes: give them a moment, then stop.
                await within(pumps, _DRAIN_AFTER_EXIT)
            else:
                timed_out = True
        except asyncio.CancelledError:
            cancelled = True
        finally:
            if timed_out or cancelled:
                kill_tree(child.pid)
                await self.launcher.killed(child)
                await within(pumps, _DRAIN_AFTER_EXIT)
            for future in pumps:
                future.cancel()
            if door is not None:
                door.close()
        code = child.exited.result()
        files, files_note = self.outputs.written(mark)
        result = p.ExecResult(
            stdout=buffers["stdout"].text("stdout"),
            stderr=notice + buffers["stderr"].text("stderr"),
            return_code=128 - code if code < 0 else code,  # killed by signal N -> 128+N, as bash reports
            timed_out=timed_out,
            cancelled=cancelled,
            stdout_bytes=buffers["stdout"].total,
            stderr_bytes=buffers["stderr"].total,
            duration=time.monotonic() - started,
            files=files[: p.MAX_REPORTED_FILES],
            files_note=files_note,
            files_total=len(files),
        )
        if cancelled:
            call.send(result)
            raise asyncio.CancelledError
        return result


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def _receive_fds(sock: socket.socket) -> tuple[int, int]:
    """The relay's stdin and stdout, sent as one byte with two fds (SCM_RIGHTS)."""
    if privileged():  # the socket's directory is root's alone; check the peer all the same
        _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        if uid != 0:
            raise ValueError(f"a connection from uid {uid}")
    loop = asyncio.get_running_loop()
    while True:
        try:
            _, fds, _, _ = socket.recv_fds(sock, 1, 2, socket.MSG_CMSG_CLOEXEC)
            break
        except BlockingIOError:
            readable = loop.create_future()
            loop.add_reader(sock.fileno(), _settle, readable)
            try:
                await asyncio.wait_for(readable, 10)
            finally:
                loop.remove_reader(sock.fileno())
    if len(fds) != 2:
        for fd in fds:
            os.close(fd)
        raise ValueError("a connection must bring two fds")
    _close_on_exec(fds)
    return fds[0], fds[1]


def _close_on_exec(fds: list[int]) -> None:
    """socket.recv_fds ignores its flags before Python 3.13, MSG_CMSG_CLOEXEC included: a
    relay's stdio would survive a reload's exec, and that connection would never end."""
    for fd in fds:
        os.set_inheritable(fd, False)


AGENT_HASH = ""  # set by main() from what the loader was given
LISTEN_FD_ENV = "MCP_CODEEXEC_LISTEN_FD"  # the loader takes its listening socket from here


async def _serve(agent: Agent, listener: socket.socket, first: tuple[socket.socket, int, int]) -> None:
    agent.launcher.start()
    agent.connect(*first)
    await agent.accept(listener)


def main(listener: socket.socket, first: tuple[socket.socket, int, int], config: dict[str, Any]) -> None:
    """Called by the loader with its listening socket, the connection that brought the
    code, and the server's settings for this sandbox."""
    global AGENT_HASH
    AGENT_HASH = str(config["hash"])
    _close_on_exec(list(first[1:]))  # the loader received them the same way
    # A per-process address-space limit, inherited by every command: one process that
    # allocates too much gets a clean MemoryError/ENOMEM instead of the host killing the
    # whole sandbox. Set here once because per-command limits would need a preexec_fn.
    limit = int(config.get("rlimit_as") or 0)
    if limit:
        try:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        except ValueError:
            # A reload inherits the previous agent's hard limit, and raising it needs
            # CAP_SYS_RESOURCE, which the agent lacks: keep it, and what fits under it.
            hard = resource.getrlimit(resource.RLIMIT_AS)[1]
            resource.setrlimit(resource.RLIMIT_AS, (min(limit, hard), hard))
    if privileged():
        os.setgroups([])  # threads acting as the user must not carry root's groups
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    tools = None
    if config.get("tools"):
        try:  # before the agent copies the environment commands start with
            os.environ.update(client_env(install_client(str(config["tool_client"]))))
            tools = Tools()
        except OSError as exc:  # /tmp full: commands run, tool calls say there is no channel
            print(f"mcp-codeexec agent: no tool client: {exc}", file=sys.stderr)
    agent = Agent(str(config["root"]), listener)
    agent.launcher.use_zygote = bool(config.get("zygote", True))
    agent.tools = agent.repl.tools = tools
    asyncio.run(_serve(agent, listener, first))
