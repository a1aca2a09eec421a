#!/usr/bin/env bash
# Start the mcp-codeexec MCP server (arguments go to it). Runs
# scripts/setup.sh first with all of its output on stderr and no stdin, so
# that stdin/stdout stay a clean MCP stdio stream.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup.sh" </dev/null >&2
exec "$ROOT/.venv/bin/mcp-codeexec" "$@"
