"""A test cluster on loopback: real etcd and kube-apiserver (scripts/k8s.sh) and the node
stand-in (node.py; NOT a kubelet). `Cluster.start(directory)` brings it up with a
RuntimeClass `gvisor` (handler `runsc`); `stop()` takes all of it down again."""

from __future__ import annotations

import json
import os
import select
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
K8S_SH = ROOT / "scripts" / "k8s.sh"
NODE_PY = Path(__file__).resolve().parent / "node.py"


@dataclass
class Cluster:
    directory: Path
    server: str = ""
    tokens: dict[str, str] = field(default_factory=dict)  # admin, server, denied
    node: subprocess.Popen[str] | None = None
    node_log: Path | None = None

    @property
    def ca(self) -> Path:
        return self.directory / "ca.crt"

    def kubeconfig(self, user: str) -> Path:
        """admin (system:masters), server (the server's account: RBAC from deploy/kubernetes),
        denied (no permissions at all)."""
        return self.directory / f"{user}.kubeconfig"

    @classmethod
    def start(cls, directory: Path, node_name: str = "stand-in") -> Cluster:
        directory.mkdir(parents=True, exist_ok=True)
        cluster = cls(directory)
        built = subprocess.run([str(K8S_SH), "build"], capture_output=True, text=True)
        if built.returncode != 0:
            raise RuntimeError(f"scripts/k8s.sh build failed: {built.stderr[-2000:]}")
        started = subprocess.run([str(K8S_SH), "start", str(directory)], capture_output=True, text=True)
        if started.returncode != 0:
            raise RuntimeError(f"scripts/k8s.sh start failed: {started.stderr[-3000:]}")
        env = dict(line.split("=", 1) for line in (directory / "cluster.env").read_text().split())
        cluster.server = env["KUBE_SERVER"]
        cluster.tokens = {"admin": env["KUBE_ADMIN_TOKEN"], "server": env["KUBE_SERVER_TOKEN"], "denied": env["KUBE_DENIED_TOKEN"]}
        try:
            cluster._start_node(node_name)
            cluster.apply({"apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass", "metadata": {"name": "gvisor"}, "handler": "runsc"})
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def install(self, namespace: str) -> None:
        """What an operator applies from deploy/kubernetes/ (the server's RBAC, bound here to the
        `mcp-codeexec` user of server.kubeconfig as well as to the ServiceAccount), plus what
        a controller-manager would make: the namespace's default ServiceAccount."""
        import yaml

        self.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
        self.apply({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default", "namespace": namespace}})
        for doc in yaml.safe_load_all((ROOT / "deploy" / "kubernetes" / "rbac.yaml").read_text()):
            doc["metadata"]["namespace"] = namespace
            if doc["kind"] == "RoleBinding":
                doc["subjects"][0]["namespace"] = namespace
                doc["subjects"].append({"kind": "User", "name": "mcp-codeexec", "apiGroup": "rbac.authorization.k8s.io"})
            self.apply(doc)

    def _start_node(self, name: str) -> None:
        self.node_log = self.directory / "node.log"
        d = self.directory
        self.node = subprocess.Popen(
            [sys.executable, str(NODE_PY), "--server", self.server, "--token", self.tokens["admin"], "--ca", str(d / "ca.crt"),
             "--cert", str(d / "kubelet.crt"), "--key", str(d / "kubelet.key"), "--client-ca", str(d / "ca.crt"),
             "--name", name],
            stdout=subprocess.PIPE, stderr=self.node_log.open("w"), text=True)
        assert self.node.stdout is not None
        ready, _, _ = select.select([self.node.stdout], [], [], 60)
        line = self.node.stdout.readline() if ready else ""
        if not line.startswith("ready"):
            raise RuntimeError(f"the node stand-in did not start: {self.node_log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.node is not None and self.node.poll() is None:
            self.node.terminate()  # it removes its containers, volumes and Node
            try:
                self.node.wait(60)
            except subprocess.TimeoutExpired:
                self.node.kill()
                self.node.wait()
        subprocess.run([str(K8S_SH), "stop", str(self.directory)], capture_output=True)

    # ----------------------------------------------------------- a small admin client
    def request(self, method: str, path: str, body: Any = None, user: str = "admin",
                content_type: str = "application/json") -> tuple[int, Any]:
        ctx = ssl.create_default_context(cafile=str(self.ca))
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.server + path, data=data, method=method,
                                     headers={"Authorization": f"Bearer {self.tokens[user]}", "Content-Type": content_type})
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=30) as r:
                text = r.read()
                return r.status, json.loads(text) if text else None
        except urllib.error.HTTPError as e:
            text = e.read()
            try:
                return e.code, json.loads(text)
            except ValueError:
                return e.code, text.decode(errors="replace")

    def apply(self, obj: dict[str, Any], namespace: str | None = None) -> dict[str, Any]:
        """Create obj, or replace it if it exists (a tiny `kubectl apply`)."""
        path = collection_path(obj, namespace)
        status, got = self.request("POST", path, obj)
        if status == 409:
            name = obj["metadata"]["name"]
            _, current = self.request("GET", f"{path}/{name}")
            obj = {**obj, "metadata": {**obj["metadata"], "resourceVersion": current["metadata"]["resourceVersion"]}}
            status, got = self.request("PUT", f"{path}/{name}", obj)
        if status >= 300:
            raise RuntimeError(f"apply {obj['kind']} {obj['metadata']['name']}: {status} {got}")
        return got

    def wait_for(self, path: str, done: Any, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            status, got = self.request("GET", path)
            if status == 200 and done(got):
                return got
            if time.monotonic() > deadline:
                raise TimeoutError(f"{path}: {status} {json.dumps(got)[:1500]}")
            time.sleep(0.2)


PLURALS = {"Namespace": "namespaces", "Pod": "pods", "PersistentVolumeClaim": "persistentvolumeclaims",
           "ServiceAccount": "serviceaccounts", "RuntimeClass": "runtimeclasses", "Role": "roles", "RoleBinding": "rolebindings",
           "ClusterRole": "clusterroles", "ClusterRoleBinding": "clusterrolebindings", "NetworkPolicy": "networkpolicies",
           "Service": "services", "Deployment": "deployments", "ConfigMap": "configmaps", "Secret": "secrets"}
CLUSTER_SCOPED = {"Namespace", "RuntimeClass", "ClusterRole", "ClusterRoleBinding"}


def collection_path(obj: dict[str, Any], namespace: str | None = None) -> str:
    group_version = obj["apiVersion"]
    prefix = f"/api/{group_version}" if "/" not in group_version else f"/apis/{group_version}"
    kind = obj["kind"]
    if kind in CLUSTER_SCOPED:
        return f"{prefix}/{PLURALS[kind]}"
    ns = namespace or obj["metadata"].get("namespace") or "default"
    return f"{prefix}/namespaces/{ns}/{PLURALS[kind]}"


def default_directory() -> Path:
    return Path(os.environ.get("MCP_CODEEXEC_K8S_DIR", "/tmp")) / f"mcp-codeexec-k8s-{os.getpid()}"
