"""Which container serves a call.

A call may name a container (request `_meta` `{"container": "container_…"}`, as the Claude
API's `container` parameter does); otherwise it uses its session's container, created on
the session's first call. Over stdio the whole process is one session, and `--container ID`
names its container up front. Over HTTP a session is the transport's session id.
"""

from __future__ import annotations

from collections import defaultdict

import anyio

from mcp_codeexec.containers import ContainerManager
from mcp_codeexec.sandbox import Sandbox


class Sessions:
    def __init__(self, manager: ContainerManager, tenant: str, preset: str | None = None) -> None:
        self.manager = manager
        self.tenant = tenant
        self._container_of: dict[str, str] = {}
        self._preset = preset
        self._locks: defaultdict[str, anyio.Lock] = defaultdict(anyio.Lock)

    async def sandbox(self, session: str, requested: str | None = None) -> Sandbox:
        if requested is not None:
            return await self.manager.open(self.tenant, requested)
        async with self._locks[session]:  # one first call creates the session's container
            container_id = self._container_of.get(session) or self._preset
            if container_id is not None:
                sandbox = await self.manager.open(self.tenant, container_id)
            else:
                sandbox = await self.manager.new(self.tenant)
            self._container_of[session] = sandbox.info.id
            return sandbox
