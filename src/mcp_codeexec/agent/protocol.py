"""The protocol spoken between the server and the agent inside a sandbox.

Shared by both ends. The agent runs on the sandbox image's own Python with nothing
installed, so this module uses the standard library only: requests and replies are
dataclasses, carried as length-prefixed JSON frames.

Frame: 4-byte big-endian length, then that many bytes of UTF-8 JSON. Lengths make the
stream robust to short reads and writes (gVisor cuts pipe writes at 64 KiB).

A connection opens with a frame from the sandbox's side: `{"kind": "hello", "body": {"agent":
null | "<hash of the agent's code>", "protocol": N}}` (null: only the loader runs and waits
for the code). Requests are `{"id", "op", "args"}`; replies `{"id", "kind": "result" |
"failure" | "event", "body"}`.

The server trusts nothing the sandbox sends: `decode_reply` checks every field's type
exactly (an int is not a bool, a list holds what it should), and the server's decoder
bounds frames at MAX_REPLY_FRAME.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from dataclasses import dataclass, field
from typing import Any, ClassVar

PROTOCOL_VERSION = 2
MAX_FRAME = 64 * 1024 * 1024  # what the agent accepts (uploads come in 4 MiB chunks)
READ_CHUNK = 2 << 20
MAX_REPORTED_FILES = 1000  # output files listed per call (the server registers fewer)  # a ReadFile reply carries at most this many bytes (base64: 4/3 more)
# The largest reply the server accepts: a ReadFile chunk in base64, or two capped output
# streams whose every byte JSON escapes to 6 (\u00XX) plus the file list.
MAX_REPLY_FRAME = 16 * 1024 * 1024
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
    # Open a tool channel for this command (toolchannel.py): its code may call upstream tools.
    tools: bool = False


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
    length: int = READ_CHUNK


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
    tools: bool = False  # as Exec.tools: the cell's code may call upstream tools


@dataclass
class ReplReset(Request):
    """Kill the interpreter (a running cell ends as a crash); the next cell starts fresh.
    Replies ExecResult, state_reset telling whether one was running."""

    op: ClassVar[str] = "repl_reset"


@dataclass
class Reload(Request):
    """The agent's code differs from the server's: kill the user's processes, then replace
    the agent by the loader (same process, same listening socket), which waits for code on
    the next connection. No reply: the connection closes."""

    op: ClassVar[str] = "reload"


@dataclass
class ToolReply(Request):
    """The server's answer to the agent's ToolRequest `call`. No reply of its own. `ok`: the
    tool ran and `result` is its value; else `code` and `message` say why not (code
    "tool_error": the upstream tool itself reported an error)."""

    op: ClassVar[str] = "tool_reply"
    call: int
    ok: bool
    result: Any = None
    code: str = ""
    message: str = ""


REQUESTS: dict[str, type[Request]] = {
    cls.op: cls for cls in (Ping, Exec, Edit, ReadFile, WriteFile, Cancel, Repl, ReplReset, Reload, ToolReply)
}


# --- replies (agent -> server) ------------------------------------------------------------


@dataclass
class Hello:
    """The first frame on a connection, from the sandbox's side."""

    agent: str | None  # sha256 of the agent's code; None while only the loader runs
    protocol: int


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
    # Set when `files` may be incomplete (the watcher lost events): says what was done.
    files_note: str = ""
    files_total: int = 0  # files written in all; `files` lists at most MAX_REPORTED_FILES


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


@dataclass
class ToolRequest:
    """From the agent: code run by the command named in the frame's id asks for `op` "list"
    (the tools it may call) or "call" (`tool` of upstream `server` with `arguments`). `call`
    is the agent's id for it, echoed in the ToolReply."""

    call: int
    op: str
    server: str = ""
    tool: str = ""
    arguments: dict[str, Any] = field(default_factory=dict)


# --- encoding ---------------------------------------------------------------------------


def encode(message: dict[str, Any]) -> bytes:
    body = json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"frame of {len(body)} bytes exceeds {MAX_FRAME}")
    return _HEADER.pack(len(body)) + body


def request_frame(request_id: int, request: Request) -> bytes:
    return encode({"id": request_id, "op": request.op, "args": dataclasses.asdict(request)})


def reply_frame(request_id: int, reply: Any) -> bytes:
    kind = (
        "event" if isinstance(reply, Output)
        else "failure" if isinstance(reply, Failure)
        else "tool" if isinstance(reply, ToolRequest)
        else "result"
    )
    return encode({"id": request_id, "kind": kind, "body": dataclasses.asdict(reply)})


def hello_frame(agent: str | None) -> bytes:
    return encode({"kind": "hello", "body": dataclasses.asdict(Hello(agent, PROTOCOL_VERSION))})


def parse_request(message: dict[str, Any]) -> tuple[int, Request]:
    cls = REQUESTS.get(message.get("op", ""))
    if cls is None:
        raise ProtocolError(f"unknown op {message.get('op')!r}")
    return int(message["id"]), cls(**message.get("args", {}))


# --- strict decoding of what the sandbox sends -----------------------------------------

_SCALARS: dict[str, Any] = {
    "str": lambda v: isinstance(v, str),
    "int": lambda v: type(v) is int,
    "bool": lambda v: type(v) is bool,
    "float": lambda v: type(v) in (int, float) and v == v and abs(v) != float("inf"),
    "None": lambda v: v is None,
    "Any": lambda v: True,
}


def _conforms(annotation: str, value: Any) -> bool:
    """Does `value` (from JSON) have the type the annotation string names? Understands the
    few forms the reply dataclasses use: scalars, `X | None`, list[X], dict[str, X]."""
    annotation = annotation.strip()
    if "|" in annotation:
        return any(_conforms(part, value) for part in annotation.split("|"))
    if annotation.startswith("list[") and annotation.endswith("]"):
        return isinstance(value, list) and all(_conforms(annotation[5:-1], v) for v in value)
    if annotation.startswith("dict[str,") and annotation.endswith("]"):
        inner = annotation[len("dict[str,") : -1]
        return isinstance(value, dict) and all(isinstance(k, str) and _conforms(inner, v) for k, v in value.items())
    return _SCALARS[annotation](value)


def decode_body(cls: type[Any], body: Any) -> Any:
    """An instance of dataclass `cls` from a JSON object, or ProtocolError: no unknown
    field, none missing that has no default, every value exactly of its field's type."""
    if not isinstance(body, dict):
        raise ProtocolError(f"{cls.__name__}: body is not an object")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(body) - set(fields)
    if unknown:
        raise ProtocolError(f"{cls.__name__}: unknown fields {sorted(unknown)[:5]}")
    for name, f in fields.items():
        if name not in body:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ProtocolError(f"{cls.__name__}: missing field {name!r}")
        elif not _conforms(str(f.type), body[name]):
            raise ProtocolError(f"{cls.__name__}.{name}: not a {f.type}")
    return cls(**body)


def decode_reply(message: Any, expected: type[Any]) -> tuple[int, Any]:
    """(request id, reply) from one agent frame: `expected`, Failure, or Output."""
    if not isinstance(message, dict) or set(message) != {"id", "kind", "body"}:
        raise ProtocolError("a reply frame must have exactly id, kind and body")
    request_id, kind = message["id"], message["kind"]
    if type(request_id) is not int:
        raise ProtocolError("reply id is not an integer")
    cls = {"result": expected, "failure": Failure, "event": Output}.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(f"unknown reply kind {str(kind)[:40]!r}")
    return request_id, decode_body(cls, message["body"])


def decode_tool_request(message: Any) -> tuple[int, ToolRequest]:
    """(the command's request id, the ToolRequest) from a frame of kind "tool"."""
    if not isinstance(message, dict) or set(message) != {"id", "kind", "body"} or message["kind"] != "tool":
        raise ProtocolError("a tool frame must have exactly id, kind and body")
    if type(message["id"]) is not int:
        raise ProtocolError("tool frame id is not an integer")
    return message["id"], decode_body(ToolRequest, message["body"])


def decode_hello(message: Any) -> Hello:
    if not isinstance(message, dict) or set(message) != {"kind", "body"} or message["kind"] != "hello":
        raise ProtocolError("the first frame must be a hello")
    return decode_body(Hello, message["body"])  # type: ignore[no-any-return]


class FrameDecoder:
    """Incremental decoder: feed bytes as they arrive, take whole messages out. Frames
    over `max_frame` are refused from their header on, before their body is buffered."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buffer = bytearray()
        self.max_frame = max_frame

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held (0 between frames)."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Any]:
        self._buffer += data
        messages = []
        while len(self._buffer) >= _HEADER.size:
            (length,) = _HEADER.unpack_from(self._buffer)
            if length > self.max_frame:
                raise ProtocolError(f"frame length {length} exceeds {self.max_frame}")
            end = _HEADER.size + length
            if len(self._buffer) < end:
                break
            body = bytes(self._buffer[_HEADER.size : end])
            del self._buffer[:end]
            try:
                messages.append(json.loads(body))
            except (ValueError, RecursionError) as exc:  # RecursionError: [[[[... nested deep
                raise ProtocolError(f"bad frame body: {str(exc)[:200]}") from exc
        return messages
