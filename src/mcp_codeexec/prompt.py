"""The system prompt: how this sandbox differs from the client's own environments, plus
the live facts of the configuration in force. Served as an MCP resource and prompt."""

from __future__ import annotations

from dataclasses import dataclass, field

from mcp_codeexec.config import Settings, format_size
from mcp_codeexec.wire import BASH_TOOL, EDITOR_TOOL

PROMPT_NAME = "code_execution_system_prompt"
PROMPT_URI = "codeexec://system-prompt"


@dataclass(frozen=True)
class ImageFacts:
    """What the sandbox image says about itself (its manifest), when known."""

    python: str = "3.11"
    packages: dict[str, str] = field(default_factory=dict)


def system_prompt(settings: Settings, isolation: str, facts: ImageFacts) -> str:
    s = settings
    packages = ", ".join(f"{name} {version}" for name, version in sorted(facts.packages.items())) or "see the image manifest"
    return f"""\
# Code execution sandbox

You have two tools that run inside a remote Linux sandbox: `{BASH_TOOL}` (runs a bash
command) and `{EDITOR_TOOL}` (view, create and edit files). They behave like the Claude
API's code execution tool.

## This sandbox is a separate computer
- It is NOT the user's machine and NOT any other shell, terminal, notebook or REPL you may
  also have. Files, variables, installed packages and running processes do not carry between
  this sandbox and those environments, in either direction.
- Use these tools for computation and file work in the sandbox. Use the client's own tools
  (if any) for anything on the user's machine.
- To move data between environments, pass it explicitly: print it here and write it there,
  or create the file in the other environment from its content.

## How calls behave
- Each `{BASH_TOOL}` call starts a fresh bash process in `{s.workdir}`: files persist between
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

## Facts
- Linux x86_64, Python {facts.python}, bash. Working directory: `{s.workdir}`; /tmp is scratch space.
- Memory: {format_size(s.memory_bytes)}; CPUs: {s.cpus:g}; processes: at most {s.pids_limit}.
- No network: no internet, no package installs from the network (pip/apt will fail).
- Runs as an unprivileged user under {isolation}.
- Installed: {packages}.
"""
