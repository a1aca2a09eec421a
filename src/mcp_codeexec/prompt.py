"""The system prompt: how this sandbox differs from the client's own environments, plus
the live facts of the configuration in force. Served as an MCP resource and prompt."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mcp_codeexec.config import Settings, format_size
from mcp_codeexec.files import UPLOADS_DIR
from mcp_codeexec.wire import BASH_TOOL, CODE_TOOL, EDITOR_TOOL

PROMPT_NAME = "code_execution_system_prompt"
PROMPT_URI = "codeexec://system-prompt"


def _tools_paragraph(s: Settings) -> str:
    if s.tool_profile.legacy:
        return (
            f"You have one tool that runs inside a remote Linux sandbox: `{CODE_TOOL}` (runs Python code). "
            "It behaves like the Claude API's code execution tool (version 20250522)."
        )
    extra = f", and `{CODE_TOOL}` (runs Python code in a persistent interpreter)" if s.tool_profile.repl else ""
    return (
        f"You have tools that run inside a remote Linux sandbox: `{BASH_TOOL}` (runs a bash command), "
        f"`{EDITOR_TOOL}` (view, create and edit files){extra}. They behave like the Claude API's code "
        f"execution tool (version {s.profile})."
    )


def _python_semantics(s: Settings) -> str:
    if s.tool_profile.legacy:
        return f"- Each `{CODE_TOOL}` call runs in a fresh Python interpreter: only files carry over.\n"
    if not s.tool_profile.repl:
        return ""
    limit = (
        f"Each cell may run for at most {s.cell_timeout:g} seconds of wall-clock time; past that it is stopped, "
        "the result has a non-zero return_code and a `detection_timeout` notice, and the interpreter's state is reset."
        if s.tool_profile.cell_limit
        else f"Each cell may run for at most {s.timeout:g} seconds."
    )
    return (
        f"- `{CODE_TOOL}` runs each call as a cell of one long-lived Python interpreter: variables, imports and "
        f"functions carry over from cell to cell (like a notebook, but only printed output is shown). {limit} If "
        "the interpreter dies, its state is reset and the result says so.\n"
    )


@dataclass(frozen=True)
class ImageFacts:
    """What the sandbox image says about itself (its manifest), when known."""

    python: str = "3.11"
    packages: dict[str, str] = field(default_factory=dict)  # Python libraries: distribution -> version
    tools: dict[str, str] = field(default_factory=dict)  # command -> version

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> ImageFacts:
        """From the image's /etc/mcp-codeexec/manifest.json (sandbox/manifest.py)."""
        return cls(
            python=str(manifest.get("python") or "3.11"),
            packages={name: str(lib["version"]) for name, lib in (manifest.get("libraries") or {}).items()},
            tools={cmd: _upstream(str(tool["version"])) for cmd, tool in (manifest.get("tools") or {}).items()},
        )


def _upstream(debian_version: str) -> str:
    """'1:0.1.3-1' -> '0.1.3', '16.02+really26.02+dfsg-0+deb12u1' -> '26.02'."""
    v = debian_version.split(":", 1)[-1].rsplit("-", 1)[0]
    v = v.split("+really", 1)[-1]
    return v.split("+", 1)[0].split("~", 1)[0]


def tools_section(settings: Settings, listing: str) -> str:
    """Programmatic tool calling: the upstream tools code here may call (`listing`, one
    line per server, from upstream.Gateway.describe), and how."""
    if not listing:
        return ""
    cells = (f" and in `{CODE_TOOL}` cells" if settings.profile in ("20260120", "20260521") else "")
    return f"""
## Tools your code can call
Code in this sandbox (Python scripts run with `{BASH_TOOL}`{cells}) can call these MCP tools as
functions. Their results stay in the sandbox: only what your code prints comes back to you. So
loop over calls, filter, join and aggregate in code, and print only what you need.
{listing}
- Python: `from mcp_tools import <server>`, then `<server>.<tool>(...)` returns the result (in
  async code, such as a cell that uses `await`, write `await <server>.<tool>(...)`). Results are
  Python objects: the tool's structured content, else its text (a str). `help(<server>.<tool>)`
  shows a tool's parameters. Any failure raises `mcp_tools.ToolError` with the reason.
- bash: `mcp-tool <server> <tool> '<json arguments>'` prints the result (JSON unless it is text),
  for pipelines; `mcp-tool --list` lists every tool with its signature.
- Calls work only while the command or cell that makes them runs; each call is limited in time,
  size and number per command.
"""


def system_prompt(settings: Settings, isolation: str, facts: ImageFacts, tools: str = "") -> str:
    """`tools`: the upstream tools this caller's code may call (upstream.Gateway.describe)."""
    s = settings
    packages = ", ".join(f"{name} {version}" for name, version in sorted(facts.packages.items())) or "see the image manifest"
    commands = ", ".join(f"{name} {version}" for name, version in sorted(facts.tools.items()))
    return f"""\
# Code execution sandbox

{_tools_paragraph(s)}

## This sandbox is a separate computer
- It is NOT the user's machine and NOT any other shell, terminal, notebook or REPL you may
  also have. Files, variables, installed packages and running processes do not carry between
  this sandbox and those environments, in either direction.
- Use these tools for computation and file work in the sandbox. Use the client's own tools
  (if any) for anything on the user's machine.
- To move data between environments, pass it explicitly: print it here and write it there,
  or create the file in the other environment from its content.

## How calls behave
{_python_semantics(s)}- Each `{BASH_TOOL}` call starts a fresh bash process in `{s.workdir}`: files persist between
  calls, shell state (current directory, variables, functions) does not. Chain commands with
  `&&` or `cd` inside the same call.
- `{EDITOR_TOOL}` paths may be relative to `{s.workdir}`; the editor cannot reach outside
  `{s.workdir}`. `view` returns the file's text as is (no line numbers); `str_replace` needs
  `old_str` to occur exactly once.
- Each call may run for at most {s.timeout:g} seconds; past that it is killed and the result
  is the error `execution_time_exceeded`. Start long jobs in smaller steps.
- stdout and stderr are each capped at {s.max_output_bytes} bytes per call: the first and last
  parts are kept and a marker says how much was left out. Write big output to a file and read
  it in parts.

## Files
- Files you create or change under `{s.workdir}` (not hidden ones, not caches) come back to
  the user as file ids in the result's `content`, and images are shown to them. Save what
  the user should get (charts, reports, data) there, under a clear name.
- Files the user provided at start are in `{s.workdir}/{UPLOADS_DIR}/`.

## Facts
- Linux x86_64, Python {facts.python}, bash. Working directory: `{s.workdir}`; /tmp is scratch space.
- Memory: {format_size(s.memory_bytes)}; CPUs: {s.cpus:g}; workspace disk: {format_size(s.disk_bytes) if s.disk_bytes else "no quota"}.
- No network: no internet, no package installs from the network (pip/apt will fail).
- Runs as an unprivileged user under {isolation}.
- Installed: {packages}.
""" + (f"- Tools: {commands}.\n" if commands else "") + tools_section(s, tools)
