"""The HTTP server as an OAuth 2.1 resource server, per the MCP authorization spec.

- The operator names the authorization server (`--oauth-issuer`); its metadata is found by
  RFC 8414 / OpenID discovery, its signing keys (JWKS) are cached and fetched again when a
  token names a key we do not hold (key rotation) or the cache is older than JWKS_MAX_AGE.
- A JWT access token is accepted when its signature (asymmetric algorithms only), `iss`, `aud`
  (this server's resource URL, RFC 8707, unless `--oauth-audience` says otherwise), `exp` and
  `nbf` check out. Any other token goes to the issuer's RFC 7662 introspection endpoint when
  the operator gave us client credentials for it.
- The tenant is a claim of the token (`--oauth-tenant-claim`, default `sub`), turned into a
  tenant name by `tenant_name` (one value, one name; no two values share one).
- Scopes gate the surface: SCOPE_EXECUTE for the MCP endpoints, SCOPE_FILES for the Files API.
  `Gate` answers 401 / 403 with `WWW-Authenticate: Bearer …, resource_metadata="…"` (RFC 6750,
  RFC 9728), which is how MCP clients find the authorization server.
- Protected Resource Metadata (RFC 9728) is served at /.well-known/oauth-protected-resource/mcp
  and at the root well-known path, which older MCP clients ask first.
No token is ever logged; all cryptography is PyJWT's (with `cryptography`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import httpx2
import jwt
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken, TokenVerifier
from mcp.server.auth.routes import build_resource_metadata_url, create_protected_resource_routes
from pydantic import AnyHttpUrl, ConfigDict, TypeAdapter
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from mcp_codeexec.config import Settings
from mcp_codeexec.tenants import load_tenants, static_tenants

log = logging.getLogger(__name__)

SCOPE_EXECUTE = "codeexec:execute"  # the MCP endpoints (/mcp, /sse): tools and resources
SCOPE_FILES = "codeexec:files"  # the Files API (/v1/files…, /v1/containers/{id}/files)
SCOPES = (SCOPE_EXECUTE, SCOPE_FILES)

# Bounds on what the authorization server sends us, and on how often we ask.
MAX_DOCUMENT_BYTES = 1 << 20
MAX_TOKEN_CHARS = 16 << 10
FETCH_TIMEOUT = 10.0
JWKS_MAX_AGE = 300.0  # refetch the keys at least this often, so a key removed upstream stops working
JWKS_REFRESH_COOLDOWN = 5.0  # unknown `kid`s make us refetch at most this often
INTROSPECTION_CACHE_SECONDS = 60.0
INTROSPECTION_CACHE_SIZE = 1024
INTROSPECTIONS_AT_ONCE = 8  # callers with made-up tokens cannot flood the authorization server
LEEWAY = 10  # seconds of clock skew allowed on exp / nbf / iat
# Asymmetric only: a shared-secret (HS*) or unsigned ("none") token could be forged by anyone
# who learns the public key, or by anyone at all.
ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")

# URLs as given: an issuer is compared as a string (RFC 8414 §3.3), so no "/" may be added to it.
_URL: TypeAdapter[AnyHttpUrl] = TypeAdapter(AnyHttpUrl, config=ConfigDict(url_preserve_empty_path=True))
_TENANT = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
_HASHED = re.compile(r"--[0-9a-f]{20}$")  # the ending of a name made by tenant_name's hashing


def tenant_name(value: str) -> str:
    """A claim value as a tenant name ([a-z0-9][a-z0-9_-]{0,62}: it names containers, volumes and
    directories). A value that is such a name already is kept as it is; any other (an e-mail, an
    Auth0 `auth0|…` subject, mixed case) becomes a readable prefix + "--" + 20 hex digits of its
    SHA-256. Values that merely look hashed are hashed too, so two values never share a name."""
    if _TENANT.fullmatch(value) and not _HASHED.search(value):
        return value
    prefix = re.sub(r"[^a-z0-9_-]+", "-", value.lower()).strip("-_")[:40].rstrip("-_") or "t"
    return f"{prefix}--{hashlib.sha256(value.encode()).hexdigest()[:20]}"


def resource_url(public_url: str, host: str, port: int) -> str:
    """This server's resource identifier (RFC 8707, RFC 9728): the MCP endpoint's URL, from
    --public-url when given (behind a proxy), else from the address it binds."""
    if public_url:
        base = public_url.rstrip("/")
    else:
        name = f"[{host}]" if ":" in host else host
        base = f"http://{name}:{port}"
    return f"{base}/mcp"


def check_issuer_url(url: str) -> str:
    """RFC 8414 §2: https, no query or fragment; plain http only on loopback (development)."""
    parts = urlsplit(url)
    if parts.query or parts.fragment or not parts.netloc:
        raise ValueError(f"issuer {url!r} must be a URL without query or fragment")
    if parts.scheme != "https" and not (parts.scheme == "http" and _loopback(parts.hostname or "")):
        raise ValueError(f"issuer {url!r} must use https (http only on loopback)")
    return url


def _loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


class DiscoveryError(Exception):
    """The authorization server's metadata or keys could not be had."""


def discovery_urls(issuer: str) -> list[str]:
    """Where the issuer's metadata may be: RFC 8414 (path inserted after the host), OpenID
    Connect Discovery (path appended), and RFC 8414's OpenID variant (path inserted)."""
    parts = urlsplit(issuer)
    origin, path = f"{parts.scheme}://{parts.netloc}", parts.path.rstrip("/")
    return [
        f"{origin}/.well-known/oauth-authorization-server{path}",
        f"{origin}{path}/.well-known/openid-configuration",
        f"{origin}/.well-known/openid-configuration{path}",
    ]


async def _get_json(http: httpx2.AsyncClient, url: str, **kwargs: Any) -> Any:
    """A JSON document, read up to MAX_DOCUMENT_BYTES; DiscoveryError on anything else."""
    method = "POST" if "data" in kwargs else "GET"
    try:
        async with http.stream(method, url, **kwargs) as response:
            body = b""
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_DOCUMENT_BYTES:
                    raise DiscoveryError(f"{url}: answer larger than {MAX_DOCUMENT_BYTES} bytes")
            status = response.status_code
    except httpx2.HTTPError as exc:
        raise DiscoveryError(f"{url}: {type(exc).__name__}: {exc}") from None
    if status != 200:
        raise DiscoveryError(f"{url}: HTTP {status}")
    try:
        return json.loads(body)
    except ValueError:
        raise DiscoveryError(f"{url}: not JSON") from None


@dataclass(frozen=True)
class OAuthConfig:
    issuer: str
    resource: str  # this server's resource URL (advertised in the metadata)
    audiences: tuple[str, ...]  # accepted `aud` values (default: the resource URL)
    tenant_claim: str = "sub"
    introspection_client: str = ""  # RFC 7662: our client id at the issuer ("" = no introspection)
    introspection_secret: str = ""
    introspection_url: str = ""  # "" = the issuer metadata's introspection_endpoint
    reserved_tenants: frozenset[str] = frozenset()  # static-token tenants: not reachable by OAuth


def config_from(settings: Settings) -> OAuthConfig | None:
    """The OAuth set-up the flags ask for, None without --oauth-issuer. ValueError says what is
    wrong (the server refuses to start)."""
    if not settings.oauth_issuer:
        if settings.oauth_audiences or settings.oauth_introspection_client:
            raise ValueError("--oauth-audience and --oauth-introspection-* need --oauth-issuer")
        return None
    if not settings.public_url and not _loopback(settings.host):
        raise ValueError(f"--oauth-issuer with --host {settings.host} needs --public-url: the resource URL clients "
                         "ask tokens for must be the address they reach")
    secret = ""
    if settings.oauth_introspection_client:
        if not settings.oauth_introspection_secret_file:
            raise ValueError("--oauth-introspection-client needs --oauth-introspection-secret-file")
        try:
            secret = Path(settings.oauth_introspection_secret_file).read_text().strip()
        except OSError as exc:
            raise ValueError(f"--oauth-introspection-secret-file: {exc.strerror or exc}") from None
    policies = load_tenants(Path(settings.tokens_file)) if settings.tokens_file else {}
    resource = resource_url(settings.public_url, settings.host, settings.port)
    return OAuthConfig(
        issuer=check_issuer_url(settings.oauth_issuer),
        resource=resource,
        audiences=settings.oauth_audiences or (resource,),
        tenant_claim=settings.oauth_tenant_claim,
        introspection_client=settings.oauth_introspection_client,
        introspection_secret=secret,
        introspection_url=settings.oauth_introspection_url,
        reserved_tenants=static_tenants(policies),
    )


class OAuthVerifier(TokenVerifier):
    """Access tokens from one issuer -> AccessToken(client_id=tenant, scopes=…), or None."""

    def __init__(self, config: OAuthConfig, http: httpx2.AsyncClient | None = None) -> None:
        self.config = config
        self.http = http or httpx2.AsyncClient(timeout=FETCH_TIMEOUT, follow_redirects=False)
        self._metadata: dict[str, Any] | None = None
        self._keys: dict[str, jwt.PyJWK] = {}
        self._keys_fetched = float("-inf")
        self._lock = anyio.Lock()
        self._introspected: OrderedDict[str, tuple[float, AccessToken | None]] = OrderedDict()
        self._introspecting = anyio.CapacityLimiter(INTROSPECTIONS_AT_ONCE)

    async def verify_token(self, token: str) -> AccessToken | None:
        if not token or len(token) > MAX_TOKEN_CHARS:
            return None
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            header = None
        try:
            if header is not None:
                return await self._verify_jwt(token, header)
            if self.config.introspection_client:
                return await self._introspect(token)
        except DiscoveryError as exc:
            log.warning("oauth: cannot check a token: %s", exc)
        return None

    # ------------------------------------------------------------------ discovery and keys
    async def metadata(self) -> dict[str, Any]:
        """The issuer's metadata (RFC 8414 / OpenID discovery), fetched once."""
        if self._metadata is not None:
            return self._metadata
        async with self._lock:
            if self._metadata is None:
                self._metadata = await self._discover()
        return self._metadata

    async def _discover(self) -> dict[str, Any]:
        failures = []
        for url in discovery_urls(self.config.issuer):
            try:
                doc = await _get_json(self.http, url)
            except DiscoveryError as exc:
                failures.append(str(exc))
                continue
            # RFC 8414 §3.3: the document must name the very issuer we asked about.
            if not isinstance(doc, dict) or doc.get("issuer") != self.config.issuer:
                failures.append(f"{url}: issuer {doc.get('issuer') if isinstance(doc, dict) else None!r} is not "
                                f"{self.config.issuer!r}")
                continue
            if not isinstance(doc.get("jwks_uri"), str):
                failures.append(f"{url}: no jwks_uri")
                continue
            log.info("oauth: issuer %s: metadata from %s", self.config.issuer, url)
            return doc
        raise DiscoveryError("no usable authorization server metadata: " + "; ".join(failures))

    async def _key(self, kid: str | None) -> jwt.PyJWK | None:
        now = time.monotonic()
        if now - self._keys_fetched > JWKS_MAX_AGE or (kid not in self._keys and now - self._keys_fetched > JWKS_REFRESH_COOLDOWN):
            async with self._lock:
                if time.monotonic() - self._keys_fetched > JWKS_REFRESH_COOLDOWN:
                    await self._fetch_keys()
        if kid is None and len(self._keys) == 1:  # a JWKS of one key may leave kid out
            return next(iter(self._keys.values()))
        return self._keys.get(kid) if kid is not None else None

    async def _fetch_keys(self) -> None:
        self._keys_fetched = time.monotonic()  # a failed fetch also waits out the cooldown
        metadata = self._metadata or await self._discover()
        self._metadata = metadata
        doc = await _get_json(self.http, metadata["jwks_uri"])
        keys: dict[str, jwt.PyJWK] = {}
        for entry in doc.get("keys", []) if isinstance(doc, dict) else []:
            if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
                continue
            try:
                key = jwt.PyJWK(entry)
            except (jwt.PyJWKError, jwt.InvalidKeyError):
                continue  # a key type or algorithm we do not use
            keys[str(entry.get("kid", ""))] = key
        self._keys = keys
        log.info("oauth: %d signing keys from %s", len(keys), metadata["jwks_uri"])

    # ------------------------------------------------------------------ JWT access tokens
    async def _verify_jwt(self, token: str, header: dict[str, Any]) -> AccessToken | None:
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in ALGORITHMS or (kid is not None and not isinstance(kid, str)):
            log.info("oauth: token refused: algorithm %r", alg)
            return None
        key = await self._key(kid)
        if key is None:
            log.info("oauth: token refused: no signing key %r at the issuer", kid)
            return None
        try:
            claims = jwt.decode(
                token, key, algorithms=[alg], audience=list(self.config.audiences), issuer=self.config.issuer,
                leeway=LEEWAY, options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.InvalidTokenError as exc:
            log.info("oauth: token refused: %s", exc)
            return None
        return self._access(token, claims)

    # ------------------------------------------------------------------ RFC 7662 introspection
    async def _introspect(self, token: str) -> AccessToken | None:
        digest = hashlib.sha256(token.encode()).hexdigest()
        now = time.monotonic()
        cached = self._introspected.get(digest)
        if cached is not None and cached[0] > now:
            return cached[1]
        url = self.config.introspection_url or (await self.metadata()).get("introspection_endpoint")
        if not isinstance(url, str):
            raise DiscoveryError("the issuer's metadata has no introspection_endpoint")
        async with self._introspecting:
            doc = await _get_json(
                self.http, url, data={"token": token, "token_type_hint": "access_token"},
                auth=(self.config.introspection_client, self.config.introspection_secret),
                headers={"Accept": "application/json"},
            )
        access = None
        if isinstance(doc, dict) and doc.get("active") is True:
            access = self._checked_introspection(token, doc)
        ttl = INTROSPECTION_CACHE_SECONDS
        if access is not None and access.expires_at is not None:
            ttl = min(ttl, access.expires_at - time.time())
        self._introspected[digest] = (now + ttl, access)
        while len(self._introspected) > INTROSPECTION_CACHE_SIZE:
            self._introspected.popitem(last=False)
        return access

    def _checked_introspection(self, token: str, doc: dict[str, Any]) -> AccessToken | None:
        """An active token's introspection answer, held to the same rules as a JWT's claims."""
        now = time.time()
        if "iss" in doc and doc["iss"] != self.config.issuer:
            log.info("oauth: introspected token refused: issuer %r", doc["iss"])
            return None
        aud = doc.get("aud")
        auds = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
        if not set(auds) & set(self.config.audiences):
            log.info("oauth: introspected token refused: audience %r", aud)
            return None
        for claim, late in (("exp", True), ("nbf", False)):
            value = doc.get(claim)
            if value is not None and (not isinstance(value, (int, float)) or (now > value + LEEWAY if late else now < value - LEEWAY)):
                log.info("oauth: introspected token refused: %s %r", claim, value)
                return None
        return self._access(token, doc)

    # ------------------------------------------------------------------ claims -> tenant
    def _access(self, token: str, claims: dict[str, Any]) -> AccessToken | None:
        value = claims.get(self.config.tenant_claim)
        if not isinstance(value, str) or not value:
            log.info("oauth: token refused: no string claim %r to name the tenant", self.config.tenant_claim)
            return None
        tenant = tenant_name(value)
        if tenant in self.config.reserved_tenants:
            # A static token's tenant: an identity provider's user must not reach it by a claim.
            log.warning("oauth: token refused: claim %s names static-token tenant %s", self.config.tenant_claim, tenant)
            return None
        aud = claims.get("aud")
        auds = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
        resource = next((a for a in auds if a in self.config.audiences), None)
        exp = claims.get("exp")
        subject = claims.get("sub")
        return AccessToken(
            token="",  # not kept: nothing downstream needs it
            client_id=tenant,
            scopes=token_scopes(claims),
            expires_at=int(exp) if isinstance(exp, (int, float)) else None,
            resource=resource,
            subject=subject if isinstance(subject, str) else None,
            claims={"iss": self.config.issuer},
        )


def token_scopes(claims: dict[str, Any]) -> list[str]:
    """Scopes from `scope` (RFC 9068 / 7662: space-separated) and `scp` (Entra, Okta: a list
    or a string)."""
    found: list[str] = []
    for name in ("scope", "scp"):
        value = claims.get(name)
        items: Iterable[Any] = value.split() if isinstance(value, str) else value if isinstance(value, list) else ()
        found += [s for s in items if isinstance(s, str) and s not in found]
    return found


class EitherVerifier(TokenVerifier):
    """Static tokens first (a hash lookup), then OAuth."""

    def __init__(self, verifiers: Sequence[TokenVerifier]) -> None:
        self.verifiers = verifiers

    async def verify_token(self, token: str) -> AccessToken | None:
        for verifier in self.verifiers:
            found = await verifier.verify_token(token)
            if found is not None:
                return found
        return None


def metadata_routes(config: OAuthConfig) -> list[Route]:
    """RFC 9728 metadata (the SDK's handler) at the path-aware and at the root well-known URL."""
    routes = create_protected_resource_routes(
        resource_url=_URL.validate_python(config.resource), authorization_servers=[_URL.validate_python(config.issuer)],
        scopes_supported=list(SCOPES), resource_name="mcp-codeexec",
    )
    root = "/.well-known/oauth-protected-resource"
    if routes[0].path != root:
        routes.append(Route(root, endpoint=routes[0].endpoint, methods=["GET", "OPTIONS"]))
    return routes


def metadata_url(config: OAuthConfig) -> str:
    return str(build_resource_metadata_url(_URL.validate_python(config.resource)))


class Gate:
    """ASGI middleware in front of every route: which scope a path needs (None: any valid
    token; paths in OPEN need none), and the RFC 6750 challenge when the caller lacks it.
    Default deny: a path not listed needs a valid token. Runs after the SDK's
    AuthenticationMiddleware, which has put the verified token (or nothing) in scope["user"]."""

    OPEN = ("/healthz", "/metrics", "/.well-known/")
    RULES = (("/mcp", SCOPE_EXECUTE), ("/sse", SCOPE_EXECUTE), ("/messages/", SCOPE_EXECUTE),
             ("/v1/files", SCOPE_FILES), ("/v1/containers/", SCOPE_FILES))

    def __init__(self, app: ASGIApp, metadata_url: str | None) -> None:
        self.app = app
        self.metadata_url = metadata_url

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path.startswith(self.OPEN) or scope.get("method") == "OPTIONS":
            await self.app(scope, receive, send)
            return
        needed = next((s for prefix, s in self.RULES if path == prefix or path.startswith(prefix.rstrip("/") + "/")), None)
        user = scope.get("user")
        if not isinstance(user, AuthenticatedUser):
            presented = any(k == b"authorization" and v[:7].lower() == b"bearer " for k, v in scope.get("headers", ()))
            # RFC 6750 §3.1: no error code when the request carried no token at all.
            error = ("invalid_token", "the access token is missing its signature, expired, or not for this server") if presented else None
            response = self.challenge(path, 401, error, needed)
        elif needed is not None and needed not in user.scopes:
            response = self.challenge(path, 403, ("insufficient_scope", f"this needs the scope {needed}"), needed)
        else:
            await self.app(scope, receive, send)
            return
        await response(scope, receive, send)

    def challenge(self, path: str, status: int, error: tuple[str, str] | None, needed: str | None) -> JSONResponse:
        params = []
        if error is not None:
            params += [f'error="{error[0]}"', f'error_description="{error[1]}"']
        if needed is not None:
            params.append(f'scope="{needed}"')
        if self.metadata_url is not None:
            params.append(f'resource_metadata="{self.metadata_url}"')
        header = "Bearer " + ", ".join(params) if params else "Bearer"
        kind, message = error or ("invalid_request", "a bearer token is required")
        body: dict[str, Any] = {"error": kind, "error_description": message}  # RFC 6750, as the SDK answers /mcp
        if path != "/mcp":  # the rest answers errors the way Anthropic's API does (remote.py)
            body = {"type": "error", "error": {"type": "authentication_error" if status == 401 else "permission_error",
                                               "message": message}}
        return JSONResponse(body, status_code=status, headers={"WWW-Authenticate": header})
