"""Fixtures for the unit tests: the local backend (deployment/local.py: the real agent as
plain local processes, NO isolation) in this process, so everything above the backend runs
for real in milliseconds, without Docker."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from mcp_codeexec.config import Settings
from mcp_codeexec.containers import ContainerManager
from mcp_codeexec.deployment.local import LocalDeployment


@pytest.fixture
def base() -> Iterator[str]:
    """A short directory of local sandboxes (their sockets live under it) that a root
    server's agent (uid 1000) can reach. Whatever a test left running is removed."""
    yield from sandbox_dir()


def sandbox_dir() -> Iterator[str]:
    directory = tempfile.mkdtemp(prefix="mcx-")
    os.chmod(directory, 0o755)
    try:
        yield directory
    finally:
        try:
            remove_everything(directory)
        finally:
            shutil.rmtree(directory, ignore_errors=True)


def remove_everything(directory: str) -> None:
    """In a thread of its own: an event loop may be running in this one (module-scoped
    async fixtures keep theirs across tests)."""

    async def remove() -> None:
        deployment = LocalDeployment(directory)
        for record in await deployment.list(""):
            await deployment.remove(record.name)

    worker = threading.Thread(target=anyio.run, args=(remove,))
    worker.start()
    worker.join()


def local_settings(base: str, **overrides: Any) -> Settings:
    """Settings as `--backend local --local-dir base` gives them, with short limits."""
    values: dict[str, Any] = {
        "backend": "local",
        "local_dir": base,
        "runtime": "none",
        "workdir": os.path.join(os.path.realpath(base), "workspace"),
        "data_dir": os.path.join(base, "data"),
        "timeout": 3.0,
        "max_output_bytes": 20000,
        "disk_bytes": 0,
        "prepare_session": False,
        "backstop_grace": 2.0,
    }
    return Settings(**{**values, **overrides})


@asynccontextmanager
async def manager(settings: Settings, **kwargs: Any) -> AsyncIterator[ContainerManager]:
    """A running container manager over the local backend; shut down on the way out."""
    async with anyio.create_task_group() as tg:
        containers = ContainerManager(settings, LocalDeployment(settings.local_dir), tg, **kwargs)
        try:
            yield containers
        finally:
            with anyio.CancelScope(shield=True):
                await containers.shutdown()
            tg.cancel_scope.cancel()


def workspace(settings: Settings) -> Path:
    return Path(settings.workdir)


@asynccontextmanager
async def mcp_session(settings: Settings, app: Any = None) -> AsyncIterator[Any]:
    """The MCP server over `settings` (or `app`), in this process, driven by the `mcp`
    SDK's client; every tool result is validated strictly (tests/conftest.Session)."""
    from conftest import Session
    from mcp.client import Client

    from mcp_codeexec.app import App
    from mcp_codeexec.server import build_server

    async with Client(build_server(app or App(settings))) as client:
        yield Session(client)
