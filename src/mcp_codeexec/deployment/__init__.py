"""Where sandboxes run: `base` is the interface, `docker` the Docker Engine backend (gVisor),
`kubernetes` pods on a cluster (gVisor RuntimeClass), `local` plain local processes with no isolation (for fast tests). `make_backend` picks one."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mcp_codeexec.config import Settings
    from mcp_codeexec.deployment.base import Deployment


def make_backend(settings: Settings) -> Deployment:
    """The backend `settings.backend` names. Each is imported only when chosen, so the local
    one runs without the `docker` package being imported at all."""
    if settings.backend == "local":
        from mcp_codeexec.deployment.local import LocalDeployment

        return LocalDeployment(settings.local_dir)
    if settings.backend == "docker":
        from mcp_codeexec.deployment import quota as q
        from mcp_codeexec.deployment.docker import DockerDeployment

        wanted = q.Wanted(settings.disk_bytes, settings.quota_dir or q.default_dir(), settings.image)
        return DockerDeployment(settings.runtime, wanted=wanted)
    if settings.backend == "kubernetes":
        from mcp_codeexec.deployment.kubernetes import KubernetesDeployment, KubernetesOptions

        return KubernetesDeployment(KubernetesOptions(
            namespace=settings.kube_namespace, runtime_class=settings.kube_runtime_class,
            storage_class=settings.kube_storage_class, pull_policy=settings.kube_pull_policy,
            node_selector=settings.kube_node_selector, tolerations=settings.kube_tolerations,
            kubeconfig=settings.kubeconfig, context=settings.kube_context, disk_bytes=settings.disk_bytes))
    raise ValueError(f"unknown backend {settings.backend!r}")
