"""The API tool versions this server can mimic, one frozen record each: which tools it
offers and how `code_execution` behaves. Everything that differs by version reads it here."""

from __future__ import annotations

from dataclasses import dataclass

from mcp_codeexec.wire import BASH_TOOL, CODE_TOOL, EDITOR_TOOL


@dataclass(frozen=True)
class Profile:
    version: str  # the API's tool version date, e.g. "20250825"
    tools: tuple[str, ...]  # the wire names of the tools offered, in the order listed
    repl: bool  # code_execution cells share one long-lived interpreter per container
    cell_limit: bool  # a cell past its own wall-clock limit is a result (return_code, notice), not an error

    @property
    def legacy(self) -> bool:
        """20250522: one Python-only tool, a fresh interpreter per call."""
        return CODE_TOOL in self.tools and BASH_TOOL not in self.tools

    def kind(self, tool: str) -> str | None:
        """What a tool of this profile does ("bash", "editor", "python"), None if not offered."""
        return _KINDS[tool] if tool in self.tools else None


_KINDS = {BASH_TOOL: "bash", EDITOR_TOOL: "editor", CODE_TOOL: "python"}

PROFILES: dict[str, Profile] = {
    p.version: p
    for p in (
        Profile("20250825", (BASH_TOOL, EDITOR_TOOL), repl=False, cell_limit=False),
        Profile("20260120", (BASH_TOOL, EDITOR_TOOL, CODE_TOOL), repl=True, cell_limit=False),
        Profile("20260521", (BASH_TOOL, EDITOR_TOOL, CODE_TOOL), repl=True, cell_limit=True),
        Profile("20250522", (CODE_TOOL,), repl=False, cell_limit=False),
    )
}
VERSIONS = tuple(PROFILES)  # the default first
