"""agent/watch.py: which files a command wrote (inotify), and the fallback by time."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from mcp_codeexec.agent import watch


def test_watcher_reports_visible_written_files(tmp_path: Path) -> None:
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "before.txt").write_text("before")  # there before the watch: not reported
    w = watch.Watcher(str(tmp_path))
    try:
        assert w.drain() == set()
        (tmp_path / "a.txt").write_text("a")
        (tmp_path / ".hidden").write_text("h")
        (tmp_path / "__pycache__").mkdir()
        (tmp_path / "__pycache__" / "x.pyc").write_bytes(b"")
        (tmp_path / "new" / "deeper").mkdir(parents=True)  # a new tree: watched from now on
        (tmp_path / "old" / "moved.txt.tmp").write_text("m")
        os.rename(tmp_path / "old" / "moved.txt.tmp", tmp_path / "old" / "moved.txt")
        time.sleep(0.05)
        first = w.drain()
        (tmp_path / "new" / "deeper" / "b.txt").write_text("b")
        second = w.drain()
        assert not w.overflowed
    finally:
        w.close()
    assert first == {str(tmp_path / "a.txt"), str(tmp_path / "old" / "moved.txt.tmp"), str(tmp_path / "old" / "moved.txt")}
    assert second == {str(tmp_path / "new" / "deeper" / "b.txt")}


def test_a_directory_moved_in_brings_its_files(tmp_path: Path) -> None:
    (tmp_path / "ws").mkdir()
    (tmp_path / "outside" / "sub").mkdir(parents=True)
    (tmp_path / "outside" / "sub" / "r.csv").write_text("r")
    w = watch.Watcher(str(tmp_path / "ws"))
    try:
        os.rename(tmp_path / "outside", tmp_path / "ws" / "in")
        assert w.drain() == {str(tmp_path / "ws" / "in" / "sub" / "r.csv")}
    finally:
        w.close()


def test_too_many_directories_is_an_overflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(watch, "_MAX_WATCHES", 3)
    for name in "abcd":
        (tmp_path / name).mkdir()
    w = watch.Watcher(str(tmp_path))
    w.close()
    assert w.overflowed


def test_recent_files_by_modification_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "old.txt").write_text("o")
    past = time.time() - 100
    os.utime(tmp_path / "old.txt", (past, past))
    (tmp_path / "d" / "new.txt").write_text("new")
    (tmp_path / ".secret").write_text("s")
    found, complete = watch.recent_files(str(tmp_path), time.time() - 10)
    assert complete and found == [[str(tmp_path / "d" / "new.txt"), 3]]
    monkeypatch.setattr(watch, "RECENT_SCAN_LIMIT", 1)
    assert watch.recent_files(str(tmp_path), 0)[1] is False  # the scan stops at its limit, and says so
