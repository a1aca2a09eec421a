"""The container manager over a backend that only lists: the listing's logic (ids, times,
states, sizes), without Docker."""

from __future__ import annotations

import anyio
import pytest

from mcp_codeexec.config import Settings
from mcp_codeexec.containers import ContainerManager
from mcp_codeexec.deployment.base import Deployment, SandboxRecord

pytestmark = pytest.mark.anyio


class ListingOnly(Deployment):
    """A backend that only lists."""

    def __init__(self, records: list[SandboxRecord]) -> None:
        self.records = records

    async def list(self, prefix: str, *, sizes: bool = False) -> list[SandboxRecord]:
        return [r for r in self.records if r.name.startswith(prefix)]


ListingOnly.__abstractmethods__ = frozenset()  # a listing uses nothing else


async def test_containers_listing_says_expired():
    labels = lambda created, expires: {  # noqa: E731
        "org.mcp-codeexec.created_at": created, "org.mcp-codeexec.expires_at": expires,
    }
    ids = ["container_" + c * 24 for c in "ABCE"]
    records = [
        SandboxRecord(f"mcp-codeexec.t.{ids[0]}", labels("2020-01-01T00:00:00Z", "2020-01-31T00:00:00Z"), running=False,
                      size_bytes=4096),
        SandboxRecord(f"mcp-codeexec.t.{ids[1]}", labels("2020-01-02T00:00:00Z", "2999-01-01T00:00:00Z"), running=True),
        SandboxRecord(f"mcp-codeexec.t.{ids[2]}", labels("2020-01-03T00:00:00Z", "2999-01-01T00:00:00Z"), running=False),
        SandboxRecord(f"mcp-codeexec.t.{ids[3]}", labels("2020-01-04T00:00:00Z", "2999-01-01T00:00:00Z"), running=False,
                      checkpointed=True, checkpoint_bytes=7 << 20),
        SandboxRecord(f"mcp-codeexec.other.{'container_' + 'D' * 24}", labels("2020-01-01T00:00:00Z", "2999-01-01T00:00:00Z"),
                      running=True),
    ]
    async with anyio.create_task_group() as tg:
        listing = await ContainerManager(Settings(), ListingOnly(records), tg).list("t")
    assert listing == [
        {"id": ids[0], "created_at": "2020-01-01T00:00:00Z", "expires_at": "2020-01-31T00:00:00Z", "state": "expired", "size_bytes": 4096,
         "checkpoint_bytes": 0},
        {"id": ids[1], "created_at": "2020-01-02T00:00:00Z", "expires_at": "2999-01-01T00:00:00Z", "state": "running", "size_bytes": None,
         "checkpoint_bytes": 0},
        {"id": ids[2], "created_at": "2020-01-03T00:00:00Z", "expires_at": "2999-01-01T00:00:00Z", "state": "stopped", "size_bytes": None,
         "checkpoint_bytes": 0},
        {"id": ids[3], "created_at": "2020-01-04T00:00:00Z", "expires_at": "2999-01-01T00:00:00Z", "state": "checkpointed",
         "size_bytes": None, "checkpoint_bytes": 7 << 20},
    ]


async def test_checkpoint_images_count_as_the_tenants_stored_bytes(tmp_path):
    """What the reaper finds saved is counted per tenant, and FileStore refuses a file that
    would take files plus saved memory past the cap."""
    from mcp_codeexec.files import FileStore, StoreFull

    labels = {"org.mcp-codeexec.created_at": "2020-01-01T00:00:00Z", "org.mcp-codeexec.expires_at": "2999-01-01T00:00:00Z"}
    records = [
        SandboxRecord("mcp-codeexec.t.container_" + "A" * 24, labels, running=False, checkpointed=True, checkpoint_bytes=600),
        SandboxRecord("mcp-codeexec.t.container_" + "B" * 24, labels, running=False, checkpointed=True, checkpoint_bytes=300),
        SandboxRecord("mcp-codeexec.t.container_" + "C" * 24, labels, running=False),
        SandboxRecord("mcp-codeexec.tt.container_" + "D" * 24, labels, running=False, checkpointed=True, checkpoint_bytes=5),
    ]
    async with anyio.create_task_group() as tg:
        manager = ContainerManager(Settings(), ListingOnly(records), tg)
        await manager.reap()
    assert (manager.checkpoint_bytes("t"), manager.checkpoint_bytes("tt"), manager.checkpoint_bytes("x")) == (900, 5, 0)
    store = FileStore(tmp_path, cap=lambda tenant: 1000, elsewhere=manager.checkpoint_bytes)
    store.add("t", "a.txt", b"x" * 100)
    assert store.used("t") == 1000 and store.room("t") == 0
    with pytest.raises(StoreFull, match="900 of saved sandbox memory"):
        store.add("t", "b.txt", b"y")
    assert store.room("tt") == 995
