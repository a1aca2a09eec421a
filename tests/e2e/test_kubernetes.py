"""The Kubernetes backend's test cluster, then the backend itself, against a real
kube-apiserver and etcd on loopback (scripts/k8s.sh) whose node is a STAND-IN for a kubelet
(tests/k8s/node.py) that runs each pod as a real `docker run --runtime=runsc` container.
What a real kubelet, scheduler, CNI and storage provisioner do is not tested here."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import tempfile
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
import yaml
from conftest import IMAGE, TENANT, connect
from k8s.cluster import ROOT, Cluster, collection_path

from mcp_codeexec.config import Settings
from mcp_codeexec.deployment.kubernetes import KubernetesDeployment, KubernetesOptions
from mcp_codeexec.errors import NameTaken, SandboxGone
from mcp_codeexec.sandbox import ContainerInfo, sandbox_spec

pytestmark = pytest.mark.timeout(300)
NAMESPACE = "mcp-codeexec"


@pytest.fixture(scope="module")
def cluster(engine: Any) -> Iterator[Cluster]:
    with tempfile.TemporaryDirectory(prefix="mcp-codeexec-k8s-") as d:
        c = Cluster.start(Path(d))
        try:
            c.install(NAMESPACE)
            yield c
        finally:
            c.stop()


def kube_args(c: Cluster, user: str = "server", *extra: str) -> tuple[str, ...]:
    return ("--backend", "kubernetes", "--kubeconfig", str(c.kubeconfig(user)), "--kube-namespace", NAMESPACE,
            "--kube-pull-policy", "Never", "--disk", "1g", "--memory", "1g", "--timeout", "20", "--reap-interval", "1s", *extra)


def pods(c: Cluster) -> list[dict[str, Any]]:
    return c.request("GET", f"/api/v1/namespaces/{NAMESPACE}/pods")[1]["items"]


def claims(c: Cluster) -> list[dict[str, Any]]:
    return c.request("GET", f"/api/v1/namespaces/{NAMESPACE}/persistentvolumeclaims")[1]["items"]


def sandbox_of(c: Cluster, cid: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(claim, pod) of the tenant's container `cid`, from the cluster alone."""
    name = f"mcp-codeexec.{TENANT}.{cid}"
    claim = next((p for p in claims(c) if p["metadata"]["annotations"].get("mcp-codeexec.dev/name") == name), None)
    if claim is None:
        return None, None
    pod_name = "mcp-codeexec-sb-" + claim["metadata"]["name"].removeprefix("mcp-codeexec-ws-")
    return claim, next((p for p in pods(c) if p["metadata"]["name"] == pod_name), None)


async def eventually(check: Any, seconds: float = 30) -> None:
    with anyio.fail_after(seconds):
        while not check():
            await anyio.sleep(0.3)


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


def test_an_attach_stream_reaches_the_pods_main_process(cluster: Cluster) -> None:
    """pods/attach (the other streaming endpoint the stand-in answers): stdin of the pod's
    own main process in, its stdout out."""
    pod = hardened_pod("attach", command=["python3", "-u", "-c", "import sys\nfor line in sys.stdin: print(line.strip()[::-1])"])
    cluster.request("DELETE", "/api/v1/namespaces/default/pods/attach")
    status, got = cluster.request("POST", "/api/v1/namespaces/default/pods", pod)
    assert status == 201, got
    cluster.wait_for("/api/v1/namespaces/default/pods/attach", running)

    async def converse() -> bytes:
        from kubernetes_asyncio import client, config
        from kubernetes_asyncio.stream import WsApiClient

        cfg = client.Configuration()
        await config.load_kube_config(config_file=str(cluster.kubeconfig("admin")), client_configuration=cfg)
        async with WsApiClient(configuration=cfg) as api:
            ws_cm = await client.CoreV1Api(api_client=api).connect_get_namespaced_pod_attach(
                "attach", "default", stdin=True, stdout=True, stderr=True, tty=False, _preload_content=False)
            async with ws_cm as ws:
                await ws.send_bytes(b"\x00stressed\n")
                out = b""
                with anyio.fail_after(20):
                    while not out.endswith(b"\n"):
                        msg = await ws.receive()
                        if msg.data[:1] == b"\x01":
                            out += msg.data[1:]
                return out

    assert anyio.run(converse) == b"desserts\n"
    cluster.request("DELETE", "/api/v1/namespaces/default/pods/attach")


def test_an_unknown_runtime_class_is_refused_by_the_apiserver(cluster: Cluster) -> None:
    status, got = cluster.request("POST", "/api/v1/namespaces/default/pods", hardened_pod("nope", runtime_class="no-such-class"))
    assert status == 403 and "no-such-class" in got["message"], got


def test_a_token_without_rbac_permissions_is_denied(cluster: Cluster) -> None:
    status, got = cluster.request("GET", "/api/v1/namespaces/default/pods", user="denied")
    assert status == 403 and got["reason"] == "Forbidden", got


# ---------------------------------------------------------------------- the backend


@pytest.mark.anyio
async def test_both_tools_end_to_end_in_a_gvisor_pod(cluster: Cluster, engine: Any) -> None:
    async with connect(*kube_args(cluster)) as s:
        # The workspace (a new persistent volume: root's) is writable by the sandbox user: fsGroup.
        r = await s.bash("set -e; echo hello > note.txt; id -u; cat /proc/version | cut -d' ' -f1-3; pwd")
        assert r["return_code"] == 0 and r["stderr"] == "" and r["stdout"].splitlines()[0] == "1000", r
        assert r["stdout"].splitlines()[-1] == "/workspace"
        r = await s.edit(command="str_replace", path="/workspace/note.txt", old_str="hello", new_str="goodbye")
        assert r["type"] == "text_editor_code_execution_str_replace_result", r
        r = await s.edit(command="view", path="/workspace/note.txt")
        assert "goodbye" in r["content"], r
        cid = s.last_meta["container"]["id"]
        claim, pod = sandbox_of(cluster, cid)
        assert claim is not None and pod is not None
        spec = pod["spec"]
        assert spec["runtimeClassName"] == "gvisor" and spec["automountServiceAccountToken"] is False
        sc = spec["containers"][0]["securityContext"]
        assert sc["readOnlyRootFilesystem"] and sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
        # The stand-in ran it as a runsc container; no network in or out.
        c = engine.inspect_container(f"k8s-stand-in-{NAMESPACE}-{pod['metadata']['name']}")
        assert c["HostConfig"]["Runtime"] == "runsc" and c["HostConfig"]["NetworkMode"] == "none"
        # No network, by inspection (never by trying to reach one): only the loopback interface.
        r = await s.bash("ls -ld /run/mcp-codeexec | cut -c1-10; python3 -c 'import socket; print([n for _, n in socket.if_nameindex()])'")
        assert r["stdout"].splitlines() == ["drwx------", "['lo']"], r
        policy = cluster.request("GET", f"/apis/networking.k8s.io/v1/namespaces/{NAMESPACE}/networkpolicies/mcp-codeexec-sandboxes")
        assert policy[0] == 200 and policy[1]["spec"]["policyTypes"] == ["Ingress", "Egress"]


@pytest.mark.anyio
async def test_reuse_by_id_across_two_replicas_and_idle_stop_keeps_files(cluster: Cluster) -> None:
    async with connect(*kube_args(cluster, "server", "--idle-stop", "2s")) as a:
        await a.bash("echo from-a > note.txt")
        cid = a.last_meta["container"]["id"]
        # Idle: the pod goes, the claim (the workspace) stays.
        await eventually(lambda: sandbox_of(cluster, cid)[1] is None)
        assert sandbox_of(cluster, cid)[0] is not None
        # A second replica (another server process) takes the same container by id.
        async with connect(*kube_args(cluster), "--container", cid) as b:
            assert (await b.bash("cat note.txt"))["stdout"] == "from-a\n"
            assert b.last_meta["container"]["id"] == cid
            await b.bash("echo from-b >> note.txt")
        # And the first one, its pod re-made around the same claim, sees both.
        r = await a.bash("cat note.txt")
        assert r["stdout"] == "from-a\nfrom-b\n", r


@pytest.mark.anyio
async def test_expiry_deletes_the_pod_and_the_claim(cluster: Cluster) -> None:
    async with connect(*kube_args(cluster, "server", "--lifetime", "5s")) as a:
        await a.bash("echo x > f")
        cid = a.last_meta["container"]["id"]
        await anyio.sleep(5.5)
        assert (await a.bash("cat f"))["error_code"] == "container_expired"
        await eventually(lambda: sandbox_of(cluster, cid) == (None, None))
    async with connect(*kube_args(cluster), "--container", cid) as b:
        assert (await b.bash("true"))["error_code"] == "container_expired"


@pytest.mark.anyio
async def test_pool_claims_racing_from_two_replicas_hand_each_sandbox_to_one(cluster: Cluster, caplog: Any) -> None:
    """Two backends (two replicas' API clients) claim the same warm sandboxes at once: each
    goes to exactly one of them (a resourceVersion-guarded patch), never to both."""
    options = KubernetesOptions(namespace=NAMESPACE, kubeconfig=str(cluster.kubeconfig("server")), pull_policy="Never",
                                disk_bytes=1 << 30)
    replicas = [KubernetesDeployment(options), KubernetesDeployment(options)]
    settings = Settings(image=IMAGE, memory_bytes=256 << 20)
    caplog.set_level(logging.INFO, "mcp_codeexec.deployment.kubernetes")
    try:
        for round_ in range(4):
            info = ContainerInfo.new(timedelta(hours=1))
            pool_name = f"mcp-codeexec-pool.{info.id}"
            await replicas[0].create(sandbox_spec(settings, pool_name, f"mcp-codeexec-ws.{info.id}", info))
            winners: list[int] = []
            losers: list[str] = []

            async def take(i: int) -> None:
                try:
                    await replicas[i].claim(pool_name, f"mcp-codeexec.{TENANT}.race{round_}-{i}")
                    winners.append(i)
                except (SandboxGone, NameTaken) as exc:
                    losers.append(type(exc).__name__)

            async with anyio.create_task_group() as tg:
                tg.start_soon(take, 0)
                tg.start_soon(take, 1)
            assert len(winners) == 1 and losers == ["SandboxGone"], (winners, losers)
            won = f"mcp-codeexec.{TENANT}.race{round_}-{winners[0]}"
            lost = f"mcp-codeexec.{TENANT}.race{round_}-{1 - winners[0]}"
            assert (await replicas[1].inspect(won)).labels["org.mcp-codeexec.expires_at"]
            with pytest.raises(SandboxGone):
                await replicas[0].inspect(lost)
            with pytest.raises(SandboxGone):
                await replicas[0].inspect(pool_name)
            await replicas[0].remove(won)
        # The claims did meet: a patch lost on its resourceVersion, not merely came second.
        assert "409 Conflict" in caplog.text
    finally:
        for r in replicas:
            await r.aclose()


@pytest.mark.anyio
async def test_rbac_denial_answers_unavailable_with_a_clear_log(cluster: Cluster) -> None:
    log = io.StringIO()
    with tempfile.TemporaryFile("w+") as errlog:
        async with connect(*kube_args(cluster, "denied"), "--no-prepare", errlog=errlog) as s:
            r = await s.bash("true")
            assert r == {"type": "bash_code_execution_tool_result_error", "error_code": "unavailable"}, r
        errlog.seek(0)
        log.write(errlog.read())
    text = log.getvalue()
    assert "403" in text and "deploy/kubernetes/rbac.yaml" in text and "mcp-codeexec-denied" in text, text[-3000:]


@pytest.mark.anyio
async def test_an_unknown_runtime_class_is_refused_at_start(cluster: Cluster) -> None:
    with tempfile.TemporaryFile("w+") as errlog:
        async with connect(*kube_args(cluster, "server", "--kube-runtime-class", "no-such-class"), "--no-prepare",
                           errlog=errlog) as s:
            r = await s.bash("true")
            assert r["error_code"] == "unavailable", r
        errlog.seek(0)
        text = errlog.read()
    assert "no RuntimeClass 'no-such-class'" in text, text[-3000:]
    assert not any(p["spec"].get("runtimeClassName") == "no-such-class" for p in pods(cluster))


def test_the_shipped_manifests_are_accepted_by_the_apiserver(cluster: Cluster) -> None:
    for path in sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            status, got = cluster.request("POST", collection_path(doc) + "?dryRun=All", doc)
            assert status in (200, 201, 409), (path.name, doc["kind"], got)  # 409: installed already
