"""mcp-codeexec: the Claude API's code execution tool as a self-hosted MCP server."""

__version__ = "0.1.0"
