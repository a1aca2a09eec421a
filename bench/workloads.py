#!/usr/bin/env python3
"""Typical agent workloads through mcp-codeexec against the same work done directly inside
a bare runsc container and a bare runc container of the same image, in the same run.

Runs the real server over stdio with the `mcp` SDK's client (profile 20260120, so the REPL
row has its persistent interpreter), real Docker and gVisor. The two bare containers get
the sandbox's own core (--cpuset-cpus, as the server pins it) and a volume as their
working directory, as the sandbox's workspace is one. Floors are timed by Python inside
the container around `bash -c COMMAND` run as uid 1000, as the agent runs it. Rows run in
rounds, each round every path in turn, so the machine's drift hits all of them alike.

Usage: .venv/bin/python bench/workloads.py [--rounds 3] [--scale 1.0]

Columns: p50 (ms) via MCP, in bare runsc, in bare runc; MCP / runsc (what the product adds,
targets: tiny commands <= 1.25x, python3 -c pass <= 1.15x, heavy rows <= 1.05x) and
runsc / runc (the isolation tax gVisor takes on this host). Editor and REPL rows have no
floor: their targets are absolute (editor view p50 < 5 ms).
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import subprocess
import sys
import time
from pathlib import Path

import anyio
from mcp.client import Client
from mcp.client.stdio import StdioServerParameters

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from mcp_codeexec.deployment.base import remove_all  # noqa: E402
from mcp_codeexec.deployment.docker import DockerDeployment  # noqa: E402

GROUPBY = (
    "import numpy as np, pandas as pd; n = 1_000_000; "
    "df = pd.DataFrame({'k': np.arange(n) % 1000, 'v': np.arange(n, dtype=float)}); "
    "df.groupby('k')['v'].agg(['sum', 'mean']).to_csv('/dev/null')"
)
FILES = "python3 -c \"import os; os.makedirs('many', exist_ok=True); [open(f'many/f{i}', 'w').write('x') for i in range(500)]\"; rm -r many"
# (label, command, calls per round, kind): tiny, python or heavy (its target).
COMMANDS = [
    ("true", "true", 30, "tiny"),
    ("echo hello | tr a-z A-Z | wc -c", "echo hello | tr a-z A-Z | wc -c", 30, "tiny"),
    ("python3 -c pass", "python3 -c pass", 15, "python"),
    ("python3 -c 'import pandas'", "python3 -c 'import pandas'", 3, "heavy"),
    ("pandas groupby, 1M rows", f'python3 -c "{GROUPBY}"', 3, "heavy"),
    ("500 small files (python, then rm)", FILES, 3, "heavy"),
]
TARGETS = {"tiny": 1.25, "python": 1.15, "heavy": 1.05}
TIMER = r"""
import json, subprocess, sys, time
command, n = sys.argv[1], int(sys.argv[2])
samples = []
for _ in range(n):
    t = time.perf_counter()
    subprocess.run(["bash", "-c", command], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=True)
    samples.append(time.perf_counter() - t)
print(json.dumps(samples))
"""


def docker(*argv: str) -> str:
    return subprocess.run(["docker", *argv], capture_output=True, text=True, check=True).stdout.strip()


class Bare:
    """A bare container of the image (runtime runsc or runc), idle until commands are timed in it."""

    def __init__(self, image: str, runtime: str, cpuset: str, tag: str) -> None:
        self.name = f"mcp-codeexec-bench-{runtime}-{tag}"
        self.volume = docker("volume", "create", self.name)
        cpus = ["--cpuset-cpus", cpuset] if cpuset else []
        docker("run", "-d", "--rm", "--name", self.name, f"--runtime={runtime}", "--network=none", *cpus,
               "-v", f"{self.volume}:/work", "-w", "/work", "-u", "0", image, "sleep", "infinity")
        docker("exec", self.name, "chown", "1000:1000", "/work")

    def time(self, command: str, n: int) -> list[float]:
        return json.loads(docker("exec", "-u", "1000", "-w", "/work", self.name, "python3", "-c", TIMER, command, str(n)))

    def remove(self) -> None:
        subprocess.run(["docker", "rm", "-f", self.name], capture_output=True)
        subprocess.run(["docker", "volume", "rm", "-f", self.volume], capture_output=True)


def p50(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


async def main(args: argparse.Namespace) -> None:
    tag = secrets.token_hex(3)
    tenant = f"bench-{tag}"
    server = StdioServerParameters(
        command=sys.executable,
        args=["-m", "mcp_codeexec", "--image", args.image, "--tenant", tenant, "--profile", "20260120", "--log-level", "WARNING"],
    )
    mcp: dict[str, list[float]] = {}
    floors: dict[str, dict[str, list[float]]] = {"runsc": {}, "runc": {}}
    bare: list[Bare] = []
    try:
        async with Client(server) as client:

            async def call(tool: str, arguments: dict) -> float:
                t = time.perf_counter()
                result = await client.call_tool(tool, arguments)
                elapsed = time.perf_counter() - t
                content = result.structured_content or {}
                assert not result.is_error and content.get("return_code", 0) == 0, content
                return elapsed

            first = await client.call_tool("bash_code_execution", {"command": "true"})
            name = f"mcp-codeexec.{tenant}.{first.meta['container']['id']}"
            cpuset = docker("inspect", "-f", "{{.HostConfig.CpusetCpus}}", name)
            bare = [Bare(args.image, runtime, cpuset, tag) for runtime in ("runsc", "runc")]
            await call("text_editor_code_execution", {"command": "create", "path": "bench.txt", "file_text": "x\n" * 100})
            await call("code_execution", {"code": "x = 0"})
            for label, command, n, _ in COMMANDS:  # warm every path once (page cache, pyc)
                await call("bash_code_execution", {"command": command})
                for b in bare:
                    b.time(command, 1)
            for _ in range(args.rounds):
                for label, command, n, _ in COMMANDS:
                    n = max(1, round(n * args.scale))
                    mcp.setdefault(label, []).extend([await call("bash_code_execution", {"command": command}) for _ in range(n)])
                    for b, runtime in zip(bare, ("runsc", "runc")):
                        floors[runtime].setdefault(label, []).extend(await anyio.to_thread.run_sync(b.time, command, n))
                n = max(1, round(30 * args.scale))
                view = {"command": "view", "path": "bench.txt"}
                mcp.setdefault("editor view", []).extend([await call("text_editor_code_execution", view) for _ in range(n)])
                for i in range(n):
                    create = {"command": "create", "path": f"created{i % 5}.txt", "file_text": "y\n" * 50}
                    mcp.setdefault("editor create", []).append(await call("text_editor_code_execution", create))
                mcp.setdefault("REPL cell (x += 1)", []).extend([await call("code_execution", {"code": "x += 1"}) for _ in range(n)])
    finally:
        for b in bare:
            b.remove()
        with anyio.CancelScope(shield=True):
            await remove_all(DockerDeployment(), f"mcp-codeexec.{tenant}.")

    print(f"\n{'workload':40} {'n':>4} {'MCP ms':>9} {'runsc ms':>9} {'runc ms':>9} {'MCP/runsc':>10} {'target':>7} {'runsc/runc':>11}")
    print("-" * 106)
    for label, samples in mcp.items():
        kind = next((k for lab, _, _, k in COMMANDS if lab == label), None)
        if kind is None:
            print(f"{label:40} {len(samples):4d} {p50(samples):9.2f} {'-':>9} {'-':>9} {'-':>10} {'-':>7} {'-':>11}")
            continue
        gv, rc = p50(floors["runsc"][label]), p50(floors["runc"][label])
        ratio = p50(samples) / gv
        mark = "ok" if ratio <= TARGETS[kind] else "MISS"
        print(f"{label:40} {len(samples):4d} {p50(samples):9.2f} {gv:9.2f} {rc:9.2f} {ratio:9.2f}x {TARGETS[kind]:5.2f}{mark:>3} {gv / rc:10.2f}x")
    print(f"\nfloors: `bash -c COMMAND` spawned by Python as uid 1000 in bare containers on the sandbox's core(s); "
          f"{args.rounds} rounds; p50 over all rounds. Editor view target: p50 < 5 ms.")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply the calls per round")
    ap.add_argument("--image", default="mcp-codeexec-sandbox:latest")
    anyio.run(main, ap.parse_args())
