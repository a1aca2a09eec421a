"""Settings in force for one server process (from the command line)."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field

from mcp_codeexec.profiles import PROFILES, Profile

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str | int) -> int:
    """'5g', '512m', '1048576' -> bytes (binary units, as Docker reads them)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([bkmgt]?)i?b?\s*", text.lower())
    if not match:
        raise ValueError(f"not a size: {text!r} (try 512m, 5g)")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def parse_duration(text: str | float) -> float:
    """'30d', '1h', '90s', '15m', '2.5' (seconds) -> seconds."""
    if isinstance(text, (int, float)):
        return float(text)
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text.lower())
    if not match:
        raise ValueError(f"not a duration: {text!r} (try 30d, 1h, 90s)")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]


def format_size(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size and n % (size // 16 or 1) == 0:
            value = n / size
            return f"{value:g} {unit}"
    return f"{n} bytes"


class Settings(BaseModel):
    model_config = ConfigDict(frozen=True)

    backend: str = "docker"  # docker (gVisor sandboxes) | kubernetes (pods, gVisor RuntimeClass) | local (no isolation: tests only)
    # --backend kubernetes (deployment/kubernetes.py)
    kube_namespace: str = "default"
    kube_runtime_class: str = "gvisor"
    kube_storage_class: str = ""  # "" = the cluster's default
    kube_pull_policy: str = "IfNotPresent"
    kube_node_selector: dict[str, str] = Field(default_factory=dict)
    kube_tolerations: tuple[dict[str, str], ...] = ()
    kubeconfig: str = ""  # "" = in-cluster service account when in a pod, else $KUBECONFIG or ~/.kube/config
    kube_context: str = ""
    local_dir: str = ""  # local backend: where its sandboxes live ("" = deployment/local.py's default)
    runtime: str = "runsc"
    image: str = "mcp-codeexec-sandbox:latest"
    memory_bytes: int = 5 << 30
    cpus: float = 1.0
    # Host tasks per sandbox: under gVisor's ptrace platform each sandboxed process costs up
    # to ~16, so 2048 leaves room for ~120 processes (deployment/quota.py nproc_limit).
    pids_limit: int = 2048
    timeout: float = Field(default=120.0, gt=0)
    max_output_bytes: int = Field(default=50_000, ge=1024)  # per stream, head + tail kept
    workdir: str = "/workspace"
    tmp_bytes: int = 512 << 20
    lifetime: float = 30 * 86400.0  # seconds: a container expires this long after creation
    profile: str = "20250825"  # the API tool version to mimic (profiles.VERSIONS)
    cell_timeout: float = 90.0  # 20260521: wall-clock limit per Python cell
    tenant: str = "default"  # stdio's one tenant; HTTP maps tokens to tenants
    container: str | None = None  # stdio: reuse this container id for the session
    container_handles: bool = False  # tools take a `container` argument; stateless calls get fresh containers
    pool_size: int = 0  # started containers kept ready for new sessions
    prepare_session: bool = True  # stdio: start the session's container at launch
    zygote: bool = True  # plain commands start from the sandbox's bash zygote (agent/process.py), not by exec
    max_running: int = Field(default=32, ge=1)  # running containers per server; idle ones are stopped past it
    idle_stop: float = 900.0  # seconds without a call before a container is stopped (files kept)
    # Seconds without a call before a container is checkpointed (memory saved, then stopped;
    # restored by the next call) where the backend can; 0: never (idle_stop applies).
    idle_checkpoint: float = 300.0
    reap_interval: float = 60.0
    disk_bytes: int = Field(default=5 << 30, ge=0)  # workspace disk quota per sandbox; 0: none
    # Where quota-backed workspaces' filesystems live ("" = /var/lib/mcp-codeexec/workspaces
    # for root, else <XDG data directory>/mcp-codeexec/workspaces: deployment/quota.py).
    quota_dir: str = ""
    data_dir: str = ""  # where files are kept on the host ("" = the XDG data directory)
    max_file_bytes: int = 64 << 20  # an output file larger than this is not registered
    max_stored_bytes: int = 1 << 30  # files a tenant may keep (outputs + uploads), unless its policy says
    max_output_files: int = 50  # output files registered per call
    inline_image_bytes: int = 5 << 20  # images up to this size also come back inline
    file_retention: float | None = None  # seconds; None keeps files until deleted
    uploads: tuple[str, ...] = ()
    tokens_file: str = ""  # remote: bearer tokens (hashed) -> tenants, limits (tenants.py)
    tools_config: str = ""  # upstream MCP servers whose tools code in the sandbox may call (upstream.py)
    transport: str = "stdio"  # stdio | http (Streamable HTTP and SSE)
    host: str = "127.0.0.1"
    port: int = 8000
    public_url: str = ""  # remote: the URL clients use (behind a proxy); its /mcp is the OAuth resource URL
    # Remote, OAuth 2.1 resource server (oauth.py): the authorization server that issues tokens,
    # the `aud` values accepted (default: the resource URL), the claim that names the tenant,
    # and client credentials for RFC 7662 introspection of opaque tokens ("" = JWTs only).
    oauth_issuer: str = ""
    oauth_audiences: tuple[str, ...] = ()
    oauth_tenant_claim: str = "sub"
    oauth_introspection_client: str = ""
    oauth_introspection_secret_file: str = ""
    oauth_introspection_url: str = ""
    allowed_hosts: tuple[str, ...] = ()  # remote: Host headers accepted besides loopback
    max_upload_bytes: int = 500 << 20  # stdio: host paths copied into every new container
    # Past timeout + this, the server stops waiting for the agent and restarts the sandbox.
    backstop_grace: float = 10.0

    @property
    def tool_profile(self) -> Profile:
        return PROFILES[self.profile]

    @property
    def tools_enabled(self) -> bool:
        """Code in the sandbox may call upstream tools: configured, and not the legacy profile."""
        return bool(self.tools_config) and not self.tool_profile.legacy

    @property
    def rlimit_as(self) -> int:
        """Address-space cap per process: the sandbox's memory, so one process alone cannot
        trigger the host's kill of the whole sandbox."""
        return self.memory_bytes
