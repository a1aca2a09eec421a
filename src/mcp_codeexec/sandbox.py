"""One sandbox as the server sees it: a container, its agent connection, and recovery.

The agent is started lazily and again whenever it dies. When the whole sandbox dies (the
host kills it past its memory limit) or stops answering past the backstop, the sandbox
is restarted: its workspace lives on a volume, so files survive.

An idle sandbox is checkpointed where the backend can (its processes and memory saved,
then stopped) and restored by the next call's start; when its memory is lost instead (the
restore failed, or the checkpoint did), the next command's result says so on stderr.
"""

from __future__ import annotations

import base64
import logging
import secrets
import string
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc

from mcp_codeexec.agent import protocol as p
from mcp_codeexec.agent.bootstrap import loader_argv
from mcp_codeexec.agent.client import AgentClient, AgentDied, CommandTools, connect_agent
from mcp_codeexec.config import Settings
from mcp_codeexec.deployment.base import MANAGED_LABEL, Deployment, SandboxSpec
from mcp_codeexec.errors import (
    CheckpointFailed,
    CodeExecError,
    ContainerExpired,
    ExecutionTimeExceeded,
    FileNotFound,
    OutputFileTooLarge,
    SandboxDied,
    SandboxGone,
)

if TYPE_CHECKING:
    from mcp_codeexec.upstream import Gateway

log = logging.getLogger(__name__)

LABEL = "org.mcp-codeexec"
# How a sandbox is made: 2 = the agent is the main process, as root (agent/bootstrap.py).
LAYOUT = "2"
_WATCH_INTERVAL = 2.0
_TRANSFER_TIMEOUT = 60.0
_ALPHABET = string.ascii_letters + string.digits


def new_container_id() -> str:
    """An id in the API's style (container_ + 24 base62 characters)."""
    return "container_" + "".join(secrets.choice(_ALPHABET) for _ in range(24))


def _utc(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class ContainerInfo:
    id: str
    created_at: datetime
    expires_at: datetime

    def meta(self) -> dict[str, Any]:
        return {"id": self.id, "expires_at": iso(self.expires_at)}

    @property
    def expired(self) -> bool:
        return datetime.now(UTC) >= self.expires_at

    def labels(self) -> dict[str, str]:
        return {f"{LABEL}.created_at": iso(self.created_at), f"{LABEL}.expires_at": iso(self.expires_at)}

    @classmethod
    def new(cls, lifetime: timedelta) -> ContainerInfo:
        now = datetime.now(UTC).replace(microsecond=0)
        return cls(new_container_id(), now, now + lifetime)

    @classmethod
    def from_labels(cls, container_id: str, labels: dict[str, str]) -> ContainerInfo:
        return cls(container_id, _utc(labels[f"{LABEL}.created_at"]), _utc(labels[f"{LABEL}.expires_at"]))


def sandbox_spec(
    settings: Settings, name: str, volume: str, info: ContainerInfo, extra_labels: dict[str, str] | None = None
) -> SandboxSpec:
    s = settings
    return SandboxSpec(
        name=name,
        volume=volume,
        image=s.image,
        runtime=s.runtime,
        memory_bytes=s.memory_bytes,
        cpus=s.cpus,
        pids_limit=s.pids_limit,
        workdir=s.workdir,
        tmp_bytes=s.tmp_bytes,
        command=tuple(loader_argv(p.PROTOCOL_VERSION)),
        labels={MANAGED_LABEL: "1", f"{LABEL}.layout": LAYOUT, **info.labels(), **(extra_labels or {})},
        env={"HOME": "/home/sandbox", "LANG": "C.UTF-8", "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1"},
    )


class Sandbox:
    """A container that exists in the engine (created by the container manager)."""

    def __init__(
        self,
        settings: Settings,
        deployment: Deployment,
        task_group: anyio.abc.TaskGroup,
        name: str,
        info: ContainerInfo,
        before_start: Callable[[Sandbox], Awaitable[None]] | None = None,
        tools: Gateway | None = None,
    ) -> None:
        self.settings = settings
        self.deployment = deployment
        self.task_group = task_group
        self.name = name
        self.info = info
        self.before_start = before_start
        self.tools = tools  # upstream MCP tools for code in this sandbox (upstream.py)
        self.in_flight = 0
        self.last_used = time.monotonic()
        self._agent: AgentClient | None = None
        self._lock = anyio.Lock()  # guards (re)start of the container and the agent
        self._notice = ""  # for the next command's stderr: its memory was lost

    @property
    def tenant(self) -> str:
        """From the name, `mcp-codeexec.<tenant>.<id>` ("" for an unclaimed pool container)."""
        parts = self.name.split(".")
        return parts[1] if len(parts) == 3 and parts[0] == "mcp-codeexec" else ""

    @property
    def running(self) -> bool:
        return self._agent is not None and not self._agent.closed.is_set()

    async def agent(self) -> AgentClient:
        """The live agent, starting the container and the agent as needed."""
        agent = self._agent
        if agent is not None and not agent.closed.is_set():
            return agent
        async with self._lock:
            if self._agent is not None and not self._agent.closed.is_set():
                return self._agent
            if self.info.expired:
                raise ContainerExpired(f"container {self.info.id} expired at {iso(self.info.expires_at)}")
            try:
                if self.before_start is not None:
                    await self.before_start(self)  # the running cap
                # Made by an older version (agent exec'd as uid 1000)? The backend re-creates
                # it around the same workspace; processes still running in it are lost.
                volume = f"mcp-codeexec-ws.{self.info.id}"  # the backend keeps the one it has
                started = await self.deployment.start(sandbox_spec(self.settings, self.name, volume, self.info))
            except SandboxGone:
                raise ContainerExpired(f"container {self.info.id} no longer exists") from None
            if started.lost:
                self._lose_memory(started.lost)
            elif started.restored:
                log.info("sandbox %s: restored from its checkpoint", self.info.id)
            self._agent = await self._connect()
            return self._agent

    def _lose_memory(self, why: str) -> None:
        log.warning("sandbox %s: memory lost: %s", self.info.id, why)
        self._notice = (
            f"[mcp-codeexec] this sandbox was restarted without its memory: {why}. Files in the workspace are "
            "intact; Python variables and background processes from earlier calls are gone.\n"
        )

    def take_notice(self) -> str:
        """What the next command's result must say on stderr (once), or ""."""
        notice, self._notice = self._notice, ""
        return notice

    async def _connect(self) -> AgentClient:
        config: dict[str, Any] = {"root": self.settings.workdir, "rlimit_as": self.settings.rlimit_as}
        if not self.settings.zygote:
            config["zygote"] = False  # (only then: the agent's code hash stays as it was)
        if self.tools is not None:
            config["tools"] = True  # (only then: the agent's code hash stays as it was without tools)
        return await connect_agent(
            self.deployment, self.name, self.task_group, config, self._tool_call if self.tools is not None else None
        )

    async def _tool_call(self, request: p.ToolRequest, command: CommandTools) -> p.ToolReply:
        assert self.tools is not None
        # The tenant comes from the container's name, never from anything the sandbox says.
        return await self.tools.call(self.tenant, self.info.id, request, command)

    async def request(self, request: p.Request, limit: float, on_output: Callable[[p.Output], None] | None = None) -> Any:
        """One request to the agent, with death detection and an outside time backstop."""
        self.in_flight += 1
        try:
            return await self._request(request, limit, on_output)
        finally:
            self.in_flight -= 1
            self.last_used = time.monotonic()

    async def _request(self, request: p.Request, limit: float, on_output: Callable[[p.Output], None] | None) -> Any:
        if self.info.expired:
            raise ContainerExpired(f"container {self.info.id} expired at {iso(self.info.expires_at)}")
        agent = await self.agent()
        reply: Any = None
        died, detail = False, "no answer"

        async def call() -> None:
            nonlocal reply, died, detail
            try:
                reply = await agent.request(request, on_output)
            except AgentDied as exc:
                died, detail = True, str(exc)
            tg.cancel_scope.cancel()

        async def watch() -> None:
            # A sandbox killed by the host (memory) can leave the exec stream open but
            # silent: look at the container itself while a call runs long.
            nonlocal died
            while True:
                await anyio.sleep(_WATCH_INTERVAL)
                try:
                    state = await self.deployment.inspect(self.name)
                except SandboxGone:
                    state = None
                if state is None or not state.running:
                    died = True
                    tg.cancel_scope.cancel()
                    return

        with anyio.move_on_after(limit + self.settings.backstop_grace) as backstop:
            async with anyio.create_task_group() as tg:
                tg.start_soon(call)
                tg.start_soon(watch)
        if not died and not backstop.cancelled_caught:
            return reply
        reason = await self._diagnose(agent, detail)
        await self._restart()
        if died:
            raise SandboxDied(reason)
        log.warning("sandbox %s: no answer within the backstop (%s); restarted it", self.info.id, reason)
        raise ExecutionTimeExceeded("the sandbox did not answer in time and was restarted")

    async def read_file(self, path: str, max_bytes: int) -> bytes:
        """A file's bytes, copied out in chunks (FileNotFound, or OutputFileTooLarge past
        max_bytes: the size the sandbox claims is checked against the bytes it sends)."""
        data = bytearray()
        while True:
            chunk = await self.request(p.ReadFile(path=path, offset=len(data)), _TRANSFER_TIMEOUT)
            if isinstance(chunk, p.Failure):
                raise FileNotFound(chunk.message)
            if chunk.size > max_bytes:
                raise OutputFileTooLarge(f"{path} is {chunk.size} bytes, over the {max_bytes}-byte limit")
            piece = base64.b64decode(chunk.data)
            data += piece
            if len(data) > max_bytes:
                raise OutputFileTooLarge(f"{path} is over the {max_bytes}-byte limit")
            if not piece or len(data) >= chunk.size:
                return bytes(data)

    async def write_file(self, path: str, data: bytes, mode: int | None = None) -> None:
        step = 4 << 20
        for offset in range(0, max(len(data), 1), step):
            final = offset + step >= len(data)
            reply = await self.request(
                p.WriteFile(path=path, data=base64.b64encode(data[offset : offset + step]).decode(), offset=offset, final=final, mode=mode),
                _TRANSFER_TIMEOUT,
            )
            if isinstance(reply, p.Failure):
                raise CodeExecError(f"cannot write {path}: {reply.message}")

    async def _diagnose(self, agent: AgentClient, fallback: str) -> str:
        try:
            state = await self.deployment.inspect(self.name)
            # A sandbox killed whole (memory) drops the agent's stream a moment before the
            # engine reports it stopped: give the engine that moment before blaming the agent.
            for _ in range(15):
                if not state.running:
                    break
                await anyio.sleep(0.2)
                state = await self.deployment.inspect(self.name)
            if not state.running and not state.oom_killed:
                await anyio.sleep(0.5)  # the engine sets OOMKilled a moment after the exit
                state = await self.deployment.inspect(self.name)
        except SandboxGone:
            return "the sandbox's container disappeared"
        if state.oom_killed:
            return (
                f"the sandbox ran out of memory (limit {self.settings.memory_bytes >> 20} MiB) and was killed "
                "with every process in it"
            )
        if not state.running and state.exit_code == 137:
            return "the sandbox was killed (SIGKILL) with every process in it"
        if not state.running and state.exit_code == 2 and self.settings.runtime == "runsc":
            # gVisor's kernel is a Go program, which ends with status 2 when it panics: seen
            # here when it could not create a host thread (the pids limit) or get memory.
            return (
                "the sandbox's kernel (gVisor) stopped on an internal error, with every process in it: most "
                f"often too many processes at once for its host task limit (--pids {self.settings.pids_limit}) "
                f"or its memory limit ({self.settings.memory_bytes >> 20} MiB)"
            )
        if not state.running:
            return f"the sandbox stopped ({state.status}, exit code {state.exit_code})"
        tail = agent.stream.stderr_tail.strip().splitlines()[-3:]
        return f"the sandbox's agent died ({fallback})" + (f": {' | '.join(tail)}" if tail else "")

    async def _restart(self) -> None:
        """Kill the container; the next call starts it again (its workspace is a volume)."""
        async with self._lock:
            await self._drop_agent()
            try:
                await self.deployment.stop(self.name)
            except SandboxGone:
                pass  # the next call answers container_expired

    async def stop(self) -> None:
        """Stop an idle sandbox so it costs no memory; the next call restarts it."""
        async with self._lock:
            await self._drop_agent()
            await self.deployment.stop(self.name)

    @property
    def starting(self) -> bool:
        """Being started or connected to right now (by a call, or at launch)."""
        return self._lock.locked()

    async def sleep(self, *, unattached: bool = False) -> tuple[str, int | None]:
        """Put an idle sandbox to sleep: close this server's connection, then checkpoint it
        (memory saved; the next call's start restores it) where the backend can, else stop
        it. Returns what _sleep_sandbox() did, or ("in use", None) if a call came in
        meanwhile (or, with `unattached`, this server connected to it meanwhile)."""
        async with self._lock:
            if self.in_flight or (unattached and self.running):
                return "in use", None
            await self._drop_agent()
            return await _sleep_sandbox(self.deployment, self.name, self._lose_memory)

    async def _drop_agent(self) -> None:
        if self._agent is not None:
            await self._agent.aclose()
            self._agent = None

    async def detach(self) -> None:
        """Close this server's agent connection; the container keeps running."""
        await self._drop_agent()


async def _sleep_sandbox(
    deployment: Deployment, name: str, on_lost: Callable[[str], None]
) -> tuple[str, int | None]:
    """Checkpoint the running sandbox `name` once no server is connected to it, else stop
    it (the checkpoint failed, or the backend has none). A restored process cannot keep
    fds an exec gave it, so every relay must be gone first: ours exits a moment after we
    close its stream. Returns ("checkpointed", the image's bytes), ("stopped", None), or
    ("in use", None): another server still is connected, and it is left running."""
    try:
        with anyio.move_on_after(5):
            while (await deployment.inspect(name)).in_use:
                await anyio.sleep(0.1)
        if (await deployment.inspect(name)).in_use:
            return "in use", None
        if deployment.can_checkpoint:
            try:
                return "checkpointed", await deployment.checkpoint(name)
            except CheckpointFailed as exc:
                log.warning("%s: checkpoint failed, stopping it instead: %s", name, exc)
                on_lost(f"it could not be checkpointed ({exc})")
        await deployment.stop(name)
        return "stopped", None
    except SandboxGone:
        return "stopped", None
