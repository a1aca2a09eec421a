#!/usr/bin/env python3
"""Per-call latency of mcp-codeexec, against floors measured in the same run.

Runs the real server over stdio with the `mcp` SDK's client, real Docker and gVisor, and
prints a table. Usage: .venv/bin/python bench/bench.py [--calls 200] [--sessions 5]

Rows:
- floor: `bash -c true` spawned by Python inside the sandbox (what any design must pay),
  measured before and after the MCP rows (the machine drifts);
- MCP round trip, no sandbox: a call the server answers itself (`invalid_tool_input`):
  client, JSON-RPC over stdio, server, and back;
- agent ping: the engine's exec stream to the in-sandbox agent and back (a second agent
  opened into the same sandbox, as a second server would);
- bash via MCP: a warm `bash_code_execution` of `true`, end to end through the client;
- editor view via MCP: `text_editor_code_execution` view of a small file;
- docker exec per call: the alternative design (one engine exec per call), same command;
- first call of a new session: from sending the call to its result, on a connected client
  whose server has started nothing yet (`--no-prepare`): container creation and start;
- the same with a warm pool (`--pool 1`): the call is sent once the pool container is
  running with its agent attached, and the result must come from that container.
Idle sandbox memory: PSS of the host processes of one sandbox (gVisor's sentry and gofer,
not containerd's shim), while it runs idle and after its server stopped it.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import time
from pathlib import Path

import anyio
import docker
from mcp.client import Client
from mcp.client.stdio import StdioServerParameters

from mcp_codeexec.agent import client as agent_client
from mcp_codeexec.agent import protocol as p
from mcp_codeexec.config import Settings
from mcp_codeexec.deployment.base import remove_all
from mcp_codeexec.deployment.docker import DockerDeployment

FLOOR_SCRIPT = """
import json, subprocess, time
samples = []
for _ in range({n}):
    t = time.perf_counter()
    subprocess.run(["bash", "-c", "true"])
    samples.append(time.perf_counter() - t)
print(json.dumps(samples))
"""
POOL_PREFIX = "mcp-codeexec-pool."
OWNER_LABEL = "org.mcp-codeexec.pool-owner"


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def params(image: str, tenant: str, *flags: str) -> StdioServerParameters:
    return StdioServerParameters(
        command=sys.executable,
        args=["-m", "mcp_codeexec", "--image", image, "--tenant", tenant, "--log-level", "WARNING", *flags],
    )


def cmdline(pid: str) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def sandbox_memory_kib(full_id: str) -> int:
    """PSS of the host processes that make up one gVisor sandbox (sentry, gofer): those
    whose command line names the container, containerd's shim left out."""
    total = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        line = cmdline(pid)
        if full_id.encode() not in line or b"containerd-shim" in line:
            continue
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                total += next(int(row.split()[1]) for row in f if row.startswith("Pss:"))
        except (OSError, StopIteration):
            continue
    return total


def server_pid(tenant: str) -> int:
    """The pid of the server process started with this (unique) tenant."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        args = cmdline(pid).split(b"\0")
        if b"mcp_codeexec" in args and tenant.encode() in args:
            return int(pid)
    raise RuntimeError(f"no server process with tenant {tenant}")


async def timed(fn, n: int) -> list[float]:
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        await fn()
        samples.append(time.perf_counter() - t)
    return samples


async def agent_pings(name: str, n: int) -> list[float]:
    """Round trips of a Ping over a second connection to the agent of the running sandbox
    `name` (with the server's own config, so the agent is not asked to reload)."""
    defaults = Settings()
    config = {"root": defaults.workdir, "rlimit_as": defaults.rlimit_as}
    async with anyio.create_task_group() as tg:
        agent = await agent_client.connect_agent(DockerDeployment(), name, tg, config)
        samples = await timed(lambda: agent.request(p.Ping()), n)
        await agent.aclose()
        tg.cancel_scope.cancel()
    return samples


async def wait_for_pool_container(api: docker.APIClient, owner_pid: int, timeout: float = 120) -> str:
    """The id of the server's pool container once it runs with its agent attached."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for c in api.containers(filters={"name": POOL_PREFIX}):
            owner = (c.get("Labels") or {}).get(OWNER_LABEL, "")
            if owner.split(":")[0] == str(owner_pid) and c["State"] == "running":
                execs = api.inspect_container(c["Id"]).get("ExecIDs") or []
                if any(api.exec_inspect(e).get("Running") for e in execs):
                    return c["Names"][0].lstrip("/")[len(POOL_PREFIX) :]
        await anyio.sleep(0.2)
    raise TimeoutError("the warm pool never got a ready container")


async def main(args: argparse.Namespace, tenant: str) -> None:
    rows: list[tuple[str, list[float]]] = []
    api = docker.APIClient(version="auto")
    async with Client(params(args.image, tenant)) as client:

        async def call(tool: str, arguments: dict) -> dict:
            result = await client.call_tool(tool, arguments)
            assert not result.is_error, result.structured_content
            return result.structured_content

        async def refused() -> None:
            result = await client.call_tool("bash_code_execution", {})
            assert result.structured_content["error_code"] == "invalid_tool_input", result

        await call("bash_code_execution", {"command": "true"})  # start the sandbox
        await call("text_editor_code_execution", {"command": "create", "path": "bench.txt", "file_text": "x\n" * 100})
        floor_out = await call("bash_code_execution", {"command": f"python3 -c '{FLOOR_SCRIPT.format(n=args.calls)}'"})
        container = (await client.call_tool("bash_code_execution", {"command": "true"})).meta["container"]["id"]
        name = f"mcp-codeexec.{tenant}.{container}"
        full_id = api.inspect_container(name)["Id"]
        no_sandbox = await timed(refused, args.calls)
        pings = await agent_pings(name, args.calls)
        bash = await timed(lambda: call("bash_code_execution", {"command": "true"}), args.calls)
        view = await timed(lambda: call("text_editor_code_execution", {"command": "view", "path": "bench.txt"}), args.calls)
        floor2 = await call("bash_code_execution", {"command": f"python3 -c '{FLOOR_SCRIPT.format(n=args.calls)}'"})
        floor = json.loads(floor_out["stdout"]) + json.loads(floor2["stdout"])
        rows.append(("floor: bash -c true spawned inside the sandbox", floor))
        rows.append(("MCP round trip, no sandbox (invalid_tool_input)", no_sandbox))
        rows.append(("agent ping over the engine's exec stream", pings))
        rows.append(("bash_code_execution `true` via MCP (warm)", bash))
        rows.append(("text_editor_code_execution view via MCP (warm)", view))

        def docker_exec() -> list[float]:
            samples = []
            for _ in range(min(args.calls, 50)):
                t = time.perf_counter()
                api.exec_start(api.exec_create(name, ["bash", "-c", "true"])["Id"])
                samples.append(time.perf_counter() - t)
            return samples

        rows.append(("alternative: one docker exec per call (SDK)", await anyio.to_thread.run_sync(docker_exec)))
        await anyio.sleep(1)
        idle_running_kib = sandbox_memory_kib(full_id)
    # Its server has exited and stopped it (files kept): what does it cost now?
    for _ in range(100):
        if not api.inspect_container(name)["State"]["Running"]:
            break
        await anyio.sleep(0.1)
    assert not api.inspect_container(name)["State"]["Running"], "the server did not stop its container"
    stopped_kib = sandbox_memory_kib(full_id)

    async def first_call(*flags: str, grace: float | None = None) -> float | None:
        """A new session's first call, from sending it to its result. With a grace time,
        the server has a warm pool: the call is sent that long after the pool container
        runs with its agent attached (the agent still has to start and answer a ping
        before the server hands the container out), and must get that container; None if
        it did not (the sample is not a warm-pool sample)."""
        async with Client(params(args.image, tenant, "--no-prepare", *flags)) as client:
            pooled = None
            if grace is not None:
                pooled = await wait_for_pool_container(api, server_pid(tenant))
                await anyio.sleep(grace)
            t = time.perf_counter()
            result = await client.call_tool("bash_code_execution", {"command": "true"})
            elapsed = time.perf_counter() - t
            assert not result.is_error, result.structured_content
            if pooled is not None and result.meta["container"]["id"] != pooled:
                return None
            return elapsed

    async def pooled_call() -> float:
        for grace in (1.0, 3.0, 10.0):
            sample = await first_call("--pool", "1", grace=grace)
            if sample is not None:
                return sample
            missed.append(grace)
        raise RuntimeError("the first call never got the warm pool's container")

    missed: list[float] = []
    cold = [await first_call() for _ in range(args.sessions)]
    pooled = [await pooled_call() for _ in range(args.sessions)]
    rows.append(("first call, new session, no pool (create + start)", cold))
    rows.append(("first call, new session, warm pool (--pool 1)", pooled))

    floor_p50 = pct(floor, 0.5)
    print(f"\n{'path':58} {'n':>5} {'p50 ms':>9} {'p99 ms':>9} {'p50/floor':>10}")
    print("-" * 95)
    for label, samples in rows:
        print(f"{label:58} {len(samples):5d} {pct(samples, 0.5):9.2f} {pct(samples, 0.99):9.2f} {pct(samples, 0.5) / floor_p50:9.2f}x")
    print(f"\nfloor p50 {floor_p50:.2f} ms; targets: warm bash <= 1.25x floor, editor view < 5 ms")
    print(f"warm pool: {len(missed)} session(s) sent their call before the pool container was ready and were "
          "measured again" if missed else "warm pool: every measured call got the pool's container")
    print(f"idle sandbox memory (PSS of its gVisor processes, shim excluded): running {idle_running_kib / 1024:.1f} MiB; "
          f"stopped {stopped_kib / 1024:.1f} MiB")


async def run(args: argparse.Namespace) -> None:
    tenant = f"bench-{secrets.token_hex(3)}"  # this run's containers, and no other's
    try:
        await main(args, tenant)
    finally:  # also when a row fails: leave no sandbox behind
        with anyio.CancelScope(shield=True):
            await remove_all(DockerDeployment(), f"mcp-codeexec.{tenant}.")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--sessions", type=int, default=5)
    ap.add_argument("--image", default="mcp-codeexec-sandbox:latest")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
    anyio.run(run, ap.parse_args())
