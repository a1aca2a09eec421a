#!/usr/bin/env python3
"""Per-call latency of mcp-codeexec, against floors measured in the same run.

Runs the real server over stdio with the `mcp` SDK's client, real Docker and gVisor, and
prints a table. Usage: .venv/bin/python bench/bench.py [--calls 200] [--sessions 5]

Rows:
- floor: `bash -c true` spawned by Python inside the sandbox (what any design must pay);
- bash via MCP: a warm `bash_code_execution` of `true`, end to end through the client;
- editor view via MCP: `text_editor_code_execution` view of a small file;
- docker exec per call: the alternative design (one engine exec per call), same command;
- first call of a new session: client start to the first result (container creation).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import anyio
import docker
from mcp.client import Client
from mcp.client.stdio import StdioServerParameters

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


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def params(image: str, *flags: str) -> StdioServerParameters:
    return StdioServerParameters(
        command=sys.executable,
        args=["-m", "mcp_codeexec", "--image", image, "--tenant", "bench", "--log-level", "WARNING", *flags],
    )


def sandbox_memory_kib(container_name: str) -> int:
    """PSS of the host processes that make up one gVisor sandbox (sentry, gofer)."""
    full_id = docker.APIClient(version="auto").inspect_container(container_name)["Id"]
    total = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if full_id.encode() not in f.read() or b"containerd-shim" in f.read():
                    continue
            with open(f"/proc/{pid}/smaps_rollup") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
        except (OSError, StopIteration):
            continue
    return total


async def timed(fn, n: int) -> list[float]:
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        await fn()
        samples.append(time.perf_counter() - t)
    return samples


async def main(args: argparse.Namespace) -> None:
    rows: list[tuple[str, list[float]]] = []
    async with Client(params(args.image)) as client:

        async def call(tool: str, arguments: dict) -> dict:
            result = await client.call_tool(tool, arguments)
            assert not result.is_error, result.structured_content
            return result.structured_content

        await call("bash_code_execution", {"command": "true"})  # start the sandbox
        await call("text_editor_code_execution", {"command": "create", "path": "bench.txt", "file_text": "x\n" * 100})
        floor_out = await call("bash_code_execution", {"command": f"python3 -c '{FLOOR_SCRIPT.format(n=args.calls)}'"})
        container = (await client.call_tool("bash_code_execution", {"command": "true"})).meta["container"]["id"]
        bash = await timed(lambda: call("bash_code_execution", {"command": "true"}), args.calls)
        view = await timed(lambda: call("text_editor_code_execution", {"command": "view", "path": "bench.txt"}), args.calls)
        floor2 = await call("bash_code_execution", {"command": f"python3 -c '{FLOOR_SCRIPT.format(n=args.calls)}'"})
        floor = json.loads(floor_out["stdout"]) + json.loads(floor2["stdout"])  # before and after: the machine drifts
        rows.append(("floor: bash -c true spawned inside the sandbox", floor))
        rows.append(("bash_code_execution `true` via MCP (warm)", bash))
        rows.append(("text_editor_code_execution view via MCP (warm)", view))

        api = docker.APIClient(version="auto")
        name = f"mcp-codeexec.bench.{container}"

        def docker_exec() -> list[float]:
            samples = []
            for _ in range(min(args.calls, 50)):
                t = time.perf_counter()
                api.exec_start(api.exec_create(name, ["bash", "-c", "true"])["Id"])
                samples.append(time.perf_counter() - t)
            return samples

        rows.append(("alternative: one docker exec per call (SDK)", await anyio.to_thread.run_sync(docker_exec)))
        await anyio.sleep(1)
        idle_running_kib = sandbox_memory_kib(name)

    async def first_call(*flags: str, warm_up: float = 0.0) -> float:
        """A new session's first call; with warm_up, the server gets that long to prepare."""
        async with Client(params(args.image, *flags)) as client:
            await anyio.sleep(warm_up)
            t = time.perf_counter()
            await client.call_tool("bash_code_execution", {"command": "true"})
            return time.perf_counter() - t

    cold = [await first_call("--no-prepare") for _ in range(args.sessions)]
    pooled = [await first_call("--no-prepare", "--pool", "1", warm_up=3.0) for _ in range(args.sessions)]
    rows.append(("first call, new session, no pool (create + start)", cold))
    rows.append(("first call, new session, warm pool (--pool 1)", pooled))

    floor_p50 = pct(floor, 0.5)
    print(f"\n{'path':58} {'n':>5} {'p50 ms':>9} {'p99 ms':>9} {'p50/floor':>10}")
    print("-" * 95)
    for label, samples in rows:
        print(f"{label:58} {len(samples):5d} {pct(samples, 0.5):9.2f} {pct(samples, 0.99):9.2f} {pct(samples, 0.5) / floor_p50:9.2f}x")
    print(f"\nfloor p50 {floor_p50:.2f} ms; targets: warm bash <= 1.25x floor, editor view < 5 ms")
    print(f"idle sandbox memory (PSS of its gVisor processes): running {idle_running_kib / 1024:.1f} MiB; "
          "stopped 0 MiB (no process; only its workspace volume on disk)")
    await DockerDeployment().remove_all("mcp-codeexec.bench.")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--sessions", type=int, default=5)
    ap.add_argument("--image", default="mcp-codeexec-sandbox:latest")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
    anyio.run(main, ap.parse_args())
