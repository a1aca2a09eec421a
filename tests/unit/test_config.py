"""config.py: sizes, durations, and the Settings record."""

from __future__ import annotations

import pydantic
import pytest

from mcp_codeexec.config import Settings, format_size, parse_duration, parse_size
from mcp_codeexec.profiles import PROFILES


@pytest.mark.parametrize(
    ("text", "size"),
    [("512m", 512 << 20), ("5g", 5 << 30), ("1048576", 1 << 20), (" 2 KiB ", 2048), ("1.5k", 1536), ("3tb", 3 << 40),
     ("7B", 7), (4096, 4096)],
)
def test_parse_size(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "m", "-5m", "5x", "five", "5 m b c"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


@pytest.mark.parametrize(("text", "seconds"), [("30d", 30 * 86400.0), ("1h", 3600.0), ("90s", 90.0), ("15m", 900.0),
                                               ("2.5", 2.5), (7, 7.0), (0.5, 0.5)])
def test_parse_duration(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "1w", "h", "-1s", "1 h 2"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


@pytest.mark.parametrize(("n", "text"), [(5 << 30, "5 GiB"), (512 << 20, "512 MiB"), (1536, "1.5 KiB"), (1000, "1000 bytes"),
                                         (0, "0 bytes"), ((1 << 30) + 1, "1073741825 bytes")])
def test_format_size(n: int, text: str) -> None:
    assert format_size(n) == text


def test_settings_are_frozen_and_checked() -> None:
    s = Settings()
    with pytest.raises(pydantic.ValidationError):
        s.timeout = 5  # type: ignore[misc]
    for bad in ({"timeout": 0}, {"max_output_bytes": 1023}, {"max_running": 0}, {"disk_bytes": -1}):
        with pytest.raises(pydantic.ValidationError):
            Settings(**bad)


def test_settings_derive_profile_and_rlimit() -> None:
    s = Settings(profile="20260521", memory_bytes=1 << 30)
    assert s.tool_profile is PROFILES["20260521"]
    assert s.rlimit_as == 1 << 30
    assert Settings().tool_profile.version == "20250825"  # the default profile
