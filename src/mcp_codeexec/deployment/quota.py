"""Limits that need the host's help: workspace disk quotas and CPU pinning.

Disk quota. Docker's overlay2 `--storage-opt size=` needs XFS with project quotas; on
ext4 hosts nothing in the engine caps a volume. What enforces a real quota here (writes
past it fail with ENOSPC inside the sandbox, nothing else on the host is touched): each
workspace volume is its own ext4 filesystem in a sparse file, attached to a loop device
and mounted by Docker's `local` volume driver:

    <dir>/<volume>.img   the filesystem (sparse: holds only what is written; deletions
                         are punched back out with the `discard` mount option)
    <dir>/<volume>.dev   a symlink to the loop device (/dev/loopN) the file is attached to
    <dir>/<volume>.loop  which attachment that was: boot id, device, the device's disk
                         sequence number (bumped by the kernel at every attach) and the
                         backing file's name

The volume's `device` option is the symlink, never /dev/loopN itself: loop numbers are
not stable (after a host reboot nothing is attached, and /dev/loop3 may then hold another
file). Before a container starts, `ensure_attached` checks that the link and the record
still describe the device's current attachment, and re-attaches and re-points them if
not. So the volume never has to change (the engine refuses to modify or remove a volume
that a container refers to, even a stopped one), and a stopped container starts again
after a reboot.

Who does what. Making the sparse file and formatting it (mkfs.ext4, debugfs) need no
privileges: this process does it when e2fsprogs is installed. Attaching and detaching
loop devices needs root. As root with util-linux's losetup and /dev/loop-control, the
server runs losetup itself ("direct"). Otherwise (a desktop user in the `docker` group,
or the server in a container with only the engine socket, as deploy/compose.yaml runs it)
the engine does it: a short-lived helper container of the sandbox image (runc, no
network, root with only CAP_SYS_ADMIN and CAP_DAC_OVERRIDE, the device cgroup opened to
loop devices only, the host's /dev and the quota directory mounted) runs losetup
("through the engine"); the engine socket is root-equivalent already. The helper sees the
quota directory at its path on the host, which is what the engine's mount(2) resolves the
volume's device link in: when the server itself runs in a container, that path is found
from the server container's mounts, and a probe at start-up checks that the engine really
sees the directory there. Either way the rest is one code path: the same losetup scripts
(`_STEPS`), run by a `Runner` chosen once.

Without any of this `setup` says why and the server runs without a quota (with a
warning; `doctor` too).

Process count. Docker's `--pids-limit` caps the container's host cgroup, and under runsc
that cgroup holds gVisor's own tasks: with the ptrace platform each process in the sandbox
costs 6 host tasks asleep and up to 15 while it runs (stub processes and threads; a
sleeping sandbox thread costs next to nothing), on top of ~40 for the sandbox itself. A
fork bomb (or just ~35 busy processes under the default 512) then hits the host limit
first, gVisor cannot make a thread, and the whole sandbox dies. So the sandbox also gets an
RLIMIT_NPROC (which gVisor enforces, per user, counting threads too) that trips first:
forks fail with EAGAIN inside and the sandbox lives on. It is (pids - 64) // 16: 28
processes and threads for --pids 512. Raise --pids for more: the host-side cap grows with it.

CPU pinning. Under gVisor, a CFS quota (`--cpus`) still shows every host CPU inside
(`nproc`, `os.cpu_count()`), so programs start too many workers; a cpuset shows what
is allotted. Each sandbox gets ceil(cpus) cores, rotating across the host's cores so
sandboxes do not all share core 0; the CFS quota still caps fractional shares.
"""

from __future__ import annotations

import abc
import fcntl
import functools
import itertools
import logging
import math
import os
import random
import re
import secrets
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import docker.errors
import requests.exceptions

from mcp_codeexec.deployment.base import SANDBOX_GID, SANDBOX_UID
from mcp_codeexec.errors import QuotaError
from mcp_codeexec.files import default_data_dir

__all__ = ["QuotaError"]  # raised here; defined with the others in errors.py

log = logging.getLogger(__name__)

ROOT_DIR = "/var/lib/mcp-codeexec/workspaces"  # the default quota directory for root
# Labels on a quota-backed volume, and on the helper containers.
FILE_LABEL = "org.mcp-codeexec.quota.file"
SIZE_LABEL = "org.mcp-codeexec.quota.bytes"
HELPER_LABEL = "org.mcp-codeexec.quota.helper"
_SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")
_MOUNT_OPTIONS = "nodev,nosuid,discard"
_TIMEOUT = 60

# The steps, as scripts for `sh -eu -c SCRIPT sh ARGS...`: run here (as root for losetup),
# or in the helper container. A file's devices are found by inode (`losetup -j` as root
# compares device and inode numbers), so they are found whichever mount namespace
# attached them.
_ATTACH = """
dev=$(losetup --list --noheadings --output NAME --associated "$1" | head -n 1)
[ -n "$dev" ] || dev=$(losetup --find --show "$1")
echo "$dev"
"""
_DETACH = """
status=0
for f in "$@"; do
    [ -e "$f" ] || continue
    for dev in $(losetup --list --noheadings --output NAME --associated "$f"); do
        losetup --detach "$dev" || status=1
    done
done
exit $status
"""
# -m 0: no blocks reserved for root (the sandbox user gets the whole size). root_owner: the
# workspace's root belongs to the sandbox user. lazy_itable_init=0: inode tables marked
# zeroed now (the file is sparse, so they are), so the kernel never writes them later;
# lazy_journal_init=1: the journal of a sparse file is zero already. Then an empty
# workspace, as without a quota (and as the Claude API's): no lost+found.
_FORMAT = f"""
mkfs.ext4 -q -F -m 0 -L workspace \
    -E root_owner={SANDBOX_UID}:{SANDBOX_GID},lazy_itable_init=0,lazy_journal_init=1 "$1"
debugfs -w -R "rmdir lost+found" "$1" 2>/dev/null
"""
# The helper's start-up check: loop devices, the tools, and the quota directory where the
# engine sees it ($1: a file just made there; $2: 1 if the helper formats too).
_PROBE = """
[ -e /dev/loop-control ] || { echo "the engine's host has no /dev/loop-control (modprobe loop)"; exit 3; }
command -v losetup >/dev/null || { echo "the helper image has no losetup (util-linux)"; exit 3; }
if [ "$2" = 1 ]; then
    command -v mkfs.ext4 >/dev/null && command -v debugfs >/dev/null \
        || { echo "neither this host nor the helper image has mkfs.ext4 and debugfs (e2fsprogs)"; exit 3; }
fi
[ -f "$1" ] || { echo "the engine does not see the quota directory at $(dirname "$1")"; exit 3; }
losetup --find >/dev/null
"""
_STEPS = {"attach": _ATTACH, "detach": _DETACH, "format": _FORMAT, "probe": _PROBE}



def default_dir() -> str:
    """Where workspaces' filesystems live by default: /var/lib for root, else the user's
    data directory (the engine, root on the same host, sees it there too)."""
    return ROOT_DIR if os.geteuid() == 0 else str(default_data_dir() / "workspaces")


def find_tool(name: str) -> str | None:
    """A command from PATH or the sbin directories (a non-login PATH may lack them)."""
    found = shutil.which(name)
    if found:
        return found
    for d in _SBIN:
        if os.access(os.path.join(d, name), os.X_OK):
            return os.path.join(d, name)
    return None


# ------------------------------------------------------------------ runners


class Runner(abc.ABC):
    """Runs one of the scripts above, with file arguments given as this process sees them."""

    how: str  # for logs and doctor

    @abc.abstractmethod
    def run(self, step: str, *files: str) -> str:
        """The stdout of the script of that name (`_STEPS`); QuotaError when it fails."""


class LocalRunner(Runner):
    """In this process's own user and mount namespace."""

    def __init__(self, how: str) -> None:
        self.how = how

    def run(self, step: str, *files: str) -> str:
        return run_here(_STEPS[step], list(files), step)


def run_here(script: str, args: list[str], what: str) -> str:
    """`sh -eu -c SCRIPT sh ARGS...` in this process (run_helper's local twin). Its
    stdout; QuotaError when it fails."""
    path = os.pathsep.join([os.environ.get("PATH", "/usr/bin:/bin"), *_SBIN])
    try:
        res = subprocess.run(["sh", "-eu", "-c", script, "sh", *args], capture_output=True, text=True,
                             timeout=_TIMEOUT, env={**os.environ, "PATH": path, "LC_ALL": "C"})
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise QuotaError(f"{what} failed: {exc}") from exc
    if res.returncode != 0:
        raise QuotaError(f"{what} failed ({res.returncode}): {(res.stderr or res.stdout).strip()[-500:]}")
    return res.stdout


@dataclass(frozen=True)
class PathMap:
    """Paths of this process -> the same paths on the engine's host. Identity unless this
    process runs in a container: then through that container's mounts."""

    mounts: tuple[tuple[str, str], ...] = ()  # (here, on the host), longest first
    in_container: str | None = None  # the container's id

    def to_host(self, path: str) -> str:
        if self.in_container is None:
            return path
        for here, host in self.mounts:
            if path == here or path.startswith(here.rstrip("/") + "/"):
                return host + path[len(here.rstrip("/")):]
        raise QuotaError(f"{path} is in the server's own container, not on a volume or bind mount: "
                         "the engine cannot see it (put the quota directory on a volume)")

    def to_local(self, path: str) -> str:
        if self.in_container is None:
            return path
        for here, host in self.mounts:
            if path == host or path.startswith(host.rstrip("/") + "/"):
                return here.rstrip("/") + path[len(host.rstrip("/")):]
        raise QuotaError(f"{path} (on the engine's host) is not mounted into the server's container")


def _own_container() -> str | None:
    """The id of the Docker container this process runs in, if any: the engine bind-mounts
    /etc/hostname from its containers/<id>/ directory."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) > 4 and fields[4] in ("/etc/hostname", "/etc/hosts", "/etc/resolv.conf"):
            found = re.search(r"/containers/([0-9a-f]{64})/", fields[3])
            if found:
                return found.group(1)
    return None


def path_map(api: docker.APIClient) -> PathMap:
    cid = _own_container()
    if cid is None:
        return PathMap()
    try:
        mounts = api.inspect_container(cid).get("Mounts") or []
    except docker.errors.NotFound:
        return PathMap()  # a container of another engine: the paths are what they are
    pairs = [(m["Destination"], m["Source"]) for m in mounts if m.get("Destination") and m.get("Source")]
    return PathMap(tuple(sorted(pairs, key=lambda p: len(p[0]), reverse=True)), cid)


class EngineRunner(Runner):
    """In a short-lived helper container started through the engine."""

    how = "through the engine"

    def __init__(self, api: docker.APIClient, image: str, directory: str, paths: PathMap) -> None:
        self.api = api
        self.image = image
        self.directory = directory  # the quota directory here; mounted at its host path
        self.paths = paths

    def run(self, step: str, *files: str) -> str:
        host_dir = self.paths.to_host(self.directory)
        args = [self.paths.to_host(f) if f.startswith("/") else f for f in files]
        return run_helper(
            self.api, self.image, _STEPS[step], args, step,
            cap_add=["SYS_ADMIN", "DAC_OVERRIDE"],  # LOOP_CONFIGURE; open the user's file
            device_cgroup_rules=["b 7:* rwm", "c 10:237 rwm"],  # loop devices, loop-control
            # The host's /dev: loop devices made after the container started appear.
            binds={"/dev": {"bind": "/dev", "mode": "ro"}, host_dir: {"bind": host_dir, "mode": "rw"}},
        )


def run_helper(api: docker.APIClient, image: str, script: str, args: list[str], what: str, **host_config: Any) -> str:
    """`sh -eu -c SCRIPT sh ARGS...` as root in a short-lived helper container of `image`:
    runc (what it works on is the host kernel's), no network, a read-only root, no new
    privileges, no capabilities but those in `host_config` (with its mounts). Its stdout;
    QuotaError when it fails."""
    try:
        cid = api.create_container(
            image,
            entrypoint=["sh", "-eu", "-c", script, "sh"],
            command=args,
            user="0:0",
            network_disabled=True,
            labels={HELPER_LABEL: "1"},
            host_config=api.create_host_config(runtime="runc", network_mode="none", cap_drop=["ALL"],
                                               security_opt=["no-new-privileges"], read_only=True, **host_config),
        )["Id"]
    except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
        raise QuotaError(f"{what} through the engine: cannot create a helper container of {image}: {exc}") from exc
    try:
        api.start(cid)
        code = api.wait(cid, timeout=_TIMEOUT)["StatusCode"]
        out = api.logs(cid, stdout=True, stderr=False).decode(errors="replace")
        err = api.logs(cid, stdout=False, stderr=True).decode(errors="replace")
    except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
        raise QuotaError(f"{what} through the engine failed: {exc}") from exc
    finally:
        try:
            api.remove_container(cid, force=True)
        except (docker.errors.DockerException, requests.exceptions.RequestException):
            pass
    if code != 0:
        raise QuotaError(f"{what} through the engine failed ({code}): {(err or out).strip()[-500:]}")
    return out


@functools.cache
def _direct_refused() -> str | None:
    """Why this process cannot attach loop devices itself (None: it can)."""
    if os.geteuid() != 0:
        return "not root"
    if find_tool("losetup") is None:
        return "losetup not found (Debian package mount)"
    if not os.path.exists("/dev/loop-control"):
        return "no /dev/loop-control here"
    return None


def _can_format() -> bool:
    return find_tool("mkfs.ext4") is not None and find_tool("debugfs") is not None


# ------------------------------------------------------------ attachments


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return None


def _attachment(device: str) -> str | None:
    """What identifies the loop device's current attachment (None: nothing attached).
    Within one boot the kernel bumps a disk's sequence number at every attach; the backing
    file's name is a second check (its directory depends on the mount namespace that
    attached it)."""
    name = os.path.basename(device)
    backing = _read(f"/sys/block/{name}/loop/backing_file")
    if not re.fullmatch(r"loop\d+", name) or backing is None:
        return None
    boot = _read("/proc/sys/kernel/random/boot_id") or "?"
    seq = _read(f"/sys/block/{name}/diskseq") or "?"
    return f"{boot} {device} {seq} {os.path.basename(backing)}"


def _record(link: str) -> str:
    return re.sub(r"\.dev$", "", link) + ".loop"


def _replace(path: str, write: Callable[[str], object]) -> None:
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    write(tmp)
    os.replace(tmp, path)


def is_attached(image: str, link: str) -> bool:
    """Whether the link leads to a loop device that still holds the attachment made for
    this file (paths as this process sees them)."""
    try:
        device = os.readlink(link)
    except OSError:
        return False
    recorded = _read(_record(link))
    return recorded is not None and recorded == _attachment(device) and recorded.endswith(" " + os.path.basename(image))


@contextmanager
def _locked(directory: str) -> Iterator[None]:
    """One attach/detach at a time across every server process on the host."""
    fd = os.open(os.path.join(directory, ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@dataclass(frozen=True)
class WorkspaceQuota:
    """Loop-device workspaces of `size_bytes` each, their files in `directory` (as this
    process sees it; `paths` maps it to the engine's host). `attacher` runs losetup,
    `formatter` mkfs.ext4 and debugfs."""

    size_bytes: int
    directory: str
    attacher: Runner
    formatter: Runner
    paths: PathMap = field(default_factory=PathMap)

    def __post_init__(self) -> None:
        object.__setattr__(self, "directory", os.path.realpath(self.directory))

    @property
    def how(self) -> str:
        return self.attacher.how

    def image(self, volume: str) -> Path:
        return Path(self.directory, f"{volume}.img")

    def link(self, volume: str) -> Path:
        return Path(self.directory, f"{volume}.dev")

    def volume_of(self, host_file: str) -> str | None:
        """The volume whose filesystem is this file (a path on the engine's host, as in the
        volume's label), if it lives in this quota's directory."""
        try:
            local = self.paths.to_local(host_file)
        except QuotaError:
            return None
        if os.path.dirname(local) != self.directory or not local.endswith(".img"):
            return None
        return os.path.basename(local)[: -len(".img")]

    # ------------------------------------------------------------- lifecycle

    def create(self, volume: str) -> dict[str, str]:
        """Make the volume's filesystem and attach it. Returns the `local` driver's options
        (paths as the engine sees them) for `docker volume create`."""
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", volume):
            raise QuotaError(f"unsuitable volume name {volume!r}")
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        image = self.image(volume)
        try:
            fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise QuotaError(f"{image} exists already") from None
        try:
            try:
                os.ftruncate(fd, self.size_bytes)  # sparse: takes no space yet
            finally:
                os.close(fd)
            self.formatter.run("format", str(image))
            with _locked(self.directory):
                self._attach(volume)
        except BaseException:
            self.release(volume)
            raise
        return {"type": "ext4", "device": self.paths.to_host(str(self.link(volume))), "o": _MOUNT_OPTIONS}

    def labels(self, volume: str) -> dict[str, str]:
        return {FILE_LABEL: self.paths.to_host(str(self.image(volume))), SIZE_LABEL: str(self.size_bytes)}

    def _attach(self, volume: str) -> str:
        """Attach the file (or find its device) and point the link and record at it. Locked."""
        device = self.attacher.run("attach", str(self.image(volume))).strip()
        attachment = _attachment(device)
        if not device.startswith("/dev/loop") or attachment is None:
            raise QuotaError(f"attaching {self.image(volume)} gave {device!r}, which is no attached loop device")
        _replace(str(self.link(volume)), lambda tmp: os.symlink(device, tmp))
        _replace(_record(str(self.link(volume))), lambda tmp: Path(tmp).write_text(attachment + "\n"))
        return device

    def attached(self, volume: str) -> bool:
        return is_attached(str(self.image(volume)), str(self.link(volume)))

    def ensure_attached(self, volume: str) -> None:
        """Before a container of a quota-backed volume starts (e.g. after a host reboot, when
        nothing is attached, or /dev/loopN holds another file)."""
        if self.attached(volume):
            return
        if not self.image(volume).is_file():
            raise QuotaError(f"the workspace's filesystem {self.image(volume)} is gone")
        with _locked(self.directory):
            if not self.attached(volume):
                device = self._attach(volume)
                log.info("workspace filesystem %s re-attached at %s (%s)", self.image(volume), device, self.how)

    def release(self, *volumes: str) -> None:
        """Detach and delete workspaces' filesystems (once their volumes are removed). A
        device still mounted is detached by the kernel when it is unmounted."""
        if not volumes:
            return
        with _locked(self.directory):
            try:
                self.attacher.run("detach", *(str(self.image(v)) for v in volumes))
            except QuotaError as exc:
                log.warning("could not detach the loop devices of %s: %s", ", ".join(volumes), exc)
            for volume in volumes:
                for path in (self.link(volume), Path(_record(str(self.link(volume)))), self.image(volume)):
                    try:
                        path.unlink()
                    except FileNotFoundError:
                        pass

    def volumes(self) -> list[str]:
        """Every volume that has a filesystem here."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        return sorted(n[: -len(".img")] for n in names if n.endswith(".img"))

    def orphans(self, existing: set[str], min_age: float = 60.0) -> list[str]:
        """Filesystems whose volume is gone (removed by hand, or by a crashed server), not
        touched for min_age seconds (a volume is created just after its file)."""
        now = time.time()
        found = []
        for volume in self.volumes():
            if volume in existing:
                continue
            try:
                if now - self.image(volume).stat().st_mtime < min_age:
                    continue
            except FileNotFoundError:
                continue
            found.append(volume)
        return found

    def collect(self, existing: set[str], min_age: float = 60.0) -> list[str]:
        orphans = self.orphans(existing, min_age)
        self.release(*orphans)
        if orphans:
            log.info("released %d orphaned workspace filesystems", len(orphans))
        return orphans



# ------------------------------------------------------------------ set-up


def disk_usage(host_file: str) -> int:
    """Bytes of host disk a workspace filesystem's sparse file takes (-1: unreadable)."""
    try:
        return os.stat(host_file).st_blocks * 512
    except OSError:
        return -1


class QuotaUnavailable(Exception):
    """Loop-device quotas cannot work here (the message says why)."""


def setup(size_bytes: int, directory: str, image: str, api: Callable[[], docker.APIClient]) -> WorkspaceQuota:
    """The quota, with the way this host can run it: losetup as root here (direct), else
    through the engine (helper containers of `image`). `api` gives the engine's client;
    it is asked only when the engine is needed."""
    directory = os.path.realpath(directory)
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise QuotaUnavailable(f"cannot create {directory}: {exc.strerror}") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise QuotaUnavailable(f"{directory} is not writable")
    formats_here = _can_format()
    refused = _direct_refused()
    if refused is None and formats_here:
        direct = LocalRunner("direct")
        return WorkspaceQuota(size_bytes, directory, direct, direct)
    try:
        client = api()
        client.inspect_image(image)
        paths = path_map(client)
        engine = EngineRunner(client, image, directory, paths)
        probe_file = os.path.join(directory, f".probe-{secrets.token_hex(4)}")
        Path(probe_file).touch()
        try:
            engine.run("probe", probe_file, "0" if formats_here else "1")
        finally:
            os.unlink(probe_file)
    except docker.errors.ImageNotFound:
        raise QuotaUnavailable(f"{'not root' if refused else 'no mkfs.ext4/debugfs here'}, and the helper image {image} "
                               "(for losetup through the engine) is missing") from None
    except Exception as exc:  # noqa: BLE001 - whatever stops the engine route is the reason
        why = refused or "mkfs.ext4 or debugfs not found (Debian package e2fsprogs)"
        raise QuotaUnavailable(f"{why}, and through the engine: {exc}") from None
    attacher = LocalRunner("direct") if refused is None else engine
    formatter = LocalRunner("here") if formats_here else engine
    return WorkspaceQuota(size_bytes, directory, attacher, formatter, paths)


def existing(api: docker.APIClient, host_file: str, image: str) -> tuple[WorkspaceQuota, str]:
    """A quota object for an existing workspace filesystem (a path on the engine's host,
    from a volume's label) made by any server, and its volume name: for re-attaching and
    releasing it."""
    if _direct_refused() is None:
        directory, paths = os.path.dirname(host_file), PathMap()
        runner: Runner = LocalRunner("direct")
    else:
        paths = path_map(api)
        directory = os.path.dirname(paths.to_local(host_file))
        runner = EngineRunner(api, image, directory, paths)
    quota = WorkspaceQuota(0, directory, runner, runner, paths)
    return quota, os.path.basename(host_file)[: -len(".img")]


@dataclass(frozen=True)
class Wanted:
    """A quota asked for on the command line: set up once the engine answers."""

    size_bytes: int
    directory: str
    image: str  # the helper containers' image (the sandbox image: it has losetup)


def workspace_quota(size_bytes: int, directory: str, image: str, api: Callable[[], docker.APIClient]) -> WorkspaceQuota | None:
    """The quota for new sandboxes, or None (logged) when off or not possible here."""
    if size_bytes <= 0:
        log.info("workspace disk quota: off")
        return None
    try:
        quota = setup(size_bytes, directory, image, api)
    except QuotaUnavailable as exc:
        log.warning("workspace disk quota OFF (%s): workspaces can fill the host's disk; see `mcp-codeexec doctor`", exc)
        return None
    how = "by this server (root)" if quota.how == "direct" else f"through the engine (helper containers of {image})"
    log.info("workspace disk quota: %d MiB per workspace, loop devices attached %s, files under %s",
             size_bytes >> 20, how, quota.directory)
    return quota


# --------------------------------------------------------------- process count

# Measured with runsc's ptrace platform on 2 cores: an idle sandbox holds 35-40 host tasks;
# each sleeping process ~6 more, each process of a running fork bomb 11-15 more.
_RUNSC_BASE_TASKS = 64
_RUNSC_TASKS_PER_PROCESS = 16


def nproc_limit(pids_limit: int, runtime: str) -> int:
    """RLIMIT_NPROC for the sandbox user: trips before the host's pids limit does."""
    if runtime != "runsc":
        return max(1, pids_limit - 4)
    return max(8, (pids_limit - _RUNSC_BASE_TASKS) // _RUNSC_TASKS_PER_PROCESS)


# ----------------------------------------------------------------- CPU pinning


def host_cpus() -> list[int]:
    """The host's online CPUs (the engine is local: only unix sockets are supported)."""
    try:
        with open("/sys/devices/system/cpu/online", encoding="ascii") as f:
            text = f.read().strip()
        cpus: list[int] = []
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            cpus.extend(range(int(lo), int(hi or lo) + 1))
        if cpus:
            return cpus
    except (OSError, ValueError):
        pass
    return list(range(os.cpu_count() or 1))


# Sandboxes of one server take turns; different servers start at different cores.
_next_cpu = itertools.count(random.randrange(1 << 16))


def pick_cpuset(cpus: float, available: list[int] | None = None) -> str | None:
    """`--cpuset-cpus` for a sandbox of `cpus` CPUs: ceil(cpus) cores, in turn. None when
    that is every core (no pinning needed)."""
    available = available if available is not None else host_cpus()
    want = max(1, math.ceil(cpus))
    if want >= len(available):
        return None
    start = next(_next_cpu) * want
    chosen = sorted(available[(start + i) % len(available)] for i in range(want))
    return ",".join(str(c) for c in chosen)
