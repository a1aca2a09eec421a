"""Every error this server raises on purpose, in one tree.

Each class carries the Claude API error code a tool result reports for it (`code`), so any
layer can raise and the tool layer turns the exception into the API's error object without
a table of its own. Only an unknown tool name stays a protocol (JSON-RPC) error.
"""

from __future__ import annotations


class CodeExecError(Exception):
    """Root of the tree. `code` is the API's error_code for a tool result."""

    code = "unavailable"

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message


# --- the API's error codes ------------------------------------------------------------


class Unavailable(CodeExecError):
    """The sandbox backend cannot serve right now (engine down, runtime or image missing)."""

    code = "unavailable"


class ContainerExpired(CodeExecError):
    """The container named for reuse has expired, is gone, or was never this tenant's."""

    code = "container_expired"


class InvalidToolInput(CodeExecError):
    """Arguments (or the request's _meta) do not match what the tool takes."""

    code = "invalid_tool_input"


class TooManyRequests(CodeExecError):
    """A rate, concurrency or running-container limit is reached."""

    code = "too_many_requests"


class ExecutionTimeExceeded(CodeExecError):
    """The sandbox did not answer within the time limit plus the backstop grace."""

    code = "execution_time_exceeded"


class FileNotFound(CodeExecError):
    """A file named by id or path does not exist (for this tenant)."""

    code = "file_not_found"


class OutputFileTooLarge(CodeExecError):
    """A file is over the size the server copies out of a sandbox."""

    code = "output_file_too_large"


# --- the sandbox ----------------------------------------------------------------------


class SandboxDied(CodeExecError):
    """The sandbox (or the connection to its agent) died during a call; it is restarted
    with its files intact. Not an API code of its own: a command reports it on stderr."""

    code = "unavailable"

    @property
    def reason(self) -> str:
        return self.message


# --- the backend (deployment/) ----------------------------------------------------------


class BackendUnavailable(Unavailable):
    """The engine cannot serve right now (down, runtime missing, image missing)."""


class SandboxGone(ContainerExpired):
    """The named sandbox does not exist (any more)."""


class NameTaken(CodeExecError):
    """A sandbox of that name exists already (a rename lost a race)."""


class CheckpointFailed(Unavailable):
    """The backend could not save a sandbox's memory (or cannot at all): the caller stops
    the sandbox instead, and says the memory was lost."""


class QuotaError(Unavailable):
    """A disk-quota operation failed (the message says which and why)."""


# --- start-up ---------------------------------------------------------------------------


class ConfigError(CodeExecError):
    """A file or flag given at start is unusable; the server does not start."""
