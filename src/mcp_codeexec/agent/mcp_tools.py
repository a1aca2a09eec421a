"""Call the MCP tools this sandbox's operator configured, from code running in the sandbox.

Shipped by the agent into a directory on PYTHONPATH (standard library only). It runs in the
user's own processes, as the user: it is a convenience, not a boundary. The agent and the
server check everything it sends.

    from mcp_tools import memory            # one namespace per upstream MCP server
    graph = memory.read_graph()              # in scripts and cells: the result itself
    graph = await memory.read_graph()        # in async code (a cell that awaits, async def)
    help(memory.create_entities)             # signature and description, from the tool

Results are Python objects: the tool's structured content when it gives one, else its text
(a str; a list when it returns several items) and images (mcp_tools.Image). Any failure (bad
arguments, a tool that reports an error, a refused or timed-out call) raises
mcp_tools.ToolError with the reason. From bash: `mcp-tool memory read_graph '{}'`.

The channel: the agent opens a Unix socket for each running command (and the REPL) and
names it in $MCP_CODEEXEC_TOOLS; each call connects, sends one frame (4-byte big-endian
length, JSON), reads one frame back. It works only while the command that started this
process runs.
"""

from __future__ import annotations

import json
import keyword
import os
import re
import socket
import struct
import sys
from collections.abc import Coroutine
from typing import Any

__all__ = ["ToolError", "Image", "PendingCall", "call", "servers"]

ENV = "MCP_CODEEXEC_TOOLS"
_MAX_REPLY = 64 << 20
_HEADER = struct.Struct(">I")


class ToolError(Exception):
    """A tool call that did not give a result. `code`: tool_error (the tool itself reported
    an error; the message is the tool's), invalid_arguments, refused (not allowed here),
    limit, timeout, unavailable (the upstream server cannot be reached), cancelled, or
    no_channel (this process is not part of a running command)."""

    def __init__(self, message: str, code: str = "tool_error", server: str = "", tool: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.server = server
        self.tool = tool

    def __str__(self) -> str:
        where = f"{self.server}.{self.tool}: " if self.server and self.tool else ""
        return f"{where}{self.message}" if self.code == "tool_error" else f"{where}[{self.code}] {self.message}"


class Image:
    """An image a tool returned."""

    def __init__(self, data: bytes, mime_type: str) -> None:
        self.data = data
        self.mime_type = mime_type

    def save(self, path: str) -> None:
        with open(path, "wb") as f:
            f.write(self.data)

    def __repr__(self) -> str:
        return f"<Image {self.mime_type}, {len(self.data)} bytes>"


# --- the channel -----------------------------------------------------------------------


def _address() -> str:
    name = os.environ.get(ENV, "")
    if not name:
        raise ToolError(
            f"no tool channel (${ENV} is not set): tools can be called only from commands and cells the sandbox runs",
            "no_channel",
        )
    return "\0" + name


def _frame(request: dict[str, Any]) -> bytes:
    body = json.dumps(request, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass")
    return _HEADER.pack(len(body)) + body


def _parse(data: bytes, request: dict[str, Any]) -> Any:
    try:
        reply = json.loads(data)
    except ValueError:
        raise ToolError("the agent answered something that is not JSON", "unavailable") from None
    server, tool = request.get("server", ""), request.get("tool", "")
    if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
        raise ToolError("the agent answered something that is not a reply", "unavailable", server, tool)
    if not reply["ok"]:
        raise ToolError(str(reply.get("message", "")), str(reply.get("code", "tool_error")), server, tool)
    return _objects(reply.get("result"))


def _objects(value: Any) -> Any:
    """Images (sent as {"type": "image", "mime_type", "data": base64}) as Image objects."""
    if isinstance(value, dict) and value.get("type") == "image" and set(value) == {"type", "mime_type", "data"}:
        import base64

        return Image(base64.b64decode(value["data"]), value["mime_type"])
    if isinstance(value, list):
        return [_objects(v) for v in value]
    return value


def _no_channel(exc: OSError) -> ToolError:
    return ToolError(
        f"the tool channel is closed ({exc.strerror or exc}): tools can be called only while the command or cell "
        "that started this process runs",
        "no_channel",
    )


def _exchange(request: dict[str, Any]) -> Any:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.connect(_address())
            sock.sendall(_frame(request))
            header = _recv(sock, _HEADER.size)
            (length,) = _HEADER.unpack(header)
            if length > _MAX_REPLY:
                raise ToolError(f"reply of {length} bytes is too large", "unavailable")
            data = _recv(sock, length)
        except OSError as exc:
            raise _no_channel(exc) from None
    finally:
        sock.close()
    return _parse(data, request)


def _recv(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(min(n - len(data), 1 << 20))
        if not chunk:
            raise ToolError("the tool channel closed before the reply (the command ended?)", "cancelled")
        data += chunk
    return bytes(data)


async def _exchange_async(request: dict[str, Any]) -> Any:
    import asyncio

    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        try:
            await loop.sock_connect(sock, _address())
            await loop.sock_sendall(sock, _frame(request))
            data = bytearray()
            need = _HEADER.size
            while len(data) < need:
                chunk = await loop.sock_recv(sock, min(need - len(data), 1 << 20))
                if not chunk:
                    raise ToolError("the tool channel closed before the reply (the command ended?)", "cancelled")
                data += chunk
                if need == _HEADER.size and len(data) >= need:
                    (length,) = _HEADER.unpack_from(data)
                    if length > _MAX_REPLY:
                        raise ToolError(f"reply of {length} bytes is too large", "unavailable")
                    need += length
        except OSError as exc:
            raise _no_channel(exc) from None
    finally:
        sock.close()
    return _parse(bytes(data[_HEADER.size :]), request)


def _in_async_code() -> bool:
    try:
        import asyncio

        asyncio.get_running_loop()
        return True
    except RuntimeError:
        return False


class PendingCall(Coroutine[Any, Any, Any]):
    """What a tool function returns in async code (a cell that uses `await`, an async
    function): a coroutine; `await` it for the result. Used as a value instead, it says
    so; never awaited, it says so on stderr (the call was not made)."""

    def __init__(self, label: str, request: dict[str, Any]) -> None:
        self._label = label
        self._request = request
        self._coro: Any = None

    def _inner(self) -> Any:
        if self._coro is None:
            self._coro = _exchange_async(self._request)
        return self._coro

    def __await__(self) -> Any:
        return self._inner().__await__()

    def send(self, value: Any) -> Any:
        return self._inner().send(value)

    def throw(self, *args: Any) -> Any:
        return self._inner().throw(*args)

    def close(self) -> None:
        if self._coro is not None:
            self._coro.close()

    def __repr__(self) -> str:
        return f"<pending tool call {self._label}: write `await` before it for its result>"

    def _not_awaited(self, *args: Any, **kwargs: Any) -> Any:
        raise ToolError(f"{self._label} was called in async code (a cell that uses await, or an async function), "
                        f"where tool functions return coroutines: write `await {self._label}` for its result",
                        "not_awaited")

    __str__ = __len__ = __iter__ = __getitem__ = __contains__ = __bool__ = __int__ = __float__ = _not_awaited

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return self._not_awaited()

    def __del__(self) -> None:
        if self._coro is None:
            try:
                sys.stderr.write(f"mcp_tools: {self._label} was never awaited, so the call was not made "
                                 f"(write `await {self._label}`)\n")
            except Exception:  # noqa: BLE001 - at interpreter exit
                pass


def call(server: str, tool: str, arguments: dict[str, Any] | None = None) -> Any:
    """Call `tool` of `server` by its exact name. Returns the result; in async code (an
    event loop runs in this thread) a PendingCall: `await` it."""
    request = {"op": "call", "server": server, "tool": tool, "arguments": arguments or {}}
    if _in_async_code():
        return PendingCall(f"{python_name(server)}.{python_name(tool)}(...)", request)
    return _exchange(request)


# --- the catalog and the generated functions ------------------------------------------

_catalog: dict[str, Any] | None = None
_namespaces: dict[str, Server] = {}


def _load() -> dict[str, Any]:
    """{server: [{"name", "description", "input_schema"}, ...]} for the servers this sandbox
    may call (asked once per process)."""
    global _catalog
    if _catalog is None:
        catalog = _exchange({"op": "list"})
        _catalog = catalog if isinstance(catalog, dict) else {}
    return _catalog


def servers() -> list[str]:
    """The upstream servers this sandbox may call."""
    return sorted(_load())


_JSON_TYPES = {
    "string": str, "integer": int, "number": (int, float), "boolean": bool, "array": list, "object": dict,
    "null": type(None),
}


def _type_name(schema: Any) -> str:
    if not isinstance(schema, dict):
        return "Any"
    kind = schema.get("type")
    if isinstance(kind, list):
        return " | ".join(_type_name({**schema, "type": k}) for k in kind)
    if "enum" in schema and isinstance(schema["enum"], list):
        return " | ".join(json.dumps(v) for v in schema["enum"][:6]) + (" | ..." if len(schema["enum"]) > 6 else "")
    if kind == "array":
        return f"list[{_type_name(schema.get('items'))}]"
    return {"string": "str", "integer": "int", "number": "float", "boolean": "bool", "object": "dict", "null": "None"}.get(
        str(kind), "Any"
    )


def _py_type(schema: Any) -> Any:
    """The Python type a schema describes, for signatures (str, list[dict], Literal[...])."""
    import typing

    if not isinstance(schema, dict):
        return typing.Any
    kind = schema.get("type")
    if isinstance(schema.get("enum"), list) and schema["enum"] and all(
        isinstance(v, (str, int, bool)) for v in schema["enum"]
    ):
        return typing.Literal[tuple(schema["enum"])]
    if isinstance(kind, list) and kind:
        return typing.Union[tuple(_py_type({**schema, "type": k}) for k in kind)]  # noqa: UP007
    if kind == "array":
        return list[_py_type(schema.get("items"))]  # type: ignore[misc]
    simple = {"string": str, "integer": int, "number": float, "boolean": bool, "object": dict, "null": type(None)}
    return simple.get(str(kind), typing.Any)


def _problems(schema: Any, value: Any, where: str) -> list[str]:
    """What is wrong with `value` against the common part of JSON Schema (type, enum,
    const, required, properties, additionalProperties, items, bounds, pattern). Keywords
    it does not know are left to the tool."""
    if not isinstance(schema, dict):
        return []
    found: list[str] = []
    kind = schema.get("type")
    if kind is not None:
        kinds = kind if isinstance(kind, list) else [kind]
        ok = False
        for k in kinds:
            t: Any = _JSON_TYPES.get(k) if isinstance(k, str) else None
            if t is None or (isinstance(value, t) and not (isinstance(value, bool) and k in ("integer", "number"))):
                ok = True
            if k == "number" and isinstance(value, float) and value != value:
                ok = False
        if not ok:
            return [f"{where}: expected {_type_name(schema)}, got {type(value).__name__}"]
    if isinstance(schema.get("enum"), list) and value not in schema["enum"]:
        found.append(f"{where}: must be one of {json.dumps(schema['enum'])[:200]}")
    if "const" in schema and value != schema["const"]:
        found.append(f"{where}: must be {json.dumps(schema['const'])[:100]}")
    if isinstance(value, dict):
        props: dict[str, Any] = schema["properties"] if isinstance(schema.get("properties"), dict) else {}
        for name in schema.get("required") or []:
            if name not in value:
                found.append(f"{where}: missing required {name!r}")
        for name, item in value.items():
            if name in props:
                found += _problems(props[name], item, f"{where}.{name}")
            elif schema.get("additionalProperties") is False:
                found.append(f"{where}: unexpected {name!r} (known: {', '.join(props) or 'none'})")
            elif isinstance(schema.get("additionalProperties"), dict):
                found += _problems(schema["additionalProperties"], item, f"{where}.{name}")
    if isinstance(value, list):
        for i, item in enumerate(value):
            found += _problems(schema.get("items"), item, f"{where}[{i}]")
        if isinstance(schema.get("minItems"), int) and len(value) < schema["minItems"]:
            found.append(f"{where}: at least {schema['minItems']} items")
        if isinstance(schema.get("maxItems"), int) and len(value) > schema["maxItems"]:
            found.append(f"{where}: at most {schema['maxItems']} items")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(schema.get("minimum"), (int, float)) and value < schema["minimum"]:
            found.append(f"{where}: at least {schema['minimum']}")
        if isinstance(schema.get("maximum"), (int, float)) and value > schema["maximum"]:
            found.append(f"{where}: at most {schema['maximum']}")
    if isinstance(value, str):
        if isinstance(schema.get("minLength"), int) and len(value) < schema["minLength"]:
            found.append(f"{where}: at least {schema['minLength']} characters")
        if isinstance(schema.get("maxLength"), int) and len(value) > schema["maxLength"]:
            found.append(f"{where}: at most {schema['maxLength']} characters")
        if isinstance(schema.get("pattern"), str):
            try:
                if re.search(schema["pattern"], value) is None:
                    found.append(f"{where}: does not match {schema['pattern']!r}")
            except re.error:
                pass
    return found


def python_name(name: str) -> str:
    """A tool's name as a Python attribute: other characters become _, keywords get a _."""
    ident = re.sub(r"\W", "_", name)
    if not ident or ident[0].isdigit():
        ident = "_" + ident
    return ident + "_" if keyword.iskeyword(ident) else ident


def _make_function(server: str, spec: dict[str, Any]) -> Any:
    import inspect

    tool = str(spec.get("name", ""))
    schema: dict[str, Any] = spec["input_schema"] if isinstance(spec.get("input_schema"), dict) else {}
    props: dict[str, Any] = schema["properties"] if isinstance(schema.get("properties"), dict) else {}
    required = [n for n in (schema.get("required") or []) if n in props]
    params, extra = [], False
    for name in required + [n for n in props if n not in required]:
        if not name.isidentifier() or keyword.iskeyword(name):
            extra = True  # reachable only as **{"that-name": ...}
            continue
        kind = inspect.Parameter.POSITIONAL_OR_KEYWORD if name in required else inspect.Parameter.KEYWORD_ONLY
        default = inspect.Parameter.empty if name in required else None
        params.append(inspect.Parameter(name, kind, default=default, annotation=_py_type(props[name])))
    if extra:
        params.append(inspect.Parameter("arguments", inspect.Parameter.VAR_KEYWORD))
    signature = inspect.Signature(params)

    def function(*args: Any, **kwargs: Any) -> Any:
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise ToolError(f"{exc}; signature: {tool}{signature}", "invalid_arguments", server, tool) from None
        arguments: dict[str, Any] = {}
        for name, value in bound.arguments.items():
            if name == "arguments" and signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                arguments.update(value)
            elif not (value is None and name not in required):  # an omitted optional stays omitted
                arguments[name] = value
        problems = _problems(schema, arguments, "arguments")
        if problems:
            raise ToolError("; ".join(problems[:10]), "invalid_arguments", server, tool)
        return call(server, tool, arguments)

    lines = [str(spec.get("description") or "").strip() or f"The {tool} tool of {server}."]
    if props:
        lines.append("\nParameters:")
        for name in required + [n for n in props if n not in required]:
            p = props[name] if isinstance(props[name], dict) else {}
            what = str(p.get("description") or "").strip()
            lines.append(f"  {name} ({_type_name(p)}{'' if name in required else ', optional'}){': ' + what if what else ''}")
    lines.append(f"\nCalls {server}.{tool} through the sandbox's tool channel. Raises mcp_tools.ToolError on failure.")
    function.__name__ = python_name(tool)
    function.__qualname__ = f"{server}.{function.__name__}"
    function.__doc__ = "\n".join(lines)
    function.__signature__ = signature  # type: ignore[attr-defined]
    function.tool_name = tool  # type: ignore[attr-defined]
    return function


class Server:
    """The tools of one upstream server, as functions (see help() of each)."""

    def __init__(self, name: str, tools: list[dict[str, Any]]) -> None:
        self.__name__ = name
        self._functions: dict[str, Any] = {}
        for spec in tools:
            if isinstance(spec, dict) and isinstance(spec.get("name"), str):
                attr = python_name(spec["name"])
                while attr in self._functions or attr.startswith("__"):
                    attr += "_"
                self._functions[attr] = _make_function(name, spec)

    def __getattr__(self, attr: str) -> Any:
        try:
            return self.__dict__["_functions"][attr]
        except KeyError:
            known = ", ".join(sorted(self.__dict__.get("_functions", {}))) or "none"
            raise AttributeError(f"server {self.__name__!r} has no tool {attr!r} (its tools: {known})") from None

    def __dir__(self) -> list[str]:
        return sorted(self._functions)

    def __repr__(self) -> str:
        import inspect

        rows = [f"  {a}{inspect.signature(f)}".replace("typing.", "") for a, f in sorted(self._functions.items())]
        return f"<MCP server {self.__name__!r}: {len(rows)} tools>\n" + "\n".join(rows)

    def call(self, tool: str, arguments: dict[str, Any] | None = None) -> Any:
        """Call a tool by its exact name (unchecked here; the server checks)."""
        return call(self.__name__, tool, arguments)


def __getattr__(name: str) -> Server:
    if name.startswith("__"):
        raise AttributeError(name)
    if name not in _namespaces:
        catalog = _load()
        if name not in catalog:
            raise AttributeError(f"no MCP server {name!r} here (servers: {', '.join(sorted(catalog)) or 'none'})")
        _namespaces[name] = Server(name, catalog[name])
    return _namespaces[name]


def __dir__() -> list[str]:
    try:
        return sorted(set(globals()) | set(_load()))
    except ToolError:
        return sorted(globals())


# --- mcp-tool -------------------------------------------------------------------------

_USAGE = """usage: mcp-tool SERVER TOOL [JSON-ARGUMENTS | -]   call a tool ('-': arguments from stdin)
       mcp-tool SERVER                              list a server's tools
       mcp-tool --list                              list every server's tools
Prints the result (text as is, anything else as JSON). Exit status 1 on a tool error."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if not argv or argv[0] in ("-h", "--help"):
            print(_USAGE, file=sys.stderr if not argv else sys.stdout)
            return 0 if argv else 2
        if argv[0] == "--list" or len(argv) == 1:
            for name in servers() if argv[0] == "--list" else [argv[0]]:
                print(repr(__getattr__(name)))
            return 0
        if len(argv) > 3:
            print(_USAGE, file=sys.stderr)
            return 2
        text = (sys.stdin.read() if argv[2] == "-" else argv[2]) if len(argv) == 3 else "{}"
        try:
            arguments = json.loads(text)
        except ValueError as exc:
            print(f"mcp-tool: the arguments are not JSON ({exc})", file=sys.stderr)
            return 2
        if not isinstance(arguments, dict):
            print("mcp-tool: the arguments must be a JSON object", file=sys.stderr)
            return 2
        result = _exchange({"op": "call", "server": argv[0], "tool": argv[1], "arguments": arguments})
    except ToolError as exc:
        print(f"mcp-tool: {exc}", file=sys.stderr)
        return 1
    except AttributeError as exc:
        print(f"mcp-tool: {exc}", file=sys.stderr)
        return 2
    if isinstance(result, Image):
        sys.stdout.buffer.write(result.data)
    elif isinstance(result, str):
        print(result)
    else:
        print(json.dumps(result, ensure_ascii=False, default=repr))
    return 0


if __name__ == "__main__":
    sys.exit(main())
