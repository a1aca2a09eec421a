"""The server as an OAuth 2.1 resource server, end to end on loopback, with real parts only:
a certified OpenID provider (npm `oidc-provider`, tests/oidc/provider.mjs), the real server
process, the `mcp` SDK's own OAuth client (discovery from the 401, dynamic registration,
authorization code + PKCE, RFC 8707 resource) driving Streamable HTTP and SSE, a "browser" that
submits the provider's login and consent forms, and the MCP Inspector's CLI. The sandboxes are
real gVisor containers. scripts/setup.sh installs the npm tools; without them this FAILS.

The test holds the provider's signing keys (it writes them), so it can also mint tokens that a
real provider would sign but this server must refuse (expired, wrong audience or issuer), and
rotate the keys by restarting the provider."""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from html import unescape
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urljoin, urlsplit

import anyio
import httpx2
import jwt
import pytest
from conftest import TENANT, Session, free_port, http_server, wait_for_http
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm
from mcp.client import Client
from mcp.client.auth import OAuthClientProvider
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.auth import AuthorizationCodeResult, OAuthClientInformationFull, OAuthClientMetadata, OAuthToken
from strict import validate_result

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parents[2]
OIDC = REPO / "tests" / "oidc"
REDIRECT = "http://127.0.0.1:9/callback"  # never contacted: the "browser" stops at it
# Users are named after the test tenant (conftest removes that family's containers).
ALICE, BOB, STATIC = f"{TENANT}-alice", f"{TENANT}-bob", f"{TENANT}-static"
STATIC_TOKEN = "static-" + secrets.token_hex(16)
RS_CLIENT, RS_SECRET = "codeexec-rs", secrets.token_hex(24)


def tools_dir() -> Path:
    """Where scripts/setup.sh installed tests/oidc/package*.json (same key as it computes)."""
    key = hashlib.sha256((OIDC / "package.json").read_bytes() + (OIDC / "package-lock.json").read_bytes()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    where = cache / "mcp-codeexec" / f"oidc-{key}"
    if not (where / ".installed").exists():
        pytest.fail(f"the OAuth test tools are not installed at {where}: run scripts/setup.sh")
    return where


def signing_key(kid: str) -> dict[str, Any]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return {**json.loads(RSAAlgorithm.to_jwk(key)), "kid": kid, "use": "sig", "alg": "RS256"}


@dataclass
class Provider:
    """oidc-provider on loopback; restart() swaps its signing keys (a key rotation)."""

    tools: Path
    tmp: Path
    port: int
    resource: str = ""
    keys: list[dict[str, Any]] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, keys: list[dict[str, Any]]) -> None:
        self.keys = keys
        (self.tmp / "keys.json").write_text(json.dumps({"keys": keys}))
        env = {**os.environ, "ISSUER": self.issuer, "PORT": str(self.port), "KEYS": str(self.tmp / "keys.json"),
               "RESOURCE": self.resource, "RS_CLIENT_ID": RS_CLIENT, "RS_CLIENT_SECRET": RS_SECRET,
               "TOOLS": str(self.tools)}
        log = (self.tmp / "provider.log").open("ab")
        self.proc = subprocess.Popen([str(self.tools / "node_modules" / ".bin" / "node"), str(OIDC / "provider.mjs")],
                                     cwd=self.tools, env=env, stdout=log, stderr=subprocess.STDOUT)
        assert wait_for_http(f"{self.issuer}/.well-known/openid-configuration", self.proc,
                             lambda: (self.tmp / "provider.log").read_text()[-3000:]), "the OpenID provider did not answer"

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=20)
            self.proc = None

    def mint(self, sub: str, **claims: Any) -> str:
        """A token shaped like the provider's, signed with its current key, claims overridable."""
        now = int(time.time())
        body = {"iss": self.issuer, "aud": self.resource, "sub": sub, "scope": "codeexec:execute codeexec:files",
                "iat": now, "exp": now + 600, "jti": secrets.token_hex(8), "client_id": "minted", **claims}
        key = self.keys[0]
        return jwt.encode({k: v for k, v in body.items() if v is not None}, RSAAlgorithm.from_jwk(json.dumps(key)),
                          algorithm="RS256", headers={"kid": key["kid"], "typ": "at+jwt"})


@dataclass
class Stack:
    base: str
    provider: Provider
    log: Path

    @property
    def mcp(self) -> str:
        return f"{self.base}/mcp"


@pytest.fixture(scope="module")
def stack(engine, tmp_path_factory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("oauth")
    provider = Provider(tools_dir(), tmp, free_port())
    (tmp / "rs-secret").write_text(RS_SECRET)
    # Both kinds of credentials at once: a static token (tokens.json) and the provider's tokens.
    (tmp / "tokens.json").write_text(json.dumps({"tenants": {
        STATIC: {"token_sha256": hashlib.sha256(STATIC_TOKEN.encode()).hexdigest()},
        BOB: {"max_concurrent": 1},  # an OAuth tenant's limits come from the same file
    }}))
    log = tmp / "server.log"
    args = ("--oauth-issuer", provider.issuer, "--tokens", str(tmp / "tokens.json"),
            "--oauth-introspection-client", RS_CLIENT, "--oauth-introspection-secret-file", str(tmp / "rs-secret"),
            "--timeout", "20", "--memory", "1g")
    with http_server(*args, log=log) as base:
        provider.resource = f"{base}/mcp"
        provider.start([signing_key("k1")])
        try:
            yield Stack(base, provider, log)
        finally:
            provider.stop()


# ---------------------------------------------------------------- the client side
class Memory:
    """The SDK client's token storage, in memory."""

    def __init__(self) -> None:
        self.tokens: OAuthToken | None = None
        self.client: OAuthClientInformationFull | None = None

    async def get_tokens(self) -> OAuthToken | None:
        return self.tokens

    async def set_tokens(self, tokens: OAuthToken) -> None:
        self.tokens = tokens

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        return self.client

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        self.client = client_info


class Browser:
    """What the user does with the authorization URL the client hands over: opens it, signs
    in as `user` and consents on the provider's pages (its forms, submitted over HTTP), and
    comes back with the redirect to the client's callback."""

    def __init__(self, user: str) -> None:
        self.user = user
        self.visited: list[str] = []
        self.callback: dict[str, list[str]] = {}

    async def open(self, url: str) -> None:
        async with httpx2.AsyncClient(follow_redirects=False, timeout=30) as http:
            response = await http.get(url)
            for _ in range(20):
                self.visited.append(f"{response.request.method} {urlsplit(str(response.request.url)).path}")
                location = response.headers.get("location")
                if location is not None:
                    target = urljoin(str(response.request.url), location)
                    if target.startswith(REDIRECT):
                        self.callback = parse_qs(urlsplit(target).query)
                        return
                    response = await http.get(target)
                    continue
                assert response.status_code == 200, response.text[:2000]
                form = re.search(r'<form[^>]*action="([^"]+)"[^>]*>(.*?)</form>', response.text, re.S)
                assert form, response.text[:2000]
                fields = {unescape(n): unescape(v) for n, v in
                          re.findall(r'<input[^>]*type="hidden"[^>]*name="([^"]+)"[^>]*value="([^"]*)"', form.group(2))}
                if 'name="login"' in form.group(2):
                    fields.update(login=self.user, password="any")  # devInteractions accepts any password
                response = await http.post(urljoin(str(response.request.url), unescape(form.group(1))), data=fields)
        raise AssertionError(f"no redirect back to the client after {self.visited}")

    async def come_back(self) -> AuthorizationCodeResult:
        return AuthorizationCodeResult(code=self.callback["code"][0], state=self.callback["state"][0],
                                       iss=self.callback.get("iss", [None])[0])


@dataclass
class User:
    """One person's MCP client: the SDK's OAuth provider, its storage, and what went over HTTP."""

    name: str
    stack: Stack
    client_name: str = "mcp-codeexec tests"
    storage: Memory = field(default_factory=Memory)
    requests: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.browser = Browser(self.name)
        metadata = OAuthClientMetadata(redirect_uris=[REDIRECT], token_endpoint_auth_method="none",  # type: ignore[list-item]
                                       grant_types=["authorization_code", "refresh_token"], response_types=["code"],
                                       client_name=self.client_name)
        self.auth = OAuthClientProvider(self.stack.mcp, metadata, self.storage, self.browser.open, self.browser.come_back)

    def http(self) -> httpx2.AsyncClient:
        async def record(request: httpx2.Request) -> None:
            self.requests.append(f"{request.method} {request.url}")

        return httpx2.AsyncClient(auth=self.auth, timeout=60, event_hooks={"request": [record]})

    @property
    def token(self) -> str:
        assert self.storage.tokens is not None
        return self.storage.tokens.access_token

    def client(self) -> Client:
        return Client(streamable_http_client(self.stack.mcp, http_client=self.http()))


def challenge(response: httpx2.Response) -> dict[str, str]:
    """The parameters of a `WWW-Authenticate: Bearer k="v", …` header."""
    header = response.headers.get("www-authenticate", "")
    assert header.startswith("Bearer"), (response.status_code, header)
    return dict(re.findall(r'(\w+)="([^"]*)"', header))


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# ---------------------------------------------------------------- tests
async def test_full_flow_over_streamable_http(stack: Stack) -> None:
    """401 from /mcp -> resource metadata -> issuer metadata -> registration -> authorization
    code + PKCE -> token -> tools, all driven by the SDK client itself."""
    alice = User(ALICE, stack)
    async with alice.client() as client:
        session = Session(client)
        result = await session.bash("echo hello")
        assert result["stdout"] == "hello\n" and result["return_code"] == 0
    issuer = stack.provider.issuer
    flow = [r.split("?")[0] for r in alice.requests]
    assert flow[:7] == [
        f"POST {stack.mcp}",  # no token yet: 401
        f"GET {stack.base}/.well-known/oauth-protected-resource/mcp",  # named by the 401's header
        f"GET {issuer}/.well-known/oauth-authorization-server",
        f"POST {issuer}/reg",  # dynamic client registration
        f"POST {issuer}/token",  # after the browser came back with a code
        f"POST {stack.mcp}",  # the same request again, with the token
        f"POST {stack.mcp}",
    ], alice.requests
    assert alice.browser.visited[0] == "GET /auth" and "POST /interaction" in " ".join(alice.browser.visited)
    # The token: a JWT for this resource (RFC 8707), with the scope the 401 asked for only.
    claims = jwt.decode(alice.token, options={"verify_signature": False})
    assert claims["aud"] == stack.mcp and claims["sub"] == ALICE and claims["scope"] == "codeexec:execute"


async def test_the_discovery_documents(stack: Stack) -> None:
    async with httpx2.AsyncClient() as http:
        first = await http.post(stack.mcp, json={})
        assert first.status_code == 401
        params = challenge(first)
        # RFC 6750 §3.1: no error code when no token was sent; the scope and metadata to get one.
        assert params == {"scope": "codeexec:execute",
                          "resource_metadata": f"{stack.base}/.well-known/oauth-protected-resource/mcp"}
        for url in (params["resource_metadata"], f"{stack.base}/.well-known/oauth-protected-resource"):
            prm = (await http.get(url)).json()
            assert prm == {"resource": stack.mcp, "authorization_servers": [stack.provider.issuer],
                           "scopes_supported": ["codeexec:execute", "codeexec:files"],
                           "bearer_methods_supported": ["header"], "resource_name": "mcp-codeexec"}, prm


async def test_sse_with_a_provider_token(stack: Stack) -> None:
    alice = User(ALICE, stack)
    async with Client(sse_client(f"{stack.base}/sse", auth=alice.auth), mode="legacy") as client:
        assert (await Session(client).bash("echo over-sse"))["stdout"] == "over-sse\n"
    async with httpx2.AsyncClient() as http:
        for path in ("/sse", "/messages/?session_id=0"):
            response = await http.request("GET" if path == "/sse" else "POST", stack.base + path)
            assert response.status_code == 401 and challenge(response)["scope"] == "codeexec:execute"


async def test_files_api_needs_the_files_scope(stack: Stack) -> None:
    """The MCP client's token (codeexec:execute) is refused by the Files API with a 403 that
    names the scope; a client that asks for codeexec:files gets it, and it is the same tenant."""
    alice = User(ALICE, stack)
    async with alice.client() as client:
        await Session(client).bash("echo from-sandbox > out.txt")
    async with httpx2.AsyncClient() as http:
        refused = await http.get(f"{stack.base}/v1/files", headers=bearer(alice.token))
        assert refused.status_code == 403
        assert challenge(refused) == {
            "error": "insufficient_scope", "error_description": "this needs the scope codeexec:files",
            "scope": "codeexec:files", "resource_metadata": f"{stack.base}/.well-known/oauth-protected-resource/mcp"}
    # A Files API script with the SDK's OAuth client: its 401 asks for codeexec:files.
    files = User(ALICE, stack)
    async with files.http() as http:
        listing = await http.get(f"{stack.base}/v1/files")
        assert listing.status_code == 200, listing.text
        assert "out.txt" in [f["filename"] for f in listing.json()["data"]]
        uploaded = await http.post(f"{stack.base}/v1/files", files={"file": ("in.txt", b"uploaded\n")})
        assert uploaded.status_code == 201
    assert jwt.decode(files.token, options={"verify_signature": False})["scope"] == "codeexec:files"
    async with httpx2.AsyncClient() as http:  # ... and that token alone does not run code
        refused = await http.post(stack.mcp, json={}, headers=bearer(files.token))
        assert refused.status_code == 403 and challenge(refused)["scope"] == "codeexec:execute"


async def test_tenant_isolation_between_two_users(stack: Stack) -> None:
    alice, bob = User(ALICE, stack), User(BOB, stack)
    async with alice.client() as client:
        a = Session(client)
        await a.bash("echo secret > a.txt")
        cid = a.last_meta["container"]["id"]
    async with bob.client() as client:
        b = Session(client)
        theirs = await b.call("bash_code_execution", {"command": "cat a.txt"}, meta={"container": cid})
        assert theirs == {"type": "bash_code_execution_tool_result_error", "error_code": "container_expired"}
        assert (await b.bash("cat a.txt"))["return_code"] == 1
        assert b.last_meta["container"]["id"] != cid
    async with httpx2.AsyncClient() as http:  # the usage endpoint names each caller's tenant
        assert (await http.get(f"{stack.base}/v1/usage", headers=bearer(alice.token))).json()["tenant"] == ALICE
        assert (await http.get(f"{stack.base}/v1/usage", headers=bearer(bob.token))).json()["tenant"] == BOB


async def test_static_tokens_work_alongside(stack: Stack) -> None:
    """--tokens and --oauth-issuer at once; no provider user can take a static tenant's name."""
    transport = streamable_http_client(stack.mcp, http_client=httpx2.AsyncClient(headers=bearer(STATIC_TOKEN), timeout=60))
    async with Client(transport) as client:
        assert (await Session(client).bash("echo static"))["stdout"] == "static\n"
    impostor = User(STATIC, stack)  # signs in at the provider as the static tenant's name
    async with impostor.http() as http:
        assert (await http.post(stack.mcp, json={})).status_code == 401  # after the whole flow, once
    assert jwt.decode(impostor.token, options={"verify_signature": False})["sub"] == STATIC
    async with httpx2.AsyncClient() as http:
        refused = await http.post(stack.mcp, json={}, headers=bearer(impostor.token))
        assert refused.status_code == 401 and challenge(refused)["error"] == "invalid_token"


async def test_opaque_token_by_introspection(stack: Stack) -> None:
    """A client the provider gives opaque tokens: the server asks the provider (RFC 7662)."""
    carol = User(f"{TENANT}-carol", stack, client_name="opaque")
    async with carol.client() as client:
        assert (await Session(client).bash("echo opaque"))["stdout"] == "opaque\n"
    assert carol.token.count(".") != 2  # not a JWT


async def test_rejections(stack: Stack) -> None:
    p = stack.provider
    now = int(time.time())
    valid = p.mint(ALICE)
    real = User(ALICE, stack)
    async with real.client() as client:
        await client.list_tools()
    header, body, signature = real.token.split(".")
    flipped = signature[:-4] + ("AAAA" if signature[-4:] != "AAAA" else "BBBB")
    other_key = signing_key(p.keys[0]["kid"])  # same kid, another key: a forgery
    forged = jwt.encode({"iss": p.issuer, "aud": p.resource, "sub": ALICE, "scope": "codeexec:execute", "exp": now + 600},
                        RSAAlgorithm.from_jwk(json.dumps(other_key)), algorithm="RS256", headers={"kid": other_key["kid"]})
    cases = {
        "expired": p.mint(ALICE, iat=now - 3600, exp=now - 600),
        "not yet valid": p.mint(ALICE, nbf=now + 600),
        "wrong audience": p.mint(ALICE, aud="https://other.example/mcp"),
        "wrong issuer": p.mint(ALICE, iss="http://127.0.0.1:1"),
        "bad signature": f"{header}.{body}.{flipped}",
        "forged with the key id": forged,
        "no exp": p.mint(ALICE, exp=None),
        "unsigned": jwt.encode({"iss": p.issuer, "aud": p.resource, "sub": ALICE, "exp": now + 600}, None, algorithm="none"),
        "not a token": "garbage",
    }
    async with httpx2.AsyncClient() as http:
        assert (await http.post(stack.mcp, json={}, headers=bearer(valid))).status_code != 401  # the control
        for why, token in cases.items():
            for method, path in (("POST", "/mcp"), ("GET", "/v1/files"), ("GET", "/sse")):
                response = await http.request(method, stack.base + path, headers=bearer(token))
                assert response.status_code == 401, (why, path, response.status_code)
                params = challenge(response)
                assert params["error"] == "invalid_token" and params["resource_metadata"].endswith("/oauth-protected-resource/mcp")
        no_scope = await http.post(stack.mcp, json={}, headers=bearer(p.mint(ALICE, scope=None)))
        assert no_scope.status_code == 403 and challenge(no_scope)["error"] == "insufficient_scope"
    logged = stack.log.read_text()
    assert not [why for why, token in cases.items() if len(token) > 20 and token in logged]


async def test_key_rotation(stack: Stack) -> None:
    """The provider rotates its signing key: a token under the new key works at once (the server
    refetches the JWKS for an unknown kid), one under the removed key no longer does."""
    p = stack.provider
    before = User(ALICE, stack)
    async with before.client() as client:
        await client.list_tools()
    old_token = before.token
    await anyio.sleep(5.5)  # past the refetch cooldown since the server's last look at the JWKS
    p.stop()
    p.start([signing_key("k2")])
    after = User(ALICE, stack)  # the provider forgot its clients: a new registration
    async with after.client() as client:
        await client.list_tools()
    assert jwt.get_unverified_header(after.token)["kid"] == "k2"
    async with httpx2.AsyncClient() as http:
        refused = await http.post(stack.mcp, json={}, headers=bearer(old_token))
        assert refused.status_code == 401 and challenge(refused)["error"] == "invalid_token"


async def test_mcp_inspector_cli(stack: Stack) -> None:
    """The MCP Inspector's CLI lists and calls the tools with a token from the provider."""
    user = User(ALICE, stack)
    async with user.client() as client:
        await client.list_tools()
    tools = tools_dir()

    def inspector(*args: str) -> dict[str, Any]:
        env = {**os.environ, "PATH": f"{tools / 'node_modules' / '.bin'}:{os.environ['PATH']}", "NO_UPDATE_NOTIFIER": "1"}
        run = subprocess.run(["mcp-inspector", "--cli", stack.mcp, "--transport", "http",
                              "--header", f"Authorization: Bearer {user.token}", *args],
                             cwd=tools, env=env, capture_output=True, text=True, timeout=90)
        assert run.returncode == 0, run.stderr[-3000:]
        return json.loads(run.stdout)

    listed = await anyio.to_thread.run_sync(lambda: inspector("--method", "tools/list"))
    assert {"bash_code_execution", "text_editor_code_execution"} <= {t["name"] for t in listed["tools"]}
    called = await anyio.to_thread.run_sync(lambda: inspector(
        "--method", "tools/call", "--tool-name", "bash_code_execution", "--tool-arg", "command=echo from-inspector"))
    validate_result("bash_code_execution", called["structuredContent"])
    assert called["structuredContent"]["stdout"] == "from-inspector\n" and not called.get("isError")
