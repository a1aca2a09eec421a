"""tools.py: argument checks, error mapping, output fitting, output-file registration, and
the legacy profile's fresh interpreter, on the local backend (the real agent)."""

from __future__ import annotations

import json

import pytest
from strict import validate_result

from mcp_codeexec import tools, wire
from mcp_codeexec.files import FileStore
from unit.conftest import local_settings, manager, workspace

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    ("tool", "code", "expected"),
    [(wire.BASH_TOOL, "file_not_found", "invalid_tool_input"), (wire.BASH_TOOL, "output_file_too_large", "output_file_too_large"),
     (wire.CODE_TOOL, "output_file_too_large", "unavailable"), (wire.CODE_TOOL, "string_not_found", "invalid_tool_input"),
     (wire.EDITOR_TOOL, "file_not_found", "file_not_found"), ("unknown", "weird", "unavailable")],
)
def test_error_maps_codes_a_tool_lacks(tool: str, code: str, expected: str) -> None:
    result = tools.error(tool, code, "why")
    assert result.error_code == expected  # type: ignore[attr-defined]
    if tool in (wire.BASH_TOOL, wire.CODE_TOOL, wire.EDITOR_TOOL):
        validate_result(tool, result.model_dump(mode="json"))
    assert getattr(result, "error_message", "why") == "why"


def test_fit_to_wire_bounds_the_encoded_size() -> None:
    assert tools.fit_to_wire("plain text") == "plain text"
    binary = "\x01" * 100_000  # 6 characters each once JSON-encoded
    fitted = tools.fit_to_wire(binary, budget=10_000)
    assert len(json.dumps(fitted)) <= 10_000 + 300 and "characters omitted" in fitted
    assert fitted.startswith("\x01") and fitted.endswith("\x01")


async def test_invalid_input_never_reaches_a_sandbox() -> None:
    async def no_sandbox():  # noqa: ANN202
        raise AssertionError("no sandbox needed for bad input")

    s = local_settings("/nonexistent")
    for arguments in ({}, {"command": 1}, {"command": "a\x00b"}, {"command": "\ud800"}):
        outcome = await tools.bash(s, no_sandbox, arguments)
        assert outcome.result == wire.BashError(error_code="invalid_tool_input") and outcome.sandbox is None
    assert (await tools.python(s, no_sandbox, {"code": None})).result == wire.CodeError(error_code="invalid_tool_input")
    edit = await tools.editor(no_sandbox, {"command": "view"})
    assert edit.result.error_code == "invalid_tool_input" and "path" in edit.result.error_message  # type: ignore[attr-defined]


async def test_output_files_within_the_limits(base: str) -> None:
    s = local_settings(base, max_output_files=2, max_file_bytes=100)
    store = FileStore(workspace(s).parent / "files", cap=lambda tenant: 150)
    async with manager(s) as m:
        sandbox = await m.new("t")

        async def get():  # noqa: ANN202
            return sandbox

        outcome = await tools.bash(s, get, {"command": "head -c 90 /dev/zero > a.bin; head -c 200 /dev/zero > big.bin"}, store=store)
        validate_result(wire.BASH_TOOL, outcome.result.model_dump(mode="json"))
        [registered] = outcome.files
        assert registered.filename == "a.bin" and registered.container_id == sandbox.info.id
        assert "big.bin (200 bytes) is over the 100-byte output-file limit" in outcome.result.stderr  # type: ignore[attr-defined]
        # The tenant's cap: 60 bytes left of 150.
        outcome = await tools.bash(s, get, {"command": "head -c 80 /dev/zero > b.bin"}, store=store)
        assert outcome.files == [] and "the cap on stored files would be exceeded (60 bytes left" in outcome.result.stderr  # type: ignore[attr-defined]
        outcome = await tools.bash(s, get, {"command": "for i in 1 2 3 4; do echo $i > f$i.txt; done"}, store=store)
        assert len(outcome.files) == 2 and "2 more files were written" in outcome.result.stderr  # type: ignore[attr-defined]
        # Outputs cut to the cap keep head and tail.
        outcome = await tools.bash(s, get, {"command": "seq 1 20000"}, store=store)
        out = outcome.result.stdout  # type: ignore[attr-defined]
        assert out.startswith("1\n2\n") and out.endswith("19999\n20000\n") and "bytes of stdout omitted" in out


async def test_legacy_python_starts_fresh_each_call(base: str) -> None:
    s = local_settings(base, profile="20250522")
    async with manager(s) as m:
        sandbox = await m.new("t")

        async def get():  # noqa: ANN202
            return sandbox

        first = await tools.python(s, get, {"code": "x = 1; print(x)"})
        assert first.result == wire.CodeResult(stdout="1\n", stderr="", return_code=0)
        second = await tools.python(s, get, {"code": "print(x)"})
        assert second.result.return_code == 1 and "NameError" in second.result.stderr  # type: ignore[attr-defined]
