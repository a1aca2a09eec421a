"""Which gVisor platform is fastest on this host, by measurement (scripts/setup.sh, doctor).

Each platform the host supports (kvm only where /dev/kvm opens; systrap; ptrace) runs the
same small probe in a throwaway sandbox (`runsc --platform=P do`, the host's root
filesystem, no network, no engine involved): the median time to spawn `/bin/true`, and to
start Python and import a few modules. The fastest platform has the lowest geometric mean
of those two times relative to ptrace (which every host has). A platform that fails or
hangs (KVM on some VMs) is skipped. Needs root.

Standard library only and runnable by path: `python3 src/mcp_codeexec/platforms.py RUNSC`
prints `PLATFORM<TAB>how it was chosen`.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

PROBE = r"""
import json, subprocess, time
def median(argv, n):
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        subprocess.run(argv, check=True)
        samples.append(time.perf_counter() - t)
    return sorted(samples)[n // 2] * 1000
subprocess.run(["/bin/true"])  # warm
print(json.dumps({"spawn": median(["/bin/true"], 30), "import": median(["python3", "-c", "import json, decimal, email.parser"], 8)}))
"""
PLATFORMS = ("kvm", "systrap", "ptrace")  # constants.RUNSC_PLATFORMS (this module is run by path)
_HANG = 20  # seconds a probe may take (KVM hangs on some VMs)


def supported() -> list[str]:
    found = []
    for platform in PLATFORMS:
        if platform == "kvm":
            try:
                os.close(os.open("/dev/kvm", os.O_RDWR))
            except OSError:
                continue
        found.append(platform)
    return found


def measure(runsc: str, platform: str) -> dict[str, float] | None:
    """{"spawn": ms, "import": ms} under `platform`, or None if it does not work here."""
    argv = [runsc, "--network=none", f"--platform={platform}", "do", sys.executable if os.path.isabs(sys.executable) else "python3", "-c", PROBE]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=_HANG, cwd="/").stdout
        figures = json.loads(out.strip().splitlines()[-1])
        return {"spawn": float(figures["spawn"]), "import": float(figures["import"])}
    except (OSError, subprocess.SubprocessError, ValueError, IndexError, KeyError, TypeError):
        return None


def choose(runsc: str) -> tuple[str | None, dict[str, dict[str, float] | None]]:
    """(the fastest working platform, or None; the figures of every platform tried)."""
    figures = {platform: measure(runsc, platform) for platform in supported()}
    working = {p: f for p, f in figures.items() if f}
    if not working:
        return None, figures
    base = working.get("ptrace") or next(iter(working.values()))

    def score(f: dict[str, float]) -> float:
        return math.sqrt(f["spawn"] / base["spawn"] * f["import"] / base["import"])

    return min(working, key=lambda p: score(working[p])), figures


def describe(figures: dict[str, dict[str, float] | None]) -> str:
    return "; ".join(
        f"{p}: spawn {f['spawn']:.1f} ms, python import {f['import']:.0f} ms" if f else f"{p}: did not run"
        for p, f in figures.items()
    )


if __name__ == "__main__":
    best, figures = choose(sys.argv[1] if len(sys.argv) > 1 else "runsc")
    if best is None:
        sys.exit(f"no gVisor platform works here ({describe(figures)})")
    print(f"{best}\tfastest by measurement ({describe(figures)})")
