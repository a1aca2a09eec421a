"""Which container serves a call.

A call may name a container (request `_meta` `{"container": "container_…"}`, as the Claude
API's `container` parameter does); otherwise it uses its session's container, created on
the session's first call. Over stdio the whole process is one session, and `--container ID`
names its container up front. Over HTTP a session is the transport's session id.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import anyio

from mcp_codeexec.containers import ContainerManager
from mcp_codeexec.sandbox import Sandbox

MAX_SESSIONS = 100_000  # remembered session → container pairs (~20 MB at most)


class Sessions:
    """`tenant` is the stdio tenant: the one `preset` and `uploads` (named at start) apply to.
    Remote calls bring their own tenant."""

    def __init__(
        self,
        manager: ContainerManager,
        tenant: str,
        preset: str | None = None,
        uploads: list[tuple[Path, str, int | None]] | None = None,
    ) -> None:
        self.manager = manager
        self.tenant = tenant
        self.uploads = uploads or []
        # Sessions come and go without telling (HTTP): remember the most recent ones only.
        self._container_of: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._preset = preset
        self._locks: dict[tuple[str, str], anyio.Lock] = {}  # only while a first call is under way

    async def sandbox(self, session: str | None, requested: str | None = None, tenant: str | None = None) -> Sandbox:
        """The named container, else the session's (made on its first call), else (session
        None: a stateless call with container handles on) a new one."""
        tenant = tenant or self.tenant
        if requested is not None:
            return await self.manager.open(tenant, requested)
        if session is None:
            return await self.manager.new(tenant)
        key = (tenant, session)
        lock = self._locks.setdefault(key, anyio.Lock())
        try:
            async with lock:  # one first call creates the session's container
                container_id = self._container_of.get(key) or (self._preset if tenant == self.tenant else None)
                if container_id is not None:
                    sandbox = await self.manager.open(tenant, container_id)
                else:
                    sandbox = await self.manager.new(tenant)
                    if tenant == self.tenant:
                        await self._seed(sandbox)
                self._remember(key, sandbox.info.id)
                return sandbox
        finally:
            if not lock.statistics().tasks_waiting and not lock.locked():
                self._locks.pop(key, None)

    def _remember(self, key: tuple[str, str], container_id: str) -> None:
        self._container_of[key] = container_id
        self._container_of.move_to_end(key)
        while len(self._container_of) > MAX_SESSIONS:
            self._container_of.popitem(last=False)  # that session's next call gets a new container

    async def _seed(self, sandbox: Sandbox) -> None:
        """Copy the files named at start into a new container (copies: the originals on the
        host are never touched by anything in the sandbox)."""
        for host, target, mode in self.uploads:
            await sandbox.write_file(target, host.read_bytes(), mode)
