"""Start-up and wiring: everything one server process holds, built once.

`App` is made from the settings (and, in tests, a backend of their choosing). Its parts that
need no running event loop exist from the start; `run()` checks the backend, starts the
container manager and the background work, and stops them again. Over HTTP the Starlette app
enters `run()` first and the MCP transports enter it again: the nested entries share the one
running state.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.abc

from mcp_codeexec.config import Settings
from mcp_codeexec.containers import ContainerManager
from mcp_codeexec.deployment import make_backend
from mcp_codeexec.deployment.base import Deployment
from mcp_codeexec.errors import BackendUnavailable
from mcp_codeexec.files import FileStore, default_data_dir, upload_plan
from mcp_codeexec.metrics import Metrics
from mcp_codeexec.prompt import ImageFacts
from mcp_codeexec.sessions import Sessions
from mcp_codeexec.tenants import Limits, TenantPolicy, Usage, load_tenants, policy_of, stored_cap
from mcp_codeexec.upstream import Gateway, start_gateway

log = logging.getLogger(__name__)


class App:
    def __init__(self, settings: Settings, backend: Deployment | None = None) -> None:
        self.settings = settings
        self.backend = backend or make_backend(settings)
        # Tenants by name, with the limits of unlisted ones under DEFAULTS (ConfigError on a
        # bad file: the server does not start).
        self.policies: dict[str, TenantPolicy] = load_tenants(Path(settings.tokens_file)) if settings.tokens_file else {}
        data_dir = Path(settings.data_dir) if settings.data_dir else default_data_dir()
        stored = stored_cap(self.policies, settings.max_stored_bytes)

        def containers_cap(tenant: str) -> int | None:
            policy = policy_of(self.policies, tenant)
            return policy.max_containers if policy else None

        def checkpoint_bytes(tenant: str) -> int:  # saved sandbox memory counts as stored bytes
            return self._containers.checkpoint_bytes(tenant) if self._containers is not None else 0

        self.files = FileStore(data_dir / "files", settings.file_retention, stored, checkpoint_bytes)
        self.limits = Limits(self.policies)
        self.usage = Usage(data_dir / "usage.json")
        self.metrics = Metrics()
        self.isolation = f"{settings.runtime} (not checked yet)"
        self.facts = ImageFacts()
        self._containers_cap = containers_cap
        self.tools: Gateway | None = None  # upstream MCP tools for code in sandboxes (upstream.py)
        self._containers: ContainerManager | None = None
        self._sessions: Sessions | None = None
        self._entered = 0  # run() entries: the first starts everything, nested ones share it
        self._ready = anyio.Event()

    @property
    def containers(self) -> ContainerManager:
        if self._containers is None:
            raise BackendUnavailable("the server is not running yet")
        return self._containers

    @property
    def sessions(self) -> Sessions:
        if self._sessions is None:
            raise BackendUnavailable("the server is not running yet")
        return self._sessions

    @asynccontextmanager
    async def run(self) -> AsyncIterator[App]:
        """The running server: entered once per process, nested entries share it."""
        if self._entered:
            self._entered += 1
            try:
                await self._ready.wait()
                yield self
            finally:
                self._entered -= 1
            return
        self._entered = 1
        self._ready = anyio.Event()
        try:
            await self._check_backend()
            async with anyio.create_task_group() as task_group:
                self.tools = await start_gateway(self.settings, self.policies, task_group)
                containers = self._start(task_group)
                self._ready.set()
                try:
                    yield self
                finally:
                    with anyio.CancelScope(shield=True), anyio.move_on_after(20):
                        await containers.shutdown()
                        await self.backend.aclose()
                    if self.tools is not None:
                        self.tools.close()
                    task_group.cancel_scope.cancel()
        finally:
            self._entered = 0

    def _start(self, task_group: anyio.abc.TaskGroup) -> ContainerManager:
        settings = self.settings
        containers = ContainerManager(settings, self.backend, task_group, self._containers_cap, self.tools)
        self._containers = containers
        self._sessions = Sessions(containers, settings.tenant, settings.container, upload_plan(settings.uploads, settings.workdir))
        self.metrics.gauges["running_containers"] = lambda: containers.running_count
        self.metrics.gauges["pool_size"] = lambda: len(containers.pool)
        task_group.start_soon(containers.run_reaper)
        task_group.start_soon(containers.run_pool)
        if settings.prepare_session:
            task_group.start_soon(self._prepare)
        if settings.file_retention is not None:
            task_group.start_soon(self._prune_files)
        return containers

    async def _check_backend(self) -> None:
        settings = self.settings
        try:
            info = await self.backend.check(settings.image)
            self.isolation = info.isolation
            log.info("sandboxes: %s, %s, image %s", info.engine, info.isolation, settings.image)
        except BackendUnavailable as exc:
            # Keep serving: calls answer `unavailable` until the engine is back.
            log.error("sandbox backend unavailable: %s", exc)
        self.facts = await self._image_facts()
        if settings.backend == "local":
            log.warning("BACKEND LOCAL: NO ISOLATION. Commands run as plain processes on this host, with its "
                        "network and files. For tests only: never give this server to anyone or anything untrusted.")
        elif settings.runtime != "runsc":
            log.warning("runtime %r: sandboxes share the host kernel; use runsc (gVisor) for real isolation", settings.runtime)

    async def _image_facts(self) -> ImageFacts:
        """The image's manifest (libraries and tools with versions) for the system prompt: from
        the image's label, so no sandbox is started for it (deployment/image.py)."""
        image = self.settings.image
        try:
            manifest = await self.backend.image_manifest(image)  # Docker raises when there is no engine
            return ImageFacts.from_manifest(manifest) if manifest is not None else ImageFacts()
        except Exception as exc:  # noqa: BLE001 - the prompt then says "see the image manifest"
            log.warning("no manifest for image %s (%s): the system prompt lists no versions", image, exc)
            return ImageFacts()

    async def _prepare(self) -> None:
        """Start the stdio session's container at launch, so the first call finds it ready."""
        try:
            sandbox = await self.sessions.sandbox("stdio")
            await sandbox.agent()
        except Exception as exc:  # noqa: BLE001 - the first call will report it properly
            log.info("could not prepare the session's container: %s", exc)

    async def _prune_files(self) -> None:
        while True:
            await anyio.to_thread.run_sync(self.files.prune)
            await anyio.sleep(self.settings.reap_interval)
