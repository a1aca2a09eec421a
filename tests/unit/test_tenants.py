"""The tokens file: read whole or refused with a message that says what is wrong."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mcp_codeexec.errors import ConfigError
from mcp_codeexec.tenants import Limits, load_tenants, static_tenants, stored_cap

DIGEST = hashlib.sha256(b"secret").hexdigest()


def write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "tokens.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_a_good_file(tmp_path: Path) -> None:
    policies = load_tenants(write(tmp_path, {"tenants": {"alice": {"token_sha256": DIGEST, "max_concurrent": 2}}}))
    assert policies["alice"].token_sha256 == DIGEST and policies["alice"].max_concurrent == 2


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
        ({"tenants": {}, "defaults": {"token_sha256": DIGEST}}, "defaults: unknown keys"),
        ({"tenants": {}, "defaults": {"rate_per_minute": 0}}, "defaults: rate_per_minute must be a positive"),
        ({"tenants": {}, "extra": {}}, "expected"),
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


def test_oauth_tenants_and_defaults(tmp_path: Path) -> None:
    """Entries without a token only set an (OAuth) tenant's limits; "defaults" covers the rest."""
    policies = load_tenants(write(tmp_path, {
        "tenants": {"alice": {"token_sha256": DIGEST}, "org-1": {"max_concurrent": 1, "max_stored_bytes": 10}},
        "defaults": {"max_concurrent": 2, "max_stored_bytes": 20},
    }))
    assert static_tenants(policies) == {"alice"}
    cap = stored_cap(policies, 99)
    assert (cap("org-1"), cap("alice"), cap("anyone")) == (10, 20, 20)
    assert stored_cap({}, 99)("anyone") == 99
    limits = Limits(policies)
    assert limits.acquire("org-1") is None and limits.acquire("org-1") is not None  # its own limit: 1
    assert limits.acquire("carol") is None and limits.acquire("carol") is None  # the defaults: 2
    assert "limit 2" in (limits.acquire("carol") or "")
