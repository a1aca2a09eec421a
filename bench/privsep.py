#!/usr/bin/env python3
"""What privilege separation costs per call (docs/security.md), against floors measured in
the same run, in the same sandbox.

The agent runs as root and starts every command as uid 1000. CPython 3.11 starts a child
that changes its uid with fork() instead of vfork(), and under gVisor's ptrace platform a
fork costs a whole new address space: that difference is the price. File operations switch
one thread's credentials (four system calls); REPL cells start nothing.

Usage: .venv/bin/python bench/privsep.py [--calls 100]

Rows (p50 and p99 in ms, and p50 against the floor):
- floor: `bash -c true` spawned by a uid-1000 Python inside the sandbox (vfork);
- spawn as root, no identity change (vfork): what an agent sharing the user's uid paid;
- spawn as root becoming uid 1000 (fork + setuid): what the agent pays now;
- bash_code_execution `true`, text_editor_code_execution view, and a code_execution cell
  (profile 20260120), each warm, end to end through the `mcp` SDK's client over stdio.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import anyio
from mcp.client import Client
from mcp.client.stdio import StdioServerParameters

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import pct, timed  # noqa: E402  (bench/bench.py: the same percentiles and timer)

SPAWNS = r"""
import json, subprocess, sys, time
n = int(sys.argv[1])
def timed(**kw):
    out = []
    for _ in range(n):
        t = time.perf_counter()
        subprocess.run(["bash", "-c", "true"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)
        out.append(time.perf_counter() - t)
    return out
rows = {"plain": timed()}
if len(sys.argv) > 2:
    rows["switch"] = timed(user=1000, group=1000, extra_groups=[])
print(json.dumps(rows))
"""


def in_sandbox(container: str, calls: int, as_root: bool) -> dict[str, list[float]]:
    """SPAWNS run inside the sandbox by `docker exec` (as root, or as the sandbox user)."""
    user = "0:0" if as_root else "1000:1000"
    argv = ["docker", "exec", "-u", user, container, "python3", "-c", SPAWNS, str(calls)] + (["switch"] if as_root else [])
    return json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)


async def main(args: argparse.Namespace) -> None:
    server = StdioServerParameters(
        command=sys.executable,
        args=["-m", "mcp_codeexec", "--image", args.image, "--tenant", "bench-privsep", "--log-level", "WARNING",
              "--profile", "20260120"],
    )
    rows: list[tuple[str, list[float]]] = []
    async with Client(server) as client:

        async def call(tool: str, arguments: dict) -> dict:
            result = await client.call_tool(tool, arguments)
            assert not result.is_error, result.structured_content
            return result

        first = await call("bash_code_execution", {"command": "true"})
        name = f"mcp-codeexec.bench-privsep.{first.meta['container']['id']}"
        await call("text_editor_code_execution", {"command": "create", "path": "bench.txt", "file_text": "x\n" * 100})
        await call("code_execution", {"code": "x = 1"})
        floor = in_sandbox(name, args.calls, as_root=False)["plain"]
        bash = await timed(lambda: call("bash_code_execution", {"command": "true"}), args.calls)
        view = await timed(lambda: call("text_editor_code_execution", {"command": "view", "path": "bench.txt"}), args.calls)
        cell = await timed(lambda: call("code_execution", {"code": "x += 1"}), args.calls)
        root = await anyio.to_thread.run_sync(in_sandbox, name, args.calls, True)
        floor += in_sandbox(name, args.calls, as_root=False)["plain"]  # before and after: the machine drifts
    rows += [
        ("floor: bash -c true spawned by uid 1000 in the sandbox", floor),
        ("spawn as root, no identity change (vfork)", root["plain"]),
        ("spawn as root becoming uid 1000 (fork+setuid)", root["switch"]),
        ("bash_code_execution `true` via MCP (warm)", bash),
        ("text_editor_code_execution view via MCP (warm)", view),
        ("code_execution cell via MCP (warm, 20260120)", cell),
    ]
    from mcp_codeexec.deployment.base import remove_all
    from mcp_codeexec.deployment.docker import DockerDeployment

    await remove_all(DockerDeployment(), "mcp-codeexec.bench-privsep.")
    base = pct(floor, 0.5)
    print(f"\n{'path':56} {'n':>5} {'p50 ms':>9} {'p99 ms':>9} {'p50/floor':>10}")
    print("-" * 93)
    for label, samples in rows:
        print(f"{label:56} {len(samples):5d} {pct(samples, 0.5):9.2f} {pct(samples, 0.99):9.2f} {pct(samples, 0.5) / base:9.2f}x")
    print(f"\nprivilege separation per command: {pct(root['switch'], 0.5) - pct(root['plain'], 0.5):+.2f} ms "
          "(fork+setuid against vfork, p50); editor and REPL calls start no process")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=100)
    ap.add_argument("--image", default="mcp-codeexec-sandbox:latest")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
    anyio.run(main, ap.parse_args())
