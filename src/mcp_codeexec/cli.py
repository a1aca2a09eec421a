"""Command line: `mcp-codeexec` serves MCP over stdio with the flags below."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from contextlib import AsyncExitStack
from pathlib import Path

import anyio
from mcp.server.stdio import stdio_server

from mcp_codeexec import __version__, stdio
from mcp_codeexec.config import Settings, parse_duration, parse_size
from mcp_codeexec.files import upload_plan
from mcp_codeexec.profiles import VERSIONS

log = logging.getLogger("mcp_codeexec")


def parser() -> argparse.ArgumentParser:
    d = Settings()
    ap = argparse.ArgumentParser(
        prog="mcp-codeexec",
        description="Claude's code execution tool as an MCP server, in gVisor sandboxes. "
        "`mcp-codeexec doctor` checks this host (engine, runtime, image, disk quota).",
    )
    ap.add_argument("--version", action="version", version=f"mcp-codeexec {__version__}")
    ap.add_argument("--runtime", default=d.runtime, help="OCI runtime for sandboxes (default runsc = gVisor). "
                    "Anything else needs --allow-weak-isolation.")
    ap.add_argument("--allow-weak-isolation", action="store_true",
                    help="permit a runtime other than runsc (e.g. runc), or --backend local")
    ap.add_argument("--backend", choices=["docker", "kubernetes", "local"], default=d.backend,
                    help="docker (default): sandboxes are containers under --runtime. kubernetes: pods on a cluster, "
                    "under --kube-runtime-class (deploy/kubernetes/). local: NO isolation, commands "
                    "run as plain processes on this host (for tests; needs --allow-weak-isolation)")
    k = ap.add_argument_group("--backend kubernetes")
    k.add_argument("--kube-namespace", default=d.kube_namespace, help=f"namespace of the sandbox pods (default {d.kube_namespace})")
    k.add_argument("--kube-runtime-class", default=d.kube_runtime_class,
                   help=f"RuntimeClass of the sandbox pods (default {d.kube_runtime_class}; its handler must be runsc)")
    k.add_argument("--kube-storage-class", default=d.kube_storage_class, help="StorageClass of workspace claims (default: the cluster's)")
    k.add_argument("--kube-pull-policy", default=d.kube_pull_policy, choices=["Always", "IfNotPresent", "Never"],
                   help=f"imagePullPolicy of the sandbox image (default {d.kube_pull_policy})")
    k.add_argument("--kube-node-selector", action="append", default=[], metavar="KEY=VALUE",
                   help="schedule sandboxes only on nodes with this label (repeatable)")
    k.add_argument("--kube-toleration", action="append", default=[], metavar="KEY[=VALUE]:EFFECT",
                   help="let sandboxes run on nodes with this taint (repeatable), e.g. sandbox.gke.io/runtime=gvisor:NoSchedule")
    k.add_argument("--kubeconfig", default=d.kubeconfig, help="kubeconfig file (default: in-cluster service account "
                   "when run in a pod, else $KUBECONFIG or ~/.kube/config)")
    k.add_argument("--kube-context", default=d.kube_context, help="kubeconfig context (default: its current one)")
    ap.add_argument("--local-dir", default=d.local_dir, help="local backend: where its sandboxes live "
                    "(default /tmp/mcp-codeexec-local-<uid>; the workspace defaults to <local-dir>/workspace)")
    ap.add_argument("--image", default=d.image, help=f"sandbox image (default {d.image})")
    ap.add_argument("--memory", default="5g", help="memory per sandbox (default 5g)")
    ap.add_argument("--cpus", type=float, default=d.cpus, help=f"CPUs per sandbox (default {d.cpus:g})")
    ap.add_argument("--pids", type=int, default=d.pids_limit, help=f"process limit per sandbox (default {d.pids_limit})")
    ap.add_argument("--disk", default="5g", help="workspace disk quota per sandbox, enforced with ENOSPC (default 5g; 0: none). "
                    "Loop devices are attached as root, or else through the engine (helper containers); "
                    "without either the server warns and runs without a quota (see `mcp-codeexec doctor`)")
    ap.add_argument("--quota-dir", default=d.quota_dir, help="where quota-backed workspaces' filesystems live (default "
                    "/var/lib/mcp-codeexec/workspaces as root, else ~/.local/share/mcp-codeexec/workspaces)")
    ap.add_argument("--timeout", type=float, default=d.timeout, metavar="SECONDS", help=f"time limit per call (default {d.timeout:g})")
    ap.add_argument("--max-output", default=str(d.max_output_bytes), metavar="BYTES",
                    help=f"stdout/stderr cap per call and stream, head and tail kept (default {d.max_output_bytes})")
    ap.add_argument("--workdir", help=f"working directory inside the sandbox (default {d.workdir}; local backend: "
                    "a host directory, shared by its sandboxes)")
    ap.add_argument("--tmp-size", default="512m", help="size of /tmp and $HOME tmpfs in the sandbox (default 512m)")
    ap.add_argument("--profile", default=d.profile, choices=VERSIONS,
                    help="the API tool version to mimic: 20250825 (bash + editor, default), 20260120 (+ persistent "
                    "Python REPL tool code_execution), 20260521 (20260120 with a per-cell limit), 20250522 (legacy: "
                    "one Python tool, fresh interpreter per call)")
    ap.add_argument("--cell-timeout", type=float, default=d.cell_timeout, metavar="SECONDS",
                    help=f"20260521: wall-clock limit per Python cell (default {d.cell_timeout:g})")
    ap.add_argument("--tenant", default=d.tenant, help="owner name for this server's containers ([a-z0-9_-]; default 'default')")
    ap.add_argument("--container", metavar="ID", help="reuse this container (an id from a result's _meta) for the session")
    ap.add_argument("--container-handles", action="store_true",
                    help="every tool takes an optional `container` argument (an id from an earlier result, which names "
                         "it in a text block); over stateless HTTP (protocol 2026-07-28) a call without one gets a new "
                         "container, as in the Claude API. Changes the published input schemas (off by default)")
    ap.add_argument("--lifetime", default="30d", help="containers expire this long after creation (default 30d; e.g. 1h, 90s)")
    ap.add_argument("--idle-stop", default="15m", help="stop a container after this long without calls; files stay (default 15m)")
    ap.add_argument("--idle-checkpoint", default="5m",
                    help="checkpoint a container after this long without calls: its processes and memory are saved "
                    "and its next call restores them (gVisor; default 5m; 0: never; a shorter --idle-stop wins)")
    ap.add_argument("--max-running", type=int, default=d.max_running, help=f"running containers per server (default {d.max_running})")
    ap.add_argument("--pool", type=int, default=d.pool_size, help="started containers kept ready for new sessions (default 0)")
    ap.add_argument("--no-prepare", action="store_true", help="do not start the session's container before its first call")
    ap.add_argument("--no-zygote", action="store_true",
                    help="start every command by exec'ing bash, not from the sandbox's bash zygote (slower; the same results)")
    ap.add_argument("--upload", action="append", default=[], metavar="PATH[:ro]",
                    help="copy a host file or directory into every new container at <workdir>/uploads/ (repeatable; :ro makes the copy read-only)")
    ap.add_argument("--data-dir", default="", help="where files and usage are kept (default ~/.local/share/mcp-codeexec)")
    ap.add_argument("--max-file-size", default="64m", help="largest output file registered (default 64m)")
    ap.add_argument("--max-stored", default="1g",
                    help="bytes of files kept per tenant (outputs and uploads); past it outputs are not registered (default 1g)")
    ap.add_argument("--file-retention", default="", help="delete kept files after this long (default: keep until deleted)")
    ap.add_argument("--transport", choices=["stdio", "http"], default="stdio",
                    help="stdio (default), or http: Streamable HTTP at /mcp and SSE at /sse, plus the Files API")
    ap.add_argument("--host", default=d.host, help="http: address to bind (default 127.0.0.1)")
    ap.add_argument("--port", type=int, default=d.port, help="http: port (default 8000)")
    ap.add_argument("--tokens", default="", metavar="FILE", help="http: JSON file mapping hashed bearer tokens to tenants")
    ap.add_argument("--tools-config", default="", metavar="FILE",
                    help="upstream MCP servers whose tools code in the sandbox may call, as Python functions "
                    "(`from mcp_tools import <server>`) and with `mcp-tool` (JSON, or TOML if FILE ends in .toml; "
                    "see the README). Not in the legacy profile 20250522")
    ap.add_argument("--max-upload", default="500m", help="http: largest file accepted by POST /v1/files (default 500m)")
    ap.add_argument("--public-url", default="", help="http: the URL clients reach this server at (behind a proxy); "
                    "<public-url>/mcp is the OAuth resource URL (default http://<host>:<port>)")
    ap.add_argument("--oauth-issuer", default="", metavar="URL",
                    help="http: accept OAuth access tokens from this authorization server (its issuer URL; metadata "
                    "and keys found by RFC 8414 / OpenID discovery). Works alongside --tokens")
    ap.add_argument("--oauth-audience", action="append", default=[], metavar="AUD",
                    help="http: an accepted token audience (repeatable; default: the resource URL <public-url>/mcp)")
    ap.add_argument("--oauth-tenant-claim", default=d.oauth_tenant_claim, metavar="CLAIM",
                    help="http: the token claim that names the tenant (default sub; e.g. org, tenant, azp)")
    ap.add_argument("--oauth-introspection-client", default="", metavar="CLIENT_ID",
                    help="http: check opaque (non-JWT) tokens by RFC 7662 introspection, as this client of the issuer")
    ap.add_argument("--oauth-introspection-secret-file", default="", metavar="FILE",
                    help="http: file holding that client's secret")
    ap.add_argument("--oauth-introspection-url", default="", metavar="URL",
                    help="http: the introspection endpoint (default: the issuer metadata's introspection_endpoint)")
    ap.add_argument("--allowed-host", action="append", default=[], help="http: Host header to accept (repeatable)")
    ap.add_argument("--reap-interval", default="60s", help=argparse.SUPPRESS)
    ap.add_argument("--log-level", default="INFO", help="server log level, logs go to stderr (default INFO)")
    return ap


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise SystemExit(f"mcp-codeexec: --kube-node-selector {text!r}: expected KEY=VALUE")
    return key, value


def _toleration(text: str) -> dict[str, str]:
    """KEY[=VALUE]:EFFECT as a pod toleration (Equal with a value, else Exists)."""
    spec, sep, effect = text.rpartition(":")
    if not sep or effect not in ("NoSchedule", "PreferNoSchedule", "NoExecute") or not spec:
        raise SystemExit(f"mcp-codeexec: --kube-toleration {text!r}: expected KEY[=VALUE]:NoSchedule|PreferNoSchedule|NoExecute")
    key, eq, value = spec.partition("=")
    return {"key": key, "operator": "Equal", "value": value, "effect": effect} if eq else {"key": key, "operator": "Exists", "effect": effect}


def settings_from(args: argparse.Namespace) -> Settings:
    if args.runtime != "runsc" and not args.allow_weak_isolation:
        raise SystemExit(
            f"mcp-codeexec: refusing runtime {args.runtime!r}: sandboxes would share the host kernel. "
            "Pass --allow-weak-isolation to accept that, or use runsc (gVisor)."
        )
    if args.backend == "local" and not args.allow_weak_isolation:
        raise SystemExit(
            "mcp-codeexec: refusing --backend local: it runs commands as plain processes on this host, with no "
            "isolation at all. Pass --allow-weak-isolation to accept that (for tests only)."
        )
    workdir = args.workdir or Settings().workdir
    if args.backend == "local" and not args.workdir:
        from mcp_codeexec.deployment.local import default_dir

        workdir = os.path.join(args.local_dir or default_dir(), "workspace")
    if args.backend == "local":  # a host path, as the agent sees it (the editor resolves symlinks)
        workdir = os.path.realpath(workdir)
    return Settings(
        backend=args.backend,
        kube_namespace=args.kube_namespace,
        kube_runtime_class=args.kube_runtime_class,
        kube_storage_class=args.kube_storage_class,
        kube_pull_policy=args.kube_pull_policy,
        kube_node_selector=dict(_key_value(s) for s in args.kube_node_selector),
        kube_tolerations=tuple(_toleration(s) for s in args.kube_toleration),
        kubeconfig=args.kubeconfig,
        kube_context=args.kube_context,
        local_dir=os.path.abspath(args.local_dir) if args.local_dir else "",
        runtime=args.runtime,
        image=args.image,
        memory_bytes=parse_size(args.memory),
        cpus=args.cpus,
        pids_limit=args.pids,
        disk_bytes=parse_size(args.disk),
        quota_dir=args.quota_dir,
        timeout=args.timeout,
        max_output_bytes=parse_size(args.max_output),
        workdir=workdir,
        tmp_bytes=parse_size(args.tmp_size),
        profile=args.profile,
        cell_timeout=args.cell_timeout,
        tenant=args.tenant,
        container=args.container,
        container_handles=args.container_handles,
        lifetime=parse_duration(args.lifetime),
        idle_stop=parse_duration(args.idle_stop),
        idle_checkpoint=parse_duration(args.idle_checkpoint),
        max_running=args.max_running,
        pool_size=args.pool,
        prepare_session=not args.no_prepare and args.transport == "stdio",
        zygote=not args.no_zygote,
        reap_interval=parse_duration(args.reap_interval),
        uploads=tuple(args.upload),
        transport=args.transport,
        host=args.host,
        port=args.port,
        tokens_file=args.tokens,
        tools_config=args.tools_config,
        max_upload_bytes=parse_size(args.max_upload),
        public_url=args.public_url,
        oauth_issuer=args.oauth_issuer,
        oauth_audiences=tuple(args.oauth_audience),
        oauth_tenant_claim=args.oauth_tenant_claim,
        oauth_introspection_client=args.oauth_introspection_client,
        oauth_introspection_secret_file=args.oauth_introspection_secret_file,
        oauth_introspection_url=args.oauth_introspection_url,
        allowed_hosts=tuple(args.allowed_host),
        data_dir=args.data_dir,
        max_file_bytes=parse_size(args.max_file_size),
        max_stored_bytes=parse_size(args.max_stored),
        file_retention=parse_duration(args.file_retention) if args.file_retention else None,
    )


async def serve_stdio(settings: Settings) -> None:
    from mcp_codeexec.app import App
    from mcp_codeexec.server import build_server

    server = build_server(App(settings))
    async with anyio.create_task_group() as tg:

        async def on_signal() -> None:
            # Claude Desktop and others stop servers with SIGTERM: shut down cleanly so
            # sandboxes are removed rather than left behind.
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    tg.cancel_scope.cancel()
                    return

        tg.start_soon(on_signal)
        async with AsyncExitStack() as stack:
            if stdio.usable():  # pipes: read and written from the loop, no thread hand-offs
                stdin, stdout = await stack.enter_async_context(stdio.streams())
                read, write = await stack.enter_async_context(stdio_server(stdin, stdout))  # type: ignore[arg-type]
            else:
                read, write = await stack.enter_async_context(stdio_server())
            await server.run(read, write, server.create_initialization_options())
        tg.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["doctor"]:
        from mcp_codeexec.doctor import main as doctor

        raise SystemExit(doctor(argv[1:]))
    args = parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = settings_from(args)
        upload_plan(settings.uploads, settings.workdir)  # a missing path: refused here, not mid-start
    except ValueError as exc:  # a size, a duration or a path that is not one (pydantic's errors too)
        raise SystemExit(f"mcp-codeexec: {exc}") from None
    if settings.tokens_file or settings.tools_config:
        from mcp_codeexec.errors import ConfigError
        from mcp_codeexec.tenants import load_tenants
        from mcp_codeexec.upstream import check_tools_config

        try:
            policies = load_tenants(Path(settings.tokens_file)) if settings.tokens_file else None
            if settings.tools_config:
                check_tools_config(Path(settings.tools_config), policies)
        except ConfigError as exc:
            raise SystemExit(f"mcp-codeexec: {exc}") from None
    log.info("mcp-codeexec %s: runtime %s, image %s", __version__, settings.runtime, settings.image)
    if settings.transport == "http":
        from mcp_codeexec.oauth import config_from
        from mcp_codeexec.remote import serve_http

        try:
            oauth = config_from(settings)
        except ValueError as exc:
            raise SystemExit(f"mcp-codeexec: {exc}") from None
        if oauth is not None:
            log.info("OAuth: tokens from %s for resource %s, tenant claim %r", oauth.issuer, oauth.resource,
                     oauth.tenant_claim)
        elif not settings.tokens_file:
            log.warning("no --tokens file: every HTTP caller is tenant %r, unauthenticated", settings.tenant)
        anyio.run(serve_http, settings)
    else:
        anyio.run(serve_stdio, settings)
