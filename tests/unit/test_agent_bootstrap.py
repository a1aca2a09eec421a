"""agent/bootstrap.py: the load frame, and the real loader: it survives a connection that
brings garbage, then loads the agent's code from the next one."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time

from mcp_codeexec.agent import protocol as p
from mcp_codeexec.agent.bootstrap import _AGENT_MODULES, SOCKET, load_frame_body, loader_argv, relay_argv


def test_load_frame_carries_every_agent_module_and_a_hash_of_code_and_config() -> None:
    body, digest = load_frame_body({"root": "/w"})
    assert body["op"] == "load" and [name for name, _ in body["modules"]] == [f"mcp_codeexec.agent.{m}" for m in _AGENT_MODULES]
    assert body["config"] == {"root": "/w", "hash": digest}
    assert load_frame_body({"root": "/w"})[1] == digest  # stable
    assert load_frame_body({"root": "/other"})[1] != digest  # other settings: another agent
    # The agent's modules stand alone: nothing outside the standard library and themselves.
    for _, source in body["modules"]:
        imports = [line.split()[1].rstrip(",") for line in source.splitlines() if line.startswith(("import ", "from "))]
        outside = [m for m in imports if not m.startswith("mcp_codeexec.agent") and m.split(".")[0] not in sys.stdlib_module_names]
        assert outside == []


def test_argv_name_their_socket() -> None:
    assert SOCKET in loader_argv(2)[-1] and "'/tmp/x.sock'" in loader_argv(2, "/tmp/x.sock")[-1]
    assert relay_argv("/tmp/y.sock")[:4] == ["python3", "-I", "-S", "-u"] and "'/tmp/y.sock'" in relay_argv("/tmp/y.sock")[-1]


def connect(path: str) -> tuple[socket.socket, int, int]:
    """A relay's part by hand: hand the loader the ends of two pipes (its stdin, its stdout)."""
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    to_agent_r, to_agent_w = os.pipe()
    from_agent_r, from_agent_w = os.pipe()
    socket.send_fds(s, [b"F"], [to_agent_r, from_agent_w])
    os.close(to_agent_r)
    os.close(from_agent_w)
    return s, to_agent_w, from_agent_r


def read_frame(fd: int) -> object:
    decoder = p.FrameDecoder()
    while True:
        chunk = os.read(fd, 65536)
        assert chunk, "the loader closed the connection"
        messages = decoder.feed(chunk)
        if messages:
            return messages[0]


def test_the_loader_survives_garbage_then_loads_the_agent() -> None:
    directory = tempfile.mkdtemp(prefix="mcx-")
    path = os.path.join(directory, "agent.sock")
    loader = subprocess.Popen(loader_argv(p.PROTOCOL_VERSION, path), cwd=directory, stdin=subprocess.DEVNULL)
    try:
        for _ in range(200):
            if os.path.exists(path):
                break
            loader.poll()
            time.sleep(0.02)
        s, to_agent, from_agent = connect(path)
        assert read_frame(from_agent) == {"kind": "hello", "body": {"agent": None, "protocol": p.PROTOCOL_VERSION}}
        os.write(to_agent, struct.pack(">I", 1 << 30))  # announces a gigabyte: refused, connection dropped
        assert os.read(from_agent, 10) == b""
        assert loader.poll() is None
        s, to_agent, from_agent = connect(path)
        assert p.decode_hello(read_frame(from_agent)).agent is None
        body, digest = load_frame_body({"root": directory})
        os.write(to_agent, p.encode(body))
        os.write(to_agent, p.request_frame(1, p.Ping()))
        request_id, reply = p.decode_reply(read_frame(from_agent), p.PingResult)
        assert request_id == 1 and reply.pid == loader.pid  # the loader became the agent
        # A later connection is greeted by the agent with its hash.
        s2, _, from_agent2 = connect(path)
        assert p.decode_hello(read_frame(from_agent2)).agent == digest
        s2.close()
    finally:
        loader.kill()
        loader.wait()
        shutil.rmtree(directory, ignore_errors=True)
