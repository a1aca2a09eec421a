"""deployment/base.py and deployment/__init__.py: the records, the optional verb, remove_all,
and the factory that picks a backend."""

from __future__ import annotations

import dataclasses

import pytest

from mcp_codeexec.config import Settings
from mcp_codeexec.deployment import make_backend
from mcp_codeexec.deployment.base import Deployment, SandboxRecord, SandboxSpec, remove_all
from mcp_codeexec.deployment.docker import DockerDeployment
from mcp_codeexec.deployment.local import LocalDeployment
from unit.conftest import local_settings

pytestmark = pytest.mark.anyio


class Listing(Deployment):
    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.removed: list[str] = []

    async def list(self, prefix: str, *, sizes: bool = False) -> list[SandboxRecord]:
        return [SandboxRecord(n, {}, running=False) for n in self.names if n.startswith(prefix)]

    async def remove(self, name: str) -> None:
        self.removed.append(name)


Listing.__abstractmethods__ = frozenset()


async def test_remove_all_removes_by_prefix_only() -> None:
    backend = Listing(["mcp-codeexec.t.a", "mcp-codeexec.t.b", "mcp-codeexec.other.c"])
    assert await remove_all(backend, "mcp-codeexec.t.") == 2
    assert backend.removed == ["mcp-codeexec.t.a", "mcp-codeexec.t.b"]
    assert await backend.image_manifest("img") is None  # optional: a backend without images has none


def test_records_are_frozen_with_defaults() -> None:
    record = SandboxRecord("n", {}, running=True)
    assert (record.status, record.exit_code, record.oom_killed, record.in_use, record.size_bytes) == ("", None, False, None, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.running = False  # type: ignore[misc]
    spec = SandboxSpec("n", "v", "img", "runsc", 1, 1.0, 1, "/w", 1, ("true",))
    assert spec.labels == {} and spec.env == {}


def test_make_backend(base: str) -> None:
    local = make_backend(local_settings(base))
    assert isinstance(local, LocalDeployment) and str(local.base) == base
    docker = make_backend(Settings(runtime="runc", disk_bytes=0))
    assert isinstance(docker, DockerDeployment) and docker.runtime == "runc" and docker.quota is None
    with pytest.raises(ValueError, match="unknown backend"):
        make_backend(Settings(backend="nomad"))
