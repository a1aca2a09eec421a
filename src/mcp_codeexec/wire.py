"""The Claude API's wire format for the code execution tools: inputs, results, errors.

Field names and types are those of the official `anthropic` SDK models (snake_case);
these pydantic models mirror them so the server can validate arguments and produce
results, and they generate the MCP tools' JSON schemas.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

BASH_TOOL = "bash_code_execution"
EDITOR_TOOL = "text_editor_code_execution"
CODE_TOOL = "code_execution"  # Python: the whole tool in 20250522, the REPL in 20260120+

# The SDK's enums plus `container_expired` (and `string_not_found` for the editor), which the
# API documents in its error table but the SDK enums do not list yet.
BashErrorCode = Literal[
    "invalid_tool_input", "unavailable", "too_many_requests", "execution_time_exceeded",
    "container_expired", "output_file_too_large",
]
CodeErrorCode = Literal[
    "invalid_tool_input", "unavailable", "too_many_requests", "execution_time_exceeded", "container_expired",
]
EditorErrorCode = Literal[
    "invalid_tool_input", "unavailable", "too_many_requests", "execution_time_exceeded",
    "container_expired", "file_not_found", "string_not_found",
]


class _Wire(BaseModel):
    # Results always carry every field, defaults included: say so in the output schema.
    model_config = ConfigDict(extra="forbid", json_schema_serialization_defaults_required=True)


# --- inputs ------------------------------------------------------------------------------


class _Input(BaseModel):
    # Strict: "1" is not an int and 1 is not a str. Unknown keys are ignored, as the API's
    # schemas do not forbid them.
    model_config = ConfigDict(strict=True, extra="ignore")


class BashInput(_Input):
    command: str


class CodeInput(_Input):
    code: str


class ViewInput(_Input):
    command: Literal["view"]
    path: str
    view_range: Annotated[list[int], Field(min_length=2, max_length=2)] | None = None


class CreateInput(_Input):
    command: Literal["create"]
    path: str
    file_text: str | None = None


class StrReplaceInput(_Input):
    command: Literal["str_replace"]
    path: str
    old_str: str
    new_str: str


EditorInput = Annotated[ViewInput | CreateInput | StrReplaceInput, Field(discriminator="command")]
editor_input = TypeAdapter(EditorInput)

BASH_INPUT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"command": {"type": "string", "description": "The bash command to run."}},
    "required": ["command"],
}

CODE_INPUT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"code": {"type": "string", "description": "Python source to run."}},
    "required": ["code"],
}

# Flat rather than the docs' root `oneOf`: the Claude API (behind Claude Desktop and Claude
# Code) rejects `oneOf` at the root of a tool's input_schema. The server checks which
# fields each command needs and answers `invalid_tool_input` itself.
EDITOR_INPUT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "command": {"type": "string", "enum": ["view", "create", "str_replace"]},
        "path": {"type": "string", "description": "File path; relative paths resolve against the working directory."},
        "file_text": {"type": "string", "description": "create: the whole content of the file."},
        "old_str": {"type": "string", "description": "str_replace: text to find; must occur exactly once."},
        "new_str": {"type": "string", "description": "str_replace: replacement text."},
        "view_range": {
            "type": "array",
            "items": {"type": "integer"},
            "minItems": 2,
            "maxItems": 2,
            "description": "view (extension): [first, last] 1-based lines; last -1 means to the end.",
        },
    },
    "required": ["command", "path"],
}


# --- results -----------------------------------------------------------------------------


class BashOutput(_Wire):
    type: Literal["bash_code_execution_output"] = "bash_code_execution_output"
    file_id: str


class BashResult(_Wire):
    type: Literal["bash_code_execution_result"] = "bash_code_execution_result"
    stdout: str
    stderr: str
    return_code: int
    content: list[BashOutput] = Field(default_factory=list)


class BashError(_Wire):
    type: Literal["bash_code_execution_tool_result_error"] = "bash_code_execution_tool_result_error"
    error_code: BashErrorCode


class ViewResult(_Wire):
    type: Literal["text_editor_code_execution_view_result"] = "text_editor_code_execution_view_result"
    file_type: Literal["text", "image", "pdf"]
    content: str
    num_lines: int | None = None
    start_line: int | None = None
    total_lines: int | None = None


class CreateResult(_Wire):
    type: Literal["text_editor_code_execution_create_result"] = "text_editor_code_execution_create_result"
    is_file_update: bool


class StrReplaceResult(_Wire):
    type: Literal["text_editor_code_execution_str_replace_result"] = "text_editor_code_execution_str_replace_result"
    old_start: int | None = None
    old_lines: int | None = None
    new_start: int | None = None
    new_lines: int | None = None
    lines: list[str] | None = None


class EditorError(_Wire):
    type: Literal["text_editor_code_execution_tool_result_error"] = "text_editor_code_execution_tool_result_error"
    error_code: EditorErrorCode
    error_message: str | None = None


class CodeOutput(_Wire):
    type: Literal["code_execution_output"] = "code_execution_output"
    file_id: str


class CodeResult(_Wire):
    type: Literal["code_execution_result"] = "code_execution_result"
    stdout: str
    stderr: str
    return_code: int
    content: list[CodeOutput] = Field(default_factory=list)


class CodeError(_Wire):
    type: Literal["code_execution_tool_result_error"] = "code_execution_tool_result_error"
    error_code: CodeErrorCode


BashOutcome = Union[BashResult, BashError]
CodeOutcome = Union[CodeResult, CodeError]
EditorOutcome = Union[ViewResult, CreateResult, StrReplaceResult, EditorError]
editor_result = TypeAdapter(Union[ViewResult, CreateResult, StrReplaceResult])


def _output_schema(outcome: Any) -> dict[str, Any]:
    schema = TypeAdapter(outcome).json_schema(mode="serialization")

    def strip_titles(node: Any) -> None:
        if isinstance(node, dict):
            node.pop("title", None)
            for value in node.values():
                strip_titles(value)
        elif isinstance(node, list):
            for value in node:
                strip_titles(value)

    strip_titles(schema)
    return {"type": "object", **schema}  # MCP wants an object at the root


BASH_OUTPUT_SCHEMA = _output_schema(BashOutcome)
CODE_OUTPUT_SCHEMA = _output_schema(CodeOutcome)
EDITOR_OUTPUT_SCHEMA = _output_schema(EditorOutcome)
