"""Sandboxes as Docker Engine containers (gVisor `runsc` by default).

Management calls (create, start, inspect, remove) go through the `docker` SDK in a worker
thread; they are rare. The agent stream, used by every tool call, is an exec attached
over the engine's unix socket with a raw, fully asynchronous HTTP upgrade, then the
engine's stdout/stderr multiplexing is undone here.
"""

from __future__ import annotations

import builtins
import json
import logging
import os
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from functools import partial
from typing import Any, TypeVar
from urllib.parse import urlparse

import anyio
import anyio.abc
import docker
import docker.errors
import docker.types
import requests.exceptions

from mcp_codeexec.deployment import quota as q
from mcp_codeexec.deployment import restore_copies
from mcp_codeexec.deployment.base import (
    AGENT_CAPABILITIES,
    AGENT_DIR,
    MANAGED_LABEL,
    SANDBOX_GID,
    SANDBOX_UID,
    SANDBOX_USER,
    VOLUME_LABEL,
    AgentStream,
    BackendInfo,
    BackendUnavailable,
    CheckpointFailed,
    Deployment,
    NameTaken,
    SandboxGone,
    SandboxRecord,
    SandboxSpec,
    Started,
)
from mcp_codeexec.deployment.image import read_manifest

log = logging.getLogger(__name__)
_T = TypeVar("_T")
_MUX_HEADER = struct.Struct(">BxxxI")
_STDERR_KEEP = 8192


def _socket_path() -> str:
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    url = urlparse(host)
    if url.scheme != "unix":
        raise BackendUnavailable(f"DOCKER_HOST={host}: only unix:// engine sockets are supported")
    return url.path


LAYOUT_LABEL = "org.mcp-codeexec.layout"
# Checkpoints are named for when they were made (ms since the epoch): one made before the
# container's last start is stale (the sandbox ran on since) and is never restored.
_CHECKPOINT_PREFIX = "mcp-codeexec-"
_STRAY_AFTER = 600.0  # seconds: how often housekeeping runs, and how long a volume may be unused
_HELPER_MAX_AGE = 600.0  # seconds: a helper container (quota.run_helper) lives seconds


def _epoch_ms(stamp: str) -> int:
    """The engine's RFC 3339 time (nanoseconds, Z) in ms; 0 for its zero time or garbage."""
    try:
        return int(datetime.fromisoformat(stamp[:26].rstrip("Z")).replace(tzinfo=UTC).timestamp() * 1000)
    except ValueError:
        return 0


def _made_at(checkpoint: str) -> int:
    suffix = checkpoint[len(_CHECKPOINT_PREFIX):]
    return int(suffix) if suffix.isdigit() else 0


def _short(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= 300 else line[:300] + "..."


class DockerAgentStream(AgentStream):
    """Demultiplexes the engine's framed exec stream: stdout to the caller, stderr kept."""

    def __init__(self, sock: anyio.abc.SocketStream, leftover: bytes) -> None:
        self._sock = sock
        self._buffer = bytearray(leftover)
        self._stderr = bytearray()

    async def send(self, data: bytes) -> None:
        await self._sock.send(data)

    async def receive(self) -> bytes:
        while True:
            if len(self._buffer) >= _MUX_HEADER.size:
                stream, size = _MUX_HEADER.unpack_from(self._buffer)
                end = _MUX_HEADER.size + size
                if len(self._buffer) >= end:
                    payload = bytes(self._buffer[_MUX_HEADER.size : end])
                    del self._buffer[:end]
                    if stream == 2:
                        self._stderr += payload
                        del self._stderr[:-_STDERR_KEEP]
                        continue
                    return payload
            self._buffer += await self._sock.receive(262144)  # raises EndOfStream at the end

    async def aclose(self) -> None:
        await self._sock.aclose()

    @property
    def stderr_tail(self) -> str:
        return self._stderr.decode("utf-8", "replace")


async def _http(path: str, body: dict[str, Any], *, upgrade: bool = False) -> tuple[int, bytes, anyio.abc.SocketStream]:
    """One HTTP/1.1 POST to the engine; returns (status, body-or-leftover, socket)."""
    sock = await anyio.connect_unix(_socket_path())
    data = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: docker\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n"
        + ("Connection: Upgrade\r\nUpgrade: tcp\r\n" if upgrade else "Connection: close\r\n")
        + "\r\n"
    )
    await sock.send(head.encode() + data)
    raw = b""
    while b"\r\n\r\n" not in raw:
        try:
            raw += await sock.receive()
        except anyio.EndOfStream:
            break
    header, _, rest = raw.partition(b"\r\n\r\n")
    status = int(header.split(b" ", 2)[1])
    if upgrade:
        return status, rest, sock
    length = 0
    for line in header.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == b"content-length":
            length = int(value)
    while len(rest) < length:
        try:
            rest += await sock.receive()
        except anyio.EndOfStream:
            break
    await sock.aclose()
    return status, rest, sock


class DockerDeployment(Deployment):
    def __init__(self, runtime: str = "runsc", quota: q.WorkspaceQuota | None = None, *,
                 wanted: q.Wanted | None = None) -> None:
        self.runtime = runtime
        self.quota = quota  # workspace disk quota (deployment/quota.py); None: no quota
        self._wanted = wanted  # a quota to set up once the engine answers (it may do the root part)
        self._wanted_lock = threading.Lock()
        self._api: docker.APIClient | None = None
        self._collected_at = -1e9  # when orphaned workspaces were last collected
        self._unused_since: dict[str, float] = {}  # workspace volumes no container uses, since when
        self._root_dir = "/var/lib/docker"  # the engine's; check() reads it (checkpoint sizes)
        self._written: set[str] = set()  # checkpoints this process saw finished (no wait to restore)

    @property
    def api(self) -> docker.APIClient:
        if self._api is None:
            try:
                self._api = docker.APIClient(base_url=f"unix://{_socket_path()}", version="auto", timeout=60)
            except docker.errors.DockerException as exc:
                raise BackendUnavailable(f"Docker Engine not reachable: {exc}") from exc
        return self._api

    async def _call(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        try:
            # abandon_on_cancel: an engine call that hangs (a crashed runsc sandbox can make
            # inspect hang) must not hold up the caller's time limit and backstop.
            return await anyio.to_thread.run_sync(partial(fn, *args, **kwargs), abandon_on_cancel=True)
        except docker.errors.NotFound as exc:
            raise SandboxGone(str(exc)) from exc
        except (docker.errors.DockerException, requests.exceptions.ConnectionError) as exc:
            raise BackendUnavailable(f"Docker Engine error: {exc}") from exc

    async def check(self, image: str | None = None) -> BackendInfo:
        info = await self._call(lambda: self.api.info())
        if self.runtime not in info.get("Runtimes", {}):
            raise BackendUnavailable(
                f"the engine has no runtime named {self.runtime!r} (it has: {', '.join(info.get('Runtimes', {}))}); "
                "run scripts/setup.sh to register gVisor"
            )
        if image is not None:
            try:
                await self._call(self.api.inspect_image, image)
            except SandboxGone:
                raise BackendUnavailable(f"sandbox image {image!r} not found; build it with sandbox/build.sh") from None
        await self._call(self._set_up_quota)
        self._root_dir = info.get("DockerRootDir") or self._root_dir
        # `docker checkpoint` exists in experimental mode only; under runc it needs CRIU,
        # which sandboxes here do not use (gVisor saves its own kernel's state).
        self.can_checkpoint = bool(info.get("ExperimentalBuild")) and self.runtime == "runsc"
        isolation = (
            "gVisor (runsc): each sandbox runs on its own user-space kernel"
            if self.runtime == "runsc"
            else f"{self.runtime}: containers share the host kernel (weaker isolation)"
        )
        return BackendInfo(engine=f"Docker Engine {info.get('ServerVersion', '?')}", runtime=self.runtime, isolation=isolation)

    async def image_manifest(self, image: str) -> dict[str, Any] | None:
        return await anyio.to_thread.run_sync(read_manifest, self.api, image)

    async def create(self, spec: SandboxSpec) -> None:
        await self._create(spec, new_volume=True)

    async def _upgrade(self, labels: dict[str, str], spec: SandboxSpec) -> bool:
        """Re-create a container that an older version of this server made (its layout
        label differs from the spec's), running or not, keeping its workspace volume and
        labels. True if it did."""
        if labels.get(LAYOUT_LABEL) == spec.labels.get(LAYOUT_LABEL):
            return False
        volume = labels.get(VOLUME_LABEL) or spec.volume
        log.info("re-creating %s in the current layout (its workspace %s stays)", spec.name, volume)
        await self._call(self.api.remove_container, spec.name, force=True)
        kept = {k: v for k, v in labels.items() if k.startswith("org.mcp-codeexec.") and k != LAYOUT_LABEL}
        await self._create(replace(spec, volume=volume, labels={**kept, **spec.labels}), new_volume=False)
        return True

    async def _create(self, spec: SandboxSpec, new_volume: bool) -> None:
        volume = spec.volume

        def create() -> None:
            # --- quota: the workspace is an ext4 filesystem of its own (deployment/quota.py)
            self._set_up_quota()
            self._collect_orphans()
            if not new_volume:
                pass  # upgrade(): the workspace exists already
            elif self.quota is not None:
                options = self.quota.create(volume)
                try:
                    self.api.create_volume(volume, driver="local", driver_opts=options, labels={**spec.labels, **self.quota.labels(volume)})
                except BaseException:
                    self.quota.release(volume)
                    raise
            else:
                self.api.create_volume(volume, labels=spec.labels)
            try:
                self._create_container(spec, handover=new_volume and self.quota is None)
            except BaseException:
                if new_volume:  # a refused create leaves no workspace behind
                    try:
                        self._drop_volume(volume, spec.image)
                    except Exception as exc:  # noqa: BLE001 - the create's own error is the one to raise
                        log.warning("could not remove the workspace volume %s of a refused create: %s", volume, exc)
                raise

        try:
            await self._call(create)
        except SandboxGone as exc:  # the image is missing
            raise BackendUnavailable(f"cannot create sandbox: {exc}") from exc

    def _create_container(self, spec: SandboxSpec, handover: bool) -> None:
        """The sandbox's container on its workspace volume (made already). `handover`: a
        plain volume's root is root's; a helper container gives it to the sandbox user
        first (a quota filesystem is made that way, quota.py)."""
        volume = spec.volume
        if handover:
            q.run_helper(self.api, spec.image, f"chown {SANDBOX_USER} /w", [], "giving the workspace to the sandbox user",
                         cap_add=["CHOWN"], binds={volume: {"bind": "/w", "mode": "rw,nocopy"}})
        # --- cpuset: ceil(cpus) cores, so the sandbox sees its CPU count (quota.py)
        cpuset = q.pick_cpuset(spec.cpus)
        host_config = self.api.create_host_config(
            runtime=spec.runtime,
            network_mode="none",
            cap_drop=["ALL"],
            cap_add=list(AGENT_CAPABILITIES),  # the agent's; commands run with none
            security_opt=["no-new-privileges"],
            read_only=True,
            init=True,  # tini as PID 1 reaps orphans of killed commands
            # Only root's processes (init, agent) write here, and rarely: a small,
            # fixed bound on the host all the same.
            log_config=docker.types.LogConfig(type="json-file", config={"max-size": "1m", "max-file": "1"}),
            mem_limit=spec.memory_bytes,
            memswap_limit=spec.memory_bytes,
            nano_cpus=int(spec.cpus * 1e9),
            cpuset_cpus=cpuset,
            pids_limit=spec.pids_limit,
            # --- quota.py: processes hit RLIMIT_NPROC (EAGAIN) before the host's pids limit
            ulimits=[docker.types.Ulimit(name="nproc", soft=q.nproc_limit(spec.pids_limit, spec.runtime),
                                         hard=q.nproc_limit(spec.pids_limit, spec.runtime))],
            # nocopy: the engine copies nothing (contents, owner) from the image's
            # mount point onto a new volume: its root is the sandbox user's already.
            binds={volume: {"bind": spec.workdir, "mode": "rw,nocopy"}},
            tmpfs={
                "/tmp": f"rw,nosuid,nodev,size={spec.tmp_bytes},mode=1777",
                "/home/sandbox": f"rw,nosuid,nodev,size={spec.tmp_bytes},uid={SANDBOX_UID},gid={SANDBOX_GID},mode=0755",
                AGENT_DIR: "rw,nosuid,nodev,noexec,size=1m,mode=0700",
            },
        )
        self.api.create_container(
            spec.image,
            command=list(spec.command),
            name=spec.name,
            user="0:0",
            working_dir=spec.workdir,
            environment=spec.env,
            labels={**spec.labels, VOLUME_LABEL: volume},
            hostname="sandbox",
            network_disabled=True,
            host_config=host_config,
        )

    async def start(self, spec: SandboxSpec) -> Started:
        container = await self._call(self.api.inspect_container, spec.name)
        labels = container["Config"].get("Labels") or {}
        saved = await self._call(self._checkpoints, container["Id"])
        upgraded = await self._upgrade(labels, spec)  # a new container: its checkpoints went with the old one
        if container["State"].get("Running") and not upgraded:
            return Started()
        await self._call(self._reattach_workspace, spec.name)  # quota: loop devices do not survive a reboot
        if upgraded:
            await self._call(self.api.start, spec.name)
            return Started(lost="it was re-made for this server version" if saved else "")
        started_at = _epoch_ms(container["State"].get("StartedAt", ""))
        fresh = sorted((c for c in saved if _made_at(c) > started_at), key=_made_at)
        lost = ""
        if fresh:
            try:
                await self._call(self._start_from, spec.name, fresh[-1])
                await self._call(self._delete_checkpoints, spec.name, saved)  # now stale
                return Started(restored=True)
            except (BackendUnavailable, SandboxGone) as exc:
                log.warning("%s: restoring checkpoint %s failed; starting it cold: %s", spec.name, fresh[-1], exc)
                lost = f"its saved memory could not be restored ({_short(str(exc))})"
        if saved:
            await self._call(self._delete_checkpoints, spec.name, saved)
        await self._call(self.api.start, spec.name)
        return Started(lost=lost)

    async def checkpoint(self, name: str) -> int | None:
        def save() -> int | None:
            container = self.api.inspect_container(name)
            if not container["State"].get("Running"):
                raise CheckpointFailed(f"{name} is not running")
            self._delete_checkpoints(name, self._checkpoints(container["Id"]))
            checkpoint = f"{_CHECKPOINT_PREFIX}{int(time.time() * 1000)}"
            response = self.api._post_json(self.api._url("/containers/{0}/checkpoints", name),
                                           data={"CheckpointID": checkpoint, "Exit": True})
            if response.status_code >= 400:
                self._delete_checkpoints(name, [checkpoint])  # a partial image, if any
                raise CheckpointFailed(f"the engine could not checkpoint {name}: {_short(response.text)}")
            # runsc answers before its image is all on disk: done means written.
            self._wait_written(container["Id"], checkpoint)
            self._written.add(checkpoint)
            return self._checkpoint_bytes(container["Id"], checkpoint)

        if not self.can_checkpoint:
            raise CheckpointFailed("this engine cannot checkpoint (experimental mode off, or not gVisor)")
        try:
            return await self._call(save)
        except BackendUnavailable as exc:
            raise CheckpointFailed(str(exc)) from exc

    # --- checkpoint helpers (in a worker thread)
    def _start_from(self, name: str, checkpoint: str) -> None:
        container = self.api.inspect_container(name)
        if checkpoint not in self._written:
            self._wait_written(container["Id"], checkpoint)
        self._written.discard(checkpoint)
        stamp = restore_copies.image_stamp(self._checkpoint_image(container["Id"], checkpoint))
        try:
            response = self.api._post(self.api._url("/containers/{0}/start", name), params={"checkpoint": checkpoint})
            self.api._raise_for_status(response)
        finally:
            # containerd leaves an unpacked copy of the image behind (restore_copies.py):
            # cleared off the wake's path.
            threading.Thread(target=restore_copies.sweep, args=(lambda: self.api, container["Image"], stamp),
                             name="restore-copies", daemon=True).start()

    def _checkpoint_image(self, container_id: str, checkpoint: str) -> str:
        return os.path.join(self._root_dir, "containers", container_id, "checkpoints", checkpoint, "checkpoint.img")

    def _checkpoints(self, container_id: str) -> builtins.list[str]:
        """This container's checkpoints (ours by name): from the engine's directory when this
        process can read it (no API call), else from the engine."""
        directory = os.path.join(self._root_dir, "containers", container_id, "checkpoints")
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            return []
        except OSError:
            response = self.api._get(self.api._url("/containers/{0}/checkpoints", container_id))
            if response.status_code >= 400:
                return []  # not experimental: there are none
            names = [c.get("Name", "") for c in response.json() or []]
        return [n for n in names if n.startswith(_CHECKPOINT_PREFIX)]

    def _wait_written(self, container_id: str, checkpoint: str) -> None:
        """Until runsc has finished writing the image. The engine's checkpoint call returns,
        lists the checkpoint and reports its container exited while runsc still writes the
        image (seen here: half of 200 MB on disk), and a restore from a growing image fails
        ("archive/tar: write too long", or containerd's "already exists"). Its maker may also
        have been killed meanwhile (a client gives a server seconds to exit). Done: the file
        unchanged for 2 s. Unreadable here: no wait (a failed restore is a cold start)."""
        image = self._checkpoint_image(container_id, checkpoint)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if time.time() - os.stat(image).st_mtime > 2:
                    return
            except OSError:
                return
            time.sleep(0.25)

    def _checkpoint_bytes(self, container_id: str, checkpoint: str) -> int | None:
        """Disk taken by a checkpoint image; None where this process cannot read it."""
        directory = os.path.join(self._root_dir, "containers", container_id, "checkpoints", checkpoint)
        try:
            with os.scandir(directory) as entries:
                return sum(e.stat(follow_symlinks=False).st_blocks * 512 for e in entries)
        except OSError:
            return None

    def _delete_checkpoints(self, name: str, checkpoints: builtins.list[str]) -> None:
        for checkpoint in checkpoints:
            self.api._delete(self.api._url("/containers/{0}/checkpoints/{1}", name, checkpoint))

    # --- quota helpers (deployment/quota.py)
    def _set_up_quota(self) -> None:
        """Decide once, when the engine answers, how (and whether) quotas work here. (While
        it does not, nothing is decided: no sandbox can be made then anyway.)"""
        with self._wanted_lock:
            if self._wanted is None:
                return
            try:
                self.api.ping()
            except (BackendUnavailable, docker.errors.DockerException, requests.exceptions.RequestException):
                return
            w, self._wanted = self._wanted, None
            self.quota = q.workspace_quota(w.size_bytes, w.directory, w.image, lambda: self.api)

    def _quota_for(self, host_file: str, image: str) -> tuple[q.WorkspaceQuota, str]:
        """The quota that manages an existing workspace filesystem, and its volume: ours, or
        one made for the file's directory (another --quota-dir, another server). `image`
        serves for helper containers (the sandbox's own image has losetup)."""
        if self.quota is not None:
            volume = self.quota.volume_of(host_file)
            if volume is not None:
                return self.quota, volume
        return q.existing(self.api, host_file, image)

    def _reattach_workspace(self, name: str) -> None:
        """A quota-backed workspace's file must be on a loop device before its container
        starts: re-attach it if not (after a host reboot nothing is)."""
        container = self.api.inspect_container(name)
        volume = (container["Config"].get("Labels") or {}).get(VOLUME_LABEL)
        if not volume:
            return
        host_file = (self.api.inspect_volume(volume).get("Labels") or {}).get(q.FILE_LABEL)
        if host_file:
            try:
                quota, volume = self._quota_for(host_file, container["Image"])
                quota.ensure_attached(volume)
            except q.QuotaError as exc:
                raise BackendUnavailable(f"cannot start {name}: {exc}") from exc

    def _collect_orphans(self) -> None:
        """Housekeeping, at most every 10 minutes: remove helper containers and workspace
        volumes no container uses (what a server killed at the wrong moment leaves), then
        release quota filesystems whose volume is gone."""
        if time.monotonic() - self._collected_at < _STRAY_AFTER:
            return
        self._collected_at = time.monotonic()
        try:
            volumes = self.api.volumes(filters={"label": f"{MANAGED_LABEL}=1"}).get("Volumes") or []
            containers = []
            for c in self.api.containers(all=True):
                # An older helper container is a killed server's.
                if (c.get("Labels") or {}).get(q.HELPER_LABEL) and time.time() - c.get("Created", 0) > _HELPER_MAX_AGE:
                    log.info("removing helper container %s, left by a server that stopped while it ran", c["Id"][:12])
                    self.api.remove_container(c["Id"], force=True)
                else:
                    containers.append(c)
            used = {m.get("Name") for c in containers for m in c.get("Mounts") or []}
            # A volume is a stray once no container used it in passes 10 minutes apart: a
            # volume is made just before its container, and a layout upgrade re-creates a
            # container on its volume.
            now = time.monotonic()
            self._unused_since = {v["Name"]: self._unused_since.get(v["Name"], now) for v in volumes if v["Name"] not in used}
            for volume, since in sorted(self._unused_since.items()):
                if now - since >= _STRAY_AFTER:
                    log.info("removing workspace volume %s: no container has used it for 10 minutes", volume)
                    try:
                        self._drop_volume(volume, image=None)
                    except docker.errors.APIError as exc:  # in use again (the engine refuses): kept
                        log.info("kept workspace volume %s: %s", volume, exc)
            if self.quota is not None:
                self.quota.collect({v["Name"] for v in self.api.volumes().get("Volumes") or []})
        except Exception as exc:  # noqa: BLE001 - housekeeping must not fail a create
            log.warning("could not collect orphaned workspaces: %s", exc)

    async def stop(self, name: str) -> None:
        try:
            await self._call(self.api.kill, name)
        except BackendUnavailable:
            pass  # already stopped: the engine answers 409
        await self._call(self.api.wait, name, timeout=30)

    async def claim(self, name: str, new_name: str) -> None:
        # The engine's rename: atomic for one engine, though two processes renaming one
        # container at once may both succeed (seen on 20.10), so each server claims only
        # pool containers it made itself (containers.py).
        try:
            await anyio.to_thread.run_sync(self.api.rename, name, new_name)
        except docker.errors.NotFound as exc:
            raise SandboxGone(str(exc)) from exc
        except docker.errors.APIError as exc:
            if exc.status_code == 409:
                raise NameTaken(str(exc)) from exc
            raise BackendUnavailable(f"Docker Engine error: {exc}") from exc

    async def list(self, prefix: str, *, sizes: bool = False) -> builtins.list[SandboxRecord]:
        found = await self._call(self.api.containers, all=True, filters={"name": prefix})
        volume_sizes = await self._volume_sizes() if sizes and found else {}
        records = []
        for c in found:
            name = c["Names"][0].lstrip("/")
            if name.startswith(prefix):  # the engine's filter matches anywhere in the name
                labels = c.get("Labels") or {}
                size = volume_sizes.get(labels.get(VOLUME_LABEL, ""), -1)
                running = c["State"] == "running"
                saved = [] if running else await self._call(self._checkpoints, c["Id"])
                saved_bytes = await self._call(self._checkpoint_bytes, c["Id"], max(saved)) if saved else None
                records.append(SandboxRecord(name=name, labels=labels, running=running, status=c["State"],
                                             size_bytes=size if size >= 0 else None,
                                             checkpointed=bool(saved), checkpoint_bytes=saved_bytes))
        return records

    async def _volume_sizes(self) -> dict[str, int]:
        """Bytes per volume, -1 where unknown. The engine measures plain volumes; a quota
        volume's filesystem is measured by the host disk its file takes (quota.py)."""
        usage = await self._call(self.api.df)
        sizes = {}
        for v in usage.get("Volumes") or []:
            size = v.get("UsageData", {}).get("Size", -1)
            host_file = (v.get("Labels") or {}).get(q.FILE_LABEL)
            if size < 0 and host_file:
                size = q.disk_usage(host_file)
            sizes[v["Name"]] = size
        return sizes

    async def remove(self, name: str) -> None:
        try:
            container = await self._call(self.api.inspect_container, name)
            volume = (container["Config"].get("Labels") or {}).get(VOLUME_LABEL)
            await self._call(self.api.remove_container, name, force=True)
        except SandboxGone:
            return
        if volume:
            await self._call(self._drop_volume, volume, container["Image"])

    def _drop_volume(self, volume: str, image: str | None) -> None:
        """Remove a workspace volume (the engine refuses while a container uses it), and
        its quota filesystem if it has one (deployment/quota.py). Without an image for
        helper containers, only a filesystem of this server's quota directory is released;
        another directory's server releases its own once the volume is gone."""
        try:
            host_file = (self.api.inspect_volume(volume).get("Labels") or {}).get(q.FILE_LABEL)
            self.api.remove_volume(volume)
        except docker.errors.NotFound:
            return
        if not host_file or (image is None and (self.quota is None or self.quota.volume_of(host_file) is None)):
            return
        try:
            quota, quota_volume = self._quota_for(host_file, image or "")
            quota.release(quota_volume)
        except (q.QuotaError, docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            log.warning("could not release the filesystem %s of volume %s: %s", host_file, volume, exc)

    async def inspect(self, name: str, *, count_in_use: bool = True) -> SandboxRecord:
        info = await self._call(self.api.inspect_container, name)
        s = info["State"]
        oom = bool(s.get("OOMKilled"))
        if not s.get("Running") and not oom and s.get("ExitCode"):
            oom = await self._call(self._oom_event, name, s.get("StartedAt", ""))
        return SandboxRecord(
            name=name,
            labels=info["Config"].get("Labels") or {},
            running=bool(s.get("Running")),
            status=s.get("Status", "?"),
            exit_code=s.get("ExitCode"),
            oom_killed=oom,
            in_use=await self._call(self._running_execs, info.get("ExecIDs") or []) if count_in_use else None,
        )

    def _oom_event(self, name: str, started: str) -> bool:
        """Did the engine see the host kill anything of the sandbox for memory since it
        started? Under gVisor the kill may hit one of its helper processes, and then the
        container's OOMKilled flag stays false though the sandbox died of it."""
        try:
            since = datetime.fromisoformat(started[:26].rstrip("Z")).replace(tzinfo=UTC).timestamp()
        except ValueError:
            return False
        events = self.api.events(since=int(since), until=int(time.time()) + 1, decode=True,
                                 filters={"container": name, "event": "oom"})
        return any(True for _ in events)

    def _running_execs(self, exec_ids: builtins.list[str]) -> int:
        """Agent connections are relays started by exec: count those still running."""
        running = 0
        for exec_id in exec_ids:
            try:
                running += bool(self.api.exec_inspect(exec_id).get("Running"))
            except docker.errors.NotFound:
                pass
        return running

    async def connect(self, name: str, argv: builtins.list[str]) -> AgentStream:
        try:
            status, body, _ = await _http(
                f"/containers/{name}/exec",
                {
                    "AttachStdin": True,
                    "AttachStdout": True,
                    "AttachStderr": True,
                    "Tty": False,
                    "Cmd": argv,
                    "User": "0:0",
                },
            )
            if status == 404:
                raise SandboxGone(f"sandbox {name} not found")
            if status != 201:
                raise BackendUnavailable(f"exec create failed ({status}): {body[:300]!r}")
            exec_id = json.loads(body)["Id"]
            status, leftover, sock = await _http(f"/exec/{exec_id}/start", {"Detach": False, "Tty": False}, upgrade=True)
        except OSError as exc:
            raise BackendUnavailable(f"Docker Engine not reachable: {exc}") from exc
        if status not in (101, 200):
            await sock.aclose()
            raise BackendUnavailable(f"exec start failed ({status})")
        return DockerAgentStream(sock, leftover)
