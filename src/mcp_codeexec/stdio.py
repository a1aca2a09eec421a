"""The stdio transport's two pipes, read and written from the event loop.

The `mcp` SDK's `stdio_server()` reads each line and writes each message through worker
threads: three thread hand-offs per call on its path (~0.1 ms each here, more on a busy
host). Given these streams instead it keeps its framing and its session; only the I/O
moves onto the loop. Used when stdin and stdout are pipes or sockets (what an MCP client
gives its server); a terminal or a file keeps the SDK's own streams, because the
non-blocking mode set here is shared with every process holding that terminal or file.

Like the SDK, fds 0 and 1 are pointed elsewhere while serving (/dev/null and stderr), so
nothing a child process or a stray print writes can corrupt the wire, and restored after.
"""

from __future__ import annotations

import os
import stat
import sys
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio

_CHUNK = 1 << 16


def _is_pipe_or_socket(fd: int) -> bool:
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


def usable() -> bool:
    return sys.platform != "win32" and _is_pipe_or_socket(0) and _is_pipe_or_socket(1)


class LineReader:
    """Lines of the pipe `fd` (non-blocking), each decoded as UTF-8 with its newline, as
    the SDK's text wrapper gives them; a last line without one at EOF too."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._partial = bytearray()
        self._lines: deque[bytes] = deque()
        self._eof = False

    def __aiter__(self) -> LineReader:
        return self

    async def __anext__(self) -> str:
        while not self._lines:
            if self._eof:
                raise StopAsyncIteration
            await self._fill()
        return self._lines.popleft().decode("utf-8", "replace")

    async def _fill(self) -> None:
        try:
            chunk = os.read(self.fd, _CHUNK)
        except BlockingIOError:
            await anyio.wait_readable(self.fd)
            return
        if not chunk:
            self._eof = True
            if self._partial:
                self._lines.append(bytes(self._partial))
                self._partial.clear()
            return
        self._partial += chunk
        if b"\n" not in chunk:  # a long line in many chunks: only the new one is searched
            return
        *lines, rest = self._partial.split(b"\n")
        self._lines.extend(bytes(line) + b"\n" for line in lines)
        self._partial = bytearray(rest)


class Writer:
    """Text written to the pipe `fd` (non-blocking) at each flush, waiting while it is full."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._pending = bytearray()

    async def write(self, text: str) -> None:
        self._pending += text.encode("utf-8")

    async def flush(self) -> None:
        while self._pending:
            try:
                written = os.write(self.fd, self._pending)
            except BlockingIOError:
                await anyio.wait_writable(self.fd)
                continue
            del self._pending[:written]


@asynccontextmanager
async def streams() -> AsyncIterator[tuple[LineReader, Writer]]:
    """The pipes on private duplicates (non-blocking while serving), fds 0 and 1 diverted."""
    wire_in, wire_out = os.dup(0), os.dup(1)  # also what fds 0 and 1 are restored from
    blocking = os.get_blocking(wire_in), os.get_blocking(wire_out)
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        os.dup2(null, 0)
        os.dup2(2, 1)
        os.set_blocking(wire_in, False)
        os.set_blocking(wire_out, False)
        yield LineReader(wire_in), Writer(wire_out)
    finally:
        os.set_blocking(wire_in, blocking[0])
        os.set_blocking(wire_out, blocking[1])
        os.dup2(wire_in, 0)
        os.dup2(wire_out, 1)
        for fd in (null, wire_in, wire_out):
            os.close(fd)
