"""Fixtures: the real server process over stdio, driven by the `mcp` SDK's client, with
real Docker and real gVisor. Without Docker these tests FAIL (never skip)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, TextIO

import anyio
import docker
import httpx2
import pytest
from mcp.client import Client
from mcp.client.stdio import StdioServerParameters, stdio_client
from processes import server_pids  # noqa: F401 - the e2e tests import it from here
from strict import validate_result

from mcp_codeexec.deployment.base import remove_all
from mcp_codeexec.deployment.docker import DockerDeployment

IMAGE = os.environ.get("MCP_CODEEXEC_IMAGE", "mcp-codeexec-sandbox:latest")
LABEL = "org.mcp-codeexec"
# The tests' containers live under their own tenant, removed at the end. Two test runs at
# once (two work trees) set MCP_CODEEXEC_TEST_TENANT apart so neither removes the other's.
TENANT = os.environ.get("MCP_CODEEXEC_TEST_TENANT", "pytest")


def remove_test_containers(api: docker.APIClient) -> None:
    """Remove the tests' containers the way the server does (workspace volume, and its disk
    quota's loop device and backing file too), and pool containers no server is connected
    to (their server is gone) that are older than a minute."""
    # The test tenant and its family (pytest-t, pytest-t-b, ...), and no other run's tenant
    # that merely starts with the same letters.
    backend = DockerDeployment()
    for prefix in (f"mcp-codeexec.{TENANT}.", f"mcp-codeexec.{TENANT}-"):
        anyio.run(remove_all, backend, prefix)
    for c in api.containers(all=True, filters={"name": "mcp-codeexec-pool."}):
        name = c["Names"][0].lstrip("/")
        if time.time() - c["Created"] > 60 and not anyio.run(backend.inspect, name).in_use:
            anyio.run(backend.remove, name)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that restart the engine go last: nothing else is running on it then."""
    items.sort(key=lambda item: item.get_closest_marker("engine_restart") is not None)


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def engine() -> Iterator[docker.APIClient]:
    """The Docker Engine, with gVisor registered and the sandbox image built."""
    try:
        api = docker.APIClient(version="auto")
        info = api.info()
    except Exception as exc:  # noqa: BLE001 - any failure here means no engine
        pytest.fail(f"Docker Engine is required for these tests and is not reachable: {exc}. Run scripts/setup.sh.")
    assert "runsc" in info.get("Runtimes", {}), "gVisor (runsc) is not registered with Docker; run scripts/setup.sh"
    api.inspect_image(IMAGE)
    remove_test_containers(api)
    yield api
    remove_test_containers(api)


class Session:
    """A connected MCP client whose every tool result is validated strictly."""

    def __init__(self, client: Client) -> None:
        self.client = client

    async def call(self, tool: str, arguments: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        return (await self.call_full(tool, arguments, **kwargs))[0]

    async def call_full(self, tool: str, arguments: dict[str, Any], **kwargs: Any) -> tuple[dict[str, Any], Any]:
        """(the validated result object, the whole MCP result: content blocks, _meta)."""
        result = await self.client.call_tool(tool, arguments, **kwargs)
        structured = result.structured_content
        assert isinstance(structured, dict), result
        validate_result(tool, structured)
        # The text block carries the same object, as JSON.
        assert json.loads(result.content[0].text) == structured
        assert result.is_error == structured["type"].endswith("_tool_result_error")
        container = (result.meta or {}).get("container")
        # Every result names its container, except where none was reached (bad input, an id
        # that names no live container, a call refused by a rate limit, no engine or image).
        if structured.get("error_code") not in ("invalid_tool_input", "container_expired", "too_many_requests", "unavailable", "file_not_found") or container:
            assert container and set(container) == {"id", "expires_at"}, structured
            self.last_meta = result.meta
        return structured, result

    async def bash(self, command: Any, **kwargs: Any) -> dict[str, Any]:
        return await self.call("bash_code_execution", {"command": command}, **kwargs)

    async def edit(self, **arguments: Any) -> dict[str, Any]:
        return await self.call("text_editor_code_execution", arguments)


# Files the servers keep (outputs) go to a directory of the test run's own, removed at the end.
DATA_DIR = tempfile.mkdtemp(prefix="mcp-codeexec-test-data-")


def pytest_sessionfinish(session: pytest.Session) -> None:
    shutil.rmtree(DATA_DIR, ignore_errors=True)


def server_params(*args: str) -> StdioServerParameters:
    return StdioServerParameters(
        command=sys.executable,
        args=["-m", "mcp_codeexec", "--image", IMAGE, "--tenant", TENANT, "--data-dir", DATA_DIR, *args,
              *os.environ.get("MCP_CODEEXEC_TEST_SERVER_ARGS", "").split()],  # e.g. a debugging runtime
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


@asynccontextmanager
async def connect(*args: str, errlog: TextIO | None = None) -> AsyncIterator[Session]:
    """A stdio client of a new server process; its stderr (logs) to `errlog` if given."""
    params = server_params(*args)
    async with Client(stdio_client(params, errlog=errlog) if errlog else params) as client:
        yield Session(client)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def http_server(*args: str, env: dict[str, str] | None = None, log: Path | None = None) -> Iterator[str]:
    """A server process on Streamable HTTP/SSE on loopback; yields its base URL once it
    answers /healthz (200, or 503 when it has no engine). Its stderr goes to `log`."""
    port = free_port()
    stderr = open(log, "w") if log else None  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "mcp_codeexec", "--transport", "http", "--port", str(port), "--image", IMAGE,
         "--tenant", TENANT, "--data-dir", DATA_DIR, *args],
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        stderr=stderr,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{base}/healthz", proc, lambda: "server exited", ok=(200, 503), timeout=15)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        if stderr:
            stderr.close()


def wait_for_http(url: str, proc: subprocess.Popen[Any], why: Callable[[], str], ok: tuple[int, ...] = (200,),
                  timeout: float = 2, tries: int = 150) -> bool:
    """Whether `url` answered with a status in `ok` within `tries`; fails with why() if `proc`
    exits first."""
    for _ in range(tries):
        try:
            if httpx2.get(url, timeout=timeout).status_code in ok:
                return True
        except httpx2.HTTPError:
            pass
        assert proc.poll() is None, why()
        time.sleep(0.2)
    return False


# One server for most tests: short time limit and small memory so the hostile cases are quick.
DEFAULT_ARGS = ("--timeout", "5", "--memory", "1g", "--max-output", "20000", "--pids", "512")


@pytest.fixture(scope="module")
async def sandbox(engine: docker.APIClient) -> AsyncIterator[Session]:
    async with connect(*DEFAULT_ARGS) as session:
        yield session


async def _python(self: Session, code: str, **kwargs: Any) -> dict[str, Any]:
    return await self.call("code_execution", {"code": code}, **kwargs)


Session.python = _python  # type: ignore[attr-defined]


def wait_for(path: str, seconds: int = 8) -> str:
    """A shell condition: true once `path` exists (in the sandbox), false after `seconds`."""
    return f"for i in $(seq {seconds * 10}); do [ -e {path} ] && break; sleep 0.1; done; [ -e {path} ]"


async def both(*calls: tuple[Session, str]) -> list[dict[str, Any]]:
    """Run bash calls (session, command) at once; their results, in order."""
    results: list[dict[str, Any]] = [{}] * len(calls)

    async def run(i: int, session: Session, command: str) -> None:
        results[i] = await session.bash(command)

    async with anyio.create_task_group() as tg:
        for i, (session, command) in enumerate(calls):
            tg.start_soon(run, i, session, command)
    return results
