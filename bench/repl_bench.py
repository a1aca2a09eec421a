#!/usr/bin/env python3
"""`code_execution` latency per profile, through MCP: the persistent interpreter of
`--profile 20260120` against a fresh interpreter per call.

Runs the real server over stdio with the `mcp` SDK's client, real Docker and gVisor.
Usage: .venv/bin/python bench/repl_bench.py [--calls 200] [--sessions 5]

Rows (all end to end through the client):
- `--profile 20260120`, `code_execution` `x = 1`: a cell on the warm persistent interpreter;
- `--profile 20250522`, `code_execution` `x = 1`: the legacy profile, a fresh interpreter
  per call;
- `bash_code_execution` `python3 -c 'x = 1'`: a fresh interpreter through bash;
- `bash_code_execution` `true`: the cost of any call that spawns a process;
- first cell of a session (`--profile 20260120`): the interpreter's start plus the cell,
  on a sandbox already running (a bash call first).
"""

from __future__ import annotations

import argparse
import secrets
import sys
import time

import anyio
from mcp.client import Client
from mcp.client.stdio import StdioServerParameters

from mcp_codeexec.deployment.base import remove_all
from mcp_codeexec.deployment.docker import DockerDeployment


def pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))] * 1000


def params(image: str, tenant: str, profile: str) -> StdioServerParameters:
    return StdioServerParameters(
        command=sys.executable,
        args=["-m", "mcp_codeexec", "--image", image, "--tenant", tenant, "--profile", profile, "--log-level", "WARNING"],
    )


async def timed_calls(client: Client, tool: str, arguments: dict, n: int) -> list[float]:
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        result = await client.call_tool(tool, arguments)
        samples.append(time.perf_counter() - t)
        assert not result.is_error and result.structured_content["return_code"] == 0, result.structured_content
    return samples


async def main(args: argparse.Namespace) -> None:
    tenant = f"bench-repl-{secrets.token_hex(3)}"
    cell = {"code": "x = 1"}
    rows: list[tuple[str, list[float]]] = []
    try:
        async with Client(params(args.image, tenant, "20260120")) as client:
            await timed_calls(client, "code_execution", cell, 5)  # start the sandbox and the interpreter
            await timed_calls(client, "bash_code_execution", {"command": "python3 -c 'x = 1'"}, 5)
            rows.append(("--profile 20260120: code_execution `x = 1`", await timed_calls(client, "code_execution", cell, args.calls)))
            bash_python = await timed_calls(client, "bash_code_execution", {"command": "python3 -c 'x = 1'"}, args.calls)
            bash_true = await timed_calls(client, "bash_code_execution", {"command": "true"}, args.calls)
        async with Client(params(args.image, tenant, "20250522")) as client:
            await timed_calls(client, "code_execution", cell, 5)
            rows.append(("--profile 20250522: code_execution `x = 1`", await timed_calls(client, "code_execution", cell, args.calls)))
        rows.append(("bash_code_execution `python3 -c 'x = 1'`", bash_python))
        rows.append(("bash_code_execution `true`", bash_true))
        first = []
        for _ in range(args.sessions):
            async with Client(params(args.image, tenant, "20260120")) as client:
                await timed_calls(client, "bash_code_execution", {"command": "true"}, 1)  # the sandbox is up
                first += await timed_calls(client, "code_execution", cell, 1)
        rows.append(("first cell of a session (interpreter start + cell)", first))
    finally:
        with anyio.CancelScope(shield=True):
            await remove_all(DockerDeployment(), f"mcp-codeexec.{tenant}.")
    base = pct(rows[0][1], 0.5)
    print(f"{'call, through MCP':52} {'n':>5} {'p50 ms':>8} {'p99 ms':>8} {'x repl p50':>11}")
    for label, samples in rows:
        p50 = pct(samples, 0.5)
        print(f"{label:52} {len(samples):>5} {p50:>8.2f} {pct(samples, 0.99):>8.2f} {p50 / base:>11.1f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--sessions", type=int, default=5)
    parser.add_argument("--image", default="mcp-codeexec-sandbox:latest")
    anyio.run(main, parser.parse_args())
