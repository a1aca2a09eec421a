"""Strict validation of tool results against the official `anthropic` SDK models.

The SDK's models accept unknown fields silently (extra="allow") and coerce types (3.0 or
True pass for an int), so: validate in pydantic's strict mode, reject extras at every
level, and require an exact round trip compared as JSON, where 3, 3.0 and true differ
(ANTHROPIC_WIRE_SCHEMAS.md §7). Editor errors must carry an `error_message` (the README
promises one; the SDK leaves it optional). Error codes the API documents but the SDK enums
lack yet are checked structurally.
"""

from __future__ import annotations

import json
from typing import Any

from anthropic.types.beta import (
    BetaBashCodeExecutionToolResultBlock,
    BetaCodeExecutionToolResultBlock,
    BetaTextEditorCodeExecutionToolResultBlock,
)
from pydantic import BaseModel

# Documented in the seeds' error table, absent from SDK 2.12's enums.
EXTRA_CODES = {
    "bash_code_execution_tool_result_error": {"container_expired"},
    "text_editor_code_execution_tool_result_error": {"container_expired", "string_not_found"},
    "code_execution_tool_result_error": {"container_expired"},
}


def _walk(obj: Any, path: str = "$") -> None:
    if isinstance(obj, BaseModel):
        assert not obj.model_extra, f"unknown field(s) at {path}: {sorted(obj.model_extra)}"
        for name in type(obj).model_fields:
            _walk(getattr(obj, name), f"{path}.{name}")
    elif isinstance(obj, list):
        for i, item in enumerate(obj):
            _walk(item, f"{path}[{i}]")


def _json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, ensure_ascii=False)


def strict_validate(model_cls: type[BaseModel], data: dict[str, Any]) -> BaseModel:
    obj = model_cls.model_validate(data, strict=True)
    _walk(obj)
    # As JSON, not with ==: in Python 3 == 3.0 == True.
    round_trip = obj.to_dict(mode="json", exclude_unset=True)  # type: ignore[attr-defined]
    assert _json(round_trip) == _json(data), f"not an exact round trip:\n{_json(data)}\n{_json(round_trip)}"
    return obj


def validate_result(tool: str, structured: dict[str, Any]) -> None:
    """Validate the MCP structuredContent (the inner result object) of `tool`."""
    block, block_type = {
        "bash_code_execution": (BetaBashCodeExecutionToolResultBlock, "bash_code_execution_tool_result"),
        "text_editor_code_execution": (BetaTextEditorCodeExecutionToolResultBlock, "text_editor_code_execution_tool_result"),
        "code_execution": (BetaCodeExecutionToolResultBlock, "code_execution_tool_result"),
    }[tool]
    wrapped = {"type": block_type, "tool_use_id": "srvtoolu_test", "content": structured}
    if structured.get("type") == "text_editor_code_execution_tool_result_error":
        message = structured.get("error_message")
        assert isinstance(message, str) and message.strip(), f"editor error without an error_message: {structured}"
    if structured.get("error_code") in EXTRA_CODES.get(structured.get("type", ""), set()):
        # Same shape as a known code: swap in a code the SDK knows, validate, then check the rest.
        known = dict(structured, error_code="unavailable")
        strict_validate(block, dict(wrapped, content=known))
        assert set(structured) <= {"type", "error_code", "error_message"}
        return
    strict_validate(block, wrapped)
