"""The remote deployment: Streamable HTTP and SSE, bearer tokens mapped to tenants, a Files
API, usage, health and metrics, all in one Starlette app.

Routes (all but /healthz, /metrics and /.well-known/ need `Authorization: Bearer <token>` when
a tokens file or an OAuth issuer is configured, see oauth.Gate for the scope each needs; without
either, every caller is the configured tenant):
- `/mcp` (Streamable HTTP), `/sse` + `/messages/` (SSE): the MCP server;
- `POST /v1/files` (multipart field `file`), `GET /v1/files`, `GET /v1/files/{id}`,
  `GET /v1/files/{id}/content`, `DELETE /v1/files/{id}`: modelled on Anthropic's Files API;
- `POST /v1/containers/{id}/files` `{"file_id": …, "path"?: …}`: put a file into a container;
- `GET /v1/usage`: the caller's metering; `GET /healthz`; `GET /metrics` (Prometheus);
- with OAuth, `/.well-known/oauth-protected-resource[/mcp]`: RFC 9728 metadata.
"""

from __future__ import annotations

import dataclasses
import logging
import posixpath
from typing import Any
from urllib.parse import quote

import anyio
from mcp.server.auth.middleware.auth_context import AuthContextMiddleware
from mcp.server.auth.middleware.bearer_auth import BearerAuthBackend
from mcp.server.auth.provider import TokenVerifier
from mcp.server.runner import serve_dual_era_loop
from mcp.server.sse import SseServerTransport
from mcp.server.transport_security import TransportSecuritySettings
from starlette.applications import Starlette
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route

from mcp_codeexec.app import App
from mcp_codeexec.calls import put_file
from mcp_codeexec.config import Settings
from mcp_codeexec.errors import BackendUnavailable, CodeExecError, ContainerExpired, FileNotFound
from mcp_codeexec.files import StoreFull
from mcp_codeexec.oauth import SCOPES, EitherVerifier, Gate, OAuthVerifier, config_from, metadata_routes, metadata_url
from mcp_codeexec.server import build_server
from mcp_codeexec.tenants import HashedTokenVerifier, static_tenants

log = logging.getLogger(__name__)


def _error(status: int, kind: str, message: str) -> JSONResponse:
    return JSONResponse({"type": "error", "error": {"type": kind, "message": message}}, status_code=status)


def _file_json(meta: Any) -> dict[str, Any]:
    return {"type": "file", "downloadable": True, **dataclasses.asdict(meta)}


def build_app(settings: Settings) -> Starlette:
    app = App(settings)
    server = build_server(app)
    # Who may call: static tokens (tokens.json), OAuth access tokens (oauth.py), both, or
    # nobody checks (one tenant). oauth.Gate, in front of every route, enforces it.
    policies = app.policies
    oauth = config_from(settings)
    verifiers: list[TokenVerifier] = [HashedTokenVerifier(policies, SCOPES)] if static_tenants(policies) else []
    if oauth is not None:
        verifiers.append(OAuthVerifier(oauth))
    verifier = EitherVerifier(verifiers) if verifiers else None
    security = _security(settings)

    def state() -> App:
        return app

    def tenant_of(request: Request) -> str:
        """The caller's tenant (the Gate has let only authenticated callers through)."""
        if verifier is None:
            return settings.tenant
        return request.scope["user"].access_token.client_id

    def authed(handler: Any) -> Any:
        async def endpoint(request: Request) -> Response:
            return await handler(request, tenant_of(request))

        return endpoint

    async def upload(request: Request, tenant: str) -> Response:
        length = int(request.headers.get("content-length") or 0)
        if length > settings.max_upload_bytes + 65536:
            return _error(413, "request_too_large", f"uploads are limited to {settings.max_upload_bytes} bytes")
        form = await request.form(max_part_size=settings.max_upload_bytes)
        part = form.get("file")
        if part is None or isinstance(part, str):
            return _error(400, "invalid_request_error", "send the file as multipart/form-data field 'file'")
        data = await part.read(settings.max_upload_bytes + 1)
        if len(data) > settings.max_upload_bytes:
            return _error(413, "request_too_large", f"uploads are limited to {settings.max_upload_bytes} bytes")
        try:
            meta = await anyio.to_thread.run_sync(state().files.add, tenant, part.filename or "upload", data)
        except StoreFull as exc:
            return _error(429, "rate_limit_error", str(exc))
        return JSONResponse(_file_json(meta), status_code=201)

    async def list_files(request: Request, tenant: str) -> Response:
        return JSONResponse({"data": [_file_json(m) for m in state().files.list(tenant)]})

    async def file_meta(request: Request, tenant: str) -> Response:
        meta = state().files.get(tenant, request.path_params["file_id"])
        return JSONResponse(_file_json(meta)) if meta else _error(404, "not_found_error", "file not found")

    async def file_content(request: Request, tenant: str) -> Response:
        file_id = request.path_params["file_id"]
        meta = state().files.get(tenant, file_id)
        data = state().files.read(tenant, file_id) if meta else None
        if meta is None or data is None:
            return _error(404, "not_found_error", "file not found")
        disposition = f"attachment; filename*=UTF-8''{quote(meta.filename)}"
        return Response(data, media_type=meta.mime_type, headers={"Content-Disposition": disposition})

    async def delete_file(request: Request, tenant: str) -> Response:
        file_id = request.path_params["file_id"]
        if not state().files.delete(tenant, file_id):
            return _error(404, "not_found_error", "file not found")
        return JSONResponse({"id": file_id, "type": "file_deleted"})

    async def container_put(request: Request, tenant: str) -> Response:
        try:
            body = await request.json()
            file_id, path = body["file_id"], body.get("path")
        except (ValueError, KeyError, TypeError):
            return _error(400, "invalid_request_error", 'send {"file_id": "file_…", "path"?: "…"}')
        if path is not None and not _in_workspace(path, settings.workdir):
            # The agent refuses it too, but as a failed write (503): say it is the request.
            return _error(400, "invalid_request_error", f"path {path!r} is outside the workspace {settings.workdir}")
        try:
            sandbox = await state().containers.open(tenant, request.path_params["container_id"])
            where = await put_file(state(), tenant, sandbox, file_id, path)
        except ContainerExpired:
            return _error(404, "not_found_error", "container not found or expired")
        except FileNotFound:
            return _error(404, "not_found_error", "file not found")
        except CodeExecError as exc:
            return _error(503, "api_error", str(exc))
        return JSONResponse({"container_id": sandbox.info.id, "file_id": file_id, "path": where}, status_code=201)

    async def usage(request: Request, tenant: str) -> Response:
        return JSONResponse(state().usage.report(tenant))

    async def healthz(request: Request) -> Response:
        try:
            with anyio.fail_after(10):
                info = await state().backend.check(settings.image)
        except (BackendUnavailable, TimeoutError) as exc:
            return JSONResponse({"status": "unavailable", "reason": str(exc)}, status_code=503)
        return JSONResponse({"status": "ok", "engine": info.engine, "runtime": info.runtime})

    async def metrics(request: Request) -> Response:
        return PlainTextResponse(state().metrics.render(), media_type="text/plain; version=0.0.4")

    sse = SseServerTransport("/messages/", security_settings=security)

    async def sse_endpoint(request: Request) -> Response:
        async with sse.connect_sse(request.scope, request.receive, request._send) as (read, write):
            await serve_dual_era_loop(
                server, read, write, lifespan_state=state(), init_options=server.create_initialization_options()
            )
        return Response()

    async def sse_messages(scope: Any, receive: Any, send: Any) -> None:
        await sse.handle_post_message(scope, receive, send)

    routes = [
        Route("/healthz", healthz),
        Route("/metrics", metrics),
        Route("/v1/files", authed(upload), methods=["POST"]),
        Route("/v1/files", authed(list_files), methods=["GET"]),
        Route("/v1/files/{file_id}", authed(file_meta), methods=["GET"]),
        Route("/v1/files/{file_id}", authed(delete_file), methods=["DELETE"]),
        Route("/v1/files/{file_id}/content", authed(file_content), methods=["GET"]),
        Route("/v1/containers/{container_id}/files", authed(container_put), methods=["POST"]),
        Route("/v1/usage", authed(usage)),
        Route("/sse", sse_endpoint),
        Mount("/messages/", app=sse_messages),
        *(metadata_routes(oauth) if oauth is not None else []),
    ]
    web = server.streamable_http_app(
        streamable_http_path="/mcp",
        host=settings.host,
        transport_security=security,
        custom_starlette_routes=routes,  # type: ignore[arg-type]  # Mounts are routes too
    )
    if verifier is not None:
        # The SDK's bearer middleware and request context (server.py reads the tenant from
        # get_access_token()), and our Gate in place of the SDK's RequireAuthMiddleware: it
        # covers every route, not /mcp alone, and names the scope a 401/403 asks for.
        # Added innermost first: authentication runs first.
        web.add_middleware(Gate, metadata_url=metadata_url(oauth) if oauth is not None else None)
        web.add_middleware(AuthContextMiddleware)
        web.add_middleware(AuthenticationMiddleware, backend=BearerAuthBackend(verifier))
    return web


def _in_workspace(path: Any, workdir: str) -> bool:
    """A target path (relative to the workdir, or absolute) that stays inside it, as text.
    (Symlinks are the agent's to check, inside the sandbox.)"""
    if not isinstance(path, str) or not path or "\0" in path:
        return False
    full = posixpath.normpath(posixpath.join(workdir, path))
    return full.startswith(workdir.rstrip("/") + "/")


def _security(settings: Settings) -> TransportSecuritySettings | None:
    """DNS-rebinding protection stays on: bound to loopback it allows only loopback Host
    headers; behind a proxy, name the public host(s) with --allowed-host."""
    hosts = [*settings.allowed_hosts]
    if settings.host in ("127.0.0.1", "localhost", "::1") or not hosts:
        hosts += ["127.0.0.1:*", "localhost:*", "[::1]:*"]
    origins = [f"http://{h}" for h in hosts] + [f"https://{h}" for h in hosts]
    return TransportSecuritySettings(enable_dns_rebinding_protection=True, allowed_hosts=hosts, allowed_origins=origins)


async def serve_http(settings: Settings) -> None:
    import uvicorn

    app = build_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning", lifespan="on")
    await uvicorn.Server(config).serve()
