"""agent/protocol.py: frames, requests and replies both ways, strict decoding. (The frame
decoder's behaviour on hostile bytes is in test_agent_client.py.)"""

from __future__ import annotations

import struct

import pytest

from mcp_codeexec.agent import protocol as p


def test_request_frames_round_trip() -> None:
    requests = [p.Ping(), p.Exec(command="ls", cwd="/w", timeout=1.5, max_output=10, env={"A": "b"}, stream=True),
                p.Edit(command="view", path="a", view_range=[1, 2]), p.ReadFile(path="/w/a", offset=3),
                p.WriteFile(path="/w/a", data="eA==", mode=0o444), p.Cancel(target=7), p.Repl(code="1", timeout=2, max_output=5),
                p.ReplReset(), p.Reload()]
    decoder = p.FrameDecoder()
    messages = decoder.feed(b"".join(p.request_frame(i, r) for i, r in enumerate(requests)))
    assert [p.parse_request(m) for m in messages] == list(enumerate(requests))
    with pytest.raises(p.ProtocolError, match="unknown op"):
        p.parse_request({"id": 1, "op": "format_disk", "args": {}})


def test_reply_frames_say_their_kind() -> None:
    def one(frame: bytes) -> dict:
        [message] = p.FrameDecoder().feed(frame)
        return message

    assert one(p.reply_frame(3, p.Written(5))) == {"id": 3, "kind": "result", "body": {"size": 5}}
    assert one(p.reply_frame(3, p.Failure("internal", "x")))["kind"] == "failure"
    assert one(p.reply_frame(3, p.Output("stdout", "x")))["kind"] == "event"
    assert p.decode_hello(one(p.hello_frame("abc"))) == p.Hello("abc", p.PROTOCOL_VERSION)


def test_frames_split_anywhere_decode_the_same() -> None:
    data = p.reply_frame(1, p.Output("stdout", "é" * 1000)) + p.reply_frame(2, p.Written(1))
    decoder = p.FrameDecoder()
    messages = [m for i in range(len(data)) for m in decoder.feed(data[i : i + 1])]
    assert [m["id"] for m in messages] == [1, 2] and decoder.pending == 0


def test_encode_refuses_a_frame_over_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(p, "MAX_FRAME", 100)
    with pytest.raises(p.ProtocolError, match="exceeds 100"):
        p.encode({"data": "x" * 200})
    assert p.encode({"a": "é"}) == struct.pack(">I", 10) + '{"a":"é"}'.encode()  # compact UTF-8, not \u escapes


@pytest.mark.parametrize(
    "message",
    [[], {"id": 1, "kind": "result"}, {"id": "1", "kind": "result", "body": {}}, {"id": True, "kind": "result", "body": {}},
     {"id": 1, "kind": "shout", "body": {}}, {"id": 1, "kind": ["result"], "body": {}},
     {"id": 1, "kind": "result", "body": {"size": "5"}}, {"id": 1, "kind": "result", "body": {"size": 5, "extra": 1}},
     {"id": 1, "kind": "result", "body": []}],
)
def test_decode_reply_is_strict(message: object) -> None:
    with pytest.raises(p.ProtocolError):
        p.decode_reply(message, p.Written)


def test_decode_reply_and_hello_accept_the_real_thing() -> None:
    assert p.decode_reply({"id": 2, "kind": "result", "body": {"size": 5}}, p.Written) == (2, p.Written(5))
    assert p.decode_reply({"id": 2, "kind": "failure", "body": {"code": "c", "message": "m"}}, p.Written) == (2, p.Failure("c", "m"))
    for bad in ({"kind": "hello"}, {"kind": "hi", "body": {}}, {"kind": "hello", "body": {"agent": 1, "protocol": 2}}):
        with pytest.raises(p.ProtocolError):
            p.decode_hello(bad)


@pytest.mark.parametrize(
    ("annotation", "value", "ok"),
    [("int", 1, True), ("int", True, False), ("int", 1.0, False), ("float", 1, True), ("float", float("nan"), False),
     ("float", float("inf"), False), ("bool", 0, False), ("str | None", None, True), ("list[int]", [1, 2], True),
     ("list[int]", [1, "2"], False), ("dict[str, Any]", {"a": [1]}, True), ("dict[str, Any]", [], False),
     ("list[list[Any]]", [[1, "a"]], True)],
)
def test_conforms(annotation: str, value: object, ok: bool) -> None:
    assert p._conforms(annotation, value) is ok
