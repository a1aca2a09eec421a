"""Finding the server processes a test started (shared by the e2e and unit tests)."""

from __future__ import annotations

import os


def server_pids(marker: str) -> list[int]:
    """Server processes started with `marker` among their arguments (an unusual flag value)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    args = f.read().split(b"\0")
            except OSError:
                continue
            if b"mcp_codeexec" in args and b"-m" in args and marker.encode() in args:
                pids.append(int(entry))
    return pids
