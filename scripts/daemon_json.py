#!/usr/bin/env python3
"""Merge what mcp-codeexec needs into Docker's daemon.json (scripts/setup.sh runs it).

Usage: daemon_json.py PATH RUNSC PLATFORM OVERRIDE

- a "runsc" runtime (path RUNSC unless the entry's path works) whose runtimeArgs hold
  --network=none (runsc fails with Docker's bridge networking on such hosts) and
  --platform=PLATFORM (an existing entry's platform is kept unless OVERRIDE is non-empty);
- "experimental": true (checkpoint and restore need it).

Never drops other settings; refuses a file that is not a JSON object; idempotent; keeps
the original once as PATH.before-mcp-codeexec. Prints what dockerd must do now:
"unchanged", "reload" (runtimes changed: SIGHUP) or "restart" (experimental changed).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile


def merge(cfg: dict, runsc: str, platform: str, override: str) -> None:
    runtimes = cfg.setdefault("runtimes", {})
    entry = runtimes.setdefault("runsc", {})
    if not (isinstance(entry.get("path"), str) and os.access(entry["path"], os.X_OK)):
        entry["path"] = runsc
    args = [a for a in entry.get("runtimeArgs", []) if isinstance(a, str)]
    if "--network=none" not in args:
        args.append("--network=none")
    has_platform = any(a.startswith("--platform=") for a in args)
    if override or not has_platform:
        args = [a for a in args if not a.startswith("--platform=")]
        args.append(f"--platform={platform}")
    entry["runtimeArgs"] = args
    cfg["experimental"] = True


def main(path: str, runsc: str, platform: str, override: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        text = ""
    try:
        cfg = json.loads(text) if text.strip() else {}
    except ValueError as e:
        sys.exit(f"{path} is not valid JSON ({e}); fix it by hand")
    if not isinstance(cfg, dict):
        sys.exit(f"{path} does not hold a JSON object; fix it by hand")
    before = json.dumps(cfg, sort_keys=True)
    experimental = cfg.get("experimental")
    merge(cfg, runsc, platform, override)
    if json.dumps(cfg, sort_keys=True) == before:
        return "unchanged"
    d = os.path.dirname(path)
    os.makedirs(d, exist_ok=True)
    backup = path + ".before-mcp-codeexec"
    if text.strip() and not os.path.exists(backup):
        shutil.copy2(path, backup)  # the original, before our first change
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".daemon.json.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return "restart" if experimental is not True else "reload"


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    print(main(*sys.argv[1:5]))
