"""Containers as durable workspaces: creation, reuse by id, expiry, idle sleep, warm pool.

The engine is the only record. A container's name says who owns it and its id
(`mcp-codeexec.<tenant>.<id>`); its labels say when it was created and when it expires; its
workspace is a volume of its own. So a restarted server (even after kill -9) finds every
container again by name, and nothing else needs storing.

Warm-pool containers are created and started ahead of need under a pool name, labelled
with the server that made them, and handed out by that server alone with the backend's
`claim` (an atomic rename for Docker), so no container is ever handed to two sessions, even
by two server processes. A pool container that no server is connected to (its server
exited or was killed) is an orphan, and any server's reaper removes it.

Sleep: a container idle past `idle_checkpoint` (or the least recently used one, past the
running cap, or every one this server leaves when it exits, or one a killed server left
running) is checkpointed where the backend can: its processes and memory are saved with
it and its next call restores them. Where it cannot, it is stopped (files kept). The saved
images count toward the tenant's stored bytes (`checkpoint_bytes`).
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc

from mcp_codeexec.config import Settings
from mcp_codeexec.deployment.base import Deployment, SandboxRecord
from mcp_codeexec.errors import BackendUnavailable, ContainerExpired, NameTaken, SandboxGone, TooManyRequests
from mcp_codeexec.sandbox import LABEL, ContainerInfo, Sandbox, iso, sandbox_spec

if TYPE_CHECKING:
    from mcp_codeexec.upstream import Gateway

log = logging.getLogger(__name__)

PREFIX = "mcp-codeexec."
POOL_PREFIX = "mcp-codeexec-pool."
_OWNER_LABEL = f"{LABEL}.pool-owner"
_TENANT = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
_ID = re.compile(r"container_[A-Za-z0-9]{24}")
_POOL_GRACE = timedelta(seconds=30)


class TooManyContainers(TooManyRequests):
    """The server's cap on running containers is reached and none is idle."""


def container_name(tenant: str, container_id: str) -> str:
    return f"{PREFIX}{tenant}.{container_id}"


def server_identity() -> str:
    """This server process, told apart from any other: pid plus its start time (so a reused
    pid does not pass for an old process), plus a random part (another host, another pid
    namespace). Only compared for equality; tests read the pid from it."""
    pid = os.getpid()
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            started = f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        started = "0"
    return f"{pid}:{started}:{secrets.token_hex(4)}"


class ContainerManager:
    def __init__(
        self,
        settings: Settings,
        deployment: Deployment,
        task_group: anyio.abc.TaskGroup,
        containers_cap: Callable[[str], int | None] = lambda tenant: None,
        tools: Gateway | None = None,
    ) -> None:
        self.settings = settings
        self.containers_cap = containers_cap  # containers a tenant may have (None: no cap)
        self.tools = tools  # upstream MCP tools for code in the sandboxes (upstream.py)
        self.deployment = deployment
        self.task_group = task_group
        self._open: dict[str, Sandbox] = {}  # by container name
        self._pool: list[Sandbox] = []
        self._pool_wanted = anyio.Event()
        self._owner = server_identity()
        self._start_lock = anyio.Lock()
        self._pool_scope = anyio.CancelScope()
        self._pool_stopped = anyio.Event()
        self._pool_started = False
        self._saved: dict[str, int] = {}  # checkpoint image bytes by container name

    # --- lookup and creation -----------------------------------------------------------

    async def open(self, tenant: str, container_id: str) -> Sandbox:
        """The tenant's container with this id, or ContainerExpired. Another tenant's id is
        indistinguishable from one that never existed."""
        if not _ID.fullmatch(container_id):
            raise ContainerExpired(f"no container {container_id!r}")
        name = container_name(tenant, container_id)
        sandbox = self._open.get(name)
        if sandbox is None:
            try:
                labels = (await self.deployment.inspect(name)).labels
            except SandboxGone:
                raise ContainerExpired(f"no container {container_id!r}") from None
            sandbox = self._adopt(name, ContainerInfo.from_labels(container_id, labels))
        if sandbox.info.expired:
            self.task_group.start_soon(self._remove, sandbox)
            raise ContainerExpired(f"container {container_id} expired at {iso(sandbox.info.expires_at)}")
        return sandbox

    async def new(self, tenant: str) -> Sandbox:
        """A fresh container for the tenant: from the warm pool if one is ready."""
        if not _TENANT.fullmatch(tenant):
            raise ValueError(f"bad tenant name {tenant!r}")
        cap = self.containers_cap(tenant)
        if cap is not None and len(await self.deployment.list(f"{PREFIX}{tenant}.")) >= cap:
            raise TooManyRequests(f"tenant {tenant} has {cap} containers, its limit; reuse one by id or let one expire")
        while self._pool:
            sandbox = self._pool.pop(0)
            self._pool_wanted.set()
            name = container_name(tenant, sandbox.info.id)
            try:
                await self.deployment.claim(sandbox.name, name)
            except (SandboxGone, NameTaken):
                continue  # lost (removed by hand, or claimed): try the next
            self._open.pop(sandbox.name, None)
            sandbox.name = name
            self._open[name] = sandbox
            return sandbox
        self._pool_wanted.set()
        info = ContainerInfo.new(timedelta(seconds=self.settings.lifetime))
        name = container_name(tenant, info.id)
        await self._create(name, info)
        return self._adopt(name, info)

    async def _create(self, name: str, info: ContainerInfo, extra_labels: dict[str, str] | None = None) -> None:
        await self.deployment.create(sandbox_spec(self.settings, name, f"mcp-codeexec-ws.{info.id}", info, extra_labels))

    def _adopt(self, name: str, info: ContainerInfo) -> Sandbox:
        sandbox = Sandbox(self.settings, self.deployment, self.task_group, name, info, before_start=self._make_room,
                          tools=self.tools)
        self._open[name] = sandbox
        return sandbox

    async def _make_room(self, starting: Sandbox) -> None:
        """Keep at most max_running containers running: put the least recently used idle
        one to sleep, or refuse if every one is busy."""
        self._saved.pop(starting.name, None)  # its image, if any, is restored (or dropped) now
        async with self._start_lock:
            running = [s for s in self._open.values() if s.running and s is not starting and s not in self._pool]
            if len(running) + len(self._pool) < self.settings.max_running:
                return
            idle = sorted((s for s in running if s.in_flight == 0), key=lambda s: s.last_used)
            if not idle:
                raise TooManyContainers(f"{len(running)} containers are running and busy (cap {self.settings.max_running})")
            log.info("cap of %d running containers reached: idle %s goes to sleep", self.settings.max_running, idle[0].info.id)
            await self._sleep(idle[0])

    async def _sleep(self, sandbox: Sandbox, unattached: bool = False) -> None:
        what, size = await sandbox.sleep(unattached=unattached)
        if what == "checkpointed":
            self._saved[sandbox.name] = size or 0
        log.info("%s: %s", sandbox.name, what)

    def checkpoint_bytes(self, tenant: str) -> int:
        """Bytes of the tenant's containers' saved memory (as of the last reaper pass and
        this server's own checkpoints since), counted with its stored files."""
        prefix = f"{PREFIX}{tenant}."
        return sum(size for name, size in self._saved.items() if name.startswith(prefix))

    # --- background work ---------------------------------------------------------------

    async def run_pool(self) -> None:
        """Keep `pool_size` started containers (agent up) ready to hand out."""
        self._pool_started = True
        with self._pool_scope:
            try:
                while True:
                    while len(self._pool) < self.settings.pool_size:
                        await self._fill_one()
                    self._pool_wanted = anyio.Event()
                    await self._pool_wanted.wait()
            finally:
                self._pool_stopped.set()

    async def _fill_one(self) -> None:
        info = ContainerInfo.new(timedelta(seconds=self.settings.lifetime))
        name = f"{POOL_PREFIX}{info.id}"
        try:
            await self._create(name, info, {_OWNER_LABEL: self._owner})
            sandbox = self._adopt(name, info)
            await sandbox.agent()
        except BaseException as exc:
            with anyio.CancelScope(shield=True):  # never leave a half-made container behind
                self._open.pop(name, None)
                await self.deployment.remove(name)
            if not isinstance(exc, (BackendUnavailable, ContainerExpired, OSError)):
                raise
            log.warning("warm pool: cannot start a container: %s", exc)
            await anyio.sleep(30)
            return
        self._pool.append(sandbox)

    async def run_reaper(self) -> None:
        while True:
            try:
                await self.reap()
            except BackendUnavailable as exc:
                log.warning("reaper: %s", exc)
            await anyio.sleep(self.settings.reap_interval)

    async def reap(self) -> None:
        """Remove expired containers (and their workspaces) and orphaned pool containers;
        put containers idle for longer than idle_checkpoint to sleep (or stop those idle
        for longer than idle_stop where there is no checkpointing)."""
        now = datetime.now(UTC)
        records = await self.deployment.list(PREFIX)
        self._saved = {r.name: r.checkpoint_bytes or 0 for r in records if r.checkpointed}
        for record in records + await self.deployment.list(POOL_PREFIX):
            expires = record.labels.get(f"{LABEL}.expires_at")
            orphan = record.name.startswith(POOL_PREFIX) and await self._orphaned(record, now)
            if orphan or (expires and datetime.fromisoformat(expires.replace("Z", "+00:00")) <= now):
                log.info("reaper: removing %s (%s)", record.name, "orphaned pool" if orphan else "expired")
                sandbox = self._open.pop(record.name, None)
                if sandbox is not None:
                    await sandbox.detach()
                await self.deployment.remove(record.name)
            elif record.running and not record.name.startswith(POOL_PREFIX):
                mine = self._open.get(record.name)
                if mine is not None and (mine.running or mine.starting or mine.in_flight):
                    continue  # ours, in use or being started (between its start and our connection)
                if not await self._in_use(record.name):
                    # Running, but no server is attached (its server exited or was killed).
                    # Through its Sandbox, whose lock keeps a call from starting it (restoring
                    # a half-written image) while the checkpoint is being written.
                    if mine is None:
                        try:
                            info = ContainerInfo.from_labels(record.name.rsplit(".", 1)[-1], record.labels)
                        except (KeyError, ValueError):
                            continue  # not made by this project's servers
                        mine = self._adopt(record.name, info)
                    log.info("reaper: %s: no server uses it", record.name)
                    await self._sleep(mine, unattached=True)
        # Whichever comes first: a checkpoint (where the backend can) or a plain stop.
        checkpointing = (self.deployment.can_checkpoint and 0 < self.settings.idle_checkpoint <= self.settings.idle_stop)
        idle_for = self.settings.idle_checkpoint if checkpointing else self.settings.idle_stop
        for sandbox in list(self._open.values()):
            if sandbox.running and sandbox.in_flight == 0 and sandbox not in self._pool:
                if time.monotonic() - sandbox.last_used > idle_for:
                    await self._idle(sandbox, idle_for, checkpointing)

    async def _idle(self, sandbox: Sandbox, idle_for: float, checkpointing: bool) -> None:
        """Idle here: put it to sleep (checkpointed, or stopped), unless another server
        (another replica, another stdio client's server) is connected to it too; then only
        let go of it, and the last one puts it to sleep."""
        try:
            others = ((await self.deployment.inspect(sandbox.name)).in_use or 0) - 1
        except SandboxGone:
            others = 0
        if others > 0:
            log.info("%s idle here for over %ds but used by another server: detaching", sandbox.info.id, idle_for)
            await sandbox.detach()
            return
        log.info("%s: idle for over %ds", sandbox.info.id, idle_for)
        if checkpointing:
            await self._sleep(sandbox)
        else:
            await sandbox.stop()

    async def _orphaned(self, record: SandboxRecord, now: datetime) -> bool:
        """Another server's pool container that no server is connected to, and old enough
        that its maker has had time to connect (it does within seconds of creating it)."""
        if record.labels.get(_OWNER_LABEL) == self._owner:
            return False
        created = record.labels.get(f"{LABEL}.created_at")
        if created and datetime.fromisoformat(created.replace("Z", "+00:00")) > now - _POOL_GRACE:
            return False
        return not await self._in_use(record.name)

    async def _in_use(self, name: str) -> bool:
        try:
            return bool((await self.deployment.inspect(name)).in_use)
        except SandboxGone:
            return True  # gone meanwhile: nothing to do with it

    async def _remove(self, sandbox: Sandbox) -> None:
        self._open.pop(sandbox.name, None)
        await sandbox.detach()
        await self.deployment.remove(sandbox.name)

    @property
    def running_count(self) -> int:
        return sum(1 for s in self._open.values() if s.running)

    @property
    def pool(self) -> list[Sandbox]:
        return list(self._pool)

    # --- listing and shutdown ----------------------------------------------------------

    async def list(self, tenant: str) -> list[dict[str, Any]]:
        prefix = f"{PREFIX}{tenant}."
        records = await self.deployment.list(prefix, sizes=True)
        listing = []
        for record in records:
            container_id = record.name[len(prefix) :]
            try:
                info = ContainerInfo.from_labels(container_id, record.labels)
            except KeyError:
                continue
            listing.append(
                {
                    "id": info.id,
                    "created_at": iso(info.created_at),
                    "expires_at": iso(info.expires_at),
                    "state": "expired" if info.expired else "running" if record.running
                    else "checkpointed" if record.checkpointed else "stopped",
                    # None when the backend does not measure it (quota volumes on a loop device)
                    "size_bytes": record.size_bytes,
                    # its saved memory (state checkpointed), counted with the tenant's stored files
                    "checkpoint_bytes": record.checkpoint_bytes if record.checkpointed else 0,
                }
            )
        return sorted(listing, key=lambda c: c["created_at"])

    async def shutdown(self) -> None:
        """Remove this process's pool; detach from every other container and put those no
        other server uses to sleep (checkpointed: the next use restores them, memory and
        all; else stopped: their files stay)."""

        async def release(sandbox: Sandbox) -> None:
            if not sandbox.running:
                await sandbox.detach()
                return
            try:
                await sandbox.sleep()
            except BackendUnavailable:
                pass

        self._pool_scope.cancel()
        if self._pool_started:
            await self._pool_stopped.wait()
        async with anyio.create_task_group() as tg:
            for sandbox in self._pool:
                tg.start_soon(self._remove, sandbox)
            for sandbox in list(self._open.values()):
                if sandbox not in self._pool:
                    tg.start_soon(release, sandbox)
        self._pool.clear()
