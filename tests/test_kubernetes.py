"""The Kubernetes backend's test cluster, then the backend itself, against a real
kube-apiserver and etcd on loopback (scripts/k8s.sh) whose node is a STAND-IN for a kubelet
(tests/k8s/node.py) that runs each pod as a real `docker run --runtime=runsc` container.
What a real kubelet, scheduler, CNI and storage provisioner do is not tested here."""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import IMAGE
from k8s.cluster import Cluster

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def cluster(engine: Any) -> Iterator[Cluster]:
    with tempfile.TemporaryDirectory(prefix="mcp-codeexec-k8s-") as d:
        c = Cluster.start(Path(d))
        try:
            yield c
        finally:
            c.stop()


def hardened_pod(name: str, runtime_class: str = "gvisor", command: list[str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"test": "stand-in"}},
        "spec": {
            "runtimeClassName": runtime_class, "automountServiceAccountToken": False, "restartPolicy": "Never",
            "shareProcessNamespace": True, "hostname": "sandbox",
            "securityContext": {"runAsUser": 1000, "runAsGroup": 1000, "runAsNonRoot": True},
            "containers": [{
                "name": "sandbox", "image": IMAGE, "imagePullPolicy": "Never", "stdin": True,
                "command": command or ["sleep", "infinity"],
                "securityContext": {"readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False,
                                    "capabilities": {"drop": ["ALL"]}},
                "resources": {"limits": {"memory": "256Mi", "cpu": "1"}},
                "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
            }],
            "volumes": [{"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}}],
        },
    }


def running(pod: dict[str, Any]) -> bool:
    statuses = pod.get("status", {}).get("containerStatuses") or []
    waiting = [s["state"]["waiting"] for s in statuses if "waiting" in s.get("state", {})]
    assert not waiting, waiting
    return pod.get("status", {}).get("phase") == "Running"


async def exec_stream(cluster: Cluster, pod: str, command: list[str]) -> Any:
    """An exec websocket through the apiserver, opened by kubernetes_asyncio (the client the
    backend uses), as an async context manager yielding aiohttp's websocket."""
    from kubernetes_asyncio import client, config
    from kubernetes_asyncio.stream import WsApiClient

    cfg = client.Configuration()
    await config.load_kube_config(config_file=str(cluster.kubeconfig("admin")), client_configuration=cfg)
    api = WsApiClient(configuration=cfg)
    v1 = client.CoreV1Api(api_client=api)
    ws = await v1.connect_get_namespaced_pod_exec(pod, "default", command=command, stdin=True, stdout=True, stderr=True,
                                                  tty=False, _preload_content=False)
    return api, ws


def test_a_gvisor_pod_runs_hardened_and_an_exec_stream_carries_stdin_and_stdout_both_ways(cluster: Cluster, engine: Any) -> None:
    cluster.request("DELETE", "/api/v1/namespaces/default/pods/echo")
    status, got = cluster.request("POST", "/api/v1/namespaces/default/pods", hardened_pod("echo"))
    assert status == 201, got
    cluster.wait_for("/api/v1/namespaces/default/pods/echo", running)
    # The stand-in ran it under gVisor, hardened as the pod asked.
    c = engine.inspect_container("k8s-stand-in-default-echo")
    hc = c["HostConfig"]
    assert hc["Runtime"] == "runsc" and hc["ReadonlyRootfs"] and hc["CapDrop"] == ["ALL"]
    assert "no-new-privileges" in hc["SecurityOpt"] and c["Config"]["User"] == "1000:1000"

    async def converse() -> tuple[list[bytes], dict[str, Any], bytes]:
        api, ws_cm = await exec_stream(cluster, "echo", ["python3", "-u", "-c",
            "import sys\nfor line in sys.stdin:\n    print(line.strip().upper(), flush=True)\n    if line.startswith('bye'): break\n"
            "import os; print(open('/proc/version').read().split()[0], os.getuid(), flush=True)"])
        echoes: list[bytes] = []
        status: dict[str, Any] = {}
        rest = b""
        async with api, ws_cm as ws:
            for word in (b"hello", b"long-lived", b"stream"):
                await ws.send_bytes(b"\x00" + word + b"\n")
                line = b""
                with anyio.fail_after(20):
                    while not line.endswith(b"\n"):  # an answer per line: the stream stays open between them
                        msg = await ws.receive()
                        if msg.data[:1] == b"\x01":
                            line += msg.data[1:]
                echoes.append(line)
                await anyio.sleep(1)
            await ws.send_bytes(b"\x00bye\n")
            with anyio.fail_after(20):
                async for msg in ws:
                    if msg.data[:1] == b"\x01":
                        rest += msg.data[1:]
                    elif msg.data[:1] == b"\x03":
                        status = json.loads(msg.data[1:])
        return echoes, status, rest

    echoes, status, rest = anyio.run(converse)
    assert echoes == [b"HELLO\n", b"LONG-LIVED\n", b"STREAM\n"]
    assert status["status"] == "Success"
    assert rest.split()[-2:] == [b"Linux", b"1000"] and b"BYE" in rest
    # gVisor's kernel, not the host's (its dmesg is its own).
    out = subprocess.run(["docker", "exec", "k8s-stand-in-default-echo", "dmesg"], capture_output=True, text=True).stdout
    assert "gVisor" in out

    status, _ = cluster.request("DELETE", "/api/v1/namespaces/default/pods/echo")
    assert status == 200
    cluster.wait_for("/api/v1/namespaces/default/pods", lambda got: not any(p["metadata"]["name"] == "echo" for p in got["items"]))
    deadline = time.monotonic() + 30
    while engine.containers(all=True, filters={"name": "k8s-stand-in-default-echo"}):
        assert time.monotonic() < deadline, "the stand-in did not remove the pod's container"
        time.sleep(0.2)


def test_an_unknown_runtime_class_is_refused_by_the_apiserver(cluster: Cluster) -> None:
    status, got = cluster.request("POST", "/api/v1/namespaces/default/pods", hardened_pod("nope", runtime_class="no-such-class"))
    assert status == 403 and "no-such-class" in got["message"], got


def test_a_token_without_rbac_permissions_is_denied(cluster: Cluster) -> None:
    status, got = cluster.request("GET", "/api/v1/namespaces/default/pods", user="denied")
    assert status == 403 and got["reason"] == "Forbidden", got
