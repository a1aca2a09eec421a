"""containerd's copies of restored checkpoints, removed.

To start a container from a checkpoint, Docker Engine 20.10 hands the checkpoint to
containerd, which unpacks it into a new temporary directory (`ctrd-checkpoint*` under its
$XDG_RUNTIME_DIR, else $TMPDIR, else /tmp) for the runtime to read, and never removes it
(containerd 1.6; its issue 10166). Under gVisor that copy is the sandbox's whole memory
image, tens to hundreds of MB, left on the engine's host at every wake: host disk that
sandboxes' sleeps would fill without a bound.

So after each restore the Docker backend clears them: the copy of the image it just
restored (found by the image's size and modification time, which the unpacked copy keeps)
and any copy older than 10 minutes (a restore reads its copy within seconds; an older one
is a failed or finished restore's, ours or another server's). Only directories holding
runsc's `checkpoint.img` are touched. As root on the engine's host this process does it
itself, in each containerd's own temporary directory (seen through /proc/PID/root).
Otherwise (a desktop user in the `docker` group, or the server in a container) a helper
container does it in the host's /tmp, the default; only the older copies are known then,
since the image itself is not readable here.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import docker

from mcp_codeexec.deployment import quota as q

log = logging.getLogger(__name__)

STALE_MINUTES = 10
# $1: a directory containerd unpacks checkpoints in; $2: "SIZE MTIME" of the image just
# restored ("" for none). Prints what it removed.
_SWEEP = f"""
cd "$1" 2>/dev/null || exit 0
for d in ctrd-checkpoint*; do
    [ -d "$d" ] && [ ! -L "$d" ] && [ -f "$d/checkpoint.img" ] || continue
    if {{ [ -n "$2" ] && [ "$(stat -c '%s %Y' "$d/checkpoint.img")" = "$2" ]; }} \
            || [ -n "$(find "$d" -maxdepth 0 -mmin +{STALE_MINUTES})" ]; then
        rm -rf -- "$d" && echo "$1/$d"
    fi
done
"""


def image_stamp(path: str) -> str:
    """What identifies a checkpoint image's unpacked copy: "SIZE MTIME" ("" if unreadable)."""
    try:
        st = os.stat(path)
    except OSError:
        return ""
    return f"{st.st_size} {int(st.st_mtime)}"


def staging_dirs() -> list[str]:
    """Where the containerd processes this process can see unpack checkpoints, through
    their own root (another mount namespace's /tmp too). Empty unless root on the host."""
    found: dict[tuple[int, int], str] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/comm", encoding="utf-8") as f:
                if f.read().strip() != "containerd":
                    continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(e.split("=", 1) for e in f.read().decode(errors="replace").split("\0") if "=" in e)
            path = f"/proc/{pid}/root" + (env.get("XDG_RUNTIME_DIR") or env.get("TMPDIR") or "/tmp")
            st = os.stat(path)
        except OSError:
            continue  # gone, or not ours to read
        found.setdefault((st.st_dev, st.st_ino), path)
    return sorted(found.values())


def clear_in(directory: str, restored: str = "") -> list[str]:
    """Remove the restore copies in `directory` (this process's view): the one of the
    image stamped `restored`, and stale ones. What was removed."""
    return q.run_here(_SWEEP, [directory, restored], f"clearing {directory}").splitlines()


def sweep(api: Callable[[], docker.APIClient], image: str, restored: str = "") -> list[str]:
    """Clear restore copies here as root, else through the engine (the host's /tmp).
    `image` serves for the helper container. What was removed (for logs and tests)."""
    removed: list[str] = []
    try:
        dirs = staging_dirs()
        for directory in dirs:
            removed += clear_in(directory, restored)
        if not dirs:
            out = q.run_helper(api(), image, _SWEEP, ["/host-tmp", ""], "clearing restore copies",
                               binds={"/tmp": {"bind": "/host-tmp", "mode": "rw"}})
            removed += out.splitlines()
    except (OSError, q.QuotaError) as exc:
        log.warning("could not remove containerd's copies of restored checkpoints: %s", exc)
    if removed:
        log.info("removed %d copies of restored checkpoints that containerd left behind", len(removed))
    return removed
