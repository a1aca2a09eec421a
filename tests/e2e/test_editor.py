"""text_editor_code_execution end to end, with byte-level checks done from bash."""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import zlib

import anyio
import pytest

pytestmark = pytest.mark.anyio

CONFIG = '{\n  "setting": "value",\n  "debug": true\n}\n'


async def sha256_in_sandbox(sandbox, path: str) -> str:
    r = await sandbox.bash(f"sha256sum '{path}' | cut -d' ' -f1")
    return r["stdout"].strip()


async def test_docs_examples(sandbox):
    assert await sandbox.edit(command="create", path="config.json", file_text=CONFIG) == {
        "type": "text_editor_code_execution_create_result",
        "is_file_update": False,
    }
    assert await sandbox.edit(command="view", path="config.json") == {
        "type": "text_editor_code_execution_view_result",
        "file_type": "text",
        "content": CONFIG,
        "num_lines": 4,
        "start_line": 1,
        "total_lines": 4,
    }
    assert await sandbox.edit(command="str_replace", path="config.json", old_str='"debug": true', new_str='"debug": false') == {
        "type": "text_editor_code_execution_str_replace_result",
        "old_start": 3,
        "old_lines": 1,
        "new_start": 3,
        "new_lines": 1,
        "lines": ['-  "debug": true', '+  "debug": false'],
    }
    r = await sandbox.edit(command="create", path="config.json", file_text="{}")
    assert r["is_file_update"] is True
    assert (await sandbox.bash("cat /workspace/config.json"))["stdout"] == "{}"


async def test_byte_faithful_edit(sandbox):
    original = b"\xef\xbb\xbfline one\r\n\tindented\r\nk\xc3\xa9y = 1\r\nlast line without newline"
    encoded = base64.b64encode(original).decode()
    await sandbox.bash(f"echo {encoded} | base64 -d > faithful.txt")
    r = await sandbox.edit(command="str_replace", path="faithful.txt", old_str="kéy = 1", new_str="kéy = 2")
    assert r["old_start"] == 3 and r["lines"] == ["-kéy = 1", "+kéy = 2"]
    expected = original.replace("kéy = 1".encode(), "kéy = 2".encode())
    assert await sha256_in_sandbox(sandbox, "faithful.txt") == hashlib.sha256(expected).hexdigest()


async def test_multiline_replace_and_hunk(sandbox):
    await sandbox.edit(command="create", path="m.py", file_text="a\nb\nc\nd\n")
    r = await sandbox.edit(command="str_replace", path="m.py", old_str="b\nc", new_str="B\nX\nC")
    assert r["old_start"] == 2 and r["old_lines"] == 2 and r["new_start"] == 2 and r["new_lines"] == 3
    assert r["lines"] == ["-b", "-c", "+B", "+X", "+C"]


async def test_multiple_matches_name_every_line(sandbox):
    await sandbox.edit(command="create", path="dup.txt", file_text="x = 1\ny = 2\nx = 1\nz\nx = 1\n")
    r = await sandbox.edit(command="str_replace", path="dup.txt", old_str="x = 1", new_str="x = 9")
    assert r["error_code"] == "invalid_tool_input"
    assert "1, 3, 5" in r["error_message"]
    assert (await sandbox.bash("cat dup.txt"))["stdout"] == "x = 1\ny = 2\nx = 1\nz\nx = 1\n"


async def test_not_found_codes(sandbox):
    r = await sandbox.edit(command="view", path="missing.txt")
    assert r["error_code"] == "file_not_found" and "missing.txt" in r["error_message"]
    r = await sandbox.edit(command="str_replace", path="missing.txt", old_str="a", new_str="b")
    assert r["error_code"] == "file_not_found"
    await sandbox.edit(command="create", path="present.txt", file_text="hello\n")
    r = await sandbox.edit(command="str_replace", path="present.txt", old_str="absent", new_str="b")
    assert r["type"] == "text_editor_code_execution_tool_result_error" and r["error_code"] == "string_not_found"


async def test_view_range_and_directory(sandbox):
    await sandbox.edit(command="create", path="dir/sub/f.txt", file_text="1\n2\n3\n4\n5\n")
    r = await sandbox.edit(command="view", path="dir/sub/f.txt", view_range=[2, 3])
    assert (r["content"], r["num_lines"], r["start_line"], r["total_lines"]) == ("2\n3\n", 2, 2, 5)
    r = await sandbox.edit(command="view", path="dir")
    assert r["file_type"] == "text" and "sub/" in r["content"] and "f.txt" in r["content"]
    r = await sandbox.edit(command="view", path="dir/sub/f.txt", view_range=[4, 99])
    assert r["error_code"] == "invalid_tool_input"


def tiny_png() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0\xff\0\0")) + chunk(b"IEND", b"")


async def test_image_and_pdf_file_types(sandbox):
    png = tiny_png()
    await sandbox.bash(f"echo {base64.b64encode(png).decode()} | base64 -d > dot.png; printf '%%PDF-1.4\\n%%%%EOF\\n' > doc.pdf")
    r = await sandbox.edit(command="view", path="dot.png")
    assert r["file_type"] == "image" and base64.b64decode(r["content"]) == png
    r = await sandbox.edit(command="view", path="doc.pdf")
    assert r["file_type"] == "pdf" and base64.b64decode(r["content"]) == b"%PDF-1.4\n%%EOF\n"


async def test_binary_file_refused(sandbox):
    await sandbox.bash("head -c 4096 /dev/urandom > blob.bin; printf '\\0\\0' >> blob.bin")
    r = await sandbox.edit(command="view", path="blob.bin")
    assert r["error_code"] == "invalid_tool_input" and "binary" in r["error_message"].lower()


@pytest.mark.parametrize("path", ["../../etc/passwd", "/etc/passwd", "/proc/self/environ", "link-out/passwd", "link-file"])
async def test_paths_cannot_lead_out(sandbox, path):
    await sandbox.bash("ln -sfn /etc link-out; ln -sfn /etc/passwd link-file")
    for arguments in (
        {"command": "view", "path": path},
        {"command": "create", "path": path, "file_text": "pwned"},
        {"command": "str_replace", "path": path, "old_str": "root", "new_str": "toor"},
    ):
        r = await sandbox.edit(**arguments)
        assert r["error_code"] == "invalid_tool_input", (arguments, r)
    assert (await sandbox.bash("head -c 4 /etc/passwd"))["stdout"] == "root"


async def test_unicode_paths_and_large_file(sandbox):
    text = "ünïcødé ✓\n" * 200_000  # ~2.4 MB
    assert (await sandbox.edit(command="create", path="données/ファイル.txt", file_text=text))["is_file_update"] is False
    r = await sandbox.bash("wc -l 'données/ファイル.txt'")
    assert r["stdout"].startswith("200000 ")


@pytest.mark.parametrize(
    "arguments",
    [
        {"command": "view"},
        {"command": "delete", "path": "x"},
        {"command": "create", "path": 7, "file_text": "x"},
        {"command": "str_replace", "path": "x", "old_str": "a"},
        {"command": "view", "path": "x", "view_range": "1-2"},
        {"command": "view", "path": ""},
        {"command": "view", "path": "a\x00b"},
        {"path": "x"},
    ],
)
async def test_invalid_input(sandbox, arguments):
    r = await sandbox.call("text_editor_code_execution", arguments)
    assert r["error_code"] == "invalid_tool_input" and r["error_message"]


READER = """python3 - <<'EOF'
import collections, hashlib, json, os, time
seen, deadline = collections.Counter(), time.monotonic() + 4
while not os.path.exists("stop-reading") and time.monotonic() < deadline:
    with open("atomic.txt", "rb") as f:
        seen[hashlib.md5(f.read()).hexdigest()] += 1
print(json.dumps(seen))
EOF"""


async def test_a_concurrent_reader_never_sees_half_a_file(sandbox):
    """Editor writes replace the file atomically: a reader running alongside sees the old
    text or the new one, never a mix or a truncated file."""
    versions = ["A" * (2 << 20) + "\n", "B" * (2 << 20) + "\n"]
    digests = {hashlib.md5(v.encode()).hexdigest() for v in versions}
    await sandbox.edit(command="create", path="atomic.txt", file_text=versions[0])
    await sandbox.bash("rm -f stop-reading")
    seen: dict[str, int] = {}

    async def reader() -> None:
        # One process reading in a loop (a shell loop of md5sum would spawn thousands).
        r = await sandbox.bash(READER)
        assert r["return_code"] == 0, r
        seen.update(json.loads(r["stdout"]))

    async with anyio.create_task_group() as tg:
        tg.start_soon(reader)
        await anyio.sleep(0.5)
        for i in range(1, 21):
            r = await sandbox.edit(command="create", path="atomic.txt", file_text=versions[i % 2])
            assert r.get("is_file_update") is True, r
        await sandbox.bash("touch stop-reading")
    assert set(seen) == digests and sum(seen.values()) > 20, seen  # both versions seen, nothing else
