"""files.py: the host's file store (ids, tenants, caps, retention) and start-up uploads."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from mcp_codeexec.files import FileStore, StoreFull, default_data_dir, new_file_id, sanitize_filename, sniff_mime, upload_plan

PNG = b"\x89PNG\r\n\x1a\n" + bytes(8)


def test_add_get_read_list_delete(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    meta = store.add("alice", "../../etc/chart.png", PNG, "container_x", "/workspace/chart.png")
    assert re.fullmatch(r"file_[A-Za-z0-9]{24}", meta.id)
    assert (meta.filename, meta.size_bytes, meta.mime_type, meta.is_image) == ("chart.png", len(PNG), "image/png", True)
    assert (meta.tenant, meta.container_id, meta.path) == ("alice", "container_x", "/workspace/chart.png")
    assert store.get("alice", meta.id) == meta and store.read("alice", meta.id) == PNG
    second = store.add("alice", "notes.txt", b"hi")
    assert {m.id for m in store.list("alice")} == {meta.id, second.id}
    # Another tenant's id is the same as no id at all; so is a malformed one.
    assert store.get("bob", meta.id) is None and store.read("bob", meta.id) is None and store.list("bob") == []
    assert store.get("alice", "../alice/" + meta.id) is None and store.read("alice", "file_x") is None
    assert not store.delete("bob", meta.id) and not store.delete("alice", "nope")
    assert store.delete("alice", meta.id)
    assert store.get("alice", meta.id) is None and [m.id for m in store.list("alice")] == [second.id]
    assert not any(p.name.endswith(".partial") for p in (tmp_path / "alice").iterdir())


def test_cap_counts_every_file_and_frees_on_delete(tmp_path: Path) -> None:
    store = FileStore(tmp_path, cap=lambda tenant: 10 if tenant == "small" else 100)
    first = store.add("small", "a", b"123456")
    assert store.used("small") == 6 and store.room("small") == 4
    with pytest.raises(StoreFull, match="10-byte cap"):
        store.add("small", "b", b"12345")
    store.add("big", "b", b"12345")  # caps are per tenant
    store.delete("small", first.id)
    assert store.room("small") == 10
    # A new store over the same directory counts what is on disk.
    assert FileStore(tmp_path, cap=lambda t: 10).used("big") == 5


def test_prune_removes_only_old_files(tmp_path: Path) -> None:
    assert FileStore(tmp_path).prune() == 0  # no retention: keep everything
    store = FileStore(tmp_path, retention=60)
    old, new = store.add("t", "old", b"o"), store.add("t", "new", b"n")
    past = time.time() - 120
    os.utime(tmp_path / "t" / old.id, (past, past))
    assert store.prune() == 1
    assert store.get("t", old.id) is None and store.get("t", new.id) is not None
    assert store.used("t") == 1


@pytest.mark.parametrize(
    ("name", "clean"),
    [("a/b/c.txt", "c.txt"), ("..\\..\\evil.sh", "evil.sh"), (".hidden", "hidden"), ("x\x00y\nz", "xyz"), ("", "file"),
     ("...", "file"), ("é" * 200, "é" * 127)],
)
def test_sanitize_filename(name: str, clean: str) -> None:
    assert sanitize_filename(name) == clean
    assert len(sanitize_filename(name).encode()) <= 255


@pytest.mark.parametrize(
    ("name", "head", "mime"),
    [("x.bin", PNG, "image/png"), ("x", b"\xff\xd8\xff\xe0", "image/jpeg"), ("x", b"GIF89a..", "image/gif"),
     ("x", b"RIFF\0\0\0\0WEBPVP8 ", "image/webp"), ("x.txt", b"%PDF-1.7", "application/pdf"),
     ("report.csv", b"a,b", "text/csv"), ("blob", b"\0\1", "application/octet-stream")],
)
def test_sniff_mime_trusts_content_over_name(name: str, head: bytes, mime: str) -> None:
    assert sniff_mime(name, head) == mime


def test_new_file_ids_are_distinct() -> None:
    assert len({new_file_id() for _ in range(100)}) == 100


def test_upload_plan(tmp_path: Path) -> None:
    (tmp_path / "data" / "sub").mkdir(parents=True)
    (tmp_path / "data" / "a.csv").write_text("a")
    (tmp_path / "data" / "sub" / "b.txt").write_text("b")
    (tmp_path / "data" / "link").symlink_to(tmp_path / "data" / "a.csv")
    (tmp_path / "one.txt").write_text("1")
    plan = upload_plan((str(tmp_path / "data"), f"{tmp_path / 'one.txt'}:ro"), "/workspace")
    assert plan == [
        (tmp_path / "data" / "a.csv", "/workspace/uploads/data/a.csv", None),
        (tmp_path / "data" / "sub" / "b.txt", "/workspace/uploads/data/sub/b.txt", None),
        (tmp_path / "one.txt", "/workspace/uploads/one.txt", 0o444),
    ]
    with pytest.raises(ValueError, match="no such file"):
        upload_plan((str(tmp_path / "absent"),), "/workspace")


def test_default_data_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", "/xdg")
    assert default_data_dir() == Path("/xdg/mcp-codeexec")
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", "/home/u")
    assert default_data_dir() == Path("/home/u/.local/share/mcp-codeexec")
