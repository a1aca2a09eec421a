"""Limits that need the host's help: workspace disk quotas and CPU pinning.

Disk quota. Docker's overlay2 `--storage-opt size=` needs XFS with project quotas; on
ext4 hosts nothing in the engine caps a volume. What enforces a real quota here (writes
past it fail with ENOSPC inside the sandbox, nothing else on the host is touched): each
workspace volume is its own ext4 filesystem in a sparse file, attached to a loop device
and mounted by Docker's `local` volume driver:

    <dir>/<volume>.img   the filesystem (sparse: holds only what is written; deletions
                         are punched back out with the `discard` mount option)
    <dir>/<volume>.dev   a symlink to the loop device (/dev/loopN) the file is attached to

The volume's `device` option is the symlink, never /dev/loopN itself: loop numbers are
not stable (after a host reboot nothing is attached, and /dev/loop3 may then hold another
file). Before a container starts, `ensure_attached` checks that the link leads to a loop
device backed by this very file, and re-attaches and re-points it if not. So the volume
never has to change (the engine refuses to modify or remove a volume that a container
refers to, even a stopped one), and a stopped container starts again after a reboot.

Needs root (losetup, mount), util-linux's `losetup` and e2fsprogs' `mkfs.ext4`; without
them `probe` says why and the server runs without a quota (with a warning; `doctor` too).

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

import fcntl
import itertools
import logging
import math
import os
import random
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_DIR = "/var/lib/mcp-codeexec/workspaces"
# Labels on a quota-backed volume.
FILE_LABEL = "org.mcp-codeexec.quota.file"
SIZE_LABEL = "org.mcp-codeexec.quota.bytes"
_SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")
_MOUNT_OPTIONS = "nodev,nosuid,discard"


class QuotaError(Exception):
    """A quota operation failed (the message says which and why)."""


def find_tool(name: str) -> str | None:
    """A command from PATH or the sbin directories (a non-login PATH may lack them)."""
    found = shutil.which(name)
    if found:
        return found
    for d in _SBIN:
        if os.access(os.path.join(d, name), os.X_OK):
            return os.path.join(d, name)
    return None


def probe(directory: str = DEFAULT_DIR) -> str | None:
    """Why loop-device quotas cannot work on this host, or None if they can."""
    if os.geteuid() != 0:
        return "not running as root: attaching loop devices and mounting them needs root"
    for tool, package in (("losetup", "util-linux"), ("mkfs.ext4", "e2fsprogs"), ("debugfs", "e2fsprogs")):
        if find_tool(tool) is None:
            return f"{tool} not found (Debian package {package})"
    if not os.path.exists("/dev/loop-control"):
        return "/dev/loop-control is missing: the kernel has no loop device support (modprobe loop)"
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    except OSError as exc:
        return f"cannot create {directory}: {exc.strerror}"
    if not os.access(directory, os.W_OK):
        return f"{directory} is not writable"
    return None


def _run(*argv: str) -> str:
    tool = find_tool(argv[0]) or argv[0]
    try:
        res = subprocess.run([tool, *argv[1:]], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise QuotaError(f"{argv[0]} failed: {exc}") from exc
    if res.returncode != 0:
        raise QuotaError(f"{' '.join(argv)} failed ({res.returncode}): {res.stderr.strip()[-500:]}")
    return res.stdout


def _backing_file(device: str) -> str | None:
    """The file attached to a loop device (None if none, or not a loop device)."""
    name = os.path.basename(device)
    try:
        with open(f"/sys/block/{name}/loop/backing_file", encoding="utf-8", errors="replace") as f:
            return f.read().rstrip("\n")
    except OSError:
        return None


@contextmanager
def _locked(directory: str) -> Iterator[None]:
    """One attach/detach at a time across every server process on the host."""
    fd = os.open(os.path.join(directory, ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _devices_of(image: str) -> list[str]:
    """The loop devices the file is attached to."""
    out = _run("losetup", "--noheadings", "--output", "NAME,BACK-FILE", "--list")
    found = []
    for line in out.splitlines():
        name, _, back = line.strip().partition(" ")
        if back.strip() == image:
            found.append(name)
    return found


def _attach(image: str, link: str) -> str:
    """Attach the file (or reuse its loop device) and point the link at it. Locked."""
    device = next(iter(_devices_of(image)), None)
    if device is None:
        device = _run("losetup", "--find", "--show", image).strip()
    tmp = f"{link}.{os.getpid()}.tmp"
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    os.symlink(device, tmp)
    os.replace(tmp, link)
    return device


def is_attached(image: str, link: str) -> bool:
    """Whether the link leads to a loop device backed by this very file."""
    try:
        device = os.readlink(link)
    except OSError:
        return False
    return _backing_file(device) == image


def ensure_attached(image: str, link: str) -> None:
    """Before a container of a quota-backed volume starts (e.g. after a host reboot, when
    nothing is attached, or /dev/loopN holds another file)."""
    if is_attached(image, link):
        return
    if not os.path.isfile(image):
        raise QuotaError(f"the workspace's filesystem {image} is gone")
    if os.geteuid() != 0:
        raise QuotaError(f"the workspace's filesystem {image} must be attached again, which needs root")
    with _locked(os.path.dirname(image)):
        if not is_attached(image, link):
            device = _attach(image, link)
            log.info("workspace filesystem %s re-attached at %s", image, device)


def release(image: str, link: str) -> None:
    """Detach and delete a workspace's filesystem (once its volume is removed). A device
    still mounted is detached by the kernel when it is unmounted."""
    with _locked(os.path.dirname(image)):
        if os.path.exists(image):
            for device in _devices_of(image):
                try:
                    _run("losetup", "--detach", device)
                except QuotaError as exc:
                    log.warning("could not detach %s: %s", device, exc)
        for path in (link, image):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


@dataclass(frozen=True)
class WorkspaceQuota:
    """Loop-device workspaces of `size_bytes` each, their files in `directory`."""

    size_bytes: int
    directory: str = DEFAULT_DIR

    def __post_init__(self) -> None:
        object.__setattr__(self, "directory", os.path.realpath(self.directory))

    def image(self, volume: str) -> Path:
        return Path(self.directory, f"{volume}.img")

    def link(self, volume: str) -> Path:
        return Path(self.directory, f"{volume}.dev")

    # ------------------------------------------------------------- lifecycle

    def create(self, volume: str, uid: int = 1000, gid: int = 1000) -> dict[str, str]:
        """Make the volume's filesystem and attach it. Returns the `local` driver's options
        and labels for `docker volume create`."""
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
            # -m 0: no blocks reserved for root (the sandbox user gets the whole size).
            # root_owner: the workspace's root belongs to the sandbox user.
            # lazy_itable_init=0: inode tables marked zeroed now (the file is sparse, so
            # they are), so the kernel never writes them later; lazy_journal_init=1: the
            # journal of a sparse file is zero already, no need to write it.
            _run(
                "mkfs.ext4", "-q", "-F", "-m", "0", "-L", "workspace",
                "-E", f"root_owner={uid}:{gid},lazy_itable_init=0,lazy_journal_init=1", str(image),
            )
            # An empty workspace, as without a quota (and as the Claude API's).
            _run("debugfs", "-w", "-R", "rmdir lost+found", str(image))
            with _locked(self.directory):
                _attach(str(image), str(self.link(volume)))
        except BaseException:
            self.release(volume)
            raise
        return {"type": "ext4", "device": str(self.link(volume)), "o": _MOUNT_OPTIONS}

    def labels(self, volume: str) -> dict[str, str]:
        return {FILE_LABEL: str(self.image(volume)), SIZE_LABEL: str(self.size_bytes)}

    def ensure_attached(self, volume: str) -> None:
        ensure_attached(str(self.image(volume)), str(self.link(volume)))

    def attached(self, volume: str) -> bool:
        return is_attached(str(self.image(volume)), str(self.link(volume)))

    def release(self, volume: str) -> None:
        release(str(self.image(volume)), str(self.link(volume)))

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
        for volume in orphans:
            self.release(volume)
        if orphans:
            log.info("released %d orphaned workspace filesystems", len(orphans))
        return orphans

    def usage(self, volume: str) -> int:
        """Bytes of host disk the volume's file takes."""
        try:
            return self.image(volume).stat().st_blocks * 512
        except FileNotFoundError:
            return 0


def workspace_quota(size_bytes: int, directory: str = DEFAULT_DIR) -> WorkspaceQuota | None:
    """The quota for new sandboxes, or None (logged) when off or not possible here."""
    if size_bytes <= 0:
        log.info("workspace disk quota: off")
        return None
    reason = probe(directory)
    if reason is not None:
        log.warning("workspace disk quota OFF (%s): workspaces can fill the host's disk; see `mcp-codeexec doctor`", reason)
        return None
    return WorkspaceQuota(size_bytes, directory)


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
