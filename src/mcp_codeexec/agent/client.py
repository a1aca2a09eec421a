"""The server's end of the agent protocol: connects to the agent in a sandbox (loading or
reloading its code), sends requests, matches replies to them by id, and notices when the
connection ends.

Everything that comes out of a sandbox is untrusted: frames are bounded before they are
buffered, every reply is decoded strictly (protocol.decode_reply) and then checked against
what its request can produce (sizes, counts, paths inside the workspace). A frame that
fails any check ends this one connection, with the reason: the calls in flight on it
fail with AgentDied, the sandbox is restarted by its owner, and nothing reaches any other
sandbox. serve() never raises (but for cancellation): it is the fault boundary.
"""

from __future__ import annotations

import base64
import binascii
import logging
import posixpath
import secrets
from collections.abc import Awaitable, Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectSendStream
from pydantic import ValidationError

from mcp_codeexec import wire
from mcp_codeexec.agent import protocol as p
from mcp_codeexec.agent.bootstrap import load_frame_body, relay_argv
from mcp_codeexec.deployment.base import AgentStream, Deployment
from mcp_codeexec.errors import BackendUnavailable, SandboxDied

log = logging.getLogger(__name__)

# A frame begun must be finished within this long (the agent writes whole frames at once).
STALL_TIMEOUT = 30.0
_MAX_MESSAGE = 64 * 1024  # a failure's message, a files note
_MAX_PATH = 4096
_MAX_EVENT = 16 * 65536  # one Output event: a 64 KiB chunk, JSON-escaped at worst


class AgentDied(SandboxDied):
    """The connection to the agent ended: its stream closed, or it sent something no
    agent would (then `reason` says what)."""


@dataclass(frozen=True)
class Bounds:
    """What a reply may hold, from the sandbox's settings."""

    workdir: str

    def inside(self, path: Any) -> bool:
        return (
            isinstance(path, str)
            and len(path) <= _MAX_PATH
            and "\x00" not in path
            and posixpath.normpath(path) == path
            and path.startswith(self.workdir.rstrip("/") + "/")
        )


def check_reply(reply: Any, request: p.Request, bounds: Bounds) -> Any:
    """`reply` if it is what `request` can get back, else ProtocolError."""

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise p.ProtocolError(f"{type(reply).__name__}: {what}")

    if isinstance(reply, p.Failure):
        need(len(reply.code) <= 64 and len(reply.message) <= _MAX_MESSAGE, "oversized failure")
    elif isinstance(reply, p.Output):
        need(reply.stream in ("stdout", "stderr") and len(reply.data) <= _MAX_EVENT, "bad output event")
    elif isinstance(reply, p.ExecResult):
        # Each stream: the capped bytes (at most one character each once decoded), the
        # truncation marker, and notices the agent adds.
        cap = getattr(request, "max_output", 0) + _MAX_MESSAGE
        need(len(reply.stdout) <= cap and len(reply.stderr) <= cap, "output over its cap")
        need(0 <= reply.return_code <= 255, f"return code {reply.return_code}")
        need(reply.stdout_bytes >= 0 and reply.stderr_bytes >= 0 and reply.duration >= 0, "negative count")
        need(len(reply.files_note) <= _MAX_MESSAGE, "oversized note")
        need(len(reply.files) <= min(p.MAX_REPORTED_FILES, max(reply.files_total, 0)), "more files than reported")
        for entry in reply.files:
            need(len(entry) == 2 and bounds.inside(entry[0]), "a file outside the workspace")
            need(type(entry[1]) is int and entry[1] >= 0, "a file size that is not a size")
    elif isinstance(reply, p.FileChunk):
        try:
            data = base64.b64decode(reply.data, validate=True)
        except (binascii.Error, ValueError):
            raise p.ProtocolError("FileChunk: data is not base64") from None
        need(len(data) <= p.READ_CHUNK and reply.size >= 0, "chunk larger than asked")
    elif isinstance(reply, p.EditResult):
        try:
            wire.editor_result.validate_python(reply.result, strict=True)
        except ValidationError as exc:
            raise p.ProtocolError(f"EditResult: not an editor result ({exc.error_count()} errors)") from None
    elif isinstance(reply, p.Written):
        need(reply.size >= 0, "negative size")
    elif isinstance(reply, p.PingResult):
        need(reply.protocol == p.PROTOCOL_VERSION, f"protocol {reply.protocol}")
    return reply


_REPLY_TYPES: dict[type[p.Request], type[Any]] = {
    p.Ping: p.PingResult,
    p.Exec: p.ExecResult,
    p.Edit: p.EditResult,
    p.ReadFile: p.FileChunk,
    p.WriteFile: p.Written,
    p.Repl: p.ExecResult,
    p.ReplReset: p.ExecResult,
}

_Waiter = tuple[p.Request, MemoryObjectSendStream[Any], Callable[[p.Output], None] | None]


@dataclass
class CommandTools:
    """The tool calls of one command (an Exec or Repl request in flight): counted against
    it, and cancelled when it ends."""

    request_id: int
    calls: int = 0  # made so far
    active: int = 0  # in flight now (counted by the gateway, after its checks)
    tasks: int = 0  # answers being worked on (counted here, before any check)
    scopes: set[anyio.CancelScope] = field(default_factory=set)
    ended: bool = False

    def end(self) -> None:
        self.ended = True
        for scope in self.scopes:
            scope.cancel()


# Answers one tool request of a command (upstream.Gateway.call, bound to the sandbox).
ToolHandler = Callable[[p.ToolRequest, CommandTools], Awaitable[p.ToolReply]]
_TOOL_COMMANDS = (p.Exec, p.Repl)  # the requests whose code may call tools
_MAX_TOOL_NAME = 256
# Tool requests in flight per command. The agent lets at most 16 through per command; more
# is something no agent would send.
_MAX_TOOL_TASKS = 64


class AgentClient:
    """One connection to the agent. `serve()` must run in a task for replies to arrive;
    `connect()` then brings the agent up to this server's code."""

    def __init__(self, stream: AgentStream, bounds: Bounds, on_tool: ToolHandler | None = None) -> None:
        self.stream = stream
        self.bounds = bounds
        self.on_tool = on_tool
        self._commands: dict[int, CommandTools] = {}
        self._tasks: anyio.abc.TaskGroup | None = None
        # Ids start at random: a reply still in flight from another connection cannot
        # pass for one of ours.
        self._next_id = secrets.randbelow(1 << 40)
        self._waiting: dict[int, _Waiter] = {}
        self._send_lock = anyio.Lock()
        self._hello: p.Hello | None = None
        self._hello_seen = anyio.Event()
        self.closed = anyio.Event()
        self.death: str = ""

    # --- the connection -------------------------------------------------------------

    async def connect(self, config: dict[str, Any]) -> bool:
        """Wait for the sandbox's hello and bring the agent up to this server's code and
        config. True when it is ready; False when it was told to reload (this connection
        then ends: connect again)."""
        body, digest = load_frame_body(config)
        with anyio.fail_after(30):
            await self._hello_seen.wait()
        hello = self._hello
        if hello is None:
            raise AgentDied(self.death or "the sandbox closed the connection before its hello")
        if hello.agent == digest:
            return True
        if hello.agent is None:
            await self._send(p.encode(body))
            return True
        await self._send(p.request_frame(self._new_id(), p.Reload()))
        return False

    async def serve(self) -> None:
        """Read frames until the stream ends or a frame is not what an agent sends. Never
        raises (but for cancellation): whatever one sandbox sends stays with its sandbox."""
        async with anyio.create_task_group() as self._tasks:  # tool calls run here
            await self._read_frames()
            self._tasks.cancel_scope.cancel()

    async def _read_frames(self) -> None:
        decoder = p.FrameDecoder(p.MAX_REPLY_FRAME)
        try:
            while True:
                with anyio.fail_after(STALL_TIMEOUT) if decoder.pending else nullcontext():
                    chunk = await self.stream.receive()
                for message in decoder.feed(chunk):
                    self._dispatch(message)
        except TimeoutError:  # (before OSError, of which it is a kind)
            self.death = f"the sandbox's agent stalled in the middle of a frame for {STALL_TIMEOUT:g} s"
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            self.death = self.death or f"agent stream ended ({type(exc).__name__})"
        except p.ProtocolError as exc:
            self.death = f"the sandbox's agent sent a malformed frame ({str(exc)[:300]})"
        except Exception as exc:  # noqa: BLE001 - a bug here must not leave this sandbox either
            log.exception("agent connection: unexpected error")
            self.death = f"internal error on the agent connection ({type(exc).__name__})"
        finally:
            for command in self._commands.values():
                command.end()
            self.closed.set()
            self._hello_seen.set()
            for _, send, _ in self._waiting.values():
                send.close()
            self._waiting.clear()
            with anyio.CancelScope(shield=True):
                await self.stream.aclose()

    def _dispatch(self, message: Any) -> None:
        if self._hello is None and not self._hello_seen.is_set():
            self._hello = p.decode_hello(message)
            self._hello_seen.set()
            return
        if isinstance(message, dict) and message.get("kind") == "tool":
            self._tool_request(message)
            return
        request_id = message.get("id") if isinstance(message, dict) else None
        if not isinstance(request_id, int) or isinstance(request_id, bool) or request_id not in self._waiting:
            # Not ours (forged, or for a request nobody waits for any more): checked all
            # the same, so garbage cannot hide behind an unknown id, then dropped.
            self._check_shape(message)
            return
        request, send, on_output = self._waiting[request_id]
        _, reply = p.decode_reply(message, _REPLY_TYPES[type(request)])
        reply = check_reply(reply, request, self.bounds)
        if isinstance(reply, p.Output):
            if on_output is not None:
                try:
                    on_output(reply)
                except Exception:  # noqa: BLE001 - a progress hiccup must not end the call
                    log.exception("progress callback failed")
            return
        del self._waiting[request_id]
        send.send_nowait(reply)
        send.close()

    def _tool_request(self, message: Any) -> None:
        """Code run by a command calls a tool: answered in a task of its own, cancelled
        when the command ends. A request for a command that has ended (a race with its
        reply) is dropped; one that names a request that runs no code is a protocol error."""
        request_id, request = p.decode_tool_request(message)
        if request.call < 0 or request.op not in ("call", "list"):
            raise p.ProtocolError(f"ToolRequest: bad call id or op {request.op[:20]!r}")
        if len(request.server) > _MAX_TOOL_NAME or len(request.tool) > _MAX_TOOL_NAME:
            raise p.ProtocolError("ToolRequest: oversized name")
        waiter = self._waiting.get(request_id)
        if waiter is None:
            return
        if not isinstance(waiter[0], _TOOL_COMMANDS):
            raise p.ProtocolError(f"a tool call from a {waiter[0].op} request")
        command = self._commands.setdefault(request_id, CommandTools(request_id))
        if command.tasks >= _MAX_TOOL_TASKS:
            raise p.ProtocolError(f"over {_MAX_TOOL_TASKS} tool calls at once from one command")
        if self._tasks is not None:
            command.tasks += 1
            self._tasks.start_soon(self._answer_tool, request, command)

    async def _answer_tool(self, request: p.ToolRequest, command: CommandTools) -> None:
        with anyio.CancelScope() as scope:
            command.scopes.add(scope)
            try:
                if command.ended:
                    return
                if self.on_tool is None:
                    reply = p.ToolReply(call=request.call, ok=False, code="unavailable",
                                        message="this server offers no tools to code in the sandbox")
                else:
                    reply = await self.on_tool(request, command)
                await self._send(p.request_frame(self._new_id(), reply))
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                pass  # the connection ended: so did the command
            except Exception:  # noqa: BLE001 - one call's bug must not end the connection
                log.exception("tool call: unexpected error")
                with anyio.move_on_after(5):
                    try:
                        await self._send(p.request_frame(self._new_id(), p.ToolReply(
                            call=request.call, ok=False, code="unavailable", message="internal error in the server")))
                    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                        pass
            finally:
                command.scopes.discard(scope)
                command.tasks -= 1

    @staticmethod
    def _check_shape(message: Any) -> None:
        if not isinstance(message, dict) or set(message) != {"id", "kind", "body"} or type(message["id"]) is not int:
            raise p.ProtocolError("a frame that is not a reply")

    # --- requests -------------------------------------------------------------------

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    async def _send(self, frame: bytes) -> None:
        async with self._send_lock:
            await self.stream.send(frame)

    async def request(self, request: p.Request, on_output: Callable[[p.Output], None] | None = None) -> Any:
        """Send one request and wait for its reply (a result dataclass or p.Failure)."""
        if self.closed.is_set():
            raise AgentDied(self.death or "agent is not running")
        request_id = self._new_id()
        send, receive = anyio.create_memory_object_stream[Any](1)
        self._waiting[request_id] = (request, send, on_output)
        try:
            await self._send(p.request_frame(request_id, request))
            async with receive:
                try:
                    return await receive.receive()
                except anyio.EndOfStream:
                    raise AgentDied(self.death or "agent stream ended") from None
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            raise AgentDied(f"cannot reach agent: {exc}") from exc
        except anyio.get_cancelled_exc_class():
            # The caller gave up (client cancellation, backstop): kill the command too.
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                try:
                    await self._send(p.request_frame(self._new_id(), p.Cancel(target=request_id)))
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    pass
            raise
        finally:
            self._waiting.pop(request_id, None)
            command = self._commands.pop(request_id, None)
            if command is not None:
                command.end()  # the command is over: so are its tool calls

    async def aclose(self) -> None:
        await self.stream.aclose()



async def connect_agent(
    deployment: Deployment,
    name: str,
    task_group: anyio.abc.TaskGroup,
    config: dict[str, Any],
    on_tool: ToolHandler | None = None,
) -> AgentClient:
    """A live connection to the agent of the running sandbox `name`, running this server's
    code with `config` ({"root": workspace, "rlimit_as": bytes, "tools": bool}), loaded or
    reloaded as needed. Its serve() runs in `task_group` (it never raises). `on_tool`
    answers the tool calls of code in the sandbox."""
    for _ in range(3):
        stream = await deployment.connect(name, relay_argv())
        agent = AgentClient(stream, Bounds(str(config["root"])), on_tool)
        task_group.start_soon(agent.serve)
        try:
            if not await agent.connect(config):
                await agent.closed.wait()  # told to reload: it closes; connect again
                continue
            with anyio.fail_after(30):
                reply = await agent.request(p.Ping())
        except (TimeoutError, AgentDied) as exc:
            await agent.aclose()
            raise BackendUnavailable(f"the sandbox's agent did not start: {agent.death or exc}") from None
        if isinstance(reply, p.Failure):
            await agent.aclose()
            raise BackendUnavailable(f"the sandbox's agent did not start properly: {reply.message[:300]}")
        return agent
    raise BackendUnavailable("the sandbox's agent kept asking to reload")
