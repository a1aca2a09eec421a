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
class Cancel(Request):
    """Kill the command started by request `target` (client cancellation). No reply of its
    own: the cancelled request answers, with `cancelled` set."""

    op: ClassVar[str] = "cancel"
    target: int


REQUESTS: dict[str, type[Request]] = {cls.op: cls for cls in (Ping, Exec, Edit, Cancel)}


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
