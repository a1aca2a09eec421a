"""The tokens file: read whole or refused with a message that says what is wrong."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mcp_codeexec.errors import ConfigError
from mcp_codeexec.tenants import load_tenants

DIGEST = hashlib.sha256(b"secret").hexdigest()


def write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "tokens.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_a_good_file(tmp_path: Path) -> None:
    policies = load_tenants(write(tmp_path, {"tenants": {"alice": {"token_sha256": DIGEST, "max_concurrent": 2}}}))
    assert policies[DIGEST].name == "alice" and policies[DIGEST].max_concurrent == 2


@pytest.mark.parametrize(
    ("data", "says"),
    [
        ("{not json", "not valid JSON"),
        ([], "expected"),
        ({"tenants": []}, "expected"),
        ({"tenants": {"Alice!": {"token_sha256": DIGEST}}}, "tenant name"),
        ({"tenants": {"alice": "x"}}, "expected an object"),
        ({"tenants": {"alice": {"token_sha256": "abc"}}}, "SHA-256"),
        ({"tenants": {"alice": {"token_sha256": DIGEST.upper()}}}, "SHA-256"),
        ({"tenants": {"alice": {"token_sha256": DIGEST, "rate": 5}}}, "unknown keys"),
        ({"tenants": {"alice": {"token_sha256": DIGEST, "max_concurrent": "4"}}}, "positive number"),
        ({"tenants": {"alice": {"token_sha256": DIGEST, "max_concurrent": True}}}, "positive number"),
        ({"tenants": {"alice": {"token_sha256": DIGEST, "max_stored_bytes": -1}}}, "positive number"),
        ({"tenants": {"alice": {"token_sha256": DIGEST}, "bob": {"token_sha256": DIGEST}}}, "same token"),
    ],
)
def test_bad_files_are_refused_with_the_reason(tmp_path: Path, data: object, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        load_tenants(write(tmp_path, data))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="No such file"):
        load_tenants(tmp_path / "absent.json")


def test_the_server_does_not_start_on_a_bad_file(tmp_path: Path) -> None:
    path = write(tmp_path, {"tenants": {"alice": {"token_sha256": "short"}}})
    r = subprocess.run([sys.executable, "-m", "mcp_codeexec", "--transport", "http", "--tokens", str(path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "token_sha256 must be a SHA-256" in r.stderr and str(path) in r.stderr
