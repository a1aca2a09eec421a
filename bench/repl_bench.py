#!/usr/bin/env python3
"""Per-cell latency of the persistent Python REPL vs a fresh interpreter per call.

Drives the real agent in a real gVisor sandbox directly (no MCP layer), so the rows differ
only in what runs inside the sandbox. Usage: .venv/bin/python bench/repl_bench.py [--calls 200]

Rows:
- repl cell `x = 1`: a Repl request on the warm persistent interpreter;
- fresh `python3 -c 'x = 1'`: an Exec request, one new interpreter per call (the 20250522 way);
- exec `true`: an Exec request of `bash -c true` (the floor for any Exec);
- first cell: interpreter start + the cell, after a ReplReset.
Round trip is measured at the client; "agent" is the agent's own duration for the request.
"""

from __future__ import annotations

import argparse
import secrets
import time
from collections.abc import Callable

import anyio

from mcp_codeexec.agent import client as c
from mcp_codeexec.agent import protocol as p
from mcp_codeexec.deployment.base import SandboxSpec
from mcp_codeexec.deployment.docker import DockerDeployment

WORKDIR = "/workspace"


def pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))] * 1000


async def measure(
    agent: c.AgentClient, make: Callable[[], p.Request], calls: int, reset_first: bool = False
) -> tuple[list[float], list[float]]:
    trips, durations = [], []
    for _ in range(calls):
        if reset_first:
            await agent.request(p.ReplReset())
        started = time.perf_counter()
        reply = await agent.request(make())
        trips.append(time.perf_counter() - started)
        assert isinstance(reply, p.ExecResult) and reply.return_code == 0, reply
        durations.append(reply.duration)
    return trips, durations


async def main(calls: int, image: str) -> None:
    deployment = DockerDeployment()
    await deployment.check(image)
    name = f"mcp-codeexec-bench-repl-{secrets.token_hex(4)}"
    await deployment.create(
        SandboxSpec(
            name=name, volume=name, image=image, runtime="runsc", memory_bytes=1 << 30, cpus=1,
            pids_limit=256, workdir=WORKDIR, tmp_bytes=64 << 20,
            env={"HOME": "/home/sandbox", "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1"},
        )
    )  # fmt: skip
    try:
        await deployment.start(name)
        stream = await deployment.open_agent(name, c.agent_argv(), {"MCP_CODEEXEC_ROOT": WORKDIR})
        agent = c.AgentClient(stream)
        async with anyio.create_task_group() as tg:
            tg.start_soon(agent.serve)
            await agent.start()
            await agent.request(p.Ping())

            def repl() -> p.Request:
                return p.Repl(code="x = 1", timeout=30, max_output=10000)

            def fresh() -> p.Request:
                return p.Exec(command="python3 -c 'x = 1'", cwd=WORKDIR, timeout=30, max_output=10000)

            def true() -> p.Request:
                return p.Exec(command="true", cwd=WORKDIR, timeout=30, max_output=10000)

            await measure(agent, repl, 5)  # warm up: start the interpreter, fill caches
            await measure(agent, fresh, 5)
            rows = [
                ("repl cell `x = 1`", await measure(agent, repl, calls)),
                ("fresh `python3 -c 'x = 1'`", await measure(agent, fresh, calls)),
                ("exec `true` (floor)", await measure(agent, true, calls)),
                ("first cell (start + cell)", await measure(agent, repl, max(5, calls // 10), reset_first=True)),
            ]
            await agent.aclose()
            tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await deployment.remove(name)
    base = pct(rows[0][1][0], 0.5)
    print(f"{'request':32} {'n':>5} {'p50 ms':>8} {'p99 ms':>8} {'agent p50':>10} {'x repl p50':>11}")
    for label, (trips, durations) in rows:
        p50 = pct(trips, 0.5)
        p99, agent_p50 = pct(trips, 0.99), pct(durations, 0.5)
        print(f"{label:32} {len(trips):>5} {p50:>8.2f} {p99:>8.2f} {agent_p50:>10.2f} {p50 / base:>11.1f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--image", default="mcp-codeexec-sandbox:latest")
    args = parser.parse_args()
    anyio.run(main, args.calls, args.image)
