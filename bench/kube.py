#!/usr/bin/env python3
"""First-call and warm-call latency of the Kubernetes backend next to Docker's, same run.

Starts the test cluster (scripts/k8s.sh: a real kube-apiserver and etcd on loopback) with
its node STAND-IN (tests/k8s/node.py: it runs each pod as `docker run --runtime=runsc` and
serves exec itself). So the Kubernetes rows measure the API round trips, the apiserver's
exec proxying and our backend, plus a stand-in's pod start: NOT what a real kubelet,
container runtime shim, image pull or storage provisioner would cost on a cluster.

Per backend, through the real server over stdio with the `mcp` SDK's client:
- floor: `bash -c true` spawned by Python inside the sandbox;
- warm call: `bash_code_execution` of `true` on a running sandbox;
- first call of a new session: a fresh server (`--no-prepare`), from sending the call to its
  result (create the workspace, start the sandbox, connect the agent, run).
Usage: .venv/bin/python bench/kube.py [--calls 100] [--sessions 5]
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import tempfile
import time
from pathlib import Path

import anyio
from mcp.client import Client

from bench import FLOOR_SCRIPT, params, pct, timed

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from k8s.cluster import Cluster  # noqa: E402

from mcp_codeexec.deployment.base import remove_all  # noqa: E402
from mcp_codeexec.deployment.docker import DockerDeployment  # noqa: E402
from mcp_codeexec.deployment.kubernetes import KubernetesDeployment, KubernetesOptions  # noqa: E402

NAMESPACE = "mcp-codeexec-bench"


async def measure(image: str, tenant: str, flags: tuple[str, ...], calls: int, sessions: int) -> dict[str, list[float]]:
    async with Client(params(image, tenant, *flags)) as client:

        async def call(command: str) -> dict:
            result = await client.call_tool("bash_code_execution", {"command": command})
            assert not result.is_error and result.structured_content["return_code"] == 0, result.structured_content
            return result.structured_content

        await call("true")
        floor = json.loads((await call(f"python3 -c '{FLOOR_SCRIPT.format(n=calls)}'"))["stdout"])
        warm = await timed(lambda: call("true"), calls)

    first = []
    for _ in range(sessions):
        async with Client(params(image, tenant, "--no-prepare", *flags)) as client:
            t = time.perf_counter()
            result = await client.call_tool("bash_code_execution", {"command": "true"})
            first.append(time.perf_counter() - t)
            assert not result.is_error, result.structured_content
    return {"floor": floor, "warm": warm, "first": first}


async def run(args: argparse.Namespace) -> None:
    tenant = f"bench-{secrets.token_hex(3)}"
    results: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="mcp-codeexec-k8s-bench-") as d:
        cluster = await anyio.to_thread.run_sync(Cluster.start, Path(d))
        kube = KubernetesDeployment(KubernetesOptions(namespace=NAMESPACE, kubeconfig=str(cluster.kubeconfig("server"))))
        try:
            await anyio.to_thread.run_sync(cluster.install, NAMESPACE)
            common = ("--memory", "1g", "--log-level", "WARNING")
            results["docker"] = await measure(args.image, tenant, common, args.calls, args.sessions)
            kube_flags = ("--backend", "kubernetes", "--kubeconfig", str(cluster.kubeconfig("server")),
                          "--kube-namespace", NAMESPACE, "--kube-pull-policy", "Never", "--disk", "1g", *common)
            results["kubernetes (node stand-in)"] = await measure(args.image, tenant, kube_flags, args.calls, args.sessions)
        finally:
            with anyio.CancelScope(shield=True):
                await remove_all(DockerDeployment(), f"mcp-codeexec.{tenant}.")
                await remove_all(kube, f"mcp-codeexec.{tenant}.")
                await kube.aclose()
                await anyio.to_thread.run_sync(cluster.stop)

    print(f"\n{'backend':28} {'row':34} {'n':>4} {'p50 ms':>9} {'p99 ms':>9} {'p50/floor':>10}")
    print("-" * 100)
    for backend, rows in results.items():
        floor = pct(rows["floor"], 0.5)
        for key, label in (("floor", "floor: bash -c true in the sandbox"), ("warm", "warm bash `true` via MCP"),
                           ("first", "first call of a new session")):
            samples = rows[key]
            print(f"{backend:28} {label:34} {len(samples):4d} {pct(samples, 0.5):9.2f} {pct(samples, 0.99):9.2f} "
                  f"{pct(samples, 0.5) / floor:9.2f}x")
    k, dk = results["kubernetes (node stand-in)"], results["docker"]
    print(f"\nkubernetes/docker, p50: warm {pct(k['warm'], 0.5) / pct(dk['warm'], 0.5):.2f}x, "
          f"first call {pct(k['first'], 0.5) / pct(dk['first'], 0.5):.2f}x")
    print("The Kubernetes rows run on a node STAND-IN (docker run --runtime=runsc behind a real apiserver): "
          "they say nothing of a real kubelet's, shim's, image pull's or provisioner's cost.")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=100)
    ap.add_argument("--sessions", type=int, default=5)
    ap.add_argument("--image", default="mcp-codeexec-sandbox:latest")
    anyio.run(run, ap.parse_args())
