"""Who is calling, what they may do, and what they used.

- Tokens: each static bearer token maps to a tenant. The file stores only SHA-256 hashes:
  `{"tenants": {"alice": {"token_sha256": "…", "rate_per_minute": 120, "max_concurrent": 4,
  "max_containers": 20, "max_stored_bytes": 1073741824, "upstreams": ["memory"]}}}`. Limits are
  optional. An entry without `token_sha256` only sets the limits of a tenant that signs in by
  OAuth (oauth.py), and `"defaults": {limits}` applies to every tenant the file does not list.
  `upstreams` names the servers of the tools config (upstream.py) whose tools the tenant's
  code may call; without it, none.
- Limits: a per-tenant request rate (token bucket) and number of calls in flight; past
  either a call answers `too_many_requests`.
- Usage: per tenant, code execution requests and execution time per container (billed with
  the API's 5-minute minimum per container), saved to a JSON file so it survives restarts.
"""

from __future__ import annotations

import atexit
import hashlib
import hmac
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mcp.server.auth.provider import AccessToken, TokenVerifier

from mcp_codeexec.errors import ConfigError

BILLING_MINIMUM_SECONDS = 300.0

log = logging.getLogger(__name__)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class TenantPolicy:
    name: str
    token_sha256: str | None = None  # None: an OAuth tenant's limits (or the defaults)
    rate_per_minute: float | None = None
    max_concurrent: int | None = None
    max_containers: int | None = None
    max_stored_bytes: int | None = None
    upstreams: tuple[str, ...] = ()  # servers of the tools config this tenant may call


_LIMIT_FIELDS = {"rate_per_minute": (int, float), "max_concurrent": (int,), "max_containers": (int,), "max_stored_bytes": (int,)}
_TENANT_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
DEFAULTS = "*"  # the policy (limits only) of tenants the file does not list


def load_tenants(path: Path) -> dict[str, TenantPolicy]:
    """Tenants by name (and the defaults under DEFAULTS). Raises ConfigError saying exactly what
    is wrong: the server refuses to start on a tokens file it cannot read whole."""

    def bad(why: str) -> ConfigError:
        return ConfigError(f"tokens file {path}: {why}")

    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise bad(exc.strerror or str(exc)) from None
    except ValueError as exc:
        raise bad(f"not valid JSON ({exc})") from None
    tenants = data.get("tenants") if isinstance(data, dict) else None
    if not isinstance(tenants, dict) or set(data) - {"tenants", "defaults"}:
        raise bad('expected {"tenants": {"<name>": {"token_sha256": "<hex>", ...}}, "defaults"?: {...}}')
    policies: dict[str, TenantPolicy] = {}
    digests: dict[str, str] = {}
    for name, entry in [*tenants.items(), *([(DEFAULTS, data["defaults"])] if "defaults" in data else [])]:
        if name != DEFAULTS and not _TENANT_NAME.fullmatch(name):
            raise bad(f"tenant name {name!r} must match [a-z0-9][a-z0-9_-]{{0,62}}")
        what = "defaults" if name == DEFAULTS else f"tenant {name}"
        if not isinstance(entry, dict):
            raise bad(f"{what}: expected an object")
        unknown = set(entry) - {*_LIMIT_FIELDS, "upstreams", *(["token_sha256"] if name != DEFAULTS else [])}
        if unknown:
            raise bad(f"{what}: unknown keys {sorted(unknown)}")
        digest = entry.get("token_sha256")
        if digest is not None and (not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest)):
            raise bad(f"{what}: token_sha256 must be a SHA-256 hex digest (64 lowercase hex digits)")
        for key, types_ in _LIMIT_FIELDS.items():
            value = entry.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, types_) or value <= 0):
                raise bad(f"{what}: {key} must be a positive number")
        upstreams = entry.get("upstreams", [])
        if not isinstance(upstreams, list) or not all(isinstance(u, str) for u in upstreams):
            raise bad(f"{what}: upstreams must be a list of server names")
        if digest is not None:
            if digest in digests:
                raise bad(f"tenants {digests[digest]} and {name} have the same token")
            digests[digest] = name
        policies[name] = TenantPolicy(name=name, **{**entry, "upstreams": tuple(upstreams)})
    return policies


def static_tenants(policies: dict[str, TenantPolicy]) -> frozenset[str]:
    """The tenants that sign in with a static token (no OAuth token may name them)."""
    return frozenset(p.name for p in policies.values() if p.token_sha256 is not None)


def policy_of(policies: dict[str, TenantPolicy], tenant: str) -> TenantPolicy | None:
    """The tenant's own policy, else the file's defaults (None: no limits)."""
    return policies.get(tenant) or policies.get(DEFAULTS)


def stored_cap(policies: dict[str, TenantPolicy], default: int) -> Callable[[str], int]:
    """Bytes of files a tenant may keep: its own limit, else the file's defaults, else `default`."""
    fallback = policies[DEFAULTS].max_stored_bytes if DEFAULTS in policies else None
    caps = {p.name: p.max_stored_bytes for p in policies.values() if p.max_stored_bytes is not None}
    return lambda tenant: caps.get(tenant, fallback or default)


class HashedTokenVerifier(TokenVerifier):
    """Static bearer token -> tenant; the tenant's name is the access token's client_id, and a
    static token carries every scope in `scopes`."""

    def __init__(self, policies: dict[str, TenantPolicy], scopes: tuple[str, ...] = ()) -> None:
        self.by_digest = {p.token_sha256: p for p in policies.values() if p.token_sha256 is not None}
        self.scopes = list(scopes)

    async def verify_token(self, token: str) -> AccessToken | None:
        digest = hash_token(token)
        for known, policy in self.by_digest.items():
            if hmac.compare_digest(known, digest):
                return AccessToken(token="", client_id=policy.name, scopes=self.scopes)
        return None


@dataclass
class _Bucket:
    tokens: float
    updated: float
    in_flight: int = 0


class Limits:
    def __init__(self, policies: dict[str, TenantPolicy]) -> None:
        self.by_tenant = {p.name: p for p in policies.values()}
        self._buckets: dict[str, _Bucket] = {}

    def acquire(self, tenant: str) -> str | None:
        """None if the call may run (then call release), else why not."""
        policy = policy_of(self.by_tenant, tenant)
        if policy is None:
            return None
        now = time.monotonic()
        rate = policy.rate_per_minute
        bucket = self._buckets.setdefault(tenant, _Bucket(tokens=rate or 0.0, updated=now))
        if rate is not None:
            bucket.tokens = min(rate, bucket.tokens + (now - bucket.updated) * rate / 60)
            bucket.updated = now
            if bucket.tokens < 1:
                return f"rate limit of {rate:g} calls per minute reached"
        if policy.max_concurrent is not None and bucket.in_flight >= policy.max_concurrent:
            return f"{bucket.in_flight} calls already running (limit {policy.max_concurrent})"
        if rate is not None:
            bucket.tokens -= 1
        bucket.in_flight += 1
        return None

    def release(self, tenant: str) -> None:
        bucket = self._buckets.get(tenant)
        if bucket is not None and bucket.in_flight:
            bucket.in_flight -= 1


@dataclass
class _TenantUsage:
    code_execution_requests: int = 0
    containers: dict[str, float] = field(default_factory=dict)  # container id -> execution seconds


class Usage:
    """Metering, kept in memory and saved to `path` (atomically) after every call by a
    writer thread: a call's reply does not wait for the disk (a save is a write and a
    rename, ~0.2-1 ms). `flush()` waits for the last save; it runs at exit."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._tmp = path.with_suffix(".tmp")
        self._dir_made = False
        self._lock = threading.Lock()  # the data
        self._save_lock = threading.Lock()  # one save at a time
        self._data: dict[str, _TenantUsage] = {}
        self._recorded = 0  # records made, and of them saved:
        self._saved = 0
        self._wake = threading.Event()
        self._writer: threading.Thread | None = None
        try:
            for tenant, entry in json.loads(path.read_text()).items():
                self._data[tenant] = _TenantUsage(entry["code_execution_requests"], dict(entry["containers"]))
        except (OSError, ValueError, KeyError):
            pass

    def record(self, tenant: str, container_id: str | None, seconds: float) -> None:
        with self._lock:
            usage = self._data.setdefault(tenant, _TenantUsage())
            usage.code_execution_requests += 1
            if container_id is not None:
                usage.containers[container_id] = usage.containers.get(container_id, 0.0) + seconds
            self._recorded += 1
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_behind, name="usage-writer", daemon=True)
                self._writer.start()
                atexit.register(self._save_quietly)
        self._wake.set()

    def flush(self) -> None:
        """Save what is recorded and not yet saved (the directory is made once)."""
        with self._save_lock:
            with self._lock:
                if self._saved == self._recorded:
                    return
                recorded = self._recorded
                data = json.dumps({t: vars(u) for t, u in self._data.items()}).encode()
            if not self._dir_made:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._dir_made = True
            self._tmp.write_bytes(data)
            os.replace(self._tmp, self.path)
            self._saved = recorded

    def _write_behind(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            self._save_quietly()

    def _save_quietly(self) -> None:
        try:
            self.flush()
        except OSError as exc:  # an unwritable data dir costs the metering file, not the calls
            log.warning("usage: cannot save %s: %s", self.path, exc)

    def report(self, tenant: str) -> dict[str, Any]:
        with self._lock:
            usage = self._data.get(tenant, _TenantUsage())
            containers: list[dict[str, Any]] = [
                {"id": cid, "execution_seconds": round(sec, 3), "billed_seconds": round(max(sec, BILLING_MINIMUM_SECONDS), 3)}
                for cid, sec in sorted(usage.containers.items())
            ]
        return {
            "tenant": tenant,
            "code_execution_requests": usage.code_execution_requests,
            "execution_seconds": round(sum(c["execution_seconds"] for c in containers), 3),
            "billed_seconds": round(sum(c["billed_seconds"] for c in containers), 3),
            "containers": containers,
        }
