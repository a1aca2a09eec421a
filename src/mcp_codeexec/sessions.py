"""Which sandbox serves which MCP session.

Each session gets its own sandbox, created on its first call and removed when the server
shuts down. A session is named by a key: over stdio the whole process is one session; over
HTTP it is the transport's session id.
"""

from __future__ import annotations

import anyio
import anyio.abc

from mcp_codeexec.config import Settings
from mcp_codeexec.deployment.base import Deployment
from mcp_codeexec.sandbox import Sandbox


class Sessions:
    def __init__(self, settings: Settings, deployment: Deployment, task_group: anyio.abc.TaskGroup) -> None:
        self.settings = settings
        self.deployment = deployment
        self.task_group = task_group
        self._by_key: dict[str, Sandbox] = {}

    def for_session(self, key: str) -> Sandbox:
        sandbox = self._by_key.get(key)
        if sandbox is None:
            sandbox = self._by_key[key] = Sandbox(self.settings, self.deployment, self.task_group)
        return sandbox

    async def close_all(self) -> None:
        """Remove every sandbox, in parallel: clients give a server little time to exit."""
        async with anyio.create_task_group() as tg:
            for sandbox in self._by_key.values():
                tg.start_soon(sandbox.close)
        self._by_key.clear()
