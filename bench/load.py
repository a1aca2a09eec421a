#!/usr/bin/env python3
"""Sustained load over Streamable HTTP: N concurrent clients (each its own tenant, so each
its own sandbox) call `bash_code_execution` `true` for a bounded time against a real server
on loopback. Prints throughput, latency p50/p99, errors, and the server's memory before and
after. Only calls sent and answered inside one common window count; the window opens
once every client's sandbox is up. Usage: .venv/bin/python bench/load.py [--clients 8] [--seconds 20]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import anyio
import httpx2
from mcp.client import Client
from mcp.client.streamable_http import streamable_http_client

from mcp_codeexec.deployment.base import remove_all
from mcp_codeexec.deployment.docker import DockerDeployment


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else float("nan")


async def main(args: argparse.Namespace) -> None:
    tokens = {f"load{i}": f"load-token-{i}-{os.urandom(8).hex()}" for i in range(args.clients)}
    tokens_file = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
    json.dump({"tenants": {t: {"token_sha256": hashlib.sha256(v.encode()).hexdigest()} for t, v in tokens.items()}}, tokens_file)
    tokens_file.close()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data_dir = tempfile.mkdtemp(prefix="mcp-codeexec-load-")
    server = subprocess.Popen(
        [sys.executable, "-m", "mcp_codeexec", "--transport", "http", "--port", str(port), "--tokens", tokens_file.name,
         "--image", args.image, "--data-dir", data_dir, "--memory", "1g", "--log-level", "WARNING"],
    )
    base = f"http://127.0.0.1:{port}"
    latencies: list[float] = []
    errors = 0
    try:
        for _ in range(150):
            try:
                if httpx2.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx2.HTTPError:
                time.sleep(0.2)
        rss_before = rss_mib(server.pid)

        # Every client first starts its sandbox (the ramp: up to --ramp seconds), then all
        # measure over one common window: only calls sent and answered inside it count.
        ready = 0
        all_ready = anyio.Event()
        window: list[float] = []  # [start, end], set when every client is ready

        async def client(tenant: str, token: str) -> None:
            nonlocal errors, ready, outside
            http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=60)
            async with Client(streamable_http_client(f"{base}/mcp", http_client=http)) as c:
                first = await c.call_tool("bash_code_execution", {"command": "true"})  # its sandbox starts
                assert not first.is_error, first.structured_content
                ready += 1
                if ready == args.clients:
                    now = time.monotonic()
                    window.extend([now, now + args.seconds])
                    all_ready.set()
                with anyio.fail_after(args.ramp):
                    await all_ready.wait()
                start, end = window
                while True:
                    t0 = time.monotonic()
                    if t0 >= end:
                        break
                    result = await c.call_tool("bash_code_execution", {"command": "true"})
                    t1 = time.monotonic()
                    if t1 > end:  # answered after the window closed: not counted
                        outside += 1
                        break
                    latencies.append(t1 - t0)
                    errors += bool(result.is_error)

        outside = 0
        async with anyio.create_task_group() as tg:
            for tenant, token in tokens.items():
                tg.start_soon(client, tenant, token)
        elapsed = window[1] - window[0]
        rss_after = rss_mib(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=60)
        await remove_all(DockerDeployment(), "mcp-codeexec.load")
        os.unlink(tokens_file.name)
    print(f"\n{'clients':>8} {'seconds':>8} {'calls':>7} {'calls/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} {'RSS before MiB':>15} {'RSS after MiB':>14}")
    print(f"{args.clients:8d} {elapsed:8.1f} {len(latencies):7d} {len(latencies) / max(elapsed, 1e-9):8.1f} "
          f"{pct(latencies, 0.5):8.2f} {pct(latencies, 0.99):8.2f} {errors:7d} {rss_before:15.1f} {rss_after:14.1f}")
    print(f"(calls counted: sent and answered inside one {elapsed:.1f} s window that opened once every client's "
          f"sandbox was up; {outside} call(s) straddling its end not counted)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=20, help="length of the measured window")
    ap.add_argument("--ramp", type=float, default=60, help="at most this long for every client's sandbox to start")
    ap.add_argument("--image", default="mcp-codeexec-sandbox:latest")
    anyio.run(main, ap.parse_args())
