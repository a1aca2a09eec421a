"""How the agent gets into a sandbox and how a server reaches it (server side).

- The sandbox's main process is the *loader* (`loader_argv()`, under the container's
  init, as root): it listens on a Unix socket in a root-only tmpfs and waits for its
  first connection to bring the agent's code. So the code always matches the server that
  connects, and the image needs nothing but python3. A server whose code differs (another
  version) sends Reload: the agent becomes the loader again, in the same process.
- Each server connection is a *relay* (`relay_argv()`), exec'd in the sandbox by the
  backend: it passes its own stdout to the agent over the socket, with a pipe it copies
  its stdin into, and waits until the agent lets go of them. The server then speaks
  frames over the exec stream as if to the agent's own stdio; replies reach it with no
  copying process in between.

The loader and the relay are kept small and stable: a container keeps the loader it was
created with for its whole life.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from typing import Any

SOCKET_DIR = "/run/mcp-codeexec"
SOCKET = f"{SOCKET_DIR}/agent.sock"

# The agent's modules, in import order.
_AGENT_MODULES = ["protocol", "process", "editor", "watch", "toolchannel", "repl", "agent"]
# Shipped as text, for the user's processes, when tools are on (toolchannel.install_client).
_TOOL_CLIENT = "mcp_tools"

# python3 -I -u -c LOADER. Frames as in protocol.py (4-byte length + JSON). It answers each
# connection with a hello (agent: null) and takes one frame
# {"op": "load", "modules": [[name, source], ...], "config": {...}}, then runs the agent.
_LOADER = r"""
import json, os, socket, struct, sys, types
def frame(fd, obj):
    b = json.dumps(obj).encode()
    b = struct.pack(">I", len(b)) + b
    while b:
        b = b[os.write(fd, b):]
def read(fd, n):
    b = b""
    while len(b) < n:
        c = os.read(fd, n - len(b))
        if not c:
            raise EOFError
        b += c
    return b
inherited = os.environ.pop("MCP_CODEEXEC_LISTEN_FD", "")
if inherited:
    listener = socket.socket(fileno=int(inherited))
else:
    try:
        os.unlink(%(socket)r)
    except FileNotFoundError:
        pass
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(%(socket)r)
    os.chmod(%(socket)r, 0o600)
    listener.listen(16)
os.set_inheritable(listener.fileno(), False)
while True:
    conn, _ = listener.accept()
    fds = []
    try:
        if os.geteuid() == 0 and struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1] != 0:
            raise ValueError("not root")
        conn.settimeout(10)
        _, fds, _, _ = socket.recv_fds(conn, 1, 2, socket.MSG_CMSG_CLOEXEC)
        conn.settimeout(None)
        if len(fds) != 2:
            raise ValueError("two fds expected")
        frame(fds[1], {"kind": "hello", "body": {"agent": None, "protocol": %(protocol)d}})
        size = struct.unpack(">I", read(fds[0], 4))[0]
        if size > (64 << 20):
            raise ValueError("load frame too large")
        load = json.loads(read(fds[0], size))
        modules, config = load["modules"], load["config"]
    except Exception:
        for fd in fds:
            os.close(fd)
        conn.close()
        continue
    break
for pkg in ("mcp_codeexec", "mcp_codeexec.agent"):
    m = types.ModuleType(pkg); m.__path__ = []; sys.modules[pkg] = m
for name, source in modules:
    m = types.ModuleType(name); sys.modules[name] = m
    exec(compile(source, name.replace(".", "/") + ".py", "exec"), m.__dict__)
sys.modules["mcp_codeexec.agent.agent"].main(listener, (conn, fds[0], fds[1]), config)
"""

# python3 -I -S -u -c RELAY: wait for the agent's socket (the sandbox may be starting), hand
# the agent its stdout and the read end of a pipe it copies its stdin into, then wait until
# the agent closes its end (the connection is over), and exit.
#
# Why stdin is copied, not handed over: gVisor cannot restore a checkpoint in which anything
# still refers to an exec's fd. The agent closes both of the exec's fds before it lets the
# relay end, yet in a loop of the checkpoint tests under CPU load 2 of some 20 checkpoints
# still held the exec's stdin (gVisor's "no host FD available for :host:0" on restore)
# while no process in the sandbox had it open: a reference inside gVisor, after the agent
# had read that stdin to its end.
# Now only the relay, which exits before any checkpoint, ever has it. Requests are small;
# replies, the bulk, still go straight from the agent to the exec's stdout.
_RELAY = r"""
import os, socket, sys, threading, time
s = socket.socket(socket.AF_UNIX)
for _ in range(600):
    try:
        s.connect(%(socket)r)
        break
    except OSError:
        time.sleep(0.05)
else:
    sys.exit("mcp-codeexec relay: the agent's socket never appeared")
r, w = os.pipe()
socket.send_fds(s, [b"F"], [r, 1])
os.close(r)
devnull = os.open(os.devnull, os.O_RDWR)
os.dup2(devnull, 1)
buf = bytearray(1 << 18)  # one buffer: a fresh 256 KiB bytes per read is an mmap, an mremap and a munmap
def copy():
    try:
        while True:
            n = os.readv(0, [buf])
            if not n:
                break
            b = memoryview(buf)[:n]
            while b:
                b = b[os.write(w, b):]
    except OSError:
        pass
    os.close(w)
threading.Thread(target=copy, daemon=True).start()
s.recv(1)
os._exit(0)
"""


def loader_argv(protocol: int, socket: str = SOCKET) -> list[str]:
    """The loader listening on `socket` (the in-sandbox path unless a backend has its own)."""
    return ["python3", "-I", "-u", "-c", _LOADER % {"socket": socket, "protocol": protocol}]


def relay_argv(socket: str = SOCKET) -> list[str]:
    return ["python3", "-I", "-S", "-u", "-c", _RELAY % {"socket": socket}]


def _sources() -> list[list[str]]:
    package = resources.files("mcp_codeexec.agent")
    return [[f"mcp_codeexec.agent.{m}", (package / f"{m}.py").read_text("utf-8")] for m in _AGENT_MODULES]


def load_frame_body(config: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """(the load frame for the loader, the hash the agent will report in its hello). The
    hash covers the code and the config, so a server with other settings reloads too."""
    sources = _sources()
    if config.get("tools"):
        client = resources.files("mcp_codeexec.agent") / f"{_TOOL_CLIENT}.py"
        config = {**config, "tool_client": client.read_text("utf-8")}
    digest = hashlib.sha256(json.dumps([sources, config], sort_keys=True).encode()).hexdigest()
    return {"op": "load", "modules": sources, "config": {**config, "hash": digest}}, digest
