"""One sandbox as the server sees it: a container, its agent connection, and recovery.

The agent is started lazily and again whenever it dies. When the whole sandbox dies (the
host kills it past its memory limit) or stops answering past the backstop, the sandbox
is restarted: its workspace lives on a volume, so files survive.
"""

from __future__ import annotations

import logging
import secrets
import string
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

import anyio
import anyio.abc

from mcp_codeexec.agent import protocol as p
from mcp_codeexec.agent.client import AgentClient, AgentDied, agent_argv
from mcp_codeexec.config import Settings
from mcp_codeexec.deployment.base import BackendUnavailable, Deployment, SandboxGone, SandboxSpec

log = logging.getLogger(__name__)

LABEL = "org.mcp-codeexec"
_WATCH_INTERVAL = 2.0
_ALPHABET = string.ascii_letters + string.digits


def new_container_id() -> str:
    """An id in the API's style (container_ + 24 base62 characters)."""
    return "container_" + "".join(secrets.choice(_ALPHABET) for _ in range(24))


class SandboxDied(Exception):
    """The sandbox died during a call; it has been restarted with its files intact."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class CallTimedOut(Exception):
    """The agent did not answer within the time limit plus the backstop grace."""


@dataclass(frozen=True)
class ContainerInfo:
    id: str
    created_at: datetime
    expires_at: datetime

    def meta(self) -> dict[str, Any]:
        return {"id": self.id, "expires_at": self.expires_at.isoformat().replace("+00:00", "Z")}


class Sandbox:
    def __init__(self, settings: Settings, deployment: Deployment, task_group: anyio.abc.TaskGroup) -> None:
        self.settings = settings
        self.deployment = deployment
        self.task_group = task_group
        now = datetime.now(timezone.utc).replace(microsecond=0)
        self.info = ContainerInfo(new_container_id(), now, now + timedelta(days=settings.lifetime_days))
        self.name = f"mcp-codeexec-{self.info.id}"
        self._created = False
        self._agent: AgentClient | None = None
        self._lock = anyio.Lock()  # guards (re)start of the container and the agent

    def spec(self) -> SandboxSpec:
        s = self.settings
        return SandboxSpec(
            name=self.name,
            image=s.image,
            runtime=s.runtime,
            memory_bytes=s.memory_bytes,
            cpus=s.cpus,
            pids_limit=s.pids_limit,
            workdir=s.workdir,
            tmp_bytes=s.tmp_bytes,
            labels={
                f"{LABEL}.id": self.info.id,
                f"{LABEL}.tenant": s.tenant,
                f"{LABEL}.created_at": self.info.created_at.isoformat(),
                f"{LABEL}.expires_at": self.info.expires_at.isoformat(),
            },
            env={"HOME": "/home/sandbox", "LANG": "C.UTF-8", "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1"},
        )

    async def agent(self) -> AgentClient:
        """The live agent, starting the container and the agent as needed."""
        agent = self._agent
        if agent is not None and not agent.closed.is_set():
            return agent
        async with self._lock:
            if self._agent is not None and not self._agent.closed.is_set():
                return self._agent
            if not self._created:
                await self.deployment.create(self.spec())
                self._created = True
            state = await self.deployment.state(self.name)
            if not state.running:
                await self.deployment.start(self.name)
            stream = await self.deployment.open_agent(
                self.name,
                agent_argv(),
                {"MCP_CODEEXEC_ROOT": self.settings.workdir, "MCP_CODEEXEC_RLIMIT_AS": str(self.settings.rlimit_as)},
            )
            agent = AgentClient(stream)
            self.task_group.start_soon(agent.serve)
            await agent.start()
            with anyio.fail_after(30):
                reply = await agent.request(p.Ping())
            if isinstance(reply, p.Failure) or reply.protocol != p.PROTOCOL_VERSION:
                await agent.aclose()
                raise BackendUnavailable(f"agent did not start properly: {reply}")
            self._agent = agent
            return agent

    async def request(self, request: p.Request, limit: float, on_output: Callable[[p.Output], None] | None = None) -> Any:
        """One request to the agent, with death detection and an outside time backstop."""
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
                    state = await self.deployment.state(self.name)
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
        raise CallTimedOut()

    async def _diagnose(self, agent: AgentClient, fallback: str) -> str:
        try:
            state = await self.deployment.state(self.name)
        except SandboxGone:
            return "the sandbox's container disappeared"
        if state.oom_killed or (not state.running and state.exit_code == 137):
            return (
                f"the sandbox ran out of memory (limit {self.settings.memory_bytes >> 20} MiB) and was killed "
                "with every process in it"
            )
        if not state.running:
            return f"the sandbox stopped ({state.status}, exit code {state.exit_code})"
        tail = agent.stream.stderr_tail.strip().splitlines()[-3:]
        return f"the sandbox's agent died ({fallback})" + (f": {' | '.join(tail)}" if tail else "")

    async def _restart(self) -> None:
        async with self._lock:
            if self._agent is not None:
                await self._agent.aclose()
                self._agent = None
            try:
                await self.deployment.kill(self.name)
            except SandboxGone:
                self._created = False

    async def close(self) -> None:
        if self._agent is not None:
            await self._agent.aclose()
        if self._created:
            await self.deployment.remove(self.name)
