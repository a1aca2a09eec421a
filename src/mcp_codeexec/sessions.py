"""Which container serves a call.

A call may name a container (request `_meta` `{"container": "container_…"}`, as the Claude
API's `container` parameter does); otherwise it uses its session's container, created on
the session's first call. Over stdio the whole process is one session, and `--container ID`
names its container up front. Over HTTP a session is the transport's session id.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import anyio

from mcp_codeexec.containers import ContainerManager
from mcp_codeexec.sandbox import Sandbox


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
        self._container_of: dict[tuple[str, str], str] = {}
        self._preset = preset
        self._locks: defaultdict[tuple[str, str], anyio.Lock] = defaultdict(anyio.Lock)

    async def sandbox(self, session: str, requested: str | None = None, tenant: str | None = None) -> Sandbox:
        tenant = tenant or self.tenant
        if requested is not None:
            return await self.manager.open(tenant, requested)
        key = (tenant, session)
        async with self._locks[key]:  # one first call creates the session's container
            container_id = self._container_of.get(key) or (self._preset if tenant == self.tenant else None)
            if container_id is not None:
                sandbox = await self.manager.open(tenant, container_id)
            else:
                sandbox = await self.manager.new(tenant)
                if tenant == self.tenant:
                    await self._seed(sandbox)
            self._container_of[key] = sandbox.info.id
            return sandbox

    async def _seed(self, sandbox: Sandbox) -> None:
        """Copy the files named at start into a new container (copies: the originals on the
        host are never touched by anything in the sandbox)."""
        for host, target, mode in self.uploads:
            await sandbox.write_file(target, host.read_bytes(), mode)
