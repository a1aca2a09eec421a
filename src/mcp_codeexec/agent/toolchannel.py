"""The agent's side of programmatic tool calling (standard library only).

Code in the sandbox (uid 1000) calls upstream MCP tools through the agent (root), which
forwards each call to the server over the connection the command came from; the server
checks it, calls the upstream and answers (protocol.ToolRequest / ToolReply).

How user code reaches the agent: each command that may call tools (Exec, and the REPL's
interpreter) gets a *door*, a Unix socket listening on a random abstract name given in
$MCP_CODEEXEC_TOOLS. Abstract names need no directory the user could squat, and the name
reaches every process the command starts (env is inherited; fds are not: subprocess closes
them). A call is one connection: one request frame in, one reply frame out.

Attribution is by door, not by peer credentials: under gVisor, SO_PEERCRED on an accepted
socket reports the listener's credentials, not the peer's. The name is not a secret from
the user's other processes (gVisor lets them read each other's environ): at worst one
command's calls are counted against another command of the same sandbox, never another
sandbox or tenant (the server decides those from the connection, not from anything sent).
A door closes when its command ends (a REPL door refuses calls between cells), so a
background process left behind cannot call tools.

Everything read from a door is hostile: frames are bounded, decoded strictly, and a slow
or silent caller is dropped after a time limit.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import socket
import stat
import struct
from typing import Any

from mcp_codeexec.agent import protocol as p
from mcp_codeexec.agent.process import privileged

ENV = "MCP_CODEEXEC_TOOLS"
# A request frame: the server bounds arguments far lower (its limits); this only keeps one
# caller from holding the agent's memory.
_MAX_FRAME = 4 << 20
_READ_TIMEOUT = 30.0  # a caller must send its whole request within this long
_MAX_OPEN = 16  # calls in flight per door; past it a call is answered "limit" at once
_HEADER = struct.Struct(">I")
_MAX_NAME = 256
_DIR_PREFIX = ".mcp-codeexec-tools-"


def install_client(source: str) -> str:
    """Write the user-side module (mcp_tools) and the `mcp-tool` command into a fresh
    directory readable by the sandbox user; its path. A new random directory each time,
    made by mkdir (fails if it exists), so nothing the user made beforehand is used."""
    # In a sandbox, its own /tmp (root may not write to the user's $HOME); an agent that is
    # not root (the local backend) uses its sandbox's own $HOME, removed with the sandbox.
    base = "/tmp" if privileged() or not os.environ.get("HOME") else os.environ["HOME"]
    if privileged():  # the sandbox's own /tmp: drop what an earlier load of the agent left
        for name in os.listdir(base):
            path = os.path.join(base, name)
            if name.startswith(_DIR_PREFIX) and os.stat(path, follow_symlinks=False).st_uid == os.geteuid():
                shutil.rmtree(path, ignore_errors=True)
    for _ in range(10):
        directory = os.path.join(base, f"{_DIR_PREFIX}{secrets.token_hex(8)}")
        try:
            os.mkdir(directory, 0o755)
            break
        except FileExistsError:
            continue
    else:
        raise OSError("cannot make a directory for the tool client")
    os.chmod(directory, 0o755)  # mkdir's mode is filtered by the umask
    os.mkdir(os.path.join(directory, "bin"), 0o755)
    os.chmod(os.path.join(directory, "bin"), 0o755)
    module = os.path.join(directory, "mcp_tools.py")
    with open(module, "w", encoding="utf-8") as f:
        f.write(source)
    os.chmod(module, 0o644)
    script = os.path.join(directory, "bin", "mcp-tool")
    with open(script, "w", encoding="utf-8") as f:
        f.write(f"#!/usr/bin/env python3\nimport sys\nsys.path.insert(0, {directory!r})\n"
                "import mcp_tools\nsys.exit(mcp_tools.main())\n")
    os.chmod(script, stat.S_IRUSR | stat.S_IWUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH | stat.S_IXUSR)
    return directory


def client_env(directory: str) -> dict[str, str]:
    """What the agent adds to its own environment, so every command finds the client
    (entries of an earlier load, kept in the environment across a reload, replaced)."""

    def kept(variable: str, default: str = "") -> list[str]:
        return [e for e in os.environ.get(variable, default).split(os.pathsep) if e and _DIR_PREFIX not in e]

    return {
        "PYTHONPATH": os.pathsep.join([directory, *kept("PYTHONPATH")]),
        # Last: the image's own /usr/local/bin/mcp-tool wins (this directory is noexec there);
        # a sandbox without one (the local backend) finds this.
        "PATH": os.pathsep.join([*kept("PATH", os.defpath), os.path.join(directory, "bin")]),
    }


def _error(code: str, message: str) -> dict[str, Any]:
    return {"ok": False, "code": code, "message": message}


def _decode(body: bytes) -> dict[str, Any] | str:
    """A caller's request, or why it is not one."""
    try:
        request = json.loads(body)
    except (ValueError, RecursionError):
        return "the request is not JSON"
    if not isinstance(request, dict):
        return "the request is not an object"
    if request == {"op": "list"}:
        return request
    if set(request) != {"op", "server", "tool", "arguments"} or request["op"] != "call":
        return 'a request is {"op": "list"} or {"op": "call", "server", "tool", "arguments"}'
    if not (isinstance(request["server"], str) and 0 < len(request["server"]) <= _MAX_NAME):
        return "server must be a name"
    if not (isinstance(request["tool"], str) and 0 < len(request["tool"]) <= _MAX_NAME):
        return "tool must be a name"
    if not isinstance(request["arguments"], dict):
        return "arguments must be an object"
    return request


class Tools:
    """Forwards calls to the server and routes its replies (one per agent)."""

    def __init__(self) -> None:
        self._next = 0
        self._pending: dict[int, asyncio.Future[p.ToolReply]] = {}

    def door(self, call: Any = None) -> Door | None:
        """A door for a command (`call`: the request it serves, or None until attached);
        None if no socket can be made (out of fds): the command runs, its calls say so."""
        try:
            return Door(self, call)
        except OSError:
            return None

    def resolve(self, reply: p.ToolReply) -> None:
        future = self._pending.pop(reply.call, None)
        if future is not None and not future.done():
            future.set_result(reply)

    async def forward(self, call: Any, request: dict[str, Any]) -> dict[str, Any]:
        """Send one request to the server on `call`'s connection, as part of that command;
        the reply for the caller."""
        self._next += 1
        call_id = self._next
        future: asyncio.Future[p.ToolReply] = asyncio.get_running_loop().create_future()
        self._pending[call_id] = future
        try:
            call.send(p.ToolRequest(call=call_id, op=request["op"], server=request.get("server", ""),
                                    tool=request.get("tool", ""), arguments=request.get("arguments", {})))
            reply = await future  # the server always answers (its own time limit per call)
        finally:
            self._pending.pop(call_id, None)
        if reply.ok:
            return {"ok": True, "result": reply.result}
        return _error(reply.code, reply.message)


class Door:
    """One command's listening socket; see the module's docstring."""

    def __init__(self, tools: Tools, call: Any) -> None:
        self.tools = tools
        self.call = call
        self.name = f"mcp-codeexec-tools-{secrets.token_hex(16)}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.bind("\0" + self.name)
        self.sock.listen(64)
        self.sock.setblocking(False)
        self.tasks: set[asyncio.Task[None]] = set()
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(self.sock.fileno(), self._accept)
        self.closed = False

    def attach(self, call: Any) -> None:
        self.call = call

    def detach(self) -> None:
        """The command (cell) ended: its calls in flight end too."""
        self.call = None
        for task in list(self.tasks):
            task.cancel()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.detach()
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # e.g. out of file descriptors: the caller sees its connection refused
            conn.setblocking(False)
            if len(self.tasks) >= _MAX_OPEN:
                self._answer_now(conn, _error("limit", f"more than {_MAX_OPEN} tool calls at once from one command"))
                continue
            task = self.loop.create_task(self._serve(conn))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    @staticmethod
    def _answer_now(conn: socket.socket, reply: dict[str, Any]) -> None:
        try:
            conn.send(_frame(reply))
        except OSError:
            pass
        conn.close()

    async def _serve(self, conn: socket.socket) -> None:
        try:
            try:
                body = await asyncio.wait_for(self._read(conn), _READ_TIMEOUT)
            except (TimeoutError, OSError, ValueError) as exc:
                reply = _error("invalid_request", f"no complete request ({type(exc).__name__}: {exc})"[:300])
            else:
                request = _decode(body)
                if isinstance(request, str):
                    reply = _error("invalid_request", request)
                elif self.call is None:
                    reply = _error("no_channel", "no command is running on this tool channel")
                else:
                    reply = await self.tools.forward(self.call, request)
            await self.loop.sock_sendall(conn, _frame(reply))
        except (OSError, ValueError):
            pass  # the caller went away
        finally:
            conn.close()

    async def _read(self, conn: socket.socket) -> bytes:
        data = bytearray()
        need = _HEADER.size
        while len(data) < need:
            chunk = await self.loop.sock_recv(conn, min(need - len(data), 1 << 20))
            if not chunk:
                raise ValueError("the caller closed before sending a whole request")
            data += chunk
            if need == _HEADER.size and len(data) >= need:
                (length,) = _HEADER.unpack_from(data)
                if length > _MAX_FRAME:
                    raise ValueError(f"a request of {length} bytes (at most {_MAX_FRAME})")
                need += length
        return bytes(data[_HEADER.size :])


def _frame(reply: dict[str, Any]) -> bytes:
    body = json.dumps(reply, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass")
    return _HEADER.pack(len(body)) + body
