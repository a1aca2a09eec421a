"""deployment/image.py: reading the sandbox image's manifest from its label (the engine's answer to an
image inspection is given as a dict: no engine, no container)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from mcp_codeexec.deployment import image
from mcp_codeexec.deployment.image import MANIFEST_LABEL, ManifestUnavailable, read_manifest


class Inspection:
    """What `inspect_image` answers, and nothing else (no container is ever made)."""

    def __init__(self, labels: dict[str, str], image_id: str) -> None:
        self.answer = {"Id": image_id, "Config": {"Labels": labels}}
        self.calls = 0

    def inspect_image(self, name: str) -> dict[str, Any]:
        self.calls += 1
        return self.answer


def test_manifest_from_the_label_is_cached_by_image_id(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(image, "_cache", {})
    manifest = {"python": "3.11.2", "libraries": {"pandas": {"version": "1.5.3"}}, "tools": {}}
    api = Inspection({MANIFEST_LABEL: json.dumps(manifest)}, "sha256:one")
    assert read_manifest(api, "img") == manifest  # type: ignore[arg-type]
    api.answer["Config"]["Labels"] = {MANIFEST_LABEL: "changed, but the image id is the same"}
    assert read_manifest(api, "img") == manifest  # type: ignore[arg-type]
    assert api.calls == 2  # the id is looked up each time; the manifest is not parsed again


@pytest.mark.parametrize(
    ("label", "says"),
    [("{not json", "is not JSON"), (json.dumps({"python": "3.11"}), "lacks its libraries"), (json.dumps([1]), "lacks its libraries")],
)
def test_bad_manifests_are_refused(monkeypatch: pytest.MonkeyPatch, label: str, says: str) -> None:
    monkeypatch.setattr(image, "_cache", {})
    with pytest.raises(ManifestUnavailable, match=says):
        read_manifest(Inspection({MANIFEST_LABEL: label}, "sha256:two"), "img")  # type: ignore[arg-type]
