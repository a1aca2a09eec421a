"""Where sandboxes run: the interface a backend implements (Docker today, Kubernetes later)."""

from __future__ import annotations

import abc
import builtins
from dataclasses import dataclass, field
from typing import Any

from mcp_codeexec.errors import BackendUnavailable, NameTaken, SandboxGone

__all__ = ["BackendUnavailable", "NameTaken", "SandboxGone"]  # re-exported for backends


# The sandbox's own processes (its init and the agent) run as root inside the sandbox
# with only these capabilities, under no-new-privileges; the user's run as uid 1000 with
# none (agent/process.py). The agent's socket lives in a root-only tmpfs at AGENT_DIR.
AGENT_CAPABILITIES = ("SETUID", "SETGID", "KILL")
AGENT_DIR = "/run/mcp-codeexec"
SANDBOX_USER = "1000:1000"
# On a sandbox, the name of its workspace storage (the list of containers shows its size).
VOLUME_LABEL = "org.mcp-codeexec.volume"


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
class SandboxState:
    running: bool
    status: str  # the engine's word: running, exited, created, ...
    exit_code: int | None = None
    oom_killed: bool = False


@dataclass(frozen=True)
class SandboxRecord:
    """A sandbox as the engine lists it."""

    name: str
    labels: dict[str, str]
    running: bool


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
    """Creates, starts, inspects and removes sandboxes, and opens agent streams into them."""

    @abc.abstractmethod
    async def check(self, image: str | None = None) -> BackendInfo:
        """Raise BackendUnavailable unless sandboxes can be created right now."""

    @abc.abstractmethod
    async def create(self, spec: SandboxSpec) -> None:
        """Create (not start) the sandbox and its workspace storage."""

    @abc.abstractmethod
    async def start(self, name: str) -> None: ...

    async def upgrade(self, name: str, spec: SandboxSpec) -> bool:
        """Bring a sandbox made by an older version up to `spec`'s layout (stopping it if
        it runs), keeping its workspace; True if anything changed. Backends without older
        layouts: no-op."""
        return False

    async def image_manifest(self, image: str) -> dict[str, Any] | None:
        """What the sandbox image has installed (image.py), for the system prompt; None
        when the backend has no image. May raise: the prompt then lists no versions."""
        return None

    @abc.abstractmethod
    async def rename(self, name: str, new_name: str) -> None:
        """Atomic in the engine: raises NameTaken if new_name exists, SandboxGone if name doesn't."""

    @abc.abstractmethod
    async def list(self, prefix: str) -> builtins.list[SandboxRecord]:
        """Every sandbox whose name starts with prefix."""

    @abc.abstractmethod
    async def volume_sizes(self) -> dict[str, int]:
        """Bytes used by each workspace volume (may be slow: for listings, not hot paths)."""

    @abc.abstractmethod
    async def kill(self, name: str) -> None:
        """Stop every process in the sandbox at once; its workspace stays."""

    @abc.abstractmethod
    async def remove(self, name: str) -> None:
        """Remove the sandbox and its workspace storage. Missing is not an error."""

    @abc.abstractmethod
    async def state(self, name: str) -> SandboxState:
        """Raises SandboxGone if it does not exist."""

    @abc.abstractmethod
    async def labels(self, name: str) -> dict[str, str]:
        """Raises SandboxGone if it does not exist."""

    @abc.abstractmethod
    async def attached(self, name: str) -> int:
        """How many agent streams (of any server process) are open into the sandbox."""

    @abc.abstractmethod
    async def open_agent(self, name: str, argv: builtins.list[str]) -> AgentStream:
        """Start `argv` (the relay) inside the running sandbox, as root, with its stdin
        and stdout attached."""
