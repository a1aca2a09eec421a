"""errors.py: one tree, each class with the API error code a tool result reports."""

from __future__ import annotations

import pytest

from mcp_codeexec import errors as e
from mcp_codeexec.containers import TooManyContainers


@pytest.mark.parametrize(
    ("cls", "code"),
    [
        (e.CodeExecError, "unavailable"), (e.Unavailable, "unavailable"), (e.ContainerExpired, "container_expired"),
        (e.InvalidToolInput, "invalid_tool_input"), (e.TooManyRequests, "too_many_requests"),
        (e.ExecutionTimeExceeded, "execution_time_exceeded"), (e.FileNotFound, "file_not_found"),
        (e.OutputFileTooLarge, "output_file_too_large"), (e.SandboxDied, "unavailable"),
        (e.BackendUnavailable, "unavailable"), (e.SandboxGone, "container_expired"), (e.QuotaError, "unavailable"),
        (TooManyContainers, "too_many_requests"),
    ],
)
def test_codes(cls: type[e.CodeExecError], code: str) -> None:
    exc = cls("why")
    assert isinstance(exc, e.CodeExecError)
    assert (exc.code, exc.message, str(exc)) == (code, "why", "why")


def test_the_backend_errors_sit_under_the_api_codes() -> None:
    # A caller catching ContainerExpired also sees a sandbox the backend lost.
    assert issubclass(e.SandboxGone, e.ContainerExpired)
    assert issubclass(e.BackendUnavailable, e.Unavailable)
    assert e.SandboxDied("the kernel stopped").reason == "the kernel stopped"
    assert e.CodeExecError().message == ""
