"""The agent that runs inside every sandbox (standard library only).

Started by the server over one attached `docker exec` stream; reads request frames on
stdin, writes reply frames on the protocol fd. One process serves every call, so a call
costs a spawn of `bash` and nothing else: no `docker exec` per call.
"""

from __future__ import annotations

import asyncio
import codecs
import os
import resource
import signal
import subprocess
import sys
import time
from typing import Any

from mcp_codeexec.agent import protocol as p
from mcp_codeexec.agent.editor import Editor, EditorError

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
    """(pid, ppid, session) of every visible process. os.listdir works on gVisor's /proc."""
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
        table.append((int(name), int(fields[1]), int(fields[3])))
    return table


def kill_tree(root: int) -> None:
    """SIGKILL the shell's session and every descendant, a few rounds to catch forks."""
    me = os.getpid()
    for _ in range(5):
        table = _proc_table()
        doomed = {pid for pid, _, sid in table if sid == root}
        doomed.add(root)
        children: dict[int, list[int]] = {}
        for pid, ppid, _ in table:
            children.setdefault(ppid, []).append(pid)
        stack = [root]
        while stack:
            for child in children.get(stack.pop(), []):
                if child not in doomed:
                    doomed.add(child)
                    stack.append(child)
        doomed.discard(me)
        doomed.discard(1)
        alive = 0
        for pid in doomed:
            try:
                os.kill(pid, signal.SIGKILL)
                alive += 1
            except ProcessLookupError:
                pass
        if not alive:
            return


class Agent:
    def __init__(self, out_fd: int) -> None:
        self.out_fd = out_fd
        self.editor = Editor(root=os.environ.get("MCP_CODEEXEC_ROOT", "/"), workdir=os.getcwd())
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.children: dict[int, tuple[subprocess.Popen[bytes], asyncio.Future[int]]] = {}

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
            elif isinstance(request, p.Edit):
                reply = await asyncio.get_running_loop().run_in_executor(None, self.edit, request)
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

    async def run(self, request_id: int, request: p.Exec) -> p.ExecResult:
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        # Popen, not asyncio's subprocess: asyncio's wait() also waits for the pipes to
        # close, so a background child holding stdout would hold the call.
        argv, script_fd = ["bash", "-c", request.command], None
        if len(request.command) > _ARGV_MAX:
            # Too long for one argv string (the kernel caps each at 128 KiB): source it from
            # an in-memory file instead.
            script_fd = os.memfd_create("command")
            os.write(script_fd, request.command.encode("utf-8", "surrogateescape"))
            argv = ["bash", "-c", f". /proc/self/fd/{script_fd}"]
        proc = subprocess.Popen(
            argv,
            pass_fds=(script_fd,) if script_fd is not None else (),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=request.cwd,
            env={**os.environ, **request.env},
            start_new_session=True,  # no preexec_fn: it would force fork() over vfork(), ~4x slower on gVisor
        )
        if script_fd is not None:
            os.close(script_fd)
        exited: asyncio.Future[int] = loop.create_future()
        self.children[proc.pid] = (proc, exited)
        self.reap()  # it may have exited before it was registered
        buffers = {"stdout": CappedBuffer(request.max_output), "stderr": CappedBuffer(request.max_output)}

        async def pump(name: str, pipe: Any) -> None:
            reader = asyncio.StreamReader(limit=_CHUNK)
            transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
            decoder = codecs.getincrementaldecoder("utf-8")("replace")
            try:
                while chunk := await reader.read(_CHUNK):
                    buffers[name].add(chunk)
                    if request.stream:
                        self.send(request_id, p.Output(name, decoder.decode(chunk)))
            finally:
                transport.close()

        pumps = [asyncio.create_task(pump("stdout", proc.stdout)), asyncio.create_task(pump("stderr", proc.stderr))]
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
            stderr=buffers["stderr"].text("stderr"),
            return_code=128 - code if code < 0 else code,  # killed by signal N -> 128+N, as bash reports
            timed_out=timed_out,
            cancelled=cancelled,
            stdout_bytes=buffers["stdout"].total,
            stderr_bytes=buffers["stderr"].total,
            duration=time.monotonic() - started,
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
