"""Sandboxes as Kubernetes pods (gVisor through a RuntimeClass), driven through the cluster's
own API: no scheduler or controller of ours.

A sandbox is two objects in one namespace, paired by a hash of its workspace's name:
- a PersistentVolumeClaim `mcp-codeexec-ws-<h>` (its workspace, sized by --disk: the disk
  quota), which lives as long as the sandbox and carries everything known about it: the
  upper layers' labels as annotations, its name in an annotation and, hashed, in a label
  (names are longer than a label value may be) — the only state there is;
- a Pod `mcp-codeexec-sb-<h>` while it runs: `runtimeClassName` (default gvisor), the
  Docker backend's hardening (root only for the agent, with SETUID/SETGID/KILL and nothing
  else, no privilege escalation, read-only root, tmpfs /tmp and $HOME, no service account
  token, no service links) and no network: the NetworkPolicy `mcp-codeexec-sandboxes`
  (ensured by check()) denies all traffic to and from these pods.

Idle stop deletes the pod and keeps the claim; the next start makes a new pod around it;
remove deletes both. A warm-pool claim rewrites the claim's name label and annotation in a
patch carrying the resourceVersion read just before (optimistic concurrency: a 409 means
someone else changed it first), so no sandbox goes to two sessions, whichever replica asks.
The agent connection is one `pods/exec` websocket (v4.channel.k8s.io) running the relay.
"In use" (a server is connected) is an annotation per connection on the pod, holding an
expiry that the connection renews while it lives, so any replica can count them.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import hashlib
import json
import logging
import os
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import aiohttp
import anyio

from mcp_codeexec.deployment.base import (
    AGENT_CAPABILITIES,
    AGENT_DIR,
    SANDBOX_GID,
    AgentStream,
    BackendInfo,
    BackendUnavailable,
    Deployment,
    NameTaken,
    SandboxGone,
    SandboxRecord,
    SandboxSpec,
    Started,
)

log = logging.getLogger(__name__)

MANAGED = {"app.kubernetes.io/managed-by": "mcp-codeexec", "app.kubernetes.io/component": "sandbox"}
SELECTOR = ",".join(f"{k}={v}" for k, v in MANAGED.items())
NAME_HASH = "mcp-codeexec.dev/name-hash"  # label: sha256 of the name, for selecting by name
NAME = "mcp-codeexec.dev/name"  # annotation: the name itself
WORKSPACE = "mcp-codeexec.dev/workspace"  # label on a pod: its claim
LAYOUT = "mcp-codeexec.dev/layout"  # annotation on a pod: the layout label it was made for
IN_USE = "in-use.mcp-codeexec.dev/"  # annotation prefix on a pod: one per open connection
NETWORK_POLICY = "mcp-codeexec-sandboxes"
CONTAINER = "sandbox"
_LAYOUT_LABEL = "org.mcp-codeexec.layout"
_LEASE = 60.0  # seconds an in-use annotation holds without renewal
_RENEW = 20.0
_START_TIMEOUT = 180.0
_CHUNK = 65536
_MAX_MESSAGE = 4 << 20  # the largest websocket message taken from the apiserver
_STDERR_KEEP = 8192
_REMEMBERED = 10_000  # pod names remembered by sandbox name
# A container that waits for one of these will not start without a change on the cluster.
_STUCK = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError", "CreateContainerError",
          "RunContainerError", "ErrImageNeverPull"}


@dataclass(frozen=True)
class KubernetesOptions:
    namespace: str = "default"
    runtime_class: str = "gvisor"
    storage_class: str = ""  # "" = the cluster's default storage class
    pull_policy: str = "IfNotPresent"
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Mapping[str, str], ...] = ()
    kubeconfig: str = ""  # "" = in-cluster service account, else $KUBECONFIG or ~/.kube/config
    context: str = ""
    disk_bytes: int = 5 << 30  # the claim's size: the workspace quota


def _hash(text: str, n: int = 40) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


class _Api:
    """The few REST calls the backend makes, on kubernetes_asyncio's configuration (so every
    kubeconfig and in-cluster authentication it knows works), as plain JSON."""

    def __init__(self, options: KubernetesOptions) -> None:
        self.options = options
        self._client: Any = None
        self._ws: Any = None
        self._lock = asyncio.Lock()

    async def clients(self) -> tuple[Any, Any]:
        async with self._lock:
            if self._client is None:
                try:
                    from kubernetes_asyncio import client, config
                    from kubernetes_asyncio.stream import WsApiClient
                except ImportError as exc:
                    raise BackendUnavailable("the Kubernetes backend needs kubernetes_asyncio: pip install 'mcp-codeexec[kubernetes]'") from exc
                cfg = client.Configuration()
                try:
                    if self.options.kubeconfig or not os.environ.get("KUBERNETES_SERVICE_HOST"):
                        await config.load_kube_config(config_file=self.options.kubeconfig or None,
                                                      context=self.options.context or None, client_configuration=cfg)
                    else:
                        config.load_incluster_config(client_configuration=cfg)
                except Exception as exc:  # noqa: BLE001 - any bad or missing configuration
                    raise BackendUnavailable(f"no usable Kubernetes configuration: {exc}") from exc
                self._client = client.ApiClient(configuration=cfg)
                self._ws = WsApiClient(configuration=cfg)
            return self._client, self._ws

    async def call(self, method: str, path: str, body: Any = None, *, query: Mapping[str, str] | None = None,
                   content_type: str = "application/json") -> Any:
        from kubernetes_asyncio.client.exceptions import ApiException

        api, _ = await self.clients()
        try:
            return await api.call_api(
                path, method, query_params=list((query or {}).items()), body=body,
                header_params={"Accept": "application/json", "Content-Type": content_type},
                auth_settings=["BearerToken"], response_types_map={200: "object", 201: "object", 202: "object"},
                _return_http_data_only=True, _request_timeout=60)
        except ApiException as exc:
            raise _ApiError(exc.status or 0, method, path, exc.body) from exc
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise BackendUnavailable(f"Kubernetes API not reachable: {exc!r}") from exc

    async def exec_ws(self, pod: str, argv: list[str]) -> aiohttp.ClientWebSocketResponse:
        from kubernetes_asyncio.client.exceptions import ApiException
        from kubernetes_asyncio.stream.ws_client import get_websocket_url

        _, ws_api = await self.clients()
        # What CoreV1Api.connect_get_namespaced_pod_exec does, with a message size bound of ours.
        url = f"{ws_api.configuration.host}/api/v1/namespaces/{self.options.namespace}/pods/{pod}/exec"
        headers = {"sec-websocket-protocol": "v4.channel.k8s.io"}
        query: list[tuple[str, str]] = [("container", CONTAINER), ("stdin", "true"), ("stdout", "true"),
                                        ("stderr", "true"), ("tty", "false")] + [("command", a) for a in argv]
        try:
            await ws_api.update_params_for_auth(headers, query, ["BearerToken"])
            return await ws_api.rest_client.pool_manager.ws_connect(  # type: ignore[no-any-return]
                get_websocket_url(f"{url}?{urlencode(query)}"), headers=headers, max_msg_size=_MAX_MESSAGE, heartbeat=30)
        except aiohttp.WSServerHandshakeError as exc:
            raise _ApiError(exc.status, "GET", f"pods/{pod}/exec", exc.message) from exc
        except ApiException as exc:
            raise _ApiError(exc.status or 0, "GET", f"pods/{pod}/exec", exc.body) from exc
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise BackendUnavailable(f"Kubernetes API not reachable: {exc!r}") from exc

    async def aclose(self) -> None:
        for c in (self._client, self._ws):
            if c is not None:
                await c.close()


class _ApiError(BackendUnavailable):
    """The apiserver said no. 403 is RBAC (or admission) and says so, loudly."""

    def __init__(self, status: int, method: str, path: str, body: Any) -> None:
        try:
            message = json.loads(body).get("message", "") if body else ""
        except (ValueError, AttributeError):
            message = str(body)[:300]
        self.status = status
        self.api_message = message
        text = f"Kubernetes API: {method} {path}: {status} {message}"
        if status == 403:
            text += " (the server's service account lacks a permission in deploy/kubernetes/rbac.yaml, or admission refused)"
            log.error("%s", text)
        super().__init__(text)


class KubernetesAgentStream(AgentStream):
    """The relay's stdio over one exec websocket: channel 0 in, 1 out, 2 kept for diagnosis,
    3 the exit status. While open, it keeps an in-use annotation on its pod alive."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, backend: KubernetesDeployment, pod: str, lease: str) -> None:
        self._ws = ws
        self._backend = backend
        self._pod = pod
        self._lease = lease
        self._stderr = bytearray()
        self.exit_status: str | None = None
        self._renewer = asyncio.ensure_future(self._renew())

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(_RENEW)
            with contextlib.suppress(BackendUnavailable):
                await self._backend._set_lease(self._pod, self._lease, time.time() + _LEASE)

    async def send(self, data: bytes) -> None:
        view = memoryview(data)
        for i in range(0, max(len(view), 1), _CHUNK):
            try:
                await self._ws.send_bytes(b"\x00" + bytes(view[i : i + _CHUNK]))
            except (ConnectionError, RuntimeError, aiohttp.ClientError) as exc:
                raise anyio.BrokenResourceError(str(exc)) from exc

    async def receive(self) -> bytes:
        while True:
            msg = await self._ws.receive()
            if msg.type != aiohttp.WSMsgType.BINARY:
                if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED,
                                aiohttp.WSMsgType.ERROR):
                    raise anyio.EndOfStream
                continue  # text (no base64 protocol was asked for), pings
            data: bytes = msg.data
            channel, payload = data[:1], data[1:]
            if channel == b"\x01" and payload:
                return payload
            if channel == b"\x02":
                self._stderr += payload
                del self._stderr[:-_STDERR_KEEP]
            elif channel == b"\x03":
                self.exit_status = payload[:1000].decode("utf-8", "replace")

    async def aclose(self) -> None:
        if self._renewer.done():
            return  # closed already
        self._renewer.cancel()
        await self._ws.close()
        with anyio.move_on_after(5, shield=True), contextlib.suppress(BackendUnavailable):
            await self._backend._set_lease(self._pod, self._lease, None)

    @property
    def stderr_tail(self) -> str:
        return self._stderr.decode("utf-8", "replace")


class KubernetesDeployment(Deployment):
    def __init__(self, options: KubernetesOptions) -> None:
        self.options = options
        self.api = _Api(options)
        self._ns = f"/api/v1/namespaces/{options.namespace}"
        self._pods: dict[str, str] = {}  # name → pod name, as last seen (validated on use)

    # ------------------------------------------------------------------ lookups
    @staticmethod
    def _names(volume: str) -> tuple[str, str]:
        h = _hash(volume, 20)
        return f"mcp-codeexec-ws-{h}", f"mcp-codeexec-sb-{h}"

    async def _claim_of(self, name: str) -> dict[str, Any]:
        """The workspace claim that is the sandbox `name`; SandboxGone if there is none."""
        found = await self.api.call("GET", f"{self._ns}/persistentvolumeclaims",
                                    query={"labelSelector": f"{SELECTOR},{NAME_HASH}={_hash(name)}"})
        for pvc in found.get("items") or []:
            meta = pvc["metadata"]
            if (meta.get("annotations") or {}).get(NAME) == name and not meta.get("deletionTimestamp"):
                return pvc
        raise SandboxGone(f"sandbox {name} not found")

    async def _pod(self, pod_name: str) -> dict[str, Any] | None:
        try:
            return await self.api.call("GET", f"{self._ns}/pods/{pod_name}")  # type: ignore[no-any-return]
        except _ApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def _find(self, name: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """(claim or None, pod or None). The pod alone when it still answers to this name
        (one GET on the hot path: inspect runs every few seconds during long calls)."""
        pod_name = self._pods.get(name)
        if pod_name is not None:
            pod = await self._pod(pod_name)
            if pod is not None and (pod["metadata"].get("annotations") or {}).get(NAME) == name:
                return None, pod
        pvc = await self._claim_of(name)
        pod_name = self._names_from_claim(pvc)[1]
        pod = await self._pod(pod_name)
        if pod is not None and (pod["metadata"].get("annotations") or {}).get(NAME) != name:
            await self._annotate_pod(pod_name, {NAME: name})  # a claim renamed it: catch the pod up
        self._remember(name, pod_name)
        return pvc, pod

    def _remember(self, name: str, pod_name: str) -> None:
        if len(self._pods) >= _REMEMBERED:  # names another replica removed are never forgotten otherwise
            self._pods.clear()
        self._pods[name] = pod_name

    @staticmethod
    def _names_from_claim(pvc: dict[str, Any]) -> tuple[str, str]:
        claim = pvc["metadata"]["name"]
        return claim, "mcp-codeexec-sb-" + claim.removeprefix("mcp-codeexec-ws-")

    async def _annotate_pod(self, pod_name: str, annotations: dict[str, str | None]) -> None:
        with contextlib.suppress(SandboxGone):
            try:
                await self.api.call("PATCH", f"{self._ns}/pods/{pod_name}", {"metadata": {"annotations": annotations}},
                                    content_type="application/merge-patch+json")
            except _ApiError as exc:
                if exc.status != 404:
                    raise

    async def _set_lease(self, pod_name: str, lease: str, until: float | None) -> None:
        await self._annotate_pod(pod_name, {IN_USE + lease: None if until is None else str(int(until))})

    # ------------------------------------------------------------------ the verbs
    async def check(self, image: str | None = None) -> BackendInfo:
        """The API answers, our namespace's sandboxes are fenced off by the NetworkPolicy,
        and a sandbox pod would be admitted: a server-side dry run of one, which exercises
        RBAC (pods: create) and admission (an unknown RuntimeClass is refused) at once."""
        version = await self.api.call("GET", "/version")
        try:
            await self.api.call("GET", f"/apis/networking.k8s.io/v1/namespaces/{self.options.namespace}/networkpolicies/{NETWORK_POLICY}")
        except _ApiError as exc:
            if exc.status != 404:
                raise
            await self.api.call("POST", f"/apis/networking.k8s.io/v1/namespaces/{self.options.namespace}/networkpolicies",
                                network_policy())
            log.info("created NetworkPolicy %s (no traffic to or from sandbox pods)", NETWORK_POLICY)
        probe = self._pod_manifest(_probe_spec(image or "probe"), "mcp-codeexec-check", "mcp-codeexec-check")
        try:
            await self.api.call("POST", f"{self._ns}/pods", probe, query={"dryRun": "All"})
        except _ApiError as exc:
            if "RuntimeClass" in exc.api_message:
                raise BackendUnavailable(
                    f"the cluster has no RuntimeClass {self.options.runtime_class!r} ({exc.api_message}); install gVisor "
                    "on the nodes and apply deploy/kubernetes/runtimeclass.yaml, or pass --kube-runtime-class") from exc
            raise
        rc = self.options.runtime_class
        return BackendInfo(engine=f"Kubernetes {version.get('gitVersion', '?')}, namespace {self.options.namespace}",
                           runtime=f"RuntimeClass {rc}",
                           isolation=f"RuntimeClass {rc!r}: gVisor (runsc) when its handler is runsc, as the manifests set it")

    async def create(self, spec: SandboxSpec) -> None:
        with contextlib.suppress(SandboxGone):
            await self._claim_of(spec.name)
            raise NameTaken(f"sandbox {spec.name} exists")
        claim, _ = self._names(spec.volume)
        request = self.options.disk_bytes or 1 << 30
        body = {
            "apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": claim, "labels": {**MANAGED, NAME_HASH: _hash(spec.name)},
                         "annotations": {**spec.labels, NAME: spec.name}},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": str(request)}},
                     **({"storageClassName": self.options.storage_class} if self.options.storage_class else {})},
        }
        try:
            await self.api.call("POST", f"{self._ns}/persistentvolumeclaims", body)
        except _ApiError as exc:
            if exc.status == 409:
                raise NameTaken(f"workspace {claim} exists") from exc
            raise

    async def start(self, spec: SandboxSpec) -> Started:
        # No checkpoint/restore of pods (can_checkpoint stays False): never `restored`.
        pvc, pod = await self._find(spec.name)
        if pod is not None:
            phase = pod.get("status", {}).get("phase")
            layout = (pod["metadata"].get("annotations") or {}).get(LAYOUT)
            if pod["metadata"].get("deletionTimestamp") is None and phase in ("Pending", "Running", None) \
                    and layout == spec.labels.get(_LAYOUT_LABEL):
                await self._wait_running(pod["metadata"]["name"])
                return Started()
            await self._delete_pod(pod["metadata"]["name"])  # ended, going, or made for another layout
        if pvc is None:
            pvc = await self._claim_of(spec.name)
        claim, pod_name = self._names_from_claim(pvc)
        kept = {k: v for k, v in (pvc["metadata"].get("annotations") or {}).items() if k != NAME}
        manifest = self._pod_manifest(spec, pod_name, claim)
        manifest["metadata"]["annotations"] = {
            **kept, **spec.labels, NAME: spec.name, LAYOUT: spec.labels.get(_LAYOUT_LABEL, ""),
            # In use from birth: another replica's reaper must not stop it before its starter connects.
            IN_USE + "start": str(int(time.time() + _LEASE)),
        }
        try:
            await self.api.call("POST", f"{self._ns}/pods", manifest)
        except _ApiError as exc:
            if exc.status != 409:  # 409: another replica is starting it at this moment
                raise
        self._remember(spec.name, pod_name)
        await self._wait_running(pod_name)
        return Started()

    async def _wait_running(self, pod_name: str) -> None:
        deadline = time.monotonic() + _START_TIMEOUT
        delay = 0.05
        while True:
            pod = await self._pod(pod_name)
            if pod is None:
                raise BackendUnavailable(f"pod {pod_name} was deleted while starting")
            status = pod.get("status") or {}
            for c in status.get("containerStatuses") or []:
                waiting = (c.get("state") or {}).get("waiting") or {}
                if waiting.get("reason") in _STUCK:
                    raise BackendUnavailable(f"pod {pod_name} cannot start: {waiting['reason']}: {waiting.get('message', '')[:500]}")
                if c.get("name") == CONTAINER and "running" in (c.get("state") or {}) and status.get("phase") == "Running":
                    return
            if status.get("phase") in ("Failed", "Succeeded"):
                raise BackendUnavailable(f"pod {pod_name} ended while starting ({status.get('reason') or status['phase']})")
            if time.monotonic() > deadline:
                conditions = "; ".join(f"{c.get('type')}: {c.get('message', '')}" for c in status.get("conditions") or [])
                raise BackendUnavailable(f"pod {pod_name} not running after {_START_TIMEOUT:.0f}s ({conditions or 'pending'})")
            await anyio.sleep(delay)
            delay = min(delay * 1.5, 1.0)

    async def _delete_pod(self, pod_name: str, wait: bool = True) -> None:
        try:
            await self.api.call("DELETE", f"{self._ns}/pods/{pod_name}", {"gracePeriodSeconds": 1})
        except _ApiError as exc:
            if exc.status != 404:
                raise
        if not wait:
            return
        deadline = time.monotonic() + 60
        while await self._pod(pod_name) is not None:  # its name is needed again for the next start
            if time.monotonic() > deadline:
                raise BackendUnavailable(f"pod {pod_name} still terminating after 60s")
            await anyio.sleep(0.2)

    async def stop(self, name: str) -> None:
        pvc, pod = await self._find(name)
        if pod is not None:
            await self._delete_pod(pod["metadata"]["name"])

    async def remove(self, name: str) -> None:
        try:
            pvc = await self._claim_of(name)
        except SandboxGone:
            return
        claim, pod_name = self._names_from_claim(pvc)
        self._pods.pop(name, None)
        await self._delete_pod(pod_name, wait=False)
        try:
            await self.api.call("DELETE", f"{self._ns}/persistentvolumeclaims/{claim}")
        except _ApiError as exc:
            if exc.status != 404:
                raise

    async def claim(self, name: str, new_name: str) -> None:
        for _ in range(10):
            pvc = await self._claim_of(name)  # SandboxGone once someone else renamed it
            with contextlib.suppress(SandboxGone):
                await self._claim_of(new_name)
                raise NameTaken(f"sandbox {new_name} exists")
            meta = pvc["metadata"]
            patch = {"metadata": {"resourceVersion": meta["resourceVersion"], "labels": {NAME_HASH: _hash(new_name)},
                                  "annotations": {NAME: new_name}}}
            try:
                await self.api.call("PATCH", f"{self._ns}/persistentvolumeclaims/{meta['name']}", patch,
                                    content_type="application/merge-patch+json")
            except _ApiError as exc:
                if exc.status == 409:  # changed since we read it (another replica's claim?): read again
                    log.info("claim of %s: changed meanwhile (409 Conflict), reading it again", name)
                    continue
                raise
            self._pods.pop(name, None)
            _, pod_name = self._names_from_claim(pvc)
            await self._annotate_pod(pod_name, {NAME: new_name})
            self._remember(new_name, pod_name)
            return
        raise NameTaken(f"sandbox {name}: too many concurrent changes")

    async def inspect(self, name: str) -> SandboxRecord:
        pvc, pod = await self._find(name)
        source = pvc if pvc is not None else pod
        assert source is not None
        return self._record(name, source, pod)

    def _record(self, name: str, source: dict[str, Any], pod: dict[str, Any] | None) -> SandboxRecord:
        annotations = source["metadata"].get("annotations") or {}
        labels = {k: v for k, v in annotations.items() if k.startswith("org.mcp-codeexec.")}
        if pod is None or pod["metadata"].get("deletionTimestamp"):
            return SandboxRecord(name=name, labels=labels, running=False, status="stopped", in_use=0)
        status = pod.get("status") or {}
        state: dict[str, Any] = {}
        for c in status.get("containerStatuses") or []:
            if c.get("name") == CONTAINER:
                state = c.get("state") or {}
        terminated = state.get("terminated") or {}
        now = time.time()
        pod_annotations = pod["metadata"].get("annotations") or {}
        in_use = sum(1 for k, v in pod_annotations.items() if k.startswith(IN_USE) and v.isdigit() and int(v) > now)
        return SandboxRecord(
            name=name, labels=labels, running="running" in state and status.get("phase") == "Running",
            status=(status.get("phase") or "Pending").lower(),
            exit_code=terminated.get("exitCode"), oom_killed=terminated.get("reason") == "OOMKilled", in_use=in_use)

    async def list(self, prefix: str, *, sizes: bool = False) -> builtins.list[SandboxRecord]:
        claims = await self.api.call("GET", f"{self._ns}/persistentvolumeclaims", query={"labelSelector": SELECTOR})
        pods = await self.api.call("GET", f"{self._ns}/pods", query={"labelSelector": SELECTOR})
        by_claim = {p["metadata"].get("labels", {}).get(WORKSPACE): p for p in pods.get("items") or []}
        records = []
        for pvc in claims.get("items") or []:
            meta = pvc["metadata"]
            name = (meta.get("annotations") or {}).get(NAME, "")
            if name.startswith(prefix) and not meta.get("deletionTimestamp"):
                records.append(self._record(name, pvc, by_claim.get(meta["name"])))
        return records  # sizes: a claim tells its capacity, not its use; size_bytes stays None

    async def connect(self, name: str, argv: builtins.list[str]) -> AgentStream:
        _, pod = await self._find(name)
        if pod is None:
            raise SandboxGone(f"sandbox {name} is not running")
        pod_name = pod["metadata"]["name"]
        lease = secrets.token_hex(8)
        # The first connection takes over from the start lease (which kept a pod just made
        # from looking unused): from now on the connections alone say who uses it.
        await self._annotate_pod(pod_name, {IN_USE + lease: str(int(time.time() + _LEASE)), IN_USE + "start": None})
        try:
            ws = await self.api.exec_ws(pod_name, argv)
        except BaseException:
            with anyio.move_on_after(5, shield=True), contextlib.suppress(BackendUnavailable):
                await self._set_lease(pod_name, lease, None)
            raise
        return KubernetesAgentStream(ws, self, pod_name, lease)

    # ------------------------------------------------------------------ the pod
    def _pod_manifest(self, spec: SandboxSpec, pod_name: str, claim: str) -> dict[str, Any]:
        o = self.options
        resources = {"memory": str(spec.memory_bytes), "cpu": f"{max(int(spec.cpus * 1000), 1)}m"}
        memory_dir = {"medium": "Memory", "sizeLimit": str(spec.tmp_bytes)}
        return {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod_name, "namespace": o.namespace, "labels": {**MANAGED, WORKSPACE: claim}},
            "spec": {
                "runtimeClassName": o.runtime_class,
                "automountServiceAccountToken": False,
                "enableServiceLinks": False,
                "restartPolicy": "Never",
                "shareProcessNamespace": True,  # the pause process is PID 1 and reaps orphans (Docker's --init)
                "hostname": "sandbox",
                "terminationGracePeriodSeconds": 1,
                **({"nodeSelector": dict(o.node_selector)} if o.node_selector else {}),
                **({"tolerations": [dict(t) for t in o.tolerations]} if o.tolerations else {}),
                # fsGroup: a new persistent volume's root is root's; the kubelet gives the
                # workspace to the sandbox user's group (group-writable, setgid directories).
                "securityContext": {"runAsUser": 0, "runAsGroup": 0, "seccompProfile": {"type": "RuntimeDefault"},
                                    "fsGroup": SANDBOX_GID, "fsGroupChangePolicy": "OnRootMismatch"},
                "containers": [{
                    "name": CONTAINER,
                    "image": spec.image,
                    "imagePullPolicy": o.pull_policy,
                    # An emptyDir is world-writable: make the agent's socket directory root's
                    # alone before the loader listens in it (the Docker backend mounts it 0700).
                    "command": ["/bin/sh", "-c", 'chmod 0700 "$0" && exec "$@"', AGENT_DIR, *spec.command],
                    "workingDir": spec.workdir,
                    "env": [{"name": k, "value": v} for k, v in spec.env.items()],
                    "securityContext": {
                        "runAsUser": 0, "runAsGroup": 0,  # the agent; user code runs as uid 1000 (agent/process.py)
                        "privileged": False,
                        "allowPrivilegeEscalation": False,
                        "readOnlyRootFilesystem": True,
                        "capabilities": {"drop": ["ALL"], "add": list(AGENT_CAPABILITIES)},
                    },
                    "resources": {"limits": resources, "requests": resources},  # Guaranteed QoS
                    "volumeMounts": [
                        {"name": "workspace", "mountPath": spec.workdir},
                        {"name": "tmp", "mountPath": "/tmp"},
                        {"name": "home", "mountPath": "/home/sandbox"},
                        {"name": "agent", "mountPath": AGENT_DIR},
                    ],
                }],
                "volumes": [
                    {"name": "workspace", "persistentVolumeClaim": {"claimName": claim}},
                    {"name": "tmp", "emptyDir": memory_dir},
                    {"name": "home", "emptyDir": memory_dir},
                    {"name": "agent", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
                ],
            },
        }

    async def aclose(self) -> None:
        await self.api.aclose()


def _probe_spec(image: str) -> SandboxSpec:
    return SandboxSpec(name="mcp-codeexec-check", volume="check", image=image, runtime="", memory_bytes=64 << 20, cpus=0.1,
                       pids_limit=64, workdir="/workspace", tmp_bytes=1 << 20, command=("true",))


def network_policy() -> dict[str, Any]:
    """No traffic in or out of sandbox pods (enforced by the cluster's network plugin)."""
    return {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": NETWORK_POLICY, "labels": {"app.kubernetes.io/managed-by": "mcp-codeexec"}},
        "spec": {"podSelector": {"matchLabels": dict(MANAGED)}, "policyTypes": ["Ingress", "Egress"]},
    }
