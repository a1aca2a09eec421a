"""Which files a command created or changed: inotify on the workspace (standard library
only, through ctypes). A walk of the tree per call would cost ~60 ms per 1000 files under
gVisor; the watcher costs nothing per call but reading its queue.

What counts as an output file: a regular file under the workspace that was written and
closed, or moved into place, while the call ran; not hidden (no path component starting
with "."), not in a cache or dependency directory (EXCLUDED_DIRS).
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

EXCLUDED_DIRS = {"__pycache__", "node_modules", "site-packages", "venv"}

_IN_CLOSE_WRITE = 0x8
_IN_MOVED_TO = 0x80
_IN_CREATE = 0x100
_IN_DELETE_SELF = 0x400
_IN_IGNORED = 0x8000
_IN_ISDIR = 0x40000000
_IN_Q_OVERFLOW = 0x4000
_MASK = _IN_CLOSE_WRITE | _IN_MOVED_TO | _IN_CREATE | _IN_DELETE_SELF
_EVENT = struct.Struct("iIII")
# Under gVisor every watched directory of a gofer-backed mount (the workspace) pins one of
# the sandbox's ~20 000 host file descriptors: at that many watches every open() in the
# sandbox fails with EMFILE. Past this many the watcher gives up (overflowed) and output
# files are found by modification time instead (recent_files).
_MAX_WATCHES = 8000
RECENT_SCAN_LIMIT = 50_000  # entries recent_files() looks at, at most (~3 s under gVisor)


def _hidden_or_excluded(name: str) -> bool:
    return name.startswith(".") or name in EXCLUDED_DIRS


class Watcher:
    """Watches every visible directory under root; `drain()` returns the files written
    since the last drain."""

    def __init__(self, root: str) -> None:
        self.root = root
        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        self._dirs: dict[int, str] = {}
        self.overflowed = False
        self._pending: set[str] = set()
        self._add_tree(root, mark_files=False)

    def _add(self, path: str) -> bool:
        if len(self._dirs) >= _MAX_WATCHES:
            self.overflowed = True
            return False
        wd = self._libc.inotify_add_watch(self.fd, os.fsencode(path), _MASK)
        if wd >= 0:
            self._dirs[wd] = path
        elif ctypes.get_errno() not in (errno.ENOENT, errno.ENOTDIR):
            self.overflowed = True  # a directory that exists is not watched: events will be missed
        return wd >= 0

    def _add_tree(self, top: str, mark_files: bool = True) -> None:
        """Watch top and its visible subdirectories. Files already inside a directory that
        appears during a call count as written (they were, by that call, before the watch
        could see them)."""
        stack = [top]
        while stack:
            path = stack.pop()
            if not self._add(path):
                continue
            try:
                with os.scandir(path) as entries:
                    for entry in entries:
                        if _hidden_or_excluded(entry.name):
                            continue
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(entry.path)
                        elif mark_files and entry.is_file(follow_symlinks=False):
                            self._pending.add(entry.path)
            except OSError:
                pass

    def close(self) -> None:
        os.close(self.fd)

    def drain(self) -> set[str]:
        """Paths (absolute) written or moved in since the last drain."""
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            offset = 0
            while offset < len(data):
                wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
                name = data[offset + _EVENT.size : offset + _EVENT.size + length].rstrip(b"\0").decode("utf-8", "surrogateescape")
                offset += _EVENT.size + length
                if mask & _IN_Q_OVERFLOW:
                    self.overflowed = True
                    continue
                if mask & (_IN_IGNORED | _IN_DELETE_SELF):
                    self._dirs.pop(wd, None)
                    continue
                parent = self._dirs.get(wd)
                if parent is None or not name or _hidden_or_excluded(name):
                    continue
                path = os.path.join(parent, name)
                if mask & _IN_ISDIR:
                    if mask & (_IN_CREATE | _IN_MOVED_TO):
                        self._add_tree(path)
                elif mask & (_IN_CLOSE_WRITE | _IN_MOVED_TO):
                    self._pending.add(path)
        written, self._pending = self._pending, set()
        return written


def recent_files(root: str, since: float) -> tuple[list[list[object]], bool]:
    """([path, size] of visible regular files under root modified at or after `since`,
    whether every entry was looked at): the fallback when the watcher lost events."""
    found: list[list[object]] = []
    stack, seen = [root], 0
    while stack:
        try:
            with os.scandir(stack.pop()) as entries:
                for entry in entries:
                    seen += 1
                    if seen > RECENT_SCAN_LIMIT:
                        return found, False
                    if _hidden_or_excluded(entry.name):
                        continue
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
                    elif entry.is_file(follow_symlinks=False):
                        st = entry.stat(follow_symlinks=False)
                        if st.st_mtime >= since - 1:  # coarse file-system clocks
                            found.append([entry.path, st.st_size])
        except OSError:
            continue
    return found, True


class OutputFiles:
    """The files each call writes, for exec and REPL calls alike: a call takes a mark
    when it starts (`tracking()`), and `written(mark)` lists the files written since."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.events: list[str] = []  # files written, in order; events_base counts dropped ones
        self.events_base = 0
        self.overflows = 0  # how often the watcher lost events
        self.open_marks = 0
        try:
            self.watcher: Watcher | None = Watcher(root)
        except OSError:
            self.watcher = None  # no inotify: calls report no output files

    @contextmanager
    def tracking(self) -> Iterator[tuple[int, int, float]]:
        """Where a call starts: (file events seen so far, watcher overflows so far, wall
        clock time). A call's files are the events after its mark."""
        mark = (0, 0, time.time())
        if self.watcher is not None:
            self._take_events()
            if self.open_marks == 0 or len(self.events) > 100_000:  # no other call runs: drop the old ones
                self.events_base += len(self.events)
                self.events.clear()
            mark = (self.events_base + len(self.events), self.overflows, mark[2])
        self.open_marks += 1
        try:
            yield mark
        finally:
            self.open_marks -= 1

    def written(self, mark: tuple[int, int, float]) -> tuple[list[list[Any]], str]:
        """([path, size] of regular files written since `mark`, a note for the caller if
        that list may be incomplete). When the watcher lost events while the call ran (its
        queue overflowed, or a directory could not be watched), the workspace is searched
        for files modified since the mark's time instead, and the watcher is rebuilt."""
        if self.watcher is None:
            return [], ""
        since, overflows, started = mark
        self._take_events()
        if self.overflows != overflows:
            found, complete = recent_files(self.root, started)
            note = (
                "more files changed than the file watcher could follow; output files were found by modification time"
                + ("" if complete else f" among the first {RECENT_SCAN_LIMIT} entries of the workspace only")
            )
            return found, note
        paths = dict.fromkeys(self.events[since - self.events_base :])
        found = []
        for path in paths:
            try:
                st = os.stat(path, follow_symlinks=False)
            except OSError:
                continue  # written, then removed or renamed
            if stat.S_ISREG(st.st_mode):
                found.append([path, st.st_size])
        return found, ""

    def _take_events(self) -> None:
        """Move the watcher's events into self.events; after a loss, count it and start a
        fresh watcher (the old one's watches may miss new directories)."""
        assert self.watcher is not None
        self.events.extend(self.watcher.drain())
        if self.watcher.overflowed:
            self.overflows += 1
            self.watcher.close()
            self.watcher = Watcher(self.root)
