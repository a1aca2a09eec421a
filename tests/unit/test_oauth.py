"""The OAuth verifier and gate without Docker or a provider: keys made here, the issuer's
documents served by an in-process httpx2 transport that counts what it is asked.
(tests/test_oauth.py runs the same code against a real OpenID provider.)"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import anyio
import httpx2
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given
from hypothesis import strategies as st
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken

from mcp_codeexec import oauth
from mcp_codeexec.config import Settings
from mcp_codeexec.oauth import SCOPE_EXECUTE, SCOPE_FILES, Gate, OAuthConfig, OAuthVerifier, tenant_name

pytestmark = pytest.mark.anyio
ISSUER = "https://id.example.test/realms/r"
RESOURCE = "https://code.example.test/mcp"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def rsa_key(kid: str) -> tuple[Any, dict[str, Any]]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key, {**json.loads(RSAAlgorithm.to_jwk(key.public_key())), "kid": kid, "use": "sig"}


class Issuer:
    """The authorization server's side: metadata at the RFC 8414 path, a JWKS, introspection."""

    def __init__(self) -> None:
        self.keys: dict[str, tuple[Any, dict[str, Any]]] = {"k1": rsa_key("k1")}
        self.asked: list[str] = []
        self.active: dict[str, dict[str, Any]] = {}
        self.metadata_issuer = ISSUER

    def handle(self, request: httpx2.Request) -> httpx2.Response:
        path = request.url.path
        self.asked.append(path)
        if path == "/.well-known/oauth-authorization-server/realms/r":
            return httpx2.Response(200, json={"issuer": self.metadata_issuer, "jwks_uri": "https://id.example.test/jwks",
                                              "introspection_endpoint": "https://id.example.test/introspect"})
        if path == "/jwks":
            return httpx2.Response(200, json={"keys": [public for _, public in self.keys.values()]})
        if path == "/introspect":
            assert request.headers["authorization"].startswith("Basic ")
            token = dict(x.split("=", 1) for x in request.content.decode().split("&"))["token"]
            return httpx2.Response(200, json=self.active.get(token, {"active": False}))
        return httpx2.Response(404)

    def token(self, kid: str = "k1", alg: str = "RS256", **claims: Any) -> str:
        now = int(time.time())
        body = {"iss": ISSUER, "aud": RESOURCE, "sub": "alice", "scope": "codeexec:execute", "exp": now + 300, **claims}
        return jwt.encode({k: v for k, v in body.items() if v is not None}, self.keys[kid][0], algorithm=alg,
                          headers={"kid": kid})


def verifier(issuer: Issuer, **config: Any) -> OAuthVerifier:
    settings = {"issuer": ISSUER, "resource": RESOURCE, "audiences": (RESOURCE,), **config}
    return OAuthVerifier(OAuthConfig(**settings), httpx2.AsyncClient(transport=httpx2.MockTransport(issuer.handle)))


async def test_a_good_token() -> None:
    issuer = Issuer()
    found = await verifier(issuer).verify_token(issuer.token(scope="codeexec:execute codeexec:files"))
    assert found is not None and found.client_id == "alice" and found.scopes == [SCOPE_EXECUTE, SCOPE_FILES]
    assert found.resource == RESOURCE and found.subject == "alice" and found.claims == {"iss": ISSUER}


@pytest.mark.parametrize(("why", "claims"), [
    ("expired", {"exp": int(time.time()) - 60}),
    ("not yet valid", {"nbf": int(time.time()) + 600}),
    ("wrong audience", {"aud": "https://other.test/mcp"}),
    ("wrong issuer", {"iss": "https://evil.test"}),
    ("no exp", {"exp": None}),
    ("no aud", {"aud": None}),
    ("no tenant claim", {"sub": None}),
    ("tenant claim not a string", {"sub": 42}),
])
async def test_refused_claims(why: str, claims: dict[str, Any]) -> None:
    issuer = Issuer()
    assert await verifier(issuer).verify_token(issuer.token(**claims)) is None, why


async def test_refused_signatures() -> None:
    issuer = Issuer()
    v = verifier(issuer)
    good = issuer.token()
    head, body, sig = good.split(".")
    assert await v.verify_token(f"{head}.{body}.{sig[::-1]}") is None
    # The public key used as an HMAC secret (algorithm confusion; PyJWT will not even make
    # one, so by hand), and no signature at all.
    public_pem = issuer.keys["k1"][0].public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    claims = jwt.decode(good, options={"verify_signature": False})
    signed = b64(json.dumps({"alg": "HS256", "kid": "k1"}).encode()) + "." + b64(json.dumps(claims).encode())
    hs = signed + "." + b64(hmac.new(public_pem, signed.encode(), hashlib.sha256).digest())
    assert await v.verify_token(hs) is None
    assert await v.verify_token(jwt.encode(claims, None, algorithm="none", headers={"kid": "k1"})) is None
    # A key the issuer never published, under the published key's id.
    other = rsa_key("k1")[0]
    assert await v.verify_token(jwt.encode(claims, other, algorithm="RS256", headers={"kid": "k1"})) is None
    assert await v.verify_token("x" * (oauth.MAX_TOKEN_CHARS + 1)) is None


async def test_other_key_types() -> None:
    issuer = Issuer()
    key = ec.generate_private_key(ec.SECP256R1())
    issuer.keys["e1"] = (key, {**json.loads(ECAlgorithm.to_jwk(key.public_key())), "kid": "e1"})
    found = await verifier(issuer).verify_token(issuer.token(kid="e1", alg="ES256"))
    assert found is not None and found.client_id == "alice"


async def test_keys_are_fetched_again_for_an_unknown_kid_but_not_too_often(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(oauth, "JWKS_REFRESH_COOLDOWN", 0.2)
    issuer = Issuer()
    v = verifier(issuer)
    old = issuer.token()
    assert await v.verify_token(old) is not None
    assert issuer.asked.count("/jwks") == 1
    issuer.keys = {"k2": rsa_key("k2")}  # rotation: k1 is gone
    new = issuer.token(kid="k2")
    assert await v.verify_token(new) is None  # within the cooldown: not refetched
    assert issuer.asked.count("/jwks") == 1
    await anyio.sleep(0.25)
    assert await v.verify_token(new) is not None  # unknown kid: refetched
    assert issuer.asked.count("/jwks") == 2
    assert await v.verify_token(old) is None  # the removed key no longer verifies
    for _ in range(20):  # made-up kids within the cooldown cost nothing upstream
        assert await v.verify_token(jwt.encode({"a": 1}, issuer.keys["k2"][0], algorithm="RS256", headers={"kid": "zz"})) is None
    assert issuer.asked.count("/jwks") == 2
    assert issuer.asked.count("/.well-known/oauth-authorization-server/realms/r") == 1


async def test_keys_expire_from_the_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(oauth, "JWKS_MAX_AGE", 0.2)
    monkeypatch.setattr(oauth, "JWKS_REFRESH_COOLDOWN", 0.1)
    issuer = Issuer()
    v = verifier(issuer)
    token = issuer.token()
    assert await v.verify_token(token) is not None
    issuer.keys = {"k2": rsa_key("k2")}
    await anyio.sleep(0.25)
    assert await v.verify_token(token) is None  # k1 left the JWKS; the cache noticed by age


async def test_metadata_must_name_the_issuer() -> None:
    issuer = Issuer()
    issuer.metadata_issuer = "https://id.example.test/realms/other"
    assert await verifier(issuer).verify_token(issuer.token()) is None
    assert "/jwks" not in issuer.asked


def test_discovery_urls() -> None:
    assert oauth.discovery_urls("https://id.test/realms/r") == [
        "https://id.test/.well-known/oauth-authorization-server/realms/r",
        "https://id.test/realms/r/.well-known/openid-configuration",
        "https://id.test/.well-known/openid-configuration/realms/r",
    ]


async def test_scopes_from_scp_and_the_tenant_claim() -> None:
    issuer = Issuer()
    v = verifier(issuer, tenant_claim="org")
    found = await v.verify_token(issuer.token(scope=None, scp=[SCOPE_FILES, 7], org="Acme Corp"))
    assert found is not None and found.scopes == [SCOPE_FILES] and found.client_id == tenant_name("Acme Corp")
    assert found.subject == "alice"  # sessions stay bound to the person, the tenant is the org
    assert await v.verify_token(issuer.token()) is None  # no org claim


async def test_static_tenants_are_out_of_reach() -> None:
    issuer = Issuer()
    v = verifier(issuer, reserved_tenants=frozenset({"ci-bot"}))
    assert await v.verify_token(issuer.token(sub="ci-bot")) is None
    assert await v.verify_token(issuer.token(sub="alice")) is not None


async def test_introspection() -> None:
    issuer = Issuer()
    v = verifier(issuer, introspection_client="rs", introspection_secret="s")
    now = int(time.time())
    issuer.active = {
        "opaque-good": {"active": True, "iss": ISSUER, "aud": RESOURCE, "sub": "bob", "scope": "codeexec:execute", "exp": now + 60},
        "opaque-elsewhere": {"active": True, "iss": ISSUER, "aud": "https://other.test", "sub": "bob", "exp": now + 60},
        "opaque-no-aud": {"active": True, "iss": ISSUER, "sub": "bob", "exp": now + 60},
        "opaque-other-iss": {"active": True, "iss": "https://evil.test", "aud": RESOURCE, "sub": "bob"},
        "opaque-expired": {"active": True, "iss": ISSUER, "aud": [RESOURCE], "sub": "bob", "exp": now - 60},
    }
    found = await v.verify_token("opaque-good")
    assert found is not None and found.client_id == "bob" and found.scopes == [SCOPE_EXECUTE]
    for token in ("opaque-elsewhere", "opaque-no-aud", "opaque-other-iss", "opaque-expired", "unknown"):
        assert await v.verify_token(token) is None, token
    asked = len(issuer.asked)
    assert await v.verify_token("opaque-good") is not None and await v.verify_token("unknown") is None
    assert len(issuer.asked) == asked  # cached, the refusals too
    # Without introspection credentials, an opaque token is simply refused.
    assert await verifier(Issuer()).verify_token("opaque-good") is None


@given(st.text(min_size=1, max_size=200))
def test_tenant_names_are_valid_and_never_shared(value: str) -> None:
    name = tenant_name(value)
    assert oauth._TENANT.fullmatch(name), name
    if name == value:
        return
    assert name != tenant_name(value + "x") and name != tenant_name(name)  # a hashed-looking value is hashed again


def test_tenant_names() -> None:
    assert tenant_name("3f2a0c1e-uuid-like") == "3f2a0c1e-uuid-like"
    assert tenant_name("auth0|65f0c0ffee").startswith("auth0-65f0c0ffee--")
    assert tenant_name("Alice") != tenant_name("alice") == "alice"
    look_alike = tenant_name("Bob@example.com")
    assert look_alike.startswith("bob-example-com--") and tenant_name(look_alike) != look_alike


def test_config_from_settings(tmp_path: Any) -> None:
    assert oauth.config_from(Settings()) is None
    config = oauth.config_from(Settings(oauth_issuer="http://127.0.0.1:9000", port=8123))
    assert config is not None and config.resource == "http://127.0.0.1:8123/mcp" and config.audiences == (config.resource,)
    config = oauth.config_from(Settings(oauth_issuer=ISSUER, public_url="https://code.example.test/", host="0.0.0.0",
                                        oauth_audiences=("api://codeexec",)))
    assert config is not None and config.resource == RESOURCE and config.audiences == ("api://codeexec",)
    for bad, says in [({"oauth_issuer": "http://id.example.test"}, "https"),
                      ({"oauth_issuer": ISSUER, "host": "0.0.0.0"}, "--public-url"),
                      ({"oauth_audiences": ("x",)}, "need --oauth-issuer"),
                      ({"oauth_issuer": ISSUER, "public_url": RESOURCE, "oauth_introspection_client": "rs"}, "secret-file")]:
        with pytest.raises(ValueError, match=says):
            oauth.config_from(Settings(**bad))


async def gate(path: str, user: AuthenticatedUser | None = None, token: bool = False) -> tuple[int, dict[str, str], bool]:
    reached = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        reached.append(True)

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    headers = [(b"authorization", b"Bearer x")] if token else []
    scope = {"type": "http", "method": "GET", "path": path, "headers": headers, "user": user}
    await Gate(app, "https://code.example.test/.well-known/oauth-protected-resource/mcp")(scope, None, send)
    if reached:
        return 200, {}, True
    head = {k.decode(): v.decode() for k, v in sent[0]["headers"]}
    return sent[0]["status"], head, False


def caller(*scopes: str) -> AuthenticatedUser:
    return AuthenticatedUser(AccessToken(token="", client_id="alice", scopes=list(scopes)))


async def test_the_gate() -> None:
    meta = 'resource_metadata="https://code.example.test/.well-known/oauth-protected-resource/mcp"'
    status, head, _ = await gate("/mcp")
    assert status == 401 and head["www-authenticate"] == f'Bearer scope="codeexec:execute", {meta}'
    status, head, _ = await gate("/v1/files/file_x/content", token=True)
    assert status == 401 and head["www-authenticate"].startswith('Bearer error="invalid_token"')
    assert 'scope="codeexec:files"' in head["www-authenticate"]
    status, head, _ = await gate("/v1/files", caller(SCOPE_EXECUTE))
    assert status == 403 and 'error="insufficient_scope"' in head["www-authenticate"]
    assert (await gate("/v1/files", caller(SCOPE_FILES)))[2] and (await gate("/mcp", caller(SCOPE_EXECUTE)))[2]
    assert (await gate("/messages/", caller(SCOPE_FILES)))[0] == 403
    assert (await gate("/v1/usage", caller()))[2]  # any valid token
    assert (await gate("/anything-else"))[0] == 401  # default deny
    for open_path in ("/healthz", "/metrics", "/.well-known/oauth-protected-resource/mcp"):
        assert (await gate(open_path))[2]
