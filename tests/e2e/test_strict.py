"""The strict validator itself (no Docker): what it must reject, so that a test passing
through it means the result really is the API's object."""

from __future__ import annotations

import pytest
from strict import validate_result

BASH_OK = {"type": "bash_code_execution_result", "stdout": "", "stderr": "", "return_code": 3, "content": []}
EDITOR_ERROR = {"type": "text_editor_code_execution_tool_result_error", "error_code": "file_not_found", "error_message": "no such file"}


def test_accepts_the_api_objects():
    validate_result("bash_code_execution", BASH_OK)
    validate_result("bash_code_execution", dict(BASH_OK, content=[{"type": "bash_code_execution_output", "file_id": "file_x"}]))
    validate_result("text_editor_code_execution", EDITOR_ERROR)
    validate_result("text_editor_code_execution", dict(EDITOR_ERROR, error_code="string_not_found"))  # documented, not in the SDK enum
    validate_result("code_execution", {"type": "code_execution_tool_result_error", "error_code": "container_expired"})


@pytest.mark.parametrize(
    "bad",
    [
        dict(BASH_OK, return_code=3.0),  # a float is not an int on the wire
        dict(BASH_OK, return_code=True),  # nor is a bool
        dict(BASH_OK, return_code="3"),
        dict(BASH_OK, stdout=b""),
        dict(BASH_OK, extra=1),
        dict(BASH_OK, content=[{"type": "bash_code_execution_output", "file_id": "file_x", "name": "a"}]),
        {k: v for k, v in BASH_OK.items() if k != "stderr"},
        {"type": "bash_code_execution_tool_result_error", "error_code": "container_expired", "error_message": "x"},
        {"type": "bash_code_execution_tool_result_error", "error_code": "no_such_code"},
    ],
    ids=["float", "bool", "str", "bytes", "extra", "nested-extra", "missing", "bash-message", "unknown-code"],
)
def test_rejects_bash(bad):
    with pytest.raises((AssertionError, ValueError)):
        validate_result("bash_code_execution", bad)


@pytest.mark.parametrize(
    "bad",
    [
        {"type": "text_editor_code_execution_tool_result_error", "error_code": "file_not_found"},
        dict(EDITOR_ERROR, error_message=None),
        dict(EDITOR_ERROR, error_message=""),
        dict(EDITOR_ERROR, error_code="string_not_found", error_message=None),
        {"type": "text_editor_code_execution_view_result", "file_type": "text", "content": "", "num_lines": 1.0},
        {"type": "text_editor_code_execution_create_result", "is_file_update": 1},
        {"type": "text_editor_code_execution_view_result", "file_type": "text", "content": "", "numLines": 1},
    ],
    ids=["no-message", "null-message", "empty-message", "extra-code-null-message", "float-lines", "int-bool", "camelCase"],
)
def test_rejects_editor(bad):
    with pytest.raises((AssertionError, ValueError)):
        validate_result("text_editor_code_execution", bad)
