"""Settings in force for one server process (from the command line)."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str | int) -> int:
    """'5g', '512m', '1048576' -> bytes (binary units, as Docker reads them)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([bkmgt]?)i?b?\s*", text.lower())
    if not match:
        raise ValueError(f"not a size: {text!r} (try 512m, 5g)")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def format_size(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size and n % (size // 16 or 1) == 0:
            value = n / size
            return f"{value:g} {unit}"
    return f"{n} bytes"


class Settings(BaseModel):
    model_config = ConfigDict(frozen=True)

    runtime: str = "runsc"
    image: str = "mcp-codeexec-sandbox:latest"
    memory_bytes: int = 5 << 30
    cpus: float = 1.0
    pids_limit: int = 512
    timeout: float = Field(default=120.0, gt=0)
    max_output_bytes: int = Field(default=50_000, ge=1024)  # per stream, head + tail kept
    workdir: str = "/workspace"
    tmp_bytes: int = 512 << 20
    lifetime_days: float = 30.0
    tenant: str = "default"
    # Past timeout + this, the server stops waiting for the agent and restarts the sandbox.
    backstop_grace: float = 10.0

    @property
    def rlimit_as(self) -> int:
        """Address-space cap per process: the sandbox's memory, so one process alone cannot
        trigger the host's kill of the whole sandbox."""
        return self.memory_bytes
