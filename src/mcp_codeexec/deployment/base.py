"""Where sandboxes run: the interface a backend implements (Docker today, Kubernetes later)."""

from __future__ import annotations

import abc
import builtins
from dataclasses import dataclass, field
from typing import Any

from mcp_codeexec.errors import BackendUnavailable, CheckpointFailed, NameTaken, SandboxGone

__all__ = ["BackendUnavailable", "CheckpointFailed", "NameTaken", "SandboxGone"]  # re-exported for backends


# The sandbox's own processes (its init and the agent) run as root inside the sandbox
# with only these capabilities, under no-new-privileges; the user's run as uid 1000 with
# none (agent/process.py). The agent's socket lives in a root-only tmpfs at AGENT_DIR.
AGENT_CAPABILITIES = ("SETUID", "SETGID", "KILL")
AGENT_DIR = "/run/mcp-codeexec"
# The sandbox user: runs the user's commands and owns the workspace's root directory.
SANDBOX_UID = SANDBOX_GID = 1000
SANDBOX_USER = f"{SANDBOX_UID}:{SANDBOX_GID}"
# On a sandbox, the name of its workspace storage (the list of containers shows its size).
VOLUME_LABEL = "org.mcp-codeexec.volume"
# On every sandbox and workspace this server makes (what its housekeeping may collect).
MANAGED_LABEL = "org.mcp-codeexec.managed"


@dataclass(frozen=True)
class SandboxSpec:
    """Everything needed to create one sandbox."""

    name: str
    volume: str  # the workspace's storage, named apart so it can outlive renames
    image: str
    runtime: str
    memory_bytes: int
    cpus: float
    pids_limit: int
    workdir: str
    tmp_bytes: int
    command: tuple[str, ...]  # the main process: the agent's loader (agent/bootstrap.py)
    labels: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SandboxRecord:
    """A sandbox as its backend sees it: what the layers above need, no engine objects."""

    name: str
    labels: dict[str, str]  # the only state kept with a sandbox (owner, times, layout)
    running: bool
    status: str = ""  # the backend's own word (running, exited, created, ...) for messages
    exit_code: int | None = None  # of its main process, once it stopped
    oom_killed: bool = False  # the host killed it (or part of it) for memory
    in_use: int | None = None  # agent connections open (of any server); inspect() counts them
    size_bytes: int | None = None  # the workspace's bytes; list(sizes=True) measures them
    # Stopped with its memory saved (checkpoint()): the next start() restores it. list()
    # fills both; checkpoint_bytes is None where the backend cannot measure the image.
    checkpointed: bool = False
    checkpoint_bytes: int | None = None


@dataclass(frozen=True)
class Started:
    """What start() did: `restored` the sandbox's memory from its checkpoint, or `lost` it
    (non-empty: why, e.g. the image was unreadable; the sandbox was started cold, its
    files intact). Neither: there was no memory to keep (a cold start, or already running)."""

    restored: bool = False
    lost: str = ""


@dataclass(frozen=True)
class BackendInfo:
    engine: str  # e.g. "Docker Engine 20.10.24"
    runtime: str  # the OCI runtime sandboxes use
    isolation: str  # human words: "gVisor (runsc): user-space kernel" / "runc: shared host kernel"


class AgentStream(abc.ABC):
    """A byte stream to the agent process inside a sandbox (its stdin and stdout)."""

    @abc.abstractmethod
    async def send(self, data: bytes) -> None: ...

    @abc.abstractmethod
    async def receive(self) -> bytes:
        """The next bytes of the agent's stdout; raises anyio.EndOfStream when it ends."""

    @abc.abstractmethod
    async def aclose(self) -> None: ...

    @property
    @abc.abstractmethod
    def stderr_tail(self) -> str:
        """The last few KiB the agent wrote to stderr (for diagnosing a death)."""


class Deployment(abc.ABC):
    """Where sandboxes run. Nine verbs that serve Docker and Kubernetes alike; names are the
    layers' own (`mcp-codeexec.<tenant>.<id>`), labels are the only state kept with a
    sandbox. Three more are optional: `image_manifest`, `aclose`, and `checkpoint` for
    backends that set `can_checkpoint`. See docs/architecture.md for how each
    verb maps to Docker and to Kubernetes."""

    @abc.abstractmethod
    async def check(self, image: str | None = None) -> BackendInfo:
        """Raise BackendUnavailable unless sandboxes can be created right now."""

    @abc.abstractmethod
    async def create(self, spec: SandboxSpec) -> None:
        """Create (not start) the sandbox and its workspace storage; NameTaken if it exists."""

    # Whether checkpoint() works here (Docker: an experimental engine and gVisor). Kubernetes
    # cannot restore a pod's memory, so it leaves this False and its sandboxes are stopped.
    can_checkpoint: bool = False

    @abc.abstractmethod
    async def start(self, spec: SandboxSpec) -> Started:
        """Make the sandbox `spec.name` run: restored from its checkpoint if it has one
        (processes and memory as they were), else started, and re-made around the same
        workspace when an older version made it to another layout (processes still running
        in it are lost). Running already: nothing. A restore that fails falls back to a
        cold start and says so in the result. SandboxGone if it does not exist."""

    @abc.abstractmethod
    async def stop(self, name: str) -> None:
        """Stop every process in the sandbox at once; its workspace stays."""

    @abc.abstractmethod
    async def remove(self, name: str) -> None:
        """Remove the sandbox and its workspace storage. Missing is not an error."""

    @abc.abstractmethod
    async def claim(self, name: str, new_name: str) -> None:
        """Hand a warm-pool sandbox to a tenant under `new_name`, atomically as far as the
        backend allows: NameTaken if new_name exists, SandboxGone if name does not."""

    @abc.abstractmethod
    async def inspect(self, name: str) -> SandboxRecord:
        """One sandbox, with `in_use` counted. SandboxGone if it does not exist."""

    @abc.abstractmethod
    async def list(self, prefix: str, *, sizes: bool = False) -> builtins.list[SandboxRecord]:
        """Every sandbox whose name starts with prefix; with sizes=True, workspace sizes too
        (may be slow: for listings, not hot paths)."""

    @abc.abstractmethod
    async def connect(self, name: str, argv: builtins.list[str]) -> AgentStream:
        """Start `argv` (the relay) inside the running sandbox, as root, with its stdin and
        stdout as the returned stream."""

    async def aclose(self) -> None:
        """Release what the backend holds open (its API clients) at server shutdown."""

    async def checkpoint(self, name: str) -> int | None:
        """Stop the running sandbox with its memory saved, for start() to restore; returns
        the saved image's bytes (None: not measurable). Every connection to its agent must
        be closed first (a process holding an exec's fds cannot be restored). Raises
        CheckpointFailed, after which the sandbox may still run: the caller stops it."""
        raise CheckpointFailed("this backend cannot checkpoint sandboxes")

    async def image_manifest(self, image: str) -> dict[str, Any] | None:
        """What the sandbox image has installed (deployment/image.py), for the system prompt; None
        when the backend has no image. May raise: the prompt then lists no versions."""
        return None


async def remove_all(backend: Deployment, prefix: str) -> int:
    """Remove every sandbox whose name starts with prefix (tests, benchmarks, pruning)."""
    records = await backend.list(prefix)
    for record in records:
        await backend.remove(record.name)
    return len(records)
