"""The official MCP conformance suite (npm `@modelcontextprotocol/conformance`, server mode)
against our Streamable HTTP endpoint, run by a real server process on loopback.

The suite's scenarios are written against its reference "everything" server: most of them call
fixture tools, resources and prompts (`test_simple_text`, `test://static-text`,
`test_simple_prompt`, ...) or capabilities (logging, completions, subscriptions) that this server
does not offer, and those fail by design. This test asserts that every scenario in
EXPECTED_PASS still passes, writes every scenario's outcome to .cache/conformance-results.json
and prints a table; docs/conformance.md explains each failure.

The package and the Node.js it runs on are pinned and installed once into .cache/conformance
(git-ignored): conformance >= 0.1.14 imports `fs.globSync`, which needs Node >= 22, so Node
comes from the npm package `node` rather than from whatever the host has. Without the npm
registry (first run) or without Docker, this test FAILS, it never skips.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx2
import pytest
from conftest import DATA_DIR, IMAGE
from conftest import TENANT as TEST_TENANT

CONFORMANCE_VERSION = "0.1.16"
NODE_VERSION = "22.23.3"
REPO = Path(__file__).resolve().parents[2]
PREFIX = REPO / ".cache" / "conformance"
RESULTS = REPO / ".cache" / "conformance-results.json"
TENANT = f"{TEST_TENANT}-conformance"  # tests/conftest.py removes the test tenant's family

INSTALL_TIMEOUT = 100  # cold install: ~15 s here
START_TIMEOUT = 30
SUITE_TIMEOUT = 45  # the whole suite: ~2 s here

# Scenarios that pass today and must keep passing.
EXPECTED_PASS = {
    "server-initialize",
    "ping",
    "tools-list",
    "resources-list",
    "prompts-list",
    "server-sse-multiple-streams",
    "server-sse-polling",  # pending suite; only WARNINGs (no resumability), no FAILURE
    "dns-rebinding-protection",
}

# Why the others fail: by design, not protocol bugs (see docs/conformance.md).
_FIXTURE = "reference-server fixture missing: "
KNOWN_FAILURES = {
    "logging-set-level": "capability not offered: no `logging` capability, so logging/setLevel is -32601",
    "completion-complete": "capability not offered: no `completions` capability, so completion/complete is -32601",
    "tools-call-simple-text": _FIXTURE + "tool test_simple_text",
    "tools-call-image": _FIXTURE + "tool test_image_content",
    "tools-call-audio": _FIXTURE + "tool test_audio_content",
    "tools-call-embedded-resource": _FIXTURE + "tool test_embedded_resource",
    "tools-call-mixed-content": _FIXTURE + "tool test_multiple_content_types",
    "tools-call-with-logging": "capability not offered: calls logging/setLevel first (-32601); "
    "also needs tool test_tool_with_logging",
    "tools-call-error": _FIXTURE + "tool test_error_handling",
    "tools-call-with-progress": _FIXTURE + "tool test_tool_with_progress",
    "tools-call-sampling": _FIXTURE + "tool test_sampling",
    "tools-call-elicitation": _FIXTURE + "tool test_elicitation",
    "json-schema-2020-12": _FIXTURE + "tool json_schema_2020_12_tool (pending suite)",
    "elicitation-sep1034-defaults": _FIXTURE + "tool test_elicitation_sep1034_defaults",
    "elicitation-sep1330-enums": _FIXTURE + "tool test_elicitation_sep1330_enums",
    "resources-read-text": _FIXTURE + "resource test://static-text",
    "resources-read-binary": _FIXTURE + "resource test://static-binary",
    "resources-templates-read": _FIXTURE + "resource template test://template/{id}/data",
    "resources-subscribe": "capability not offered: resources.subscribe is false, so resources/subscribe is -32601",
    "resources-unsubscribe": "capability not offered: resources.subscribe is false, so resources/unsubscribe is -32601",
    "prompts-get-simple": _FIXTURE + "prompt test_simple_prompt",
    "prompts-get-with-args": _FIXTURE + "prompt test_prompt_with_arguments",
    "prompts-get-embedded-resource": _FIXTURE + "prompt test_prompt_with_embedded_resource",
    "prompts-get-with-image": _FIXTURE + "prompt test_prompt_with_image",
}

_RESULT_DIR = re.compile(r"^server-(?P<scenario>.+)-\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}-\d{3}Z$")


def _env() -> dict[str, str]:
    return {**os.environ, "NO_UPDATE_NOTIFIER": "1", "npm_config_update_notifier": "false",
            "npm_config_fund": "false", "npm_config_audit": "false"}


def _installed_version(package: str) -> str | None:
    try:
        return json.loads((PREFIX / "node_modules" / package / "package.json").read_text())["version"]
    except (OSError, ValueError, KeyError):
        return None


def _npx(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run a binary installed in PREFIX: `npx --no-install` never reaches the registry, and puts
    PREFIX/node_modules/.bin (with the pinned `node`) first on PATH."""
    return subprocess.run(["npx", "--no-install", *args], cwd=PREFIX, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


def ensure_conformance() -> None:
    """Install the pinned suite and Node into PREFIX unless they are already there."""
    if shutil.which("npm") is None or shutil.which("npx") is None:
        pytest.fail("npm/npx not found on PATH: the MCP conformance suite needs Node.js and npm")
    node_ok = (PREFIX / "node_modules" / ".bin" / "node").exists() and _installed_version("node") == NODE_VERSION
    if _installed_version("@modelcontextprotocol/conformance") != CONFORMANCE_VERSION or not node_ok:
        PREFIX.mkdir(parents=True, exist_ok=True)
        cmd = ["npm", "install", "--prefix", str(PREFIX), "--no-audit", "--no-fund", "--fetch-retries=1",
               "--fetch-timeout=30000", f"@modelcontextprotocol/conformance@{CONFORMANCE_VERSION}", f"node@{NODE_VERSION}"]
        try:
            done = subprocess.run(cmd, cwd=PREFIX, env=_env(), capture_output=True, text=True, timeout=INSTALL_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"`{' '.join(cmd)}` took over {INSTALL_TIMEOUT}s: is the npm registry reachable?")
        if done.returncode != 0:
            pytest.fail(f"could not install the MCP conformance suite from the npm registry (is it reachable?): "
                        f"`{' '.join(cmd)}` exited {done.returncode}:\n{done.stderr[-3000:]}")
    version = _npx("node", "--version", timeout=30)
    assert version.stdout.strip() == f"v{NODE_VERSION}", f"pinned node not usable in {PREFIX}: {version}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, log: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "mcp_codeexec", "--transport", "http", "--host", "127.0.0.1", "--port", str(port),
         "--image", IMAGE, "--tenant", TENANT, "--data-dir", DATA_DIR, "--no-prepare", "--memory", "1g"],
        env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=log.open("wb"), stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx2.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return proc
        except httpx2.HTTPError:
            pass
        time.sleep(0.2)
    stop_server(proc)
    pytest.fail(f"server not healthy within {START_TIMEOUT}s:\n{log.read_text()[-3000:]}")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def parse_results(out: Path) -> dict[str, dict]:
    """One entry per scenario from the suite's `server-<scenario>-<timestamp>/checks.json`."""
    results: dict[str, dict] = {}
    for directory in sorted(out.iterdir()):
        m = _RESULT_DIR.match(directory.name)
        if not m or not (directory / "checks.json").is_file():
            continue
        checks = json.loads((directory / "checks.json").read_text())
        by_status: dict[str, list[dict]] = {}
        for check in checks:
            by_status.setdefault(check.get("status", "?"), []).append(check)
        failures = by_status.get("FAILURE", [])
        warnings = by_status.get("WARNING", [])
        name = m["scenario"]
        results[name] = {
            "status": "fail" if failures or not checks else "pass",
            "succeeded": [c["id"] for c in by_status.get("SUCCESS", [])],
            "failed": [{"id": c["id"], "error": c.get("errorMessage") or json.dumps(c.get("details"))} for c in failures],
            "warnings": [{"id": c["id"], "message": c.get("errorMessage", "")} for c in warnings],
            "expected": "pass" if name in EXPECTED_PASS else "fail",
            "cause": KNOWN_FAILURES.get(name, ""),
        }
    return results


def summary_table(results: dict[str, dict]) -> str:
    rows = []
    for name, r in results.items():
        if r["status"] == "pass":
            reason = "; ".join(f"WARNING {w['id']}" for w in r["warnings"]) or f"{len(r['succeeded'])} check(s) passed"
        else:
            reason = (r["failed"][0]["error"] if r["failed"] else "no checks reported")[:90]
        flag = "" if r["status"] == r["expected"] else "  <-- UNEXPECTED"
        rows.append(f"{name:32} {r['status']:5} {reason}{flag}")
    passed = sum(r["status"] == "pass" for r in results.values())
    return "\n".join([f"{'scenario':32} {'result':5} reason", "-" * 100, *rows, "-" * 100,
                      f"{passed} passed, {len(results) - passed} failed"])


def test_mcp_conformance_suite(engine, tmp_path):
    started = time.monotonic()
    ensure_conformance()
    port = free_port()
    url = f"http://127.0.0.1:{port}/mcp"
    out = tmp_path / "results"
    proc = start_server(port, tmp_path / "server.log")
    try:
        try:
            run = _npx("conformance", "server", "--url", url, "--suite", "all", "-o", str(out), timeout=SUITE_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the conformance suite ran over {SUITE_TIMEOUT}s")
    finally:
        stop_server(proc)
    # Exit 1 just means some scenario failed; anything else (or no results) is the suite breaking.
    assert run.returncode in (0, 1) and out.is_dir(), f"conformance exited {run.returncode}:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    results = parse_results(out)
    assert results, f"no scenario results in {out}:\n{run.stdout[-3000:]}"

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "package": f"@modelcontextprotocol/conformance@{CONFORMANCE_VERSION}",
        "node": NODE_VERSION,
        "url": url,
        "suite": "all",
        "seconds": round(time.monotonic() - started, 1),
        "scenarios": results,
    }, indent=2) + "\n")
    print(f"\nMCP conformance {CONFORMANCE_VERSION} against {url} (results: {RESULTS})\n{summary_table(results)}")

    missing = sorted(EXPECTED_PASS - results.keys())
    regressed = sorted(n for n in EXPECTED_PASS & results.keys() if results[n]["status"] != "pass")
    assert not missing and not regressed, (
        f"expected-pass scenarios missing: {missing}; now failing: "
        + "; ".join(f"{n}: {results[n]['failed']}" for n in regressed)
    )
