"""The protocol spoken between the server and the agent inside a sandbox.

Shared by both ends. The agent runs on the sandbox image's own Python with nothing
installed, so this module uses the standard library only: requests and replies are
dataclasses, carried as length-prefixed JSON frames.

Frame: 4-byte big-endian length, then that many bytes of UTF-8 JSON. Lengths make the
stream robust to short reads and writes (gVisor cuts pipe writes at 64 KiB).
"""

from __future__ import annotations

import dataclasses
import json
import struct
from dataclasses import dataclass, field
from typing import Any, ClassVar

PROTOCOL_VERSION = 1
MAX_FRAME = 64 * 1024 * 1024
_HEADER = struct.Struct(">I")


class ProtocolError(Exception):
    """The byte stream does not hold well-formed frames."""


# --- requests (server -> agent) ---------------------------------------------------------


@dataclass
class Request:
    op: ClassVar[str] = ""


@dataclass
class Ping(Request):
    op: ClassVar[str] = "ping"


@dataclass
class Exec(Request):
    """Run `bash -c command`; stdout and stderr kept apart, each capped head+tail."""

    op: ClassVar[str] = "exec"
    command: str
    cwd: str
    timeout: float
    max_output: int
    env: dict[str, str] = field(default_factory=dict)
    # Send Output events while the command runs (progress for long calls).
    stream: bool = False


@dataclass
class Edit(Request):
    """One text-editor command; fields mirror the tool's input."""

    op: ClassVar[str] = "edit"
    command: str
    path: str
    file_text: str | None = None
    old_str: str | None = None
    new_str: str | None = None
    view_range: list[int] | None = None


@dataclass
class ReadFile(Request):
    """Read part of a file (base64 in the reply): files leave the sandbox in chunks."""

    op: ClassVar[str] = "read_file"
    path: str
    offset: int = 0
    length: int = 4 << 20


@dataclass
class WriteFile(Request):
    """Write part of a file: truncate at offset 0, append after. `mode` is applied when
    `final` (e.g. 0o444 for a read-only copy)."""

    op: ClassVar[str] = "write_file"
    path: str
    data: str  # base64
    offset: int = 0
    final: bool = True
    mode: int | None = None


@dataclass
class Cancel(Request):
    """Kill the command started by request `target` (client cancellation). No reply of its
    own: the cancelled request answers, with `cancelled` set."""

    op: ClassVar[str] = "cancel"
    target: int


@dataclass
class Repl(Request):
    """Run `code` as the next cell of the container's persistent Python interpreter (started
    on first use). Replies ExecResult; see repl.py for the semantics."""

    op: ClassVar[str] = "repl"
    code: str
    timeout: float  # per cell, from when the cell starts (not while it queues behind another)
    max_output: int
    # Past the limit, answer a normal result (return code 124, `detection_timeout` on stderr,
    # timed_out false) instead of timed_out (20260521). Either way the interpreter restarts.
    timeout_is_result: bool = False
    stream: bool = False
    cwd: str = ""  # where a fresh interpreter starts ("" = the agent's cwd)
    env: dict[str, str] = field(default_factory=dict)  # added when a fresh interpreter starts


@dataclass
class ReplReset(Request):
    """Kill the interpreter (a running cell ends as a crash); the next cell starts fresh.
    Replies ExecResult, state_reset telling whether one was running."""

    op: ClassVar[str] = "repl_reset"


REQUESTS: dict[str, type[Request]] = {
    cls.op: cls for cls in (Ping, Exec, Edit, ReadFile, WriteFile, Cancel, Repl, ReplReset)
}


# --- replies (agent -> server) ------------------------------------------------------------


@dataclass
class PingResult:
    protocol: int
    python: str
    pid: int
    uid: int


@dataclass
class ExecResult:
    stdout: str
    stderr: str
    return_code: int
    timed_out: bool
    cancelled: bool
    stdout_bytes: int  # total produced, before capping
    stderr_bytes: int
    duration: float
    # Repl only: the interpreter's state was lost with this cell (crash, limit, cancel) or
    # before it (it died between cells); stderr says which.
    state_reset: bool = False
    # Regular files written or moved into the workspace while the command ran, as
    # [path, size] pairs (see agent/watch.py for what counts).
    files: list[list[Any]] = field(default_factory=list)


@dataclass
class FileChunk:
    data: str  # base64
    size: int  # the whole file's size


@dataclass
class Written:
    size: int


@dataclass
class EditResult:
    result: dict[str, Any]  # exactly the API's result object


@dataclass
class Failure:
    """A typed failure: `code` is one of the API's error codes, or `internal`."""

    code: str
    message: str


@dataclass
class Output:
    """An event: a chunk of a running command's output."""

    stream: str  # "stdout" | "stderr"
    data: str


# --- encoding ---------------------------------------------------------------------------


def encode(message: dict[str, Any]) -> bytes:
    body = json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"frame of {len(body)} bytes exceeds {MAX_FRAME}")
    return _HEADER.pack(len(body)) + body


def request_frame(request_id: int, request: Request) -> bytes:
    return encode({"id": request_id, "op": request.op, "args": dataclasses.asdict(request)})


def reply_frame(request_id: int, reply: Any) -> bytes:
    kind = "event" if isinstance(reply, Output) else "failure" if isinstance(reply, Failure) else "result"
    return encode({"id": request_id, "kind": kind, "body": dataclasses.asdict(reply)})


def parse_request(message: dict[str, Any]) -> tuple[int, Request]:
    cls = REQUESTS.get(message.get("op", ""))
    if cls is None:
        raise ProtocolError(f"unknown op {message.get('op')!r}")
    return int(message["id"]), cls(**message.get("args", {}))


class FrameDecoder:
    """Incremental decoder: feed bytes as they arrive, take whole messages out."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buffer += data
        messages = []
        while len(self._buffer) >= _HEADER.size:
            (length,) = _HEADER.unpack_from(self._buffer)
            if length > MAX_FRAME:
                raise ProtocolError(f"frame length {length} exceeds {MAX_FRAME}")
            end = _HEADER.size + length
            if len(self._buffer) < end:
                break
            body = bytes(self._buffer[_HEADER.size : end])
            del self._buffer[:end]
            try:
                messages.append(json.loads(body))
            except ValueError as exc:
                raise ProtocolError(f"bad frame body: {exc}") from exc
        return messages
