"""A node for the test cluster: a STAND-IN for a kubelet, not a kubelet.

The tests run a real kube-apiserver and etcd (scripts/k8s.sh) but no kubelet, scheduler or
controller-manager: a real kubelet cannot run gVisor pods on these machines (no
containerd-shim-runsc-v1 is packaged) and it rewrites the host's sysctls, cgroups and
networking. This process does, for the pods of the tests, the part of their jobs a
sandbox's life depends on, and nothing else:

- as the node: registers a Node object whose address and kubelet port point here, and
  serves the kubelet's streaming endpoints over TLS (`/exec`, `/attach`, `/containerLogs`)
  that the apiserver proxies `pods/exec` and `pods/attach` websockets to
  (`v4.channel.k8s.io`, `v5.channel.k8s.io`): stdin on channel 0, stdout 1, stderr 2,
  the exit status on 3;
- as the kubelet: runs each pod bound to it as one real `docker run` container, with the
  handler of its RuntimeClass as Docker runtime (`runsc` for gVisor) and its
  securityContext, resources and volumes mapped (below), reports the pod's status, and
  removes the container when the pod is deleted;
- as the scheduler: binds pending pods whose nodeSelector and tolerations fit this node;
- as a volume provisioner and the pvc-protection controller: a PersistentVolumeClaim is a
  Docker volume, marked Bound at once; a deleted claim goes when no pod uses it.

Mapping (pod spec → docker run): runtimeClassName → --runtime=<handler>;
shareProcessNamespace → --init (a reaping PID 1, as the pause container is);
runAsUser/runAsGroup → --user; fsGroup → --group-add, and the claim's volume given that
group as the kubelet does (policy OnRootMismatch); runAsNonRoot with uid 0 → refused (as a
kubelet does); readOnlyRootFilesystem → --read-only; capabilities → --cap-drop/--cap-add;
allowPrivilegeEscalation false → no-new-privileges; limits.memory/cpu → --memory/--cpus;
the kubelet's podPidsLimit → --pids-limit (a flag here); emptyDir → a tmpfs of its
sizeLimit (disk or memory alike); a claim → its Docker volume, empty and root's as a new
persistent volume is (no copy from the image; its size is NOT enforced here); no network
at all (--network none; NetworkPolicies are stored but nothing here enforces them —
runsc's --network=none does the isolating). One container per pod;
restartPolicy is treated as Never. Image pull policy is ignored: images must be local.

Run: python tests/k8s/node.py --server URL --token T --ca ca.crt --cert kubelet.crt
--key kubelet.key --client-ca ca.crt [--name NAME]. Prints "ready PORT" once the Node
is registered; on SIGTERM or SIGINT removes its containers, volumes and Node and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shlex
import signal
import ssl
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import aiohttp
from aiohttp import web

log = logging.getLogger("node-stand-in")
LABEL = "org.mcp-codeexec.k8s-stand-in"  # on every container and volume made here: the node's name
CHUNK = 65536
PROTOCOLS = ("v5.channel.k8s.io", "v4.channel.k8s.io")


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def quantity(text: str) -> float:
    """A Kubernetes quantity ("512Mi", "1G", "500m", "2") as a number."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "m": 1e-3}
    for suffix in sorted(units, key=len, reverse=True):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * units[suffix]
    return float(text)


class ApiError(Exception):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"{status}: {body[:300]}")
        self.status = status


class Kube:
    """Just enough of a REST client (JSON in, JSON out, watches as lines)."""

    def __init__(self, server: str, token: str, ca: str) -> None:
        self.server = server.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"}
        self.ssl = ssl.create_default_context(cafile=ca)
        self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self.ssl))

    async def call(self, method: str, path: str, body: Any = None, content_type: str = "application/json", **params: str) -> Any:
        data = None if body is None else json.dumps(body)
        headers = {**self.headers, "Content-Type": content_type}
        async with self.http.request(method, self.server + path, data=data, headers=headers, params=params) as r:
            text = await r.text()
            if r.status >= 400:
                raise ApiError(r.status, text)
            return json.loads(text) if text else None

    async def watch(self, path: str, **params: str) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """List then watch, forever; a synthetic ("ADDED", obj) for everything listed
        (again after any break, so handlers must be idempotent)."""
        while True:
            try:
                listed = await self.call("GET", path, **params)
                for item in listed.get("items", []):
                    yield "ADDED", item
                version = listed["metadata"]["resourceVersion"]
                timeout = aiohttp.ClientTimeout(total=None, sock_read=330)
                async with self.http.get(self.server + path, headers=self.headers, timeout=timeout,
                                         params={**params, "watch": "1", "resourceVersion": version,
                                                 "timeoutSeconds": "300", "allowWatchBookmarks": "false"}) as r:
                    if r.status >= 400:
                        raise ApiError(r.status, await r.text())
                    async for line in r.content:
                        event = json.loads(line)
                        if event["type"] == "ERROR":
                            break
                        yield event["type"], event["object"]
            except (TimeoutError, aiohttp.ClientError, ApiError, json.JSONDecodeError) as exc:
                log.warning("watch %s: %s; listing again", path, exc)
                await asyncio.sleep(0.5)

    async def close(self) -> None:
        await self.http.close()


async def docker(*args: str, stdin: bytes | None = None) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        "docker", *args, stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate(stdin)
    return proc.returncode or 0, out.decode(errors="replace").strip()


class Refused(Exception):
    """The pod cannot run here (the reason goes into its status, as a kubelet's would)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Node:
    def __init__(self, kube: Kube, name: str, pids_limit: int) -> None:
        self.kube = kube
        self.name = name
        self.pids_limit = pids_limit
        self.port = 0
        self.containers: dict[tuple[str, str], str] = {}  # (namespace, pod) → docker container
        self.uids: dict[str, tuple[str, str]] = {}  # pod uid → (namespace, pod)
        self.busy: dict[str, asyncio.Task[None]] = {}  # pod uid → its start/stop in progress
        self.labels = {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64"}

    # ------------------------------------------------------------------ the Node object
    async def register(self) -> None:
        body = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": self.name, "labels": self.labels}}
        with contextlib.suppress(ApiError):
            await self.kube.call("DELETE", f"/api/v1/nodes/{self.name}")
        await self.kube.call("POST", "/api/v1/nodes", body)
        capacity = {"cpu": str(os.cpu_count() or 1), "memory": f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') // 2**20}Mi",
                    "pods": "110", "ephemeral-storage": "10Gi"}
        status = {"status": {
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": self.name}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.port}},
            "capacity": capacity, "allocatable": capacity,
            "conditions": [{"type": "Ready", "status": "True", "reason": "StandInReady", "message": "node stand-in (not a kubelet)",
                            "lastHeartbeatTime": now(), "lastTransitionTime": now()}],
            "nodeInfo": {"kubeletVersion": "stand-in", "containerRuntimeVersion": "docker://runsc", "operatingSystem": "linux",
                         "architecture": "amd64", "machineID": "", "systemUUID": "", "bootID": "", "kernelVersion": "",
                         "osImage": "", "kubeProxyVersion": ""},
        }}
        await self.kube.call("PATCH", f"/api/v1/nodes/{self.name}/status", status, "application/merge-patch+json")

    # ------------------------------------------------------------------ the scheduler's part
    def fits(self, pod: dict[str, Any]) -> bool:
        spec = pod["spec"]
        if any(self.labels.get(k) != v for k, v in (spec.get("nodeSelector") or {}).items()):
            return False
        return not spec.get("schedulerName") or spec["schedulerName"] == "default-scheduler"

    async def schedule(self) -> None:
        async for kind, pod in self.kube.watch("/api/v1/pods", fieldSelector="spec.nodeName="):
            if kind == "DELETED" or pod["metadata"].get("deletionTimestamp") or not self.fits(pod):
                continue
            meta = pod["metadata"]
            binding = {"apiVersion": "v1", "kind": "Binding", "metadata": {"name": meta["name"], "uid": meta["uid"]},
                       "target": {"apiVersion": "v1", "kind": "Node", "name": self.name}}
            try:
                await self.kube.call("POST", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}/binding", binding)
            except ApiError as exc:
                if exc.status not in (404, 409):
                    log.warning("binding %s: %s", meta["name"], exc)

    # ------------------------------------------------------------------ the kubelet's part
    async def pods(self) -> None:
        async for kind, pod in self.kube.watch("/api/v1/pods", fieldSelector=f"spec.nodeName={self.name}"):
            meta = pod["metadata"]
            uid = meta["uid"]
            if kind == "DELETED" or meta.get("deletionTimestamp"):
                self.spawn(uid, self.stop(pod, forget=kind == "DELETED"))
            elif uid not in self.uids and pod["status"].get("phase") in (None, "Pending"):
                self.uids[uid] = (meta["namespace"], meta["name"])
                self.spawn(uid, self.start(pod))

    def spawn(self, uid: str, work: Awaitable[None]) -> None:
        before = self.busy.get(uid)

        async def run() -> None:
            if before is not None:
                with contextlib.suppress(BaseException):
                    await before
            try:
                await work
            except Exception:
                log.exception("pod %s", uid)

        self.busy[uid] = asyncio.ensure_future(run())

    async def status(self, pod: dict[str, Any], status: dict[str, Any]) -> None:
        meta = pod["metadata"]
        with contextlib.suppress(ApiError):  # the pod may be gone by now
            await self.kube.call("PATCH", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}/status",
                                 {"status": status}, "application/merge-patch+json")

    async def start(self, pod: dict[str, Any]) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        container = spec["containers"][0]
        name = f"k8s-{self.name}-{meta['namespace']}-{meta['name']}"[:120]
        try:
            argv = await self.docker_run_args(pod, name)
        except Refused as exc:
            waiting = {"waiting": {"reason": exc.reason, "message": str(exc)}}
            await self.status(pod, {"phase": "Pending", "containerStatuses": [self.container_status(container, waiting)]})
            return
        await docker("rm", "-f", name)
        code, out = await docker(*argv)
        if code != 0:
            waiting = {"waiting": {"reason": "CreateContainerError", "message": out[-1000:]}}
            await self.status(pod, {"phase": "Pending", "containerStatuses": [self.container_status(container, waiting)]})
            return
        self.containers[(meta["namespace"], meta["name"])] = name
        started = now()
        conditions = [{"type": t, "status": "True", "lastTransitionTime": started}
                      for t in ("Initialized", "Ready", "ContainersReady", "PodScheduled")]
        running = {"running": {"startedAt": started}}
        await self.status(pod, {"phase": "Running", "hostIP": "127.0.0.1", "startTime": started, "conditions": conditions,
                                "containerStatuses": [{**self.container_status(container, running), "ready": True,
                                                       "started": True, "containerID": f"docker://{out[:64]}"}]})

    @staticmethod
    def container_status(container: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
        return {"name": container["name"], "image": container["image"], "imageID": "", "ready": False,
                "restartCount": 0, "state": state}

    async def docker_run_args(self, pod: dict[str, Any], name: str) -> list[str]:
        meta, spec = pod["metadata"], pod["spec"]
        if len(spec["containers"]) != 1 or spec.get("initContainers"):
            raise Refused("CreateContainerConfigError", "the node stand-in runs pods of exactly one container")
        c = spec["containers"][0]
        psc, csc = spec.get("securityContext") or {}, c.get("securityContext") or {}
        args = ["run", "-d", "--name", name, "--label", f"{LABEL}={self.name}", "--label", f"{LABEL}.uid={meta['uid']}",
                "--network", "none", "--hostname", spec.get("hostname") or meta["name"],
                "--log-opt", "max-size=1m", "--log-opt", "max-file=1", "--pids-limit", str(self.pids_limit)]
        handler = None
        if spec.get("runtimeClassName"):
            rc = await self.kube.call("GET", f"/apis/node.k8s.io/v1/runtimeclasses/{spec['runtimeClassName']}")
            handler = rc["handler"]
            args += ["--runtime", handler]
        if spec.get("shareProcessNamespace"):
            args.append("--init")
        if c.get("stdin"):
            args.append("-i")
        uid = csc.get("runAsUser", psc.get("runAsUser"))
        gid = csc.get("runAsGroup", psc.get("runAsGroup"))
        if csc.get("runAsNonRoot", psc.get("runAsNonRoot")) and not uid:
            raise Refused("CreateContainerConfigError", "container has runAsNonRoot and its user is root (or unset)")
        if uid is not None:
            args += ["--user", f"{uid}:{gid if gid is not None else uid}"]
        fs_group = psc.get("fsGroup")
        if fs_group is not None:
            args += ["--group-add", str(fs_group)]
        if csc.get("readOnlyRootFilesystem"):
            args.append("--read-only")
        if csc.get("allowPrivilegeEscalation") is False:
            args += ["--security-opt", "no-new-privileges"]
        if csc.get("privileged"):
            raise Refused("CreateContainerConfigError", "the node stand-in runs no privileged containers")
        caps = csc.get("capabilities") or {}
        for cap in caps.get("drop") or []:
            args += ["--cap-drop", cap]
        for cap in caps.get("add") or []:
            args += ["--cap-add", cap]
        limits = (c.get("resources") or {}).get("limits") or {}
        if "memory" in limits:
            memory = str(int(quantity(limits["memory"])))
            args += ["--memory", memory, "--memory-swap", memory]
        if "cpu" in limits:
            args += ["--cpus", f"{quantity(limits['cpu']):g}"]
        for env in c.get("env") or []:
            args += ["--env", f"{env['name']}={env.get('value', '')}"]
        if c.get("workingDir"):
            args += ["--workdir", c["workingDir"]]
        volumes = {v["name"]: v for v in spec.get("volumes") or []}
        for mount in c.get("volumeMounts") or []:
            args += await self.mount(meta["namespace"], volumes.get(mount["name"]), mount, c["image"], fs_group)
        command, rest = c.get("command") or [], c.get("args") or []
        if command:
            args += ["--entrypoint", command[0], c["image"], *command[1:], *rest]
        else:
            args += [c["image"], *rest]
        return args

    async def mount(self, namespace: str, volume: dict[str, Any] | None, mount: dict[str, Any], image: str,
                    fs_group: int | None) -> list[str]:
        path, ro = mount["mountPath"], mount.get("readOnly", False)
        if volume is None:
            raise Refused("CreateContainerConfigError", f"volume {mount['name']!r} not found")
        if "emptyDir" in volume:
            size = (volume["emptyDir"] or {}).get("sizeLimit")
            options = "rw,nosuid,nodev,mode=0777" + (f",size={int(quantity(size))}" if size else "")
            return ["--tmpfs", f"{path}:{options}"]
        if "persistentVolumeClaim" in volume:
            claim = volume["persistentVolumeClaim"]["claimName"]
            try:
                pvc = await self.kube.call("GET", f"/api/v1/namespaces/{namespace}/persistentvolumeclaims/{claim}")
            except ApiError as exc:
                raise Refused("CreateContainerConfigError", f"persistentvolumeclaim {claim!r}: {exc}") from exc
            if pvc["metadata"].get("deletionTimestamp"):
                raise Refused("CreateContainerConfigError", f"persistentvolumeclaim {claim!r} is being deleted")
            source = self.volume_name(pvc)
            if fs_group is not None and not ro:
                await self.own(source, int(fs_group), image)
            # A persistent volume starts empty and root's: nothing is copied from the image.
            return ["--mount", f"type=volume,source={source},target={path},volume-nocopy{',readonly' if ro else ''}"]
        raise Refused("CreateContainerConfigError", f"volume {mount['name']!r}: only emptyDir and persistentVolumeClaim here")

    async def own(self, volume: str, fs_group: int, image: str) -> None:
        """The kubelet's volume ownership for fsGroup (policy OnRootMismatch): unless the
        root has that group already, every file gets the group and g+rw, directories
        g+rwx and setgid. In a short-lived runc container of the pod's image."""
        script = ('[ "$(stat -c %g /v)" = "$1" ] && exit 0; chgrp -R "$1" /v && '
                  "find /v -type d -exec chmod g+rwxs {} + && find /v ! -type d -exec chmod g+rw {} +")
        code, out = await docker("run", "--rm", "--network", "none", "--user", "0:0",
                                 "--mount", f"type=volume,source={volume},target=/v,volume-nocopy",
                                 "--entrypoint", "sh", image, "-c", script, "sh", str(fs_group))
        if code != 0:
            raise Refused("CreateContainerConfigError", f"setting the ownership of volume {volume} for fsGroup: {out}")

    def volume_name(self, pvc: dict[str, Any]) -> str:
        return f"k8s-{self.name}-pvc-{pvc['metadata']['uid']}"

    async def stop(self, pod: dict[str, Any], forget: bool) -> None:
        meta = pod["metadata"]
        key = (meta["namespace"], meta["name"])
        name = self.containers.pop(key, None)
        if name is None:  # not started by this process (or already gone): find it by its pod's uid
            code, out = await docker("ps", "-aq", "--filter", f"label={LABEL}.uid={meta['uid']}")
            name = out.split()[0] if code == 0 and out else None
        if name:
            await docker("rm", "-f", name)
        if not forget:  # what the kubelet does once the containers are gone: the final delete
            with contextlib.suppress(ApiError):
                await self.kube.call("DELETE", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}",
                                     {"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 0,
                                      "preconditions": {"uid": meta["uid"]}})
        self.uids.pop(meta["uid"], None)
        await self.release_claims()

    async def exits(self) -> None:
        """Report containers that ended (the pod's phase, exit code, OOM kill)."""
        while True:
            await asyncio.sleep(1)
            for (namespace, pod_name), name in list(self.containers.items()):
                code, out = await docker("inspect", "--format", "{{json .State}}", name)
                if code != 0:
                    continue
                state = json.loads(out)
                if state.get("Running"):
                    continue
                self.containers.pop((namespace, pod_name), None)
                try:
                    pod = await self.kube.call("GET", f"/api/v1/namespaces/{namespace}/pods/{pod_name}")
                except ApiError:
                    continue
                exit_code = int(state.get("ExitCode") or 0)
                reason = "OOMKilled" if state.get("OOMKilled") else ("Completed" if exit_code == 0 else "Error")
                terminated = {"terminated": {"exitCode": exit_code, "reason": reason, "finishedAt": now(),
                                             "startedAt": (pod["status"].get("startTime") or now())}}
                c = pod["spec"]["containers"][0]
                await self.status(pod, {"phase": "Succeeded" if exit_code == 0 else "Failed",
                                        "containerStatuses": [self.container_status(c, terminated)]})

    # ------------------------------------------------------------------ the volumes' part
    async def claims(self) -> None:
        async for kind, pvc in self.kube.watch("/api/v1/persistentvolumeclaims"):
            meta = pvc["metadata"]
            if kind == "DELETED":
                await docker("volume", "rm", "-f", self.volume_name(pvc))
            elif meta.get("deletionTimestamp"):
                await self.release_claims()
            elif pvc.get("status", {}).get("phase") != "Bound":
                await docker("volume", "create", "--label", f"{LABEL}={self.name}", self.volume_name(pvc))
                request = pvc["spec"].get("resources", {}).get("requests", {}).get("storage", "0")
                with contextlib.suppress(ApiError):
                    await self.kube.call(
                        "PATCH", f"/api/v1/namespaces/{meta['namespace']}/persistentvolumeclaims/{meta['name']}/status",
                        {"status": {"phase": "Bound", "accessModes": pvc["spec"].get("accessModes"),
                                    "capacity": {"storage": request}}}, "application/merge-patch+json")

    async def release_claims(self) -> None:
        """The pvc-protection controller: a deleted claim goes once no pod uses it."""
        claims = await self.kube.call("GET", "/api/v1/persistentvolumeclaims")
        doomed = [p for p in claims["items"] if p["metadata"].get("deletionTimestamp")]
        if not doomed:
            return
        pods = (await self.kube.call("GET", "/api/v1/pods"))["items"]
        used = {(p["metadata"]["namespace"], v["persistentVolumeClaim"]["claimName"])
                for p in pods if p["status"].get("phase") not in ("Succeeded", "Failed")
                for v in p["spec"].get("volumes") or [] if "persistentVolumeClaim" in v}
        for pvc in doomed:
            meta = pvc["metadata"]
            if (meta["namespace"], meta["name"]) in used:
                continue
            with contextlib.suppress(ApiError):
                await self.kube.call("PATCH", f"/api/v1/namespaces/{meta['namespace']}/persistentvolumeclaims/{meta['name']}",
                                     {"metadata": {"finalizers": None}}, "application/merge-patch+json")

    # ------------------------------------------------------------------ streaming (exec/attach)
    async def stream(self, request: web.Request, argv_of: Callable[[str, web.Request], list[str]]) -> web.StreamResponse:
        key = (request.match_info["namespace"], request.match_info["pod"])
        name = self.containers.get(key)
        if name is None:
            raise web.HTTPNotFound(text=f"pod {key[0]}/{key[1]} is not running on this node")
        q = request.query
        stdin = q.get("input") == "1"
        ws = web.WebSocketResponse(protocols=PROTOCOLS, max_msg_size=16 * 2**20)
        if not ws.can_prepare(request).ok:
            raise web.HTTPBadRequest(text="only websocket streams (v4/v5.channel.k8s.io) here, no SPDY")
        await ws.prepare(request)
        argv = argv_of(name, request)
        log.info("stream %s: %s", ws.ws_protocol, shlex.join(argv))
        proc = await asyncio.create_subprocess_exec(
            "docker", *argv, stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)

        async def pump(reader: asyncio.StreamReader | None, channel: int) -> None:
            assert reader is not None
            while chunk := await reader.read(CHUNK):
                await ws.send_bytes(bytes([channel]) + chunk)

        async def feed() -> None:
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.BINARY or not msg.data:
                    continue
                channel, data = msg.data[0], msg.data[1:]
                if channel == 0 and proc.stdin is not None and not proc.stdin.is_closing():
                    proc.stdin.write(data)
                    with contextlib.suppress(ConnectionError):
                        await proc.stdin.drain()
                elif channel == 255 and data[:1] == b"\x00" and proc.stdin is not None:  # v5: stdin closed
                    proc.stdin.close()
            if proc.stdin is not None:  # the client went away: stdin ends (the command is not killed)
                proc.stdin.close()

        feeder = asyncio.ensure_future(feed())
        try:
            await asyncio.gather(pump(proc.stdout, 1), pump(proc.stderr, 2))
            code = await proc.wait()
            status: dict[str, Any] = {"metadata": {}, "status": "Success"}
            if code:
                status = {"metadata": {}, "status": "Failure", "reason": "NonZeroExitCode",
                          "message": f"command terminated with non-zero exit code: {code}",
                          "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]}}
            if not ws.closed:
                await ws.send_bytes(b"\x03" + json.dumps(status).encode())
        except ConnectionError:
            pass
        finally:
            feeder.cancel()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            await ws.close()
        return ws

    async def exec_(self, request: web.Request) -> web.StreamResponse:
        def argv(name: str, r: web.Request) -> list[str]:
            command = r.query.getall("command", [])
            if not command:
                raise web.HTTPBadRequest(text="no command")
            return ["exec", *(["-i"] if r.query.get("input") == "1" else []), name, *command]

        return await self.stream(request, argv)

    async def attach(self, request: web.Request) -> web.StreamResponse:
        return await self.stream(request, lambda name, r: ["attach", "--sig-proxy=false", name])

    async def logs(self, request: web.Request) -> web.StreamResponse:
        name = self.containers.get((request.match_info["namespace"], request.match_info["pod"]))
        if name is None:
            raise web.HTTPNotFound()
        code, out = await docker("logs", "--tail", request.query.get("tailLines", "1000"), name)
        return web.Response(text=out + "\n")

    # ------------------------------------------------------------------ clean-up
    async def clean(self, delete_node: bool) -> None:
        code, out = await docker("ps", "-aq", "--filter", f"label={LABEL}={self.name}")
        if code == 0 and out:
            await docker("rm", "-f", *out.split())
        code, out = await docker("volume", "ls", "-q", "--filter", f"label={LABEL}={self.name}")
        if code == 0 and out:
            await docker("volume", "rm", "-f", *out.split())
        if delete_node:
            with contextlib.suppress(ApiError, aiohttp.ClientError):
                await self.kube.call("DELETE", f"/api/v1/nodes/{self.name}")


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--server", required=True)
    p.add_argument("--token", required=True, help="an admin token (the stand-in does a node's and controllers' work)")
    p.add_argument("--ca", required=True, help="the apiserver's CA")
    p.add_argument("--cert", required=True, help="this node's serving certificate")
    p.add_argument("--key", required=True)
    p.add_argument("--client-ca", required=True, help="CA of the apiserver's kubelet client certificate")
    p.add_argument("--name", default="stand-in")
    p.add_argument("--pods-pids-limit", type=int, default=1024, help="the kubelet's podPidsLimit")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s node: %(message)s", stream=sys.stderr)

    kube = Kube(a.server, a.token, a.ca)
    node = Node(kube, a.name, a.pods_pids_limit)
    await node.clean(delete_node=False)  # left over by a stand-in of this name that was killed

    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=a.client_ca)
    tls.load_cert_chain(a.cert, a.key)
    tls.verify_mode = ssl.CERT_REQUIRED  # only the apiserver (its kubelet client certificate) may stream
    app = web.Application()
    app.router.add_route("*", "/exec/{namespace}/{pod}/{container}", node.exec_)
    app.router.add_route("*", "/attach/{namespace}/{pod}/{container}", node.attach)
    app.router.add_get("/containerLogs/{namespace}/{pod}/{container}", node.logs)
    app.router.add_get("/healthz", lambda r: web.Response(text="ok"))
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls)
    await site.start()
    node.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    await node.register()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tasks = [asyncio.ensure_future(t) for t in (node.schedule(), node.pods(), node.exits(), node.claims())]
    print(f"ready {node.port}", flush=True)
    await stop.wait()
    for t in tasks:
        t.cancel()
    await runner.cleanup()
    await node.clean(delete_node=True)
    await kube.close()


if __name__ == "__main__":
    asyncio.run(main())
