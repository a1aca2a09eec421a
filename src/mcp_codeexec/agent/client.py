"""The server's end of the agent protocol: starts the agent in a sandbox, sends requests,
matches replies to them by id, and notices when the agent dies."""

from __future__ import annotations

import itertools
import json
from importlib import resources
from typing import Any, Callable

import anyio
import anyio.abc

from mcp_codeexec.agent import protocol as p
from mcp_codeexec.deployment.base import AgentStream

# The agent's modules, in import order. They are sent over stdin at start, so the agent
# always matches this server's version and needs nothing in the image but python3.
_AGENT_MODULES = ["protocol", "editor", "watch", "repl", "agent"]

# Runs as `python3 -c`: reads a JSON header line naming (module, size) pairs, then the
# sources, registers them as modules in memory and starts the agent. Reads fd 0 unbuffered
# so that no byte meant for the agent's own reader is swallowed here.
_BOOTSTRAP = """
import json, os, sys, types
def read(n):
    b = b""
    while len(b) < n:
        c = os.read(0, n - len(b))
        if not c:
            sys.exit(3)
        b += c
    return b
line = b""
while not line.endswith(b"\\n"):
    line += read(1)
for pkg in ("mcp_codeexec", "mcp_codeexec.agent"):
    m = types.ModuleType(pkg); m.__path__ = []; sys.modules[pkg] = m
for name, size in json.loads(line):
    m = types.ModuleType(name); sys.modules[name] = m
    exec(compile(read(size), name.replace(".", "/") + ".py", "exec"), m.__dict__)
sys.modules["mcp_codeexec.agent.agent"].main()
"""


def agent_argv() -> list[str]:
    return ["python3", "-I", "-u", "-c", _BOOTSTRAP]


def agent_payload() -> bytes:
    package = resources.files("mcp_codeexec.agent")
    sources = [(f"mcp_codeexec.agent.{m}", (package / f"{m}.py").read_bytes()) for m in _AGENT_MODULES]
    header = json.dumps([[name, len(src)] for name, src in sources]).encode() + b"\n"
    return header + b"".join(src for _, src in sources)


class AgentDied(Exception):
    """The agent's stream ended (the agent or its whole sandbox died)."""


def _decode(kind: str, body: dict[str, Any], expected: type[Any]) -> Any:
    if kind == "failure":
        return p.Failure(**body)
    if kind == "event":
        return p.Output(**body)
    return expected(**body)


_REPLY_TYPES: dict[type[p.Request], type[Any]] = {
    p.Ping: p.PingResult,
    p.Exec: p.ExecResult,
    p.Edit: p.EditResult,
    p.ReadFile: p.FileChunk,
    p.WriteFile: p.Written,
    p.Repl: p.ExecResult,
    p.ReplReset: p.ExecResult,
}


class AgentClient:
    """One agent connection. `serve()` must run in a task for replies to arrive."""

    def __init__(self, stream: AgentStream) -> None:
        self.stream = stream
        self._ids = itertools.count(1)
        self._waiting: dict[int, tuple[type[Any], anyio.abc.ObjectSendStream[Any], Callable[[p.Output], None] | None]] = {}
        self._send_lock = anyio.Lock()
        self.closed = anyio.Event()
        self.death: str = ""

    async def start(self) -> None:
        await self.stream.send(agent_payload())

    async def serve(self) -> None:
        decoder = p.FrameDecoder()
        try:
            while True:
                chunk = await self.stream.receive()
                for message in decoder.feed(chunk):
                    self._dispatch(message)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            self.death = f"agent stream ended ({type(exc).__name__})"
        except p.ProtocolError as exc:
            self.death = f"agent protocol error: {exc}"
        finally:
            self.closed.set()
            for _, send, _ in self._waiting.values():
                send.close()
            self._waiting.clear()
            with anyio.CancelScope(shield=True):
                await self.stream.aclose()

    def _dispatch(self, message: dict[str, Any]) -> None:
        entry = self._waiting.get(int(message.get("id", -1)))
        if entry is None:
            return  # a reply to a request nobody waits for any more
        expected, send, on_output = entry
        reply = _decode(message.get("kind", ""), message.get("body", {}), expected)
        if isinstance(reply, p.Output):
            if on_output is not None:
                on_output(reply)
            return
        self._waiting.pop(int(message["id"]))
        send.send_nowait(reply)
        send.close()

    async def request(self, request: p.Request, on_output: Callable[[p.Output], None] | None = None) -> Any:
        """Send one request and wait for its reply (a result dataclass or p.Failure)."""
        if self.closed.is_set():
            raise AgentDied(self.death or "agent is not running")
        request_id = next(self._ids)
        send, receive = anyio.create_memory_object_stream[Any](1)
        self._waiting[request_id] = (_REPLY_TYPES[type(request)], send, on_output)
        try:
            async with self._send_lock:
                await self.stream.send(p.request_frame(request_id, request))
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
                async with self._send_lock:
                    await self.stream.send(p.request_frame(next(self._ids), p.Cancel(target=request_id)))
            raise
        finally:
            self._waiting.pop(request_id, None)

    async def aclose(self) -> None:
        await self.stream.aclose()
