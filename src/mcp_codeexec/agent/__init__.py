"""The in-sandbox agent (standard library only) and the server's client for it."""
