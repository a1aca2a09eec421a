"""prompt.py: the system prompt says what differs per profile and states the live facts."""

from __future__ import annotations

import pytest

from mcp_codeexec.config import Settings
from mcp_codeexec.prompt import ImageFacts, _upstream, system_prompt


@pytest.mark.parametrize(
    ("debian", "upstream"),
    [("1:0.1.3-1", "0.1.3"), ("16.02+really26.02+dfsg-0+deb12u1", "26.02"), ("3.40.1-2+deb12u1", "3.40.1"),
     ("14.0.0-1~bpo12+1", "14.0.0"), ("1.2", "1.2")],
)
def test_upstream_version(debian: str, upstream: str) -> None:
    assert _upstream(debian) == upstream


def test_facts_from_a_manifest() -> None:
    facts = ImageFacts.from_manifest({
        "python": "3.11.2",
        "libraries": {"pandas": {"version": "1.5.3"}, "numpy": {"version": 1.24}},
        "tools": {"rg": {"version": "13.0.0-4+b2"}},
    })
    assert facts == ImageFacts(python="3.11.2", packages={"pandas": "1.5.3", "numpy": "1.24"}, tools={"rg": "13.0.0"})
    assert ImageFacts.from_manifest({}) == ImageFacts()


def test_default_prompt_states_the_settings() -> None:
    s = Settings(workdir="/work", timeout=42, max_output_bytes=1234, memory_bytes=1 << 30, cpus=1.5, disk_bytes=0)
    facts = ImageFacts(packages={"pandas": "2.0", "numpy": "1.0"}, tools={"rg": "13"})
    text = system_prompt(s, "gVisor (test)", facts)
    assert "`bash_code_execution` (runs a bash command)" in text and "version 20250825" in text
    assert "`code_execution`" not in text  # this profile has no Python tool
    for fact in ("`/work`", "at most 42 seconds", "capped at 1234 bytes", "Memory: 1 GiB", "CPUs: 1.5",
                 "workspace disk: no quota", "under gVisor (test)", "Installed: numpy 1.0, pandas 2.0.", "- Tools: rg 13.",
                 "`/work/uploads/`"):
        assert fact in text, fact


def test_no_facts_say_where_to_look() -> None:
    text = system_prompt(Settings(), "x", ImageFacts())
    assert "Installed: see the image manifest." in text and "- Tools:" not in text and "workspace disk: 5 GiB" in text


def test_profiles_describe_their_python() -> None:
    repl = system_prompt(Settings(profile="20260120", timeout=9), "x", ImageFacts())
    assert "one long-lived Python interpreter" in repl and "Each cell may run for at most 9 seconds." in repl
    limited = system_prompt(Settings(profile="20260521", cell_timeout=33), "x", ImageFacts())
    assert "at most 33 seconds of wall-clock time" in limited and "detection_timeout" in limited
    legacy = system_prompt(Settings(profile="20250522"), "x", ImageFacts())
    assert "You have one tool" in legacy and "version 20250522" in legacy and "fresh Python interpreter" in legacy
