"""stdio.py: the stdio transport's pipes read and written from the event loop. The last
test runs the real server over real pipes with the `mcp` SDK's stdio client (local
backend: the real agent as a local process, no Docker)."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import anyio
import pytest
from mcp.client import Client
from mcp.client.stdio import StdioServerParameters, stdio_client
from processes import server_pids
from strict import validate_result

from mcp_codeexec import stdio

pytestmark = pytest.mark.anyio


async def test_lines_come_whole_however_the_pipe_cuts_them() -> None:
    r, w = os.pipe()
    os.set_blocking(r, False)
    reader = stdio.LineReader(r)
    euro = "€".encode()  # three bytes, cut between two writes

    def write() -> None:
        for part in (b'{"a": 1}\n{"b"', b': 2}\n' + euro[:1], euro[1:] + b"\n\n", b"\xff bad\n", b"last, no newline"):
            os.write(w, part)
            time.sleep(0.01)
        os.close(w)

    threading.Thread(target=write).start()
    lines = [line async for line in reader]
    os.close(r)
    assert lines == ['{"a": 1}\n', '{"b": 2}\n', "€\n", "\n", "\ufffd bad\n", "last, no newline"]


async def test_a_flush_waits_while_the_pipe_is_full_and_loses_nothing() -> None:
    r, w = os.pipe()
    os.set_blocking(w, False)
    writer = stdio.Writer(w)
    text = "".join(f"line {i} é\n" for i in range(200_000))  # ~2.6 MB: many times a pipe's buffer
    received = bytearray()

    def slow_reader() -> None:
        while chunk := os.read(r, 1 << 15):
            received.extend(chunk)
            time.sleep(0.001)

    reading = threading.Thread(target=slow_reader)
    reading.start()
    await writer.write(text)
    with anyio.fail_after(30):
        await writer.flush()
    os.close(w)
    reading.join()
    os.close(r)
    assert received.decode() == text


def test_only_pipes_and_sockets_take_this_path(tmp_path: Path) -> None:
    with open(tmp_path / "f", "w") as f:
        assert not stdio._is_pipe_or_socket(f.fileno())  # a file (or a terminal): the SDK's own streams
    r, w = os.pipe()
    assert stdio._is_pipe_or_socket(r) and stdio._is_pipe_or_socket(w)
    os.close(r)
    os.close(w)


async def test_the_server_serves_over_pipes_with_fds_0_and_1_diverted(base: str, tmp_path: Path) -> None:
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "mcp_codeexec", "--backend", "local", "--allow-weak-isolation", "--local-dir", base,
              "--data-dir", str(tmp_path / "data"), "--tenant", "stdio-unit", "--log-level", "WARNING"],
        env={**os.environ},
    )
    with open(tmp_path / "stderr", "w") as errlog:
        async with Client(stdio_client(params, errlog=errlog)) as client:
            result = await client.call_tool("bash_code_execution", {"command": "echo hi; echo oops >&2; exit 3"})
            validate_result("bash_code_execution", result.structured_content)
            assert (result.structured_content["stdout"], result.structured_content["return_code"]) == ("hi\n", 3)
            [server] = server_pids("stdio-unit")
            # While serving, a stray write to fd 1 goes to stderr and a read of fd 0 finds nothing.
            assert os.readlink(f"/proc/{server}/fd/0") == os.devnull
            assert os.readlink(f"/proc/{server}/fd/1") == os.readlink(f"/proc/{server}/fd/2")
            big = "x" * 300_000  # messages larger than a pipe's buffer, both ways
            result = await client.call_tool("text_editor_code_execution", {"command": "create", "path": "big.txt", "file_text": big})
            validate_result("text_editor_code_execution", result.structured_content)
            result = await client.call_tool("bash_code_execution", {"command": "wc -c < big.txt; head -c 49000 big.txt"})
            assert result.structured_content["stdout"] == "300000\n" + big[:49000]
    assert json.loads((tmp_path / "data" / "usage.json").read_text())["stdio-unit"]["code_execution_requests"] == 3

