"""profiles.py: one record per API tool version."""

from __future__ import annotations

import dataclasses

import pytest

from mcp_codeexec.profiles import PROFILES, VERSIONS
from mcp_codeexec.wire import BASH_TOOL, CODE_TOOL, EDITOR_TOOL


def test_versions_default_first() -> None:
    assert VERSIONS == ("20250825", "20260120", "20260521", "20250522")
    assert all(PROFILES[v].version == v for v in VERSIONS)


@pytest.mark.parametrize(
    ("version", "tools", "repl", "cell_limit", "legacy"),
    [
        ("20250825", (BASH_TOOL, EDITOR_TOOL), False, False, False),
        ("20260120", (BASH_TOOL, EDITOR_TOOL, CODE_TOOL), True, False, False),
        ("20260521", (BASH_TOOL, EDITOR_TOOL, CODE_TOOL), True, True, False),
        ("20250522", (CODE_TOOL,), False, False, True),
    ],
)
def test_each_profile(version: str, tools: tuple[str, ...], repl: bool, cell_limit: bool, legacy: bool) -> None:
    profile = PROFILES[version]
    assert (profile.tools, profile.repl, profile.cell_limit, profile.legacy) == (tools, repl, cell_limit, legacy)


def test_kind_says_what_a_tool_does_or_none() -> None:
    assert [PROFILES["20260120"].kind(t) for t in (BASH_TOOL, EDITOR_TOOL, CODE_TOOL)] == ["bash", "editor", "python"]
    assert PROFILES["20250825"].kind(CODE_TOOL) is None
    assert PROFILES["20250522"].kind(BASH_TOOL) is None
    assert PROFILES["20250522"].kind("no_such_tool") is None


def test_profiles_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        PROFILES["20250825"].repl = True  # type: ignore[misc]
