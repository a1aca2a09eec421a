"""Files out (output file ids, downloads as resources, inline images) and in (uploads named
at start). Real server over stdio, real Docker, real gVisor."""

from __future__ import annotations

import base64
import hashlib
import json

import anyio
import pytest
from conftest import TENANT, connect
from mcp.shared.exceptions import MCPError
from mcp_types import INVALID_PARAMS
from strict import validate_result

from .test_editor import tiny_png

pytestmark = pytest.mark.anyio


async def read_file_resource(session, file_id: str) -> tuple[bytes, str]:
    contents = (await session.client.read_resource(f"codeexec://files/{file_id}")).contents[0]
    return base64.b64decode(contents.blob), contents.mime_type


async def test_output_image_comes_back_as_file_id_inline_and_resource(sandbox):
    png = tiny_png()
    result = await sandbox.client.call_tool(
        "bash_code_execution", {"command": f"mkdir -p out && echo {base64.b64encode(png).decode()} | base64 -d > out/chart.png"}
    )
    structured = result.structured_content
    validate_result("bash_code_execution", structured)
    assert [c["type"] for c in structured["content"]] == ["bash_code_execution_output"]
    file_id = structured["content"][0]["file_id"]
    assert file_id.startswith("file_")
    images = [c for c in result.content if c.type == "image"]
    assert len(images) == 1 and base64.b64decode(images[0].data) == png and images[0].mime_type == "image/png"
    data, mime = await read_file_resource(sandbox, file_id)
    assert hashlib.sha256(data).digest() == hashlib.sha256(png).digest() and mime == "image/png"
    listing = json.loads((await sandbox.client.read_resource("codeexec://files")).contents[0].text)["files"]
    meta = next(f for f in listing if f["id"] == file_id)
    assert meta["filename"] == "chart.png" and meta["size_bytes"] == len(png)
    assert meta["path"] == "/workspace/out/chart.png" and meta["container_id"] == result.meta["container"]["id"]


async def test_what_counts_as_output(sandbox):
    r = await sandbox.bash(
        "mkdir -p .hidden __pycache__ deep/er; echo a > kept.txt; echo b > .dot; echo c > .hidden/x; "
        "echo d > __pycache__/m.pyc; echo e > deep/er/new.csv; echo f > tmp.txt; rm tmp.txt; echo g > /tmp/outside"
    )
    assert len(r["content"]) == 2
    paths = set()
    for entry in r["content"]:
        meta = json.loads((await sandbox.client.read_resource("codeexec://files")).contents[0].text)
        paths |= {f["path"] for f in meta["files"] if f["id"] == entry["file_id"]}
    assert paths == {"/workspace/kept.txt", "/workspace/deep/er/new.csv"}
    # Reading does not count; rewriting does.
    assert (await sandbox.bash("cat kept.txt"))["content"] == []
    assert len((await sandbox.bash("echo again >> kept.txt"))["content"]) == 1


async def test_hostile_file_names(sandbox):
    r = await sandbox.bash("touch $'new\\nline.txt' 'ünï cødé ✓.txt' -- '-dash.txt' \"$(printf 'x%.0s' {1..250}).txt\"")
    assert r["return_code"] == 0 and len(r["content"]) == 4
    listing = json.loads((await sandbox.client.read_resource("codeexec://files")).contents[0].text)["files"]
    names = {f["filename"] for f in listing if f["id"] in {c["file_id"] for c in r["content"]}}
    assert "ünï cødé ✓.txt" in names and "-dash.txt" in names
    assert all("\n" not in n and "/" not in n and len(n.encode()) <= 255 for n in names)


async def test_many_small_files_are_capped(sandbox):
    r = await sandbox.bash("mkdir -p many && for i in $(seq 1 300); do echo $i > many/f$i.txt; done")
    assert len(r["content"]) == 50, r
    assert "250 more files were written" in r["stderr"]


async def test_big_output_file_is_not_registered_but_reported(sandbox):
    r = await sandbox.bash("head -c 100000000 /dev/zero > big.bin; echo done")
    assert r["stdout"] == "done\n" and r["content"] == []
    assert "big.bin (100000000 bytes) is over the" in r["stderr"]
    assert (await sandbox.bash("stat -c %s big.bin; rm big.bin"))["stdout"] == "100000000\n"


async def resource_error(session, uri: str) -> tuple[int, str]:
    with pytest.raises(MCPError) as caught:
        await session.client.read_resource(uri)
    return caught.value.code, caught.value.message


async def test_unknown_file_ids(sandbox):
    for bad in ("file_" + "Z" * 24, "../../etc/passwd", "nope", "file_" + "Z" * 24 + "/../x"):
        code, message = await resource_error(sandbox, f"codeexec://files/{bad}")
        assert code == INVALID_PARAMS and bad in message, (bad, message)
    code, message = await resource_error(sandbox, "codeexec://no-such-resource")
    assert code == INVALID_PARAMS and "codeexec://no-such-resource" in message


async def test_uploads_named_at_start(tmp_path, engine):
    (tmp_path / "data.csv").write_text("name,value\na,1\nb,2\nc,39\n")
    folder = tmp_path / "inputs"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "note.txt").write_text("hello")
    async with connect("--upload", str(tmp_path / "data.csv"), "--upload", f"{folder}:ro") as s:
        r = await s.bash("python3 -c \"import csv; print(sum(int(r['value']) for r in csv.DictReader(open('uploads/data.csv'))))\"")
        assert r["stdout"] == "42\n"
        assert (await s.bash("cat uploads/inputs/sub/note.txt"))["stdout"] == "hello"
        r = await s.bash("echo x > uploads/inputs/sub/note.txt")
        assert r["return_code"] != 0 and "Permission denied" in r["stderr"]
    assert (folder / "sub" / "note.txt").read_text() == "hello"  # the host's file is untouched


async def test_files_outlive_their_container_and_tenant_scoping(engine):
    async with connect("--lifetime", "4s", "--reap-interval", "1s") as a:
        r = await a.bash("echo keep-me > result.txt")
        file_id = r["content"][0]["file_id"]
        await anyio.sleep(5)
        assert (await a.bash("true"))["error_code"] == "container_expired"
        data, _ = await read_file_resource(a, file_id)
        assert data == b"keep-me\n"
    never = "file_" + "Q" * 24  # well-formed, never existed
    async with connect("--tenant", f"{TENANT}-other", "--no-prepare") as other:
        theirs = await resource_error(other, f"codeexec://files/{file_id}")
        unknown = await resource_error(other, f"codeexec://files/{never}")
        assert theirs[0] == unknown[0] == INVALID_PARAMS
        assert theirs[1] == unknown[1].replace(never, file_id)  # the same answer, but for the id asked about


async def test_inline_jpeg_gif_webp(sandbox):
    structured, result = await sandbox.call_full("bash_code_execution", {"command": (
        "mkdir -p pics && python3 -c \"from PIL import Image; im = Image.new('RGB', (8, 6), (200, 30, 10)); "
        "im.save('pics/a.jpg'); im.save('pics/b.gif'); im.save('pics/c.webp')\"")})
    assert structured["return_code"] == 0 and len(structured["content"]) == 3, structured
    inline = {block.mime_type: base64.b64decode(block.data) for block in result.content if block.type == "image"}
    assert set(inline) == {"image/jpeg", "image/gif", "image/webp"}
    for entry in structured["content"]:
        data, mime = await read_file_resource(sandbox, entry["file_id"])
        assert inline[mime] == data  # the same bytes inline and as the file


async def test_inline_image_limit_is_5_mib(sandbox):
    png = tiny_png()
    limit = 5 * 1024 * 1024
    # The same PNG padded to exactly the limit, and to one byte more.
    command = (
        f"echo {base64.b64encode(png).decode()} | base64 -d > at.png && cp at.png over.png && "
        f"truncate -s {limit} at.png && truncate -s {limit + 1} over.png"
    )
    structured, result = await sandbox.call_full("bash_code_execution", {"command": command})
    assert len(structured["content"]) == 2, structured
    images = [base64.b64decode(block.data) for block in result.content if block.type == "image"]
    assert [len(i) for i in images] == [limit]  # only the one at the limit comes inline
    sizes = {}
    for entry in structured["content"]:  # both are files, whatever their size
        data, mime = await read_file_resource(sandbox, entry["file_id"])
        sizes[len(data)] = mime
    assert sizes == {limit: "image/png", limit + 1: "image/png"}


async def test_files_moved_into_place_count(sandbox):
    r = await sandbox.bash("echo staged > .staging.tmp && mv .staging.tmp final.txt; echo x > /tmp/t && mv /tmp/t from-tmp.txt")
    paths = await output_paths(sandbox, r)
    assert paths == {"/workspace/final.txt", "/workspace/from-tmp.txt"}


async def test_dependency_trees_are_not_outputs(sandbox):
    r = await sandbox.bash(
        "mkdir -p node_modules/pkg site-packages/mod venv/lib proj/node_modules/x proj/venv/bin; "
        "echo a > node_modules/pkg/index.js; echo b > site-packages/mod/m.py; echo c > venv/lib/v.py; "
        "echo d > proj/node_modules/x/y.js; echo e > proj/venv/bin/activate; echo f > proj/real.txt"
    )
    assert await output_paths(sandbox, r) == {"/workspace/proj/real.txt"}


async def output_paths(session, result: dict) -> set[str]:
    listing = json.loads((await session.client.read_resource("codeexec://files")).contents[0].text)["files"]
    ids = {c["file_id"] for c in result["content"]}
    found = {f["path"] for f in listing if f["id"] in ids}
    assert len(found) == len(ids)
    return found


async def test_code_execution_outputs_and_inline_chart(engine):
    async with connect("--profile", "20260120", "--timeout", "60", "--memory", "1g") as s:
        code = (
            "import matplotlib.pyplot as plt\n"
            "plt.plot([1, 2, 3], [2, 4, 1]); plt.savefig('chart.png')\n"
            "open('table.csv', 'w').write('a,b\\n1,2\\n')\n"
        )
        structured, result = await s.call_full("code_execution", {"code": code})
        assert structured["type"] == "code_execution_result" and structured["return_code"] == 0, structured
        assert [c["type"] for c in structured["content"]] == ["code_execution_output"] * 2
        by_name = {}
        for entry in structured["content"]:
            data, mime = await read_file_resource(s, entry["file_id"])
            by_name[mime] = data
        assert by_name["text/csv"] == b"a,b\n1,2\n" and by_name["image/png"].startswith(b"\x89PNG")
        [chart] = [block for block in result.content if block.type == "image"]
        assert chart.mime_type == "image/png" and base64.b64decode(chart.data) == by_name["image/png"]
