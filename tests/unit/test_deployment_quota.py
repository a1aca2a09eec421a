"""deployment/quota.py without loop devices: process-count and CPU arithmetic, path maps,
workspace bookkeeping (a runner that records the steps instead of attaching), the real
mkfs step on a sparse file, and set-up refusals."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from mcp_codeexec.deployment import quota as q
from mcp_codeexec.errors import QuotaError


def test_nproc_limit() -> None:
    assert q.nproc_limit(2048, "runsc") == (2048 - 64) // 16
    assert q.nproc_limit(100, "runsc") == 8  # never below a usable minimum
    assert q.nproc_limit(512, "runc") == 508 and q.nproc_limit(2, "runc") == 1


def test_pick_cpuset_spreads_sandboxes() -> None:
    cpus = [0, 1, 2, 3]
    assert q.pick_cpuset(4, cpus) is None and q.pick_cpuset(8, cpus) is None  # every core: no pinning
    picks = [q.pick_cpuset(1, cpus) for _ in range(4)]
    assert sorted(picks) == ["0", "1", "2", "3"]  # in turn, each core once
    two = q.pick_cpuset(1.2, cpus)
    assert two is not None and len(two.split(",")) == 2
    assert q.pick_cpuset(0, [5, 7]) in ("5", "7")


def test_host_cpus() -> None:
    cpus = q.host_cpus()
    assert cpus and cpus == sorted(set(cpus)) and len(cpus) <= (os.cpu_count() or 1)


def test_path_map() -> None:
    assert q.PathMap().to_host("/x") == "/x" and q.PathMap().to_local("/x") == "/x"
    m = q.PathMap((("/data/quota", "/var/lib/docker/volumes/q/_data"),), in_container="abc")
    assert m.to_host("/data/quota/ws.img") == "/var/lib/docker/volumes/q/_data/ws.img"
    assert m.to_local("/var/lib/docker/volumes/q/_data/ws.img") == "/data/quota/ws.img"
    with pytest.raises(QuotaError, match="in the server's own container"):
        m.to_host("/data/quotax/ws.img")
    with pytest.raises(QuotaError, match="not mounted"):
        m.to_local("/elsewhere/ws.img")


class Recording(q.Runner):
    how = "recorded"

    def __init__(self, attach_answer: str = "") -> None:
        self.steps: list[tuple[str, tuple[str, ...]]] = []
        self.attach_answer = attach_answer

    def run(self, step: str, *files: str) -> str:
        self.steps.append((step, files))
        return self.attach_answer if step == "attach" else ""


def test_workspace_bookkeeping(tmp_path: Path) -> None:
    runner = Recording()
    quota = q.WorkspaceQuota(1 << 20, str(tmp_path), runner, runner)
    with pytest.raises(QuotaError, match="unsuitable volume name"):
        quota.create("../evil")
    # An attach that gives no loop device: refused, and nothing is left behind.
    with pytest.raises(QuotaError, match="no attached loop device"):
        quota.create("ws1")
    assert quota.volumes() == [] and [s for s, _ in runner.steps] == ["format", "attach", "detach"]
    # Filesystems whose volume is gone, once old enough, are released.
    for name in ("kept", "orphan", "fresh"):
        Path(tmp_path, f"{name}.img").write_bytes(b"")
    old = time.time() - 120
    os.utime(tmp_path / "orphan.img", (old, old))
    assert quota.volumes() == ["fresh", "kept", "orphan"]
    assert quota.volume_of(str(tmp_path / "kept.img")) == "kept" and quota.volume_of("/elsewhere/kept.img") is None
    assert quota.collect({"kept"}) == ["orphan"]
    assert quota.volumes() == ["fresh", "kept"] and runner.steps[-1] == ("detach", (str(tmp_path / "orphan.img"),))
    assert quota.labels("kept") == {q.FILE_LABEL: str(tmp_path / "kept.img"), q.SIZE_LABEL: str(1 << 20)}
    assert q.disk_usage(str(tmp_path / "kept.img")) == 0 and q.disk_usage(str(tmp_path / "absent")) == -1


@pytest.mark.skipif(q.find_tool("mkfs.ext4") is None, reason="e2fsprogs not installed")
def test_the_format_step_makes_an_ext4_filesystem(tmp_path: Path) -> None:
    image = tmp_path / "ws.img"
    with open(image, "wb") as f:
        f.truncate(8 << 20)  # sparse
    q.LocalRunner("here").run("format", str(image))
    with open(image, "rb") as f:
        f.seek(1024 + 56)
        assert f.read(2) == b"\x53\xef"  # the ext4 superblock's magic
    with pytest.raises(QuotaError, match="format failed"):
        q.LocalRunner("here").run("format", str(tmp_path / "absent.img"))


def test_setup_refusals(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(q.QuotaUnavailable, match="cannot create"):
        q.setup(1 << 20, str(tmp_path / "file" / "sub"), "img", lambda: pytest.fail("no engine needed"))  # type: ignore[arg-type]
    assert q.workspace_quota(0, str(tmp_path), "img", lambda: pytest.fail("no engine needed")) is None  # type: ignore[arg-type]
    assert q.workspace_quota(1 << 20, str(tmp_path / "file" / "sub"), "img", lambda: None) is None  # type: ignore[arg-type]
    assert "workspace disk quota OFF" in caplog.text
