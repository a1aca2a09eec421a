"""Sandboxes as plain local processes: NO isolation. For fast tests of everything above the
backend (protocol, tools, containers, sessions, limits, files) without Docker or gVisor.

A sandbox is a directory `<base>/<name>/`: `state.json` (labels, the loader's pid), `run/`
(the agent's socket), `home/` ($HOME) and `agent.log` (the loader's stdout and stderr).
Its main process is the same loader as in a container (agent/bootstrap.py), started as a
subprocess listening on `run/agent.sock`; each connection is the same relay, run here as a
subprocess whose stdin and stdout pipes are the agent stream. So the agent's code path is
the container's, socket hand-over included. (The layers above pass the loader and relay
for the in-container socket path; this backend builds them for each sandbox's own socket.)

The agent never runs as root here: as root it would take every non-root process of the
host for the sandbox user's and kill them on a reload (agent/process.py). A root server
starts it as the sandbox user (uid 1000), otherwise it runs as the server's user; either
way it switches no identities and kills only its own descendants.

Limits: no memory, CPU, network, disk or filesystem isolation at all. Every sandbox works
in the one directory `Settings.workdir` names (a real host path, which the agent sees as
is), so containers share their files. A command that detaches from its process tree
(double fork) survives `kill`.
"""

from __future__ import annotations

import builtins
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import IO, Any

import anyio
import anyio.abc

from mcp_codeexec.agent.bootstrap import loader_argv, relay_argv
from mcp_codeexec.agent.process import SANDBOX_GID, SANDBOX_UID, _descendants, _proc_table, _stop_then_kill, user_spawn_options
from mcp_codeexec.agent.protocol import PROTOCOL_VERSION
from mcp_codeexec.deployment.base import (
    VOLUME_LABEL,
    AgentStream,
    BackendInfo,
    BackendUnavailable,
    Deployment,
    NameTaken,
    SandboxGone,
    SandboxRecord,
    SandboxSpec,
    Started,
)

ISOLATION = (
    "NO isolation (--backend local): commands run as ordinary processes on the server's own host, "
    "with its network, files and resources; for tests only"
)
_STDERR_KEEP = 8192
_SOCKET_MAX = 107  # sun_path


def default_dir() -> str:
    """Short, so that sockets under it stay within the 108 bytes a socket path may have."""
    return os.path.join(tempfile.gettempdir(), f"mcp-codeexec-local-{os.geteuid()}")


def _identity(pid: int) -> str | None:
    """pid and start time of a live (not zombie) process, so a reused pid does not pass."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == b"Z" else f"{pid}:{fields[19].decode()}"


def _give_to_agent(path: Path) -> None:
    """A root server's agent runs as the sandbox user: what it writes must be its own."""
    if os.geteuid() == 0:
        os.chown(path, SANDBOX_UID, SANDBOX_GID)


def _kill_tree(pid: int) -> None:
    """Stop, then kill, the loader and every descendant, in rounds until none is left. A
    root server kills only the sandbox user's processes."""
    uid = SANDBOX_UID if os.geteuid() == 0 else None
    for _ in range(250):
        table = _proc_table()
        doomed = _descendants(table, {pid}) & {p for p, _, _, u in table if uid is None or u == uid}
        if not doomed:
            return
        _stop_then_kill(doomed)
        time.sleep(0.02)


class LocalAgentStream(AgentStream):
    """The relay subprocess's stdin and stdout; its stderr goes to a file, read on demand."""

    def __init__(self, process: anyio.abc.Process, stderr: IO[bytes]) -> None:
        self._process = process
        self._stderr = stderr
        self._tail = ""
        self._closed = False

    async def send(self, data: bytes) -> None:
        assert self._process.stdin is not None
        await self._process.stdin.send(data)

    async def receive(self) -> bytes:
        assert self._process.stdout is not None
        return await self._process.stdout.receive(262144)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        assert self._process.stdin is not None
        await self._process.stdin.aclose()  # the agent sees EOF, lets go, and the relay exits
        with anyio.move_on_after(2):
            await self._process.wait()
        if self._process.returncode is None:
            self._process.kill()
        await self._process.aclose()
        self._tail = self.stderr_tail
        self._stderr.close()

    @property
    def stderr_tail(self) -> str:
        if self._stderr.closed:
            return self._tail
        self._stderr.seek(max(0, os.fstat(self._stderr.fileno()).st_size - _STDERR_KEEP))
        return self._stderr.read().decode("utf-8", "replace")


class LocalDeployment(Deployment):
    def __init__(self, base: str = "") -> None:
        self.base = Path(base or default_dir())
        self._loaders: dict[str, subprocess.Popen[bytes]] = {}  # the loaders this process started

    # --- the sandbox's directory and state ------------------------------------------

    def _dir(self, name: str) -> Path:
        if not name or "/" in name or name.startswith("."):
            raise SandboxGone(f"no sandbox {name!r}")
        return self.base / name

    def _socket(self, name: str) -> str:
        return str(self._dir(name) / "run" / "agent.sock")

    def _read(self, name: str) -> dict[str, Any]:
        try:
            return json.loads((self._dir(name) / "state.json").read_text())
        except (FileNotFoundError, NotADirectoryError):  # not a sandbox: a stray file in the base
            raise SandboxGone(f"no sandbox {name!r}") from None

    def _write(self, name: str, state: dict[str, Any]) -> None:
        staging = self._dir(name) / "state.json.new"
        staging.write_text(json.dumps(state))
        os.replace(staging, self._dir(name) / "state.json")

    def _running(self, name: str, state: dict[str, Any]) -> bool:
        loader = self._loaders.get(name)
        if loader is not None and loader.poll() is not None:  # ours, and it exited: reap it
            del self._loaders[name]
            code = loader.returncode
            state["exit_code"] = 128 - code if code < 0 else code  # killed by signal N: 128+N
            self._write(name, state)
        return state.get("identity") is not None and _identity(state["pid"]) == state["identity"]

    # --- the interface ----------------------------------------------------------------

    async def check(self, image: str | None = None) -> BackendInfo:
        try:
            self.base.mkdir(mode=0o755, parents=True, exist_ok=True)
        except OSError as exc:
            raise BackendUnavailable(f"cannot make {self.base}: {exc}") from exc
        if self.base.stat().st_uid != os.geteuid():
            raise BackendUnavailable(f"{self.base} belongs to another user")
        return BackendInfo(engine="local processes", runtime="none", isolation=ISOLATION)

    async def create(self, spec: SandboxSpec) -> None:
        await self.check()
        directory = self._dir(spec.name)
        if len(self._socket(spec.name)) > _SOCKET_MAX:
            raise BackendUnavailable(f"{self._socket(spec.name)} is too long for a socket path: use a shorter --local-dir")
        try:
            directory.mkdir(mode=0o755)
        except FileExistsError:
            raise NameTaken(f"sandbox {spec.name} exists") from None
        for sub in ("run", "home"):
            (directory / sub).mkdir(mode=0o700)
            _give_to_agent(directory / sub)
        workspace = Path(spec.workdir)
        if not workspace.is_dir():
            workspace.mkdir(mode=0o755, parents=True)
            _give_to_agent(workspace)
        labels = {**spec.labels, VOLUME_LABEL: spec.volume}
        self._write(spec.name, {"labels": labels, "workdir": spec.workdir, "env": spec.env, "pid": None, "identity": None})

    async def start(self, spec: SandboxSpec) -> Started:
        name = spec.name  # one layout only: nothing to upgrade
        state = self._read(name)
        if self._running(name, state):
            return Started()
        directory, socket = self._dir(name), self._socket(name)
        with open(directory / "agent.log", "ab") as log:
            loader = subprocess.Popen(
                loader_argv(PROTOCOL_VERSION, socket),
                cwd=state["workdir"],
                env={"PATH": os.environ.get("PATH", os.defpath), **state["env"], "HOME": str(directory / "home")},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                **user_spawn_options(),  # a root server's agent: the sandbox user
            )
        self._loaders[name] = loader
        self._write(name, {**state, "pid": loader.pid, "identity": _identity(loader.pid), "exit_code": None})
        for _ in range(200):  # the socket appears, or the loader says why not
            if os.path.exists(socket):
                return Started()
            if loader.poll() is not None:
                tail = (directory / "agent.log").read_bytes()[-2000:].decode("utf-8", "replace")
                raise BackendUnavailable(f"the local loader of {name} exited ({loader.returncode}): {tail}")
            await anyio.sleep(0.05)
        raise BackendUnavailable(f"the local loader of {name} made no socket at {socket}")

    async def stop(self, name: str) -> None:
        state = self._read(name)
        if self._running(name, state):
            await anyio.to_thread.run_sync(_kill_tree, state["pid"])
        loader = self._loaders.pop(name, None)
        if loader is not None:
            await anyio.to_thread.run_sync(loader.wait)
        if state.get("identity"):
            self._write(name, {**state, "identity": None, "exit_code": 128 + signal.SIGKILL})

    async def remove(self, name: str) -> None:
        try:
            await self.stop(name)
        except SandboxGone:
            return
        shutil.rmtree(self._dir(name), ignore_errors=True)  # the workspace (Settings.workdir) stays

    async def claim(self, name: str, new_name: str) -> None:
        try:
            os.rename(self._dir(name), self._dir(new_name))  # a running loader's socket moves along
        except FileNotFoundError:
            raise SandboxGone(f"no sandbox {name!r}") from None
        except OSError as exc:  # the target exists (and is not empty)
            raise NameTaken(f"sandbox {new_name} exists: {exc}") from None
        if name in self._loaders:
            self._loaders[new_name] = self._loaders.pop(name)

    async def inspect(self, name: str) -> SandboxRecord:
        return self._record(name, self._read(name), in_use=self._relays(name))

    def _record(self, name: str, state: dict[str, Any], *, in_use: int | None = None, size: int | None = None) -> SandboxRecord:
        running = self._running(name, state)
        return SandboxRecord(
            name=name,
            labels=dict(state["labels"]),
            running=running,
            status="running" if running else "created" if state.get("pid") is None else "exited",
            exit_code=None if running else state.get("exit_code"),
            in_use=in_use,
            size_bytes=size,
        )

    async def list(self, prefix: str, *, sizes: bool = False) -> builtins.list[SandboxRecord]:
        records = []
        for entry in sorted(self.base.glob(f"{prefix}*")) if self.base.is_dir() else []:
            try:
                state = self._read(entry.name)
            except (SandboxGone, ValueError):
                continue
            size = _tree_size(Path(state["workdir"])) if sizes else None
            records.append(self._record(entry.name, state, size=size))
        return records

    def _relays(self, name: str) -> int:
        """Relays (of any server process) connected to this sandbox's socket."""
        marker = self._relay_marker(name)
        return sum(_is_relay(pid, marker) for pid in filter(str.isdigit, os.listdir("/proc")))

    def _relay_marker(self, name: str) -> bytes:
        """What a relay of this sandbox has on its command line: its socket's path."""
        return repr(self._socket(name)).encode()

    async def connect(self, name: str, argv: builtins.list[str]) -> AgentStream:
        self._read(name)  # SandboxGone if there is no such sandbox
        stderr = tempfile.TemporaryFile()
        try:
            process = await anyio.open_process(relay_argv(self._socket(name)), stderr=stderr)
        except OSError as exc:
            stderr.close()
            raise BackendUnavailable(f"cannot start the local relay: {exc}") from exc
        # The spawn returns once the relay's exec is under way, but the kernel sets up the
        # arguments /proc shows a little later: until then in_use would not count it.
        marker = self._relay_marker(name)
        for _ in range(1000):
            if process.returncode is not None or _is_relay(process.pid, marker):
                break
            await anyio.sleep(0.001)
        return LocalAgentStream(process, stderr)


def _tree_size(directory: Path) -> int:
    """Bytes in the regular files under a directory (symlinks not followed)."""
    files = (p for p in directory.rglob("*") if p.is_file() and not p.is_symlink())
    return sum(p.stat().st_size for p in files)


def _is_relay(pid: int | str, marker: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return False
    return b"mcp-codeexec relay" in cmdline and marker in cmdline
