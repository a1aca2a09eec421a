"""containers.py: the container manager. Over the local backend (real sandboxes running
the real agent): reuse by id, expiry, idle stop, the running cap, the per-tenant cap, the
warm pool. Over small fake backends: the listing, lost claims, orphan detection."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import anyio
import pytest

from mcp_codeexec.agent import protocol as p
from mcp_codeexec.config import Settings
from mcp_codeexec.containers import _OWNER_LABEL, POOL_PREFIX, ContainerManager, TooManyContainers, container_name
from mcp_codeexec.deployment.base import AgentStream, BackendInfo, Deployment, SandboxRecord, SandboxSpec
from mcp_codeexec.deployment.local import LocalDeployment
from mcp_codeexec.errors import BackendUnavailable, ContainerExpired, NameTaken, SandboxGone, TooManyRequests
from mcp_codeexec.sandbox import LABEL, ContainerInfo, iso
from unit.conftest import local_settings, manager

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


# --- the manager over the local backend (real sandboxes, real agent) -----------------------


async def test_reuse_by_id_and_tenant_separation(base: str) -> None:
    async with manager(local_settings(base)) as m:
        sandbox = await m.new("alice")
        assert sandbox.name == container_name("alice", sandbox.info.id)
        assert await m.open("alice", sandbox.info.id) is sandbox
        for tenant, cid in (("bob", sandbox.info.id), ("alice", "container_" + "x" * 24), ("alice", "not-an-id"),
                            ("alice", "../" + sandbox.info.id)):
            with pytest.raises(ContainerExpired):
                await m.open(tenant, cid)
        with pytest.raises(ValueError, match="bad tenant"):
            await m.new("Alice!")
    # Another manager (a restarted server) finds it again by name and labels alone.
    async with manager(local_settings(base)) as again:
        found = await again.open("alice", sandbox.info.id)
        assert found is not sandbox and found.info == sandbox.info


async def test_an_expired_container_is_refused_and_removed(base: str) -> None:
    async with manager(local_settings(base, lifetime=0)) as m:  # expired as soon as made
        sandbox = await m.new("t")
        with pytest.raises(ContainerExpired, match="expired at"):
            await m.open("t", sandbox.info.id)
        for _ in range(50):
            if not await m.deployment.list(sandbox.name):
                break
            await anyio.sleep(0.02)
        assert await m.deployment.list(sandbox.name) == []


async def test_reaper_removes_expired_and_stops_idle(base: str) -> None:
    async with manager(local_settings(base, idle_stop=0.0)) as m:
        idle = await m.new("t")
        await idle.agent()
        async with manager(local_settings(base, lifetime=0)) as short:
            doomed = await short.new("t")
        await m.reap()
        assert [r.name for r in await m.deployment.list("mcp-codeexec.")] == [idle.name]
        assert not idle.running and not (await m.deployment.inspect(idle.name)).running
        assert doomed.name not in m._open
        # Stopped, not gone: the next call starts it again.
        assert isinstance(await idle.request(p.Ping(), 5), p.PingResult)


async def test_reaper_stops_a_running_sandbox_no_server_uses(base: str) -> None:
    async with manager(local_settings(base)) as first:
        orphan = await first.new("t")
        await orphan.agent()
        await orphan.detach()  # its server let go (as after kill -9): the sandbox runs on, unused
        for _ in range(100):
            if not (await first.deployment.inspect(orphan.name)).in_use:
                break
            await anyio.sleep(0.02)
        async with manager(local_settings(base)) as second:
            await second.reap()
            assert not (await second.deployment.inspect(orphan.name)).running


async def test_running_cap_stops_the_least_recently_used_idle_one(base: str) -> None:
    async with manager(local_settings(base, max_running=2)) as m:
        a, b, c = [await m.new("t") for _ in range(3)]
        for sandbox in (a, b):
            await sandbox.agent()
        b.last_used = a.last_used + 1  # a is the least recently used
        await c.agent()
        assert (a.running, b.running, c.running) == (False, True, True)
        assert m.running_count == 2


async def test_running_cap_refuses_when_every_one_is_busy(base: str) -> None:
    s = local_settings(base, max_running=1)
    async with manager(s) as m:
        busy, other = await m.new("t"), await m.new("t")
        async with anyio.create_task_group() as tg:
            tg.start_soon(busy.request, p.Exec(command="sleep 0.5", cwd=s.workdir, timeout=5, max_output=100), 5)
            while not busy.running:
                await anyio.sleep(0.01)
            with pytest.raises(TooManyContainers, match="busy"):
                await other.agent()
        assert busy.running and not other.running


async def test_max_containers_per_tenant(base: str) -> None:
    async with manager(local_settings(base), containers_cap=lambda tenant: 2 if tenant == "capped" else None) as m:
        await m.new("capped")
        await m.new("capped")
        with pytest.raises(TooManyRequests, match="2 containers, its limit"):
            await m.new("capped")
        await m.new("free")


async def test_warm_pool_hands_out_started_sandboxes(base: str) -> None:
    s = local_settings(base, pool_size=1)
    async with manager(s) as m:
        m.task_group.start_soon(m.run_pool)
        for _ in range(200):
            if m.pool:
                break
            await anyio.sleep(0.02)
        [pooled] = m.pool
        assert pooled.running and pooled.name.startswith(POOL_PREFIX) and pooled.tenant == ""
        claimed = await m.new("alice")
        assert claimed is pooled and claimed.name == container_name("alice", claimed.info.id) and claimed.tenant == "alice"
        assert claimed.running  # no start on the first call
        assert (await m.deployment.inspect(claimed.name)).labels[_OWNER_LABEL]
        for _ in range(200):  # refilled
            if m.pool:
                break
            await anyio.sleep(0.02)
        assert len(m.pool) == 1 and m.pool[0] is not claimed
        pool_name = m.pool[0].name
    # Shutdown removes this server's pool and keeps the tenant's container (stopped).
    assert [r.name for r in await LocalDeployment(base).list(POOL_PREFIX)] == []
    record = await LocalDeployment(base).inspect(claimed.name)
    assert not record.running and pool_name != claimed.name


async def test_listing_with_sizes(base: str) -> None:
    s = local_settings(base)
    async with manager(s) as m:
        sandbox = await m.new("t")
        await sandbox.write_file(f"{s.workdir}/f", b"x" * 1000)
        [entry] = await m.list("t")
        assert entry["id"] == sandbox.info.id and entry["state"] == "running" and entry["size_bytes"] >= 1000
        assert await m.list("other") == []


# --- the manager's own logic over a dummy backend -------------------------------------------


class Dummy(Deployment):
    """Sandboxes as records in a dict: for the manager's decisions (claims, orphans), not
    for anything that runs."""

    def __init__(self) -> None:
        self.records: dict[str, SandboxRecord] = {}
        self.removed: list[str] = []
        self.stopped: list[str] = []
        self.claim_errors: list[Exception] = []

    async def check(self, image: str | None = None) -> BackendInfo:
        return BackendInfo("dummy", "none", "none")

    async def create(self, spec: SandboxSpec) -> None:
        self.records[spec.name] = SandboxRecord(spec.name, dict(spec.labels), running=False)

    async def start(self, spec: SandboxSpec) -> None:
        raise BackendUnavailable("the dummy runs nothing")

    async def stop(self, name: str) -> None:
        self.stopped.append(name)
        self.records[name] = replace(self.records[name], running=False)

    async def remove(self, name: str) -> None:
        self.removed.append(name)
        self.records.pop(name, None)

    async def claim(self, name: str, new_name: str) -> None:
        if self.claim_errors:
            raise self.claim_errors.pop(0)
        self.records[new_name] = replace(self.records.pop(name), name=new_name)

    async def inspect(self, name: str) -> SandboxRecord:
        if name not in self.records:
            raise SandboxGone(name)
        return self.records[name]

    async def list(self, prefix: str, *, sizes: bool = False) -> list[SandboxRecord]:
        return [r for n, r in sorted(self.records.items()) if n.startswith(prefix)]

    async def connect(self, name: str, argv: list[str]) -> AgentStream:
        raise BackendUnavailable("the dummy runs nothing")


def labels(created: datetime, **extra: str) -> dict[str, str]:
    return {f"{LABEL}.created_at": iso(created), f"{LABEL}.expires_at": iso(created + timedelta(days=1)), **extra}


async def test_a_lost_claim_moves_on_to_the_next_pool_sandbox() -> None:
    dummy = Dummy()
    async with anyio.create_task_group() as tg:
        m = ContainerManager(Settings(), dummy, tg)
        for _ in range(3):
            info = ContainerInfo.new(timedelta(days=1))
            await m._create(f"{POOL_PREFIX}{info.id}", info)
            m._pool.append(m._adopt(f"{POOL_PREFIX}{info.id}", info))
        first, second, third = m.pool
        dummy.claim_errors = [NameTaken("raced"), SandboxGone("removed by hand")]
        got = await m.new("t")
        assert got is third and got.name == container_name("t", third.info.id)
        assert m.pool == [] and first.name not in dummy.records or first.name.startswith(POOL_PREFIX)
        assert set(dummy.records) - {got.name} == {first.name, second.name}  # the losers were not renamed
        tg.cancel_scope.cancel()


async def test_orphans_are_pool_sandboxes_no_server_uses_past_the_grace() -> None:
    dummy = Dummy()
    now = datetime.now(UTC)
    old, young = now - timedelta(minutes=5), now
    records = {
        "orphan": (labels(old, **{_OWNER_LABEL: "gone-server"}), 0),
        "in-use": (labels(old, **{_OWNER_LABEL: "other-server"}), 1),
        "young": (labels(young, **{_OWNER_LABEL: "other-server"}), 0),
    }
    async with anyio.create_task_group() as tg:
        m = ContainerManager(Settings(), dummy, tg)
        records["mine"] = (labels(old, **{_OWNER_LABEL: m._owner}), 0)
        for name, (lab, in_use) in records.items():
            dummy.records[POOL_PREFIX + name] = SandboxRecord(POOL_PREFIX + name, lab, running=True, in_use=in_use)
        expired = labels(old - timedelta(days=2))
        dummy.records["mcp-codeexec.t.container_old"] = SandboxRecord("mcp-codeexec.t.container_old", expired, running=False)
        dummy.records["mcp-codeexec.t.container_busy"] = SandboxRecord("mcp-codeexec.t.container_busy", labels(old), running=True,
                                                                      in_use=1)
        await m.reap()
        tg.cancel_scope.cancel()
    assert sorted(dummy.removed) == ["mcp-codeexec-pool.orphan", "mcp-codeexec.t.container_old"]
    assert dummy.stopped == []  # a running sandbox another server uses is left alone

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
