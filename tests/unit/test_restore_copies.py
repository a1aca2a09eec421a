"""deployment/restore_copies.py without an engine: which of containerd's unpacked
checkpoint copies the sweep removes (the one just restored, found by its image's size and
modification time; any older than 10 minutes), and what it never touches (fresh copies of
other images, directories without runsc's image, symlinks, files). The sweep after a real
restore is tested in tests/e2e/test_checkpoint.py."""

from __future__ import annotations

import os
import time
from pathlib import Path

from mcp_codeexec.deployment import restore_copies as rc


def copy(base: Path, name: str, data: bytes = b"state", *, age_minutes: float = 0, mtime: float | None = None) -> Path:
    d = base / name
    d.mkdir()
    image = d / "checkpoint.img"
    image.write_bytes(data)
    if mtime is not None:
        os.utime(image, (mtime, mtime))
    then = time.time() - age_minutes * 60
    os.utime(d, (then, then))
    return d


def test_the_restored_copy_and_stale_copies_go_and_nothing_else(tmp_path: Path) -> None:
    original = tmp_path / "original.img"
    original.write_bytes(b"x" * 1000)
    os.utime(original, (1_700_000_000.75, 1_700_000_000.75))
    stamp = rc.image_stamp(str(original))
    assert stamp == "1000 1700000000"  # whole seconds: what the unpacked copy keeps

    staging = tmp_path / "tmp"
    staging.mkdir()
    restored = copy(staging, "ctrd-checkpoint111", b"x" * 1000, mtime=1_700_000_000)
    stale = copy(staging, "ctrd-checkpoint222", age_minutes=11)
    fresh = copy(staging, "ctrd-checkpoint333", b"y" * 1000, mtime=1_700_000_001)  # another restore, in progress
    spaced = copy(staging, "ctrd-checkpoint 4 4", age_minutes=30)
    not_runsc = staging / "ctrd-checkpoint555"
    not_runsc.mkdir()
    (not_runsc / "pages-1.img").write_bytes(b"criu")
    os.utime(not_runsc, (0, 0))
    elsewhere = copy(tmp_path, "kept-elsewhere", age_minutes=60)
    (staging / "ctrd-checkpoint666").symlink_to(elsewhere)
    (staging / "ctrd-checkpoint777").write_bytes(b"a file")
    other = copy(staging, "unrelated", age_minutes=60)

    removed = rc.clear_in(str(staging), stamp)
    assert sorted(removed) == sorted(f"{staging}/{d.name}" for d in (restored, stale, spaced))
    assert not restored.exists() and not stale.exists() and not spaced.exists()
    assert fresh.exists() and not_runsc.exists() and other.exists()
    assert (elsewhere / "checkpoint.img").exists() and (staging / "ctrd-checkpoint666").is_symlink()
    assert (staging / "ctrd-checkpoint777").is_file()
    # Without a stamp (through the engine, the image unreadable): stale copies only.
    again = copy(staging, "ctrd-checkpoint888", b"x" * 1000, mtime=1_700_000_000)
    assert rc.clear_in(str(staging), "") == [] and again.exists()


def test_a_missing_directory_or_image_is_nothing_to_do(tmp_path: Path) -> None:
    assert rc.clear_in(str(tmp_path / "absent"), "1 2") == []
    assert rc.image_stamp(str(tmp_path / "absent.img")) == ""
