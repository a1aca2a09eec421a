"""deployment/docker.py without an engine: the options a sandbox is created with (the SDK's
requests recorded, never sent), the error mapping, and the exec stream's demultiplexing.
Nothing here runs a container: tests/e2e does, on Docker and gVisor."""

from __future__ import annotations

import struct
from datetime import timedelta
from typing import Any

import anyio
import docker
import docker.errors
import pytest
import requests

from mcp_codeexec.config import Settings
from mcp_codeexec.deployment import docker as d
from mcp_codeexec.deployment.base import AGENT_CAPABILITIES, AGENT_DIR, VOLUME_LABEL
from mcp_codeexec.errors import BackendUnavailable, NameTaken, SandboxGone
from mcp_codeexec.sandbox import ContainerInfo, sandbox_spec

pytestmark = pytest.mark.anyio


def offline(runtime: str = "runsc") -> d.DockerDeployment:
    """A backend whose SDK client points nowhere (a fixed API version: nothing is asked)."""
    deployment = d.DockerDeployment(runtime)
    deployment._api = docker.APIClient(base_url="unix:///nonexistent/docker.sock", version="1.41")
    return deployment


async def test_create_builds_a_locked_down_container(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = offline()
    made: dict[str, Any] = {}
    monkeypatch.setattr(backend.api, "create_volume", lambda name, **kw: made.setdefault("volume", (name, kw)))
    monkeypatch.setattr(backend.api, "create_container", lambda image, **kw: made.setdefault("container", (image, kw)))
    monkeypatch.setattr(d.q, "run_helper", lambda api, image, script, args, what, **kw: made.setdefault("handed over", (script, kw)))
    monkeypatch.setattr(d.q, "host_cpus", lambda: [0, 1, 2, 3])
    s = Settings(memory_bytes=1 << 30, cpus=1.5, pids_limit=512, tmp_bytes=64 << 20, image="img:1")
    info = ContainerInfo.new(timedelta(days=1))
    await backend.create(sandbox_spec(s, "mcp-codeexec.t." + info.id, "ws-vol", info))
    volume, options = made["volume"]
    assert volume == "ws-vol" and options["labels"]["org.mcp-codeexec.managed"] == "1"
    image, kw = made["container"]
    host = kw["host_config"]
    assert (image, kw["name"], kw["user"], kw["working_dir"], kw["network_disabled"]) == ("img:1", "mcp-codeexec.t." + info.id,
                                                                                          "0:0", "/workspace", True)
    assert kw["labels"][VOLUME_LABEL] == "ws-vol" and kw["command"][:2] == ["python3", "-I"]
    assert (host["Runtime"], host["NetworkMode"], host["ReadonlyRootfs"], host["Init"]) == ("runsc", "none", True, True)
    assert host["CapDrop"] == ["ALL"] and host["CapAdd"] == list(AGENT_CAPABILITIES)
    assert host["SecurityOpt"] == ["no-new-privileges"]
    assert (host["Memory"], host["MemorySwap"], host["NanoCpus"], host["PidsLimit"]) == (1 << 30, 1 << 30, 1_500_000_000, 512)
    assert len(host["CpusetCpus"].split(",")) == 2  # ceil(1.5) cores of the four
    [nproc] = host["Ulimits"]
    assert nproc["Name"] == "nproc" and nproc["Soft"] == nproc["Hard"] == d.q.nproc_limit(512, "runsc")
    script, helper = made["handed over"]  # a plain volume's root becomes the sandbox user's
    assert script == "chown 1000:1000 /w" and helper["binds"] == {"ws-vol": {"bind": "/w", "mode": "rw,nocopy"}}
    assert host["Binds"] == ["ws-vol:/workspace:rw,nocopy"]  # nothing copied up from the image
    assert set(host["Tmpfs"]) == {"/tmp", "/home/sandbox", AGENT_DIR} and "size=67108864" in host["Tmpfs"]["/tmp"]
    assert "noexec" in host["Tmpfs"][AGENT_DIR] and "mode=0700" in host["Tmpfs"][AGENT_DIR]
    assert host["LogConfig"] == {"Type": "json-file", "Config": {"max-size": "1m", "max-file": "1"}}


async def test_engine_errors_map_to_the_tree() -> None:
    backend = offline()

    def raising(exc: Exception) -> Any:
        def call() -> None:
            raise exc
        return call

    with pytest.raises(SandboxGone):
        await backend._call(raising(docker.errors.NotFound("no such container")))
    for exc in (docker.errors.APIError("boom"), requests.exceptions.ConnectionError("refused")):
        with pytest.raises(BackendUnavailable, match="Docker Engine error"):
            await backend._call(raising(exc))
    # The real client, pointed at no engine: unavailable, not a crash.
    with pytest.raises(BackendUnavailable):
        await backend.check("img")


@pytest.mark.parametrize(("status", "error"), [(404, SandboxGone), (409, NameTaken), (500, BackendUnavailable)])
async def test_claim_maps_rename_errors(monkeypatch: pytest.MonkeyPatch, status: int, error: type[Exception]) -> None:
    backend = offline()
    response = requests.Response()
    response.status_code = status
    exc = (docker.errors.NotFound if status == 404 else docker.errors.APIError)("rename", response=response)

    def rename(name: str, new: str) -> None:
        raise exc

    monkeypatch.setattr(backend.api, "rename", rename)
    with pytest.raises(error):
        await backend.claim("mcp-codeexec-pool.a", "mcp-codeexec.t.a")


def test_only_unix_engine_sockets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", "tcp://127.0.0.1:2375")
    with pytest.raises(BackendUnavailable, match="only unix://"):
        d._socket_path()
    monkeypatch.setenv("DOCKER_HOST", "unix:///run/other.sock")
    assert d._socket_path() == "/run/other.sock"


class Chunks:
    """A byte stream handing out fixed chunks (the engine's bytes, however they are cut)."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if not self.chunks:
            raise anyio.EndOfStream
        return self.chunks.pop(0)


def mux(stream: int, payload: bytes) -> bytes:
    return struct.pack(">BxxxI", stream, len(payload)) + payload


async def test_exec_stream_demultiplexes_stdout_and_keeps_stderr() -> None:
    data = mux(1, b"hello ") + mux(2, b"warning\n") + mux(1, b"world") + mux(2, b"x" * 10000)
    cut = [data[i : i + 7] for i in range(0, len(data), 7)]
    stream = d.DockerAgentStream(Chunks(cut[1:]), cut[0])  # type: ignore[arg-type]
    received = b""
    with pytest.raises(anyio.EndOfStream):
        while True:
            received += await stream.receive()
    assert received == b"hello world"
    assert len(stream.stderr_tail) == d._STDERR_KEEP and stream.stderr_tail.endswith("x" * 100)
