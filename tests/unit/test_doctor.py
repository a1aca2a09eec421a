"""doctor.py without an engine: the report, the runtime checks read from the engine's info
(given as a dict), runsc's release parsing, and what it says when nothing is there."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from mcp_codeexec import doctor


class Info:
    """The engine's `GET /info` answer, and nothing else."""

    def __init__(self, runtimes: dict[str, Any]) -> None:
        self.runtimes = runtimes

    def info(self) -> dict[str, Any]:
        return {"Runtimes": self.runtimes}


def fake_runsc(tmp_path: Path, version_line: str) -> str:
    path = tmp_path / "runsc"
    path.write_text(f"#!/bin/sh\necho '{version_line}'\necho 'spec: 1.1.0'\n")
    path.chmod(0o755)
    return str(path)


def test_report_counts_and_prints(capsys: pytest.CaptureFixture[str]) -> None:
    r = doctor.Report()
    r.ok("a", "fine")
    r.warn("b", "meh", "do x")
    r.fail("c", "bad")
    assert (r.warned, r.failed) == (1, 1)
    r.print()
    assert capsys.readouterr().out.splitlines() == ["ok    a: fine", "WARN  b: meh", "      fix: do x", "FAIL  c: bad"]
    assert r.lines == []


def test_runtime_checks(tmp_path: Path) -> None:
    r = doctor.Report()
    assert not doctor.check_runtime(r, Info({"runc": {}}), "runsc")  # type: ignore[arg-type]
    assert r.failed == 1 and "no runtime 'runsc' (it has: runc)" in r.lines[0]
    r = doctor.Report()
    assert doctor.check_runtime(r, Info({"runc": {}}), "runc")  # type: ignore[arg-type]
    assert r.warned == 1 and "share the host kernel" in r.lines[0]
    old = fake_runsc(tmp_path, "runsc version release-20221219.0")
    r = doctor.Report()
    assert doctor.check_runtime(r, Info({"runsc": {"path": old, "runtimeArgs": []}}), "runsc")  # type: ignore[arg-type]
    text = "\n".join(r.lines)
    assert "platform ptrace (runsc's default)" in text  # releases before 2023 default to ptrace
    assert "older than 2024" in text and "lack --network=none" in text and r.warned == 2
    new = fake_runsc(tmp_path, "runsc version release-20240729.0")
    r = doctor.Report()
    args = ["--network=none", "--platform=ptrace"]
    assert doctor.check_runtime(r, Info({"runsc": {"path": new, "runtimeArgs": args}}), "runsc")  # type: ignore[arg-type]
    assert r.warned == 0 and "platform ptrace" in r.lines[0]


def test_runsc_release(tmp_path: Path) -> None:
    assert doctor._runsc_release(fake_runsc(tmp_path, "runsc version release-20240729.0")) == (
        "runsc version release-20240729.0", 20240729)
    line, release = doctor._runsc_release(str(tmp_path / "absent"))
    assert release is None and line.startswith("cannot run")


def test_no_engine_is_a_failure_with_a_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-engine.sock")
    assert doctor.main(["--disk", "0", "--quick"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  engine: Docker Engine not reachable" in out and "fix: start it" in out
    assert "WARN  disk quota: off (--disk 0)" in out and "1 essential problem(s)" in out


def test_quota_check_without_a_usable_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    r = doctor.Report()
    doctor.check_quota(r, None, 16 << 20, str(tmp_path / "file" / "q"), "img")
    assert r.warned == 1 and "not possible here" in r.lines[0]
    assert "fix: pass --quota-dir with a directory this user can write" in r.lines[1]
    assert os.path.exists(tmp_path / "file")
