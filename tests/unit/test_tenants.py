"""tenants.py: the tokens file (read whole or refused with a message that says what is
wrong), the token verifier, the per-tenant limits, and metering."""

from __future__ import annotations

import atexit
import hashlib
import json
import time
from pathlib import Path

import pytest

from mcp_codeexec import cli, tenants
from mcp_codeexec.errors import ConfigError
from mcp_codeexec.tenants import (
    BILLING_MINIMUM_SECONDS,
    HashedTokenVerifier,
    Limits,
    TenantPolicy,
    Usage,
    hash_token,
    load_tenants,
    static_tenants,
    stored_cap,
)

pytestmark = pytest.mark.anyio

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
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--transport", "http", "--tokens", str(path)])
    message = str(exit_.value.code)
    assert "token_sha256 must be a SHA-256" in message and str(path) in message


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


async def test_verifier_maps_tokens_to_tenants(tmp_path: Path) -> None:
    verifier = HashedTokenVerifier(load_tenants(write(tmp_path, {"tenants": {"alice": {"token_sha256": DIGEST}}})))
    token = await verifier.verify_token("secret")
    assert token is not None and token.client_id == "alice" and token.token == ""  # the secret is not kept
    assert await verifier.verify_token("Secret") is None and await verifier.verify_token("") is None
    assert hash_token("secret") == DIGEST


def test_concurrency_limit_and_release() -> None:
    limits = Limits({DIGEST: TenantPolicy("alice", DIGEST, max_concurrent=2)})
    assert limits.acquire("alice") is None and limits.acquire("alice") is None
    assert limits.acquire("alice") == "2 calls already running (limit 2)"
    limits.release("alice")
    assert limits.acquire("alice") is None
    assert all(limits.acquire("nobody") is None for _ in range(100))  # no policy: no limit
    limits.release("nobody")  # harmless


def test_rate_limit_refills_over_time(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(tenants.time, "monotonic", lambda: now[0])
    limits = Limits({DIGEST: TenantPolicy("alice", DIGEST, rate_per_minute=2)})
    assert limits.acquire("alice") is None and limits.acquire("alice") is None
    assert limits.acquire("alice") == "rate limit of 2 calls per minute reached"
    now[0] += 30  # one token back (2 per minute)
    assert limits.acquire("alice") is None
    assert limits.acquire("alice") is not None
    now[0] += 3600  # never more than the rate's worth banked
    assert [limits.acquire("alice") is None for _ in range(3)] == [True, True, False]


def test_usage_bills_a_minimum_per_container_and_survives_a_restart(tmp_path: Path) -> None:
    usage = Usage(tmp_path / "usage.json")
    usage.record("alice", "container_a", 1.5)
    usage.record("alice", "container_a", 2.0)
    usage.record("alice", "container_b", 400.0)
    usage.record("alice", None, 9.0)  # a call that reached no container: counted, not billed
    usage.flush()  # (the writer thread saves it soon anyway; at exit, flush() runs)
    report = Usage(tmp_path / "usage.json").report("alice")
    assert report == {
        "tenant": "alice",
        "code_execution_requests": 4,
        "execution_seconds": 403.5,
        "billed_seconds": BILLING_MINIMUM_SECONDS + 400.0,
        "containers": [
            {"id": "container_a", "execution_seconds": 3.5, "billed_seconds": BILLING_MINIMUM_SECONDS},
            {"id": "container_b", "execution_seconds": 400.0, "billed_seconds": 400.0},
        ],
    }
    assert usage.report("bob")["code_execution_requests"] == 0


def test_usage_is_saved_by_its_writer_thread_and_a_failing_save_never_fails_a_call(tmp_path: Path) -> None:
    usage = Usage(tmp_path / "usage.json")
    usage.record("alice", "container_a", 1.0)
    deadline = time.monotonic() + 5
    while not (tmp_path / "usage.json").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert json.loads((tmp_path / "usage.json").read_text())["alice"]["code_execution_requests"] == 1
    blocked = Usage(tmp_path / "file" / "usage.json")  # its directory cannot be made: a file is in the way
    (tmp_path / "file").write_text("")
    blocked.record("alice", "container_a", 1.0)  # no exception: the writer logs it
    with pytest.raises(OSError):
        blocked.flush()
    assert blocked.report("alice")["code_execution_requests"] == 1
    atexit.unregister(blocked._save_quietly)  # (its exit-time save would only log the same)


def test_usage_starts_afresh_from_an_unreadable_file(tmp_path: Path) -> None:
    (tmp_path / "usage.json").write_text("{broken")
    assert Usage(tmp_path / "usage.json").report("alice")["containers"] == []
