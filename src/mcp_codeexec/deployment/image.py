"""The sandbox image's manifest: what it has installed, at which versions.

sandbox/build.sh writes it into the image (/etc/mcp-codeexec/manifest.json, see
sandbox/manifest.py) and copies it into the image's `org.mcp-codeexec.manifest` label, so
reading it costs one image inspection. For an image built some other way (no label) the
file is read from a created, never started, container (no gVisor sandbox is booted), once
per image id and process.
"""

from __future__ import annotations

import io
import json
import secrets
import tarfile
import threading
from typing import Any

import docker
import docker.errors

from mcp_codeexec.constants import INPUTS_LABEL, MANIFEST_LABEL

MANIFEST_PATH = "/etc/mcp-codeexec/manifest.json"
__all__ = ["INPUTS_LABEL", "MANIFEST_LABEL", "MANIFEST_PATH"]

_cache: dict[str, dict[str, Any]] = {}
_lock = threading.Lock()


class ManifestUnavailable(Exception):
    """The image has no readable manifest (the message says why)."""


def _from_file(api: docker.APIClient, image: str) -> dict[str, Any]:
    name = f"mcp-codeexec-manifest-{secrets.token_hex(4)}"
    # runc, no network, never started: only the image's files are read.
    api.create_container(image, command=["true"], name=name, network_disabled=True,
                         host_config=api.create_host_config(network_mode="none", runtime="runc"))
    try:
        try:
            stream, _ = api.get_archive(name, MANIFEST_PATH)
        except docker.errors.NotFound:
            raise ManifestUnavailable(f"{image} has no {MANIFEST_PATH}") from None
        with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
            member = tar.extractfile(tar.getmembers()[0])
            assert member is not None
            return json.loads(member.read())
    finally:
        api.remove_container(name, force=True)


def read_manifest(api: docker.APIClient, image: str) -> dict[str, Any]:
    """The image's manifest (label, else file). Raises ManifestUnavailable, or the SDK's
    errors when the engine or the image is missing."""
    info = api.inspect_image(image)
    image_id = info["Id"]
    with _lock:
        if image_id in _cache:
            return _cache[image_id]
    label = ((info.get("Config") or {}).get("Labels") or {}).get(MANIFEST_LABEL)
    if label:
        try:
            manifest = json.loads(label)
        except ValueError as exc:
            raise ManifestUnavailable(f"{image}'s {MANIFEST_LABEL} label is not JSON: {exc}") from None
    else:
        manifest = _from_file(api, image)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("libraries"), dict):
        raise ManifestUnavailable(f"{image}'s manifest lacks its libraries (an image older than the manifest format?)")
    with _lock:
        _cache[image_id] = manifest
    return manifest
