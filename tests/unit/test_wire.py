"""wire.py: the tools' inputs (strict) and results, checked against the official `anthropic`
SDK models (tests/strict.py), and the schemas published to MCP clients."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel, ValidationError
from strict import validate_result

from mcp_codeexec import wire

RESULTS: list[tuple[str, BaseModel]] = [
    (wire.BASH_TOOL, wire.BashResult(stdout="ó\n", stderr="", return_code=0)),
    (wire.BASH_TOOL, wire.BashResult(stdout="", stderr="x", return_code=2, content=[wire.BashOutput(file_id="file_1")])),
    (wire.BASH_TOOL, wire.BashError(error_code="execution_time_exceeded")),
    (wire.BASH_TOOL, wire.BashError(error_code="container_expired")),
    (wire.CODE_TOOL, wire.CodeResult(stdout="1\n", stderr="", return_code=0, content=[wire.CodeOutput(file_id="file_2")])),
    (wire.CODE_TOOL, wire.CodeError(error_code="too_many_requests")),
    (wire.EDITOR_TOOL, wire.ViewResult(file_type="text", content="a\n", num_lines=1, start_line=1, total_lines=1)),
    (wire.EDITOR_TOOL, wire.ViewResult(file_type="image", content="iVBO")),
    (wire.EDITOR_TOOL, wire.CreateResult(is_file_update=True)),
    (wire.EDITOR_TOOL, wire.StrReplaceResult(old_start=1, old_lines=1, new_start=1, new_lines=2, lines=["-a", "+b", "+c"])),
    (wire.EDITOR_TOOL, wire.EditorError(error_code="string_not_found", error_message="no match")),
    (wire.EDITOR_TOOL, wire.EditorError(error_code="file_not_found", error_message="no file")),
]


@pytest.mark.parametrize(("tool", "result"), RESULTS, ids=lambda x: getattr(x, "type", x))
def test_results_pass_the_sdk_models_strictly(tool: str, result: BaseModel) -> None:
    validate_result(tool, result.model_dump(mode="json"))


def test_a_near_miss_fails_the_strict_check() -> None:
    data = wire.BashResult(stdout="", stderr="", return_code=0).model_dump(mode="json")
    for broken in ({**data, "return_code": 0.0}, {**data, "return_code": True}, {**data, "extra": 1}):
        with pytest.raises((AssertionError, ValueError)):
            validate_result(wire.BASH_TOOL, broken)


def test_results_refuse_unknown_fields_and_codes() -> None:
    with pytest.raises(ValidationError):
        wire.BashResult(stdout="", stderr="", return_code=0, extra=1)  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        wire.CodeError(error_code="file_not_found")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("model", "good", "bad"),
    [
        (wire.BashInput, {"command": "ls", "unknown": 1}, {"command": 1}),
        (wire.CodeInput, {"code": "print(1)"}, {"code": b"x"}),
        (wire.BashInput, {"command": ""}, {}),
    ],
)
def test_inputs_are_strict_and_ignore_unknown_keys(model: type[BaseModel], good: dict[str, Any], bad: dict[str, Any]) -> None:
    model.model_validate(good)
    with pytest.raises(ValidationError):
        model.model_validate(bad)


def test_editor_input_picks_the_command() -> None:
    assert isinstance(wire.editor_input.validate_python({"command": "view", "path": "a"}), wire.ViewInput)
    created = wire.editor_input.validate_python({"command": "create", "path": "a", "file_text": "x"})
    assert isinstance(created, wire.CreateInput) and created.file_text == "x"
    for bad in (
        {"command": "delete", "path": "a"},
        {"command": "str_replace", "path": "a", "old_str": "x"},  # new_str missing
        {"command": "view", "path": "a", "view_range": [1]},
        {"command": "view", "path": "a", "view_range": [1, "2"]},
        {"command": "view", "path": 3},
    ):
        with pytest.raises(ValidationError):
            wire.editor_input.validate_python(bad)


def test_published_schemas() -> None:
    # Inputs: flat objects (no root oneOf, which the Claude API rejects).
    for schema in (wire.BASH_INPUT_SCHEMA, wire.CODE_INPUT_SCHEMA, wire.EDITOR_INPUT_SCHEMA):
        assert schema["type"] == "object" and "oneOf" not in schema and "anyOf" not in schema
    assert wire.EDITOR_INPUT_SCHEMA["properties"]["command"]["enum"] == ["view", "create", "str_replace"]
    # Outputs: objects at the root, a branch per result type, no titles, every field required.
    for schema, types in (
        (wire.BASH_OUTPUT_SCHEMA, {"bash_code_execution_result", "bash_code_execution_tool_result_error"}),
        (wire.CODE_OUTPUT_SCHEMA, {"code_execution_result", "code_execution_tool_result_error"}),
        (wire.EDITOR_OUTPUT_SCHEMA, {"text_editor_code_execution_view_result", "text_editor_code_execution_create_result",
                                     "text_editor_code_execution_str_replace_result",
                                     "text_editor_code_execution_tool_result_error"}),
    ):
        assert schema["type"] == "object" and "title" not in str(schema)
        defs = schema["$defs"]
        assert {d["properties"]["type"]["const"] for d in defs.values() if "type" in d.get("properties", {})} >= types
        result = next(d for d in defs.values() if d["properties"]["type"]["const"].endswith("_result")
                      and "return_code" in d["properties"]) if "return_code" in str(schema) else None
        if result is not None:
            assert set(result["required"]) == {"type", "stdout", "stderr", "return_code", "content"}
