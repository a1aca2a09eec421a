"""The agent that runs inside every sandbox (standard library only).

Started by the server over one attached `docker exec` stream; reads request frames on
stdin, writes reply frames on the protocol fd. One process serves every call, so a call
costs a spawn of `bash` and nothing else: no `docker exec` per call.
"""

from __future__ import annotations

import asyncio
import base64
import codecs
import os
import resource
import signal
import stat
import subprocess
import sys
import time
from typing import Any

from mcp_codeexec.agent import protocol as p
from mcp_codeexec.agent.editor import Editor, EditorError
from mcp_codeexec.agent.repl import Repl
from mcp_codeexec.agent.watch import Watcher

# After the shell exits, how long to keep reading pipes that background children still
# hold open before returning (their later output is dropped).
_DRAIN_AFTER_EXIT = 0.2
_CHUNK = 65536
_ARGV_MAX = 100_000


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


def _proc_table() -> list[tuple[int, int, int]]:
    """(pid, ppid, session) of every live process (zombies left out: they cannot be killed
    and are already dying). os.listdir works on gVisor's /proc."""
    table = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name may contain spaces and parens: split after its last ')'.
        fields = stat[stat.rfind(b")") + 2 :].split()
        if fields[0] != b"Z":
            table.append((int(name), int(fields[1]), int(fields[3])))
    return table


def kill_tree(root: int) -> None:
    """Kill the shell's session and every descendant (also those that left the session).
    Each round stops them all before killing, so a fork bomb cannot outrun it; rounds go on
    until nothing is left, for up to 5 seconds."""
    me = os.getpid()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        # Stop (not kill) the shell's process group in one atomic step, so a fork bomb in it
        # cannot outrun us. Killing it here would orphan the children that left the group
        # (setsid) before the table below is read: adopted by PID 1, they would escape.
        try:
            os.killpg(root, signal.SIGSTOP)
        except (ProcessLookupError, PermissionError):
            pass
        table = _proc_table()
        doomed = {pid for pid, _, sid in table if sid == root}
        doomed.add(root)
        children: dict[int, list[int]] = {}
        for pid, ppid, _ in table:
            children.setdefault(ppid, []).append(pid)
        stack = list(doomed)
        while stack:
            for child in children.get(stack.pop(), []):
                if child not in doomed:
                    doomed.add(child)
                    stack.append(child)
        doomed -= {me, 1}
        alive = doomed & {pid for pid, _, _ in table}
        if not alive:
            return
        for sig in (signal.SIGSTOP, signal.SIGKILL):
            for pid in alive:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        time.sleep(0.01)
    kill_all_but_agent()  # still not done after 5 s


def kill_all_but_agent() -> None:
    """Stop, then kill, every process in the sandbox but PID 1 and the agent, until none is
    left (a few rounds: what runs may fork meanwhile)."""
    spared = {1, os.getpid(), os.getppid()}  # the exec'd agent may sit under a helper process
    for _ in range(20):
        doomed = [pid for pid, _, _ in _proc_table() if pid not in spared]
        if not doomed:
            return
        for sig in (signal.SIGSTOP, signal.SIGKILL):
            for pid in doomed:
                try:
                    os.kill(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
        time.sleep(0.02)


class Agent:
    # For Repl, which cannot import this module (this one imports it).
    capped = CappedBuffer
    kill_tree = staticmethod(kill_tree)

    def __init__(self, out_fd: int) -> None:
        self.out_fd = out_fd
        self.editor = Editor(root=os.environ.get("MCP_CODEEXEC_ROOT", "/"), workdir=os.getcwd())
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.children: dict[int, tuple[subprocess.Popen[bytes], asyncio.Future[int]]] = {}
        self.repl = Repl(self)  # the persistent Python interpreter, started on first use
        self.events: list[str] = []  # files written, in order; events_base counts dropped ones
        self.events_base = 0
        try:
            self.watcher: Watcher | None = Watcher(self.editor.root)
        except OSError:
            self.watcher = None  # no inotify: commands report no output files

    def reap(self) -> None:
        """On SIGCHLD: collect our commands' exit codes without blocking. A signal handler
        instead of a waiter thread per command: threads are costly under gVisor's ptrace
        platform, and this keeps the agent single-threaded while commands run."""
        for pid, (proc, exited) in list(self.children.items()):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0
            if done:
                del self.children[pid]
                proc.returncode = os.waitstatus_to_exitcode(status)
                if not exited.done():
                    exited.set_result(proc.returncode)

    def send(self, request_id: int, reply: Any) -> None:
        # One synchronous write loop per frame: frames never interleave (single thread),
        # and short writes are retried.
        view = memoryview(p.reply_frame(request_id, reply))
        while view:
            n = os.write(self.out_fd, view)
            view = view[n:]

    async def serve(self, reader: asyncio.StreamReader) -> None:
        decoder = p.FrameDecoder()
        while chunk := await reader.read(_CHUNK):
            for message in decoder.feed(chunk):
                try:
                    request_id, request = p.parse_request(message)
                except (p.ProtocolError, TypeError, KeyError, ValueError) as exc:
                    self.send(int(message.get("id", 0)), p.Failure("internal", f"bad request: {exc}"))
                    continue
                if isinstance(request, p.Cancel):
                    task = self.tasks.get(request.target)
                    if task:
                        task.cancel()
                    continue  # fire and forget: the cancelled request answers for itself
                task = asyncio.create_task(self.handle(request_id, request))
                self.tasks[request_id] = task
                task.add_done_callback(lambda _t, rid=request_id: self.tasks.pop(rid, None))
        # stdin closed: the server went away. Leave; commands in flight die with us.
        for task in list(self.tasks.values()):
            task.cancel()

    async def handle(self, request_id: int, request: p.Request) -> None:
        try:
            if isinstance(request, p.Ping):
                reply: Any = p.PingResult(p.PROTOCOL_VERSION, sys.version.split()[0], os.getpid(), os.getuid())
            elif isinstance(request, p.Exec):
                reply = await self.run(request_id, request)
            elif isinstance(request, p.Repl):
                reply = await self.repl.run(request_id, request)
            elif isinstance(request, p.ReplReset):
                reply = await self.repl.reset()
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
        self.send(request_id, reply)

    def edit(self, request: p.Edit) -> p.EditResult | p.Failure:
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
        try:
            if isinstance(request, p.ReadFile):
                data, size = self.editor.read_chunk(request.path, request.offset, request.length)
                return p.FileChunk(base64.b64encode(data).decode("ascii"), size)
            data = base64.b64decode(request.data)
            return p.Written(self.editor.write_chunk(request.path, data, request.offset, request.final, request.mode))
        except EditorError as exc:
            return p.Failure(exc.code, exc.message)

    def written_files(self, since: int) -> list[list[Any]]:
        """[path, size] of regular files written since event number `since`."""
        if self.watcher is None:
            return []
        self.events.extend(self.watcher.drain())
        paths = dict.fromkeys(self.events[since - self.events_base :])
        found = []
        for path in paths:
            try:
                st = os.stat(path, follow_symlinks=False)
            except OSError:
                continue  # written, then removed or renamed
            if stat.S_ISREG(st.st_mode):
                found.append([path, st.st_size])
        return found

    def event_mark(self) -> int:
        """The number of file events seen so far (a call's files are those after its mark)."""
        if self.watcher is None:
            return 0
        self.events.extend(self.watcher.drain())
        if len(self.tasks) <= 1 or len(self.events) > 100_000:  # only this call runs: drop the old ones
            self.events_base += len(self.events)
            self.events.clear()
        return self.events_base + len(self.events)

    def spawn(self, argv: list[str], **kwargs: Any) -> tuple[subprocess.Popen[bytes], asyncio.Future[int]]:
        """Start a child in its own session (kill_tree's unit); the future gets its exit code."""
        # No preexec_fn: it would force fork() over vfork(), ~4x slower on gVisor.
        proc = subprocess.Popen(argv, start_new_session=True, **kwargs)
        exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.children[proc.pid] = (proc, exited)
        self.reap()  # it may have exited before it was registered
        return proc, exited

    async def pump(self, request_id: int, name: str, pipe: Any, buffer: CappedBuffer, stream: bool) -> None:
        """Read one output pipe to its end into `buffer` (and Output events if streaming)."""
        reader = asyncio.StreamReader(limit=_CHUNK)
        loop = asyncio.get_running_loop()
        transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        try:
            while chunk := await reader.read(_CHUNK):
                buffer.add(chunk)
                if stream:
                    self.send(request_id, p.Output(name, decoder.decode(chunk)))
        finally:
            transport.close()

    async def run(self, request_id: int, request: p.Exec) -> p.ExecResult:
        started = time.monotonic()
        mark = self.event_mark()
        # Popen, not asyncio's subprocess: asyncio's wait() also waits for the pipes to
        # close, so a background child holding stdout would hold the call.
        argv, script_fd = ["bash", "-c", request.command], None
        if len(request.command) > _ARGV_MAX:
            # Too long for one argv string (the kernel caps each at 128 KiB): source it from
            # an in-memory file instead.
            script_fd = os.memfd_create("command")
            os.write(script_fd, request.command.encode("utf-8", "surrogateescape"))
            argv = ["bash", "-c", f". /proc/self/fd/{script_fd}"]
        notice = ""
        try:
            for attempt in (1, 2):
                try:
                    proc, exited = self.spawn(
                        argv,
                        pass_fds=(script_fd,) if script_fd is not None else (),
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                        cwd=request.cwd,
                        env={**os.environ, **request.env},
                    )
                    break
                except BlockingIOError:
                    if attempt == 2:
                        raise
                    # The process limit is full, most likely of what earlier commands left
                    # running in the background (a fork bomb): clear the sandbox and retry.
                    kill_all_but_agent()
                    await asyncio.sleep(0.3)  # for PID 1 to reap them
                    notice = (
                        "[mcp-codeexec] the sandbox's process limit was full; every process left running by earlier "
                        "commands was killed to run this one\n"
                    )
        except OSError as exc:  # still EAGAIN, or ENOMEM: no memory
            message = f"mcp-codeexec: cannot start bash: {exc.strerror or exc} (the sandbox's process or memory limit is reached)\n"
            return p.ExecResult("", message, 126, False, False, 0, len(message), time.monotonic() - started)
        finally:
            if script_fd is not None:
                os.close(script_fd)
        buffers = {"stdout": CappedBuffer(request.max_output), "stderr": CappedBuffer(request.max_output)}
        pumps = [
            asyncio.create_task(self.pump(request_id, name, pipe, buffers[name], request.stream))
            for name, pipe in (("stdout", proc.stdout), ("stderr", proc.stderr))
        ]
        timed_out = cancelled = False
        try:
            await asyncio.wait_for(asyncio.shield(exited), request.timeout)
            # Background children may still hold the pipes: give them a moment, then stop.
            await asyncio.wait(pumps, timeout=_DRAIN_AFTER_EXIT)
        except asyncio.TimeoutError:
            timed_out = True
        except asyncio.CancelledError:
            cancelled = True
        finally:
            if timed_out or cancelled:
                kill_tree(proc.pid)
                await exited
                await asyncio.wait(pumps, timeout=_DRAIN_AFTER_EXIT)
            for task in pumps:
                task.cancel()
        code = exited.result()
        result = p.ExecResult(
            stdout=buffers["stdout"].text("stdout"),
            stderr=notice + buffers["stderr"].text("stderr"),
            return_code=128 - code if code < 0 else code,  # killed by signal N -> 128+N, as bash reports
            timed_out=timed_out,
            cancelled=cancelled,
            stdout_bytes=buffers["stdout"].total,
            stderr_bytes=buffers["stderr"].total,
            duration=time.monotonic() - started,
            files=self.written_files(mark),
        )
        if cancelled:
            self.send(request_id, result)
            raise asyncio.CancelledError
        return result


async def _main(in_fd: int, out_fd: int) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=p.MAX_FRAME)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(in_fd, "rb", buffering=0))
    agent = Agent(out_fd)
    loop.add_signal_handler(signal.SIGCHLD, agent.reap)
    await agent.serve(reader)


def main() -> None:
    # A per-process address-space limit, inherited by every command: one process that
    # allocates too much gets a clean MemoryError/ENOMEM instead of the host killing the
    # whole sandbox. Set here once because per-command limits would need a preexec_fn.
    limit = int(os.environ.get("MCP_CODEEXEC_RLIMIT_AS", "0"))
    if limit:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    # The protocol owns the original stdout; anything else that writes to fd 1 (a stray
    # print, a library warning) goes to stderr instead of corrupting frames.
    out_fd = os.dup(1)
    os.dup2(2, 1)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    asyncio.run(_main(0, out_fd))


if __name__ == "__main__":
    main()
