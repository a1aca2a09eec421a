"""The server's end of the agent protocol against hostile input, without Docker: the frame
decoder, strict reply decoding, and a whole AgentClient fed arbitrary bytes. Whatever a
sandbox sends, the client either delivers a well-typed reply or ends that one connection
with a reason; it never raises into its caller's task group."""

from __future__ import annotations

import json
import struct
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mcp_codeexec.agent import protocol as p
from mcp_codeexec.agent.client import AgentClient, AgentDied, Bounds, check_reply
from mcp_codeexec.deployment.base import AgentStream

pytestmark = pytest.mark.anyio

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
REPLY_TYPES = [p.PingResult, p.ExecResult, p.FileChunk, p.Written, p.EditResult, p.Failure, p.Output, p.Hello]
FIELDS = st.sampled_from(["stdout", "stderr", "return_code", "timed_out", "cancelled", "stdout_bytes", "stderr_bytes",
                          "duration", "files", "files_note", "data", "size", "result", "code", "message", "stream",
                          "protocol", "python", "pid", "uid", "agent", "bogus"])


def frame(obj: Any) -> bytes:
    body = json.dumps(obj).encode()
    return struct.pack(">I", len(body)) + body


@settings(deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=20), st.integers(min_value=0, max_value=1 << 20))
def test_decoder_only_ever_raises_protocol_error(chunks: list[bytes], limit: int) -> None:
    decoder = p.FrameDecoder(limit)
    try:
        for chunk in chunks:
            decoder.feed(chunk)
    except p.ProtocolError:
        pass


def test_decoder_refuses_an_oversized_header_before_buffering_its_body() -> None:
    decoder = p.FrameDecoder(1024)
    with pytest.raises(p.ProtocolError, match="exceeds 1024"):
        decoder.feed(struct.pack(">I", 1 << 30))
    assert decoder.pending == 4  # nothing of the announced gigabyte was waited for


def test_decoder_deep_nesting_is_a_protocol_error() -> None:
    with pytest.raises(p.ProtocolError):
        p.FrameDecoder().feed(frame(None)[:4] + b"[" * 100_000)  # header lies; body is garbage
    deep = ("[" * 100_000 + "]" * 100_000).encode()
    with pytest.raises(p.ProtocolError):
        p.FrameDecoder(1 << 20).feed(struct.pack(">I", len(deep)) + deep)


@settings(deadline=None)
@given(st.sampled_from(REPLY_TYPES), st.dictionaries(FIELDS, JSON, max_size=8))
def test_decode_body_is_total_and_exact(cls: type, body: dict[str, Any]) -> None:
    try:
        reply = p.decode_body(cls, body)
    except p.ProtocolError:
        return
    # What passes has exactly the declared types: no bool for an int, no float for an int.
    for name, value in vars(reply).items():
        assert p._conforms(str(cls.__dataclass_fields__[name].type), value)


@pytest.mark.parametrize(
    "body",
    [
        {"stdout": "", "stderr": "", "return_code": True, "timed_out": False, "cancelled": False,
         "stdout_bytes": 0, "stderr_bytes": 0, "duration": 0.1},  # a bool is not a return code
        {"stdout": "", "stderr": "", "return_code": 3.0, "timed_out": False, "cancelled": False,
         "stdout_bytes": 0, "stderr_bytes": 0, "duration": 0.1},  # nor is a float
        {"stdout": "", "stderr": "", "return_code": 0, "timed_out": 0, "cancelled": False,
         "stdout_bytes": 0, "stderr_bytes": 0, "duration": 0.1},  # 0 is not False
        {"bogus": 1},
    ],
)
def test_decode_body_rejects_near_misses(body: dict[str, Any]) -> None:
    with pytest.raises(p.ProtocolError):
        p.decode_body(p.ExecResult, body)


BOUNDS = Bounds("/workspace")


def exec_result(**overrides: Any) -> p.ExecResult:
    fields: dict[str, Any] = dict(stdout="", stderr="", return_code=0, timed_out=False, cancelled=False,
                                  stdout_bytes=0, stderr_bytes=0, duration=0.0)
    return p.ExecResult(**{**fields, **overrides})


@pytest.mark.parametrize(
    "reply",
    [
        exec_result(files=[["/etc/passwd", 1]]),
        exec_result(files=[["/workspace/../etc/passwd", 1]]),
        exec_result(files=[["/workspace/a", -1]]),
        exec_result(files=[["/workspace/a", True]]),
        exec_result(files=[["/workspace/a"]]),
        exec_result(files=[["/workspacex/a", 1]]),
        exec_result(return_code=-1),
        exec_result(return_code=256),
        exec_result(stdout="x" * 200_000),
        exec_result(duration=-1.0),
        p.FileChunk(data="not base64!", size=1),
        p.FileChunk(data="", size=-5),
        p.EditResult(result={"type": "text_editor_code_execution_create_result", "is_file_update": 1}),
        p.EditResult(result={"type": "rm -rf"}),
        p.PingResult(protocol=p.PROTOCOL_VERSION + 1, python="3", pid=1, uid=0),
        p.Output(stream="stdin", data=""),
        p.Failure(code="x" * 100, message=""),
    ],
)
def test_check_reply_refuses_what_no_agent_sends(reply: Any) -> None:
    request = p.Exec(command="true", cwd="/workspace", timeout=1, max_output=1000)
    with pytest.raises(p.ProtocolError):
        check_reply(reply, request, BOUNDS)


def test_check_reply_accepts_real_replies() -> None:
    request = p.Exec(command="true", cwd="/workspace", timeout=1, max_output=1000)
    ok = exec_result(stdout="x" * 1000, files=[["/workspace/out/a b.png", 10]], files_total=1, return_code=137)
    assert check_reply(ok, request, BOUNDS) is ok
    edit = p.EditResult(result={"type": "text_editor_code_execution_create_result", "is_file_update": False})
    assert check_reply(edit, request, BOUNDS) is edit


class MemoryStream(AgentStream):
    """Bytes the test scripts, in place of an engine's exec stream."""

    def __init__(self, incoming: list[bytes]) -> None:
        self.incoming = list(incoming)
        self.sent: list[bytes] = []
        self.closed = False
        self.more = anyio.Event()

    async def send(self, data: bytes) -> None:
        if self.closed:
            raise anyio.ClosedResourceError
        self.sent.append(data)

    async def receive(self) -> bytes:
        while not self.incoming:
            if self.closed:
                raise anyio.EndOfStream
            await self.more.wait()
            self.more = anyio.Event()
        return self.incoming.pop(0)

    def push(self, data: bytes) -> None:
        self.incoming.append(data)
        self.more.set()

    async def aclose(self) -> None:
        self.closed = True
        self.more.set()

    @property
    def stderr_tail(self) -> str:
        return ""


async def answer_first_request(stream: MemoryStream, body: dict[str, Any]) -> None:
    """Once the client has sent a request, push a result frame with its id and `body`."""
    while not stream.sent:
        await anyio.sleep(0.01)
    request_id = json.loads(stream.sent[0][4:])["id"]
    stream.push(frame({"id": request_id, "kind": "result", "body": body}))


HELLO = frame({"kind": "hello", "body": {"agent": None, "protocol": p.PROTOCOL_VERSION}})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.binary(max_size=40) | JSON.map(frame), max_size=6))
async def test_client_survives_any_byte_stream(garbage: list[bytes]) -> None:
    """Arbitrary frames after the hello, a request waiting: serve() returns without raising,
    and the waiting request either gets a well-typed reply or AgentDied."""
    stream = MemoryStream([HELLO, *garbage])
    client = AgentClient(stream, BOUNDS)
    async with anyio.create_task_group() as tg:
        tg.start_soon(client.serve)
        with anyio.move_on_after(0.2):
            try:
                reply = await client.request(p.Ping())
                assert isinstance(reply, (p.PingResult, p.Failure))
            except AgentDied as exc:
                assert client.closed.is_set() and exc.reason
        await stream.aclose()
    assert client.closed.is_set()


async def test_forged_reply_to_a_waiting_id_ends_only_that_connection() -> None:
    """The attack of issue #10: a frame with the id a request waits for and a body that is
    not its reply type. The request fails with the reason; nothing else is touched."""
    stream = MemoryStream([HELLO])
    client = AgentClient(stream, BOUNDS)
    async with anyio.create_task_group() as tg:
        tg.start_soon(client.serve)

        tg.start_soon(answer_first_request, stream, {"bogus": 1})
        with pytest.raises(AgentDied) as info:
            await client.request(p.Exec(command="true", cwd="/workspace", timeout=1, max_output=100))
        assert "malformed" in info.value.reason and "bogus" in info.value.reason
    assert client.closed.is_set() and stream.closed


async def test_unknown_ids_are_ignored() -> None:
    stream = MemoryStream([HELLO, frame({"id": 12345, "kind": "result", "body": {"whatever": 1}})])
    client = AgentClient(stream, BOUNDS)
    async with anyio.create_task_group() as tg:
        tg.start_soon(client.serve)

        body = {"protocol": p.PROTOCOL_VERSION, "python": "3.11", "pid": 2, "uid": 0}
        tg.start_soon(answer_first_request, stream, body)
        assert isinstance(await client.request(p.Ping()), p.PingResult)
        assert not client.closed.is_set()
        await stream.aclose()


async def test_a_stalled_half_frame_ends_the_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("mcp_codeexec.agent.client.STALL_TIMEOUT", 0.2)
    stream = MemoryStream([HELLO, struct.pack(">I", 100) + b"{"])
    client = AgentClient(stream, BOUNDS)
    async with anyio.create_task_group() as tg:
        tg.start_soon(client.serve)
        with anyio.fail_after(5):
            await client.closed.wait()
    assert "stalled" in client.death
