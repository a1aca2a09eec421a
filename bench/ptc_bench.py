#!/usr/bin/env python3
"""Programmatic tool calling: what a tool call costs from code in the sandbox, against a
direct `mcp` client call of the same upstream tool, in the same run; a 100-call loop; and
the length of what returns to the model when code filters 100 results down to one line.

Runs the real server (`--profile 20260120`) over stdio with real Docker and gVisor, and the
real upstreams scripts/setup.sh installs: server-everything over Streamable HTTP on
loopback (`echo`), server-memory over stdio (`search_nodes`).
Usage: .venv/bin/python bench/ptc_bench.py [--calls 200] [--image IMAGE]

Rows, per upstream (the floor is the direct client call, from this process):
- direct: `Client.call_tool` of the upstream, one call at a time;
- in the sandbox, per call: timed inside a REPL cell (`await server.tool(...)`), so it is
  the path sandbox -> agent -> server -> upstream and back, without the cell's own round trip;
- the same from a script's synchronous form;
- a cell making 100 calls in a loop and printing one line: time of the whole tool call
  through MCP.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio
from mcp.client import Client
from mcp.client.stdio import StdioServerParameters
from repl_bench import pct

from mcp_codeexec.deployment.base import remove_all
from mcp_codeexec.deployment.docker import DockerDeployment

REPO = Path(__file__).resolve().parent.parent
CITIES = ["New York", "Chicago", "Los Angeles"]


def upstreams() -> Path:
    pointer = REPO / ".cache" / "upstreams"
    if not pointer.exists():
        sys.exit("run scripts/setup.sh first: it installs the upstream MCP servers")
    return Path(pointer.read_text().strip())


def start_everything_http() -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = upstreams() / "npm/node_modules/@modelcontextprotocol/server-everything/dist/index.js"
    proc = subprocess.Popen(["node", "--require", str(REPO / "tests/upstreams/loopback.cjs"), str(script), "streamableHttp"],
                            env={**os.environ, "PORT": str(port)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, f"http://127.0.0.1:{port}/mcp"
        time.sleep(0.1)
    proc.kill()
    sys.exit("server-everything did not start")


def memory_params(path: Path) -> StdioServerParameters:
    script = upstreams() / "npm/node_modules/@modelcontextprotocol/server-memory/dist/index.js"
    return StdioServerParameters(command="node", args=[str(script)], env={"MEMORY_FILE_PATH": str(path)})


async def direct(target: object, tool: str, arguments: dict, n: int) -> list[float]:
    async with Client(target) as client:  # type: ignore[arg-type]
        for _ in range(5):
            await client.call_tool(tool, arguments)
        samples = []
        for _ in range(n):
            t = time.perf_counter()
            result = await client.call_tool(tool, arguments)
            samples.append(time.perf_counter() - t)
            assert not result.is_error
        return samples


def cell_timing(server: str, tool: str, arguments: dict, n: int, awaited: bool) -> str:
    call = f"{'await ' if awaited else ''}{server}.{tool}(**{arguments!r})"
    return (f"import time, json\nfrom mcp_tools import {server}\nfor _ in range(5): {call}\nsamples = []\n"
            f"for _ in range({n}):\n    t = time.perf_counter(); {call}; samples.append(time.perf_counter() - t)\n"
            "print(json.dumps(samples))")


async def main(args: argparse.Namespace) -> None:
    tenant = f"bench-ptc-{secrets.token_hex(3)}"
    work = Path(tempfile.mkdtemp(prefix="ptc-bench-"))
    everything, url = start_everything_http()
    config = work / "tools.json"
    memory = memory_params(work / "memory.jsonl")
    config.write_text(json.dumps({"servers": {
        "everything": {"url": url, "tools": ["echo", "get-structured-content"]},
        "memory": {"command": memory.command, "args": memory.args, "env": memory.env, "tools": "*"},
    }}))
    rows: list[tuple[str, list[float], float]] = []
    try:
        async with Client(memory) as seed:  # a small graph to search
            await seed.call_tool("create_entities", {"entities": [
                {"name": f"entity-{i}", "entityType": "thing", "observations": [f"note {i}"]} for i in range(20)]})
        cases = [("everything", "echo", {"message": "hi"}, url), ("memory", "search_nodes", {"query": "entity-7"}, memory)]
        floors = {}
        for server, tool, arguments, target in cases:
            floors[server] = await direct(target, tool, arguments, args.calls)
        params = StdioServerParameters(command=sys.executable, args=[
            "-m", "mcp_codeexec", "--image", args.image, "--tenant", tenant, "--profile", "20260120",
            "--tools-config", str(config), "--log-level", "WARNING"])
        async with Client(params) as client:

            async def cell(code: str) -> dict:
                result = await client.call_tool("code_execution", {"code": code})
                assert result.structured_content["return_code"] == 0, result.structured_content
                return result.structured_content

            for server, tool, arguments, _ in cases:
                floor = pct(floors[server], 0.5)
                rows.append((f"{server}.{tool}: direct client call (floor)", floors[server], floor))
                for awaited in (True, False):
                    out = await cell(cell_timing(server, tool, arguments, args.calls, awaited))
                    form = "await in a cell" if awaited else "synchronous form"
                    rows.append((f"{server}.{tool}: from the sandbox, {form}", json.loads(out["stdout"]), floor))
            loop = []
            for _ in range(5):
                t = time.perf_counter()
                out = await cell("from mcp_tools import everything\nn = 0\nfor i in range(100):\n"
                                 "    n += len(await everything.echo(message=str(i)))\nprint(n)")
                loop.append(time.perf_counter() - t)
            rows.append(("cell: 100 echo calls in a loop, one line printed (MCP call)", loop,
                         pct(floors["everything"], 0.5) * 100))

            # The README's worked example: 100 upstream results filtered to one line.
            filtered = await client.call_tool("code_execution", {"code": (
                "from mcp_tools import everything\n"
                f"reports = [await everything.get_structured_content(location=c) for c in {CITIES!r} * 34][:100]\n"
                "hot = max(reports, key=lambda r: r['temperature'])\n"
                "print(f\"{len(reports)} reports; hottest {hot['temperature']} C, {hot['conditions']}\")")})
        async with Client(url) as upstream:  # the same 100 results, if the model called the tool itself
            sent_back = []
            for city in (CITIES * 34)[:100]:
                result = await upstream.call_tool("get-structured-content", {"location": city})
                sent_back.append(len(json.dumps(result.model_dump(mode="json", by_alias=True, exclude_none=True))))
    finally:
        everything.terminate()
        with anyio.CancelScope(shield=True):
            await remove_all(DockerDeployment(), f"mcp-codeexec.{tenant}.")
    print(f"{'path (same run)':62} {'n':>5} {'p50 ms':>8} {'p99 ms':>8} {'p50 / floor':>12} {'p50 - floor':>12}")
    for label, samples, floor in rows:
        p50 = pct(samples, 0.5)
        print(f"{label:62} {len(samples):>5} {p50:>8.2f} {pct(samples, 0.99):>8.2f} {p50 / floor:>11.2f}x "
              f"{p50 - floor:>9.2f} ms")
    returned = len(json.dumps(filtered.model_dump(mode="json", by_alias=True, exclude_none=True)))
    print(f"\nworked example: {filtered.structured_content['stdout'].strip()!r}")
    print(f"returned to the model: with code {returned} bytes (~{returned // 4} tokens); "
          f"calling the tool 100 times directly {sum(sent_back)} bytes (~{sum(sent_back) // 4} tokens), "
          f"{sum(sent_back) / returned:.1f}x more (tokens estimated as bytes / 4)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--image", default="mcp-codeexec-sandbox:latest")
    anyio.run(main, parser.parse_args())
