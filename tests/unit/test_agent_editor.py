"""Unit tests of the in-sandbox editor (stdlib + pytest only; no Docker needed).

The editor is loaded from its file, not through the package, because it must stand
alone inside the sandbox: these tests would catch an accidental package import.
"""

from __future__ import annotations

import base64
import importlib.util
import os
import stat
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "standalone_editor", Path(__file__).resolve().parents[2] / "src/mcp_codeexec/agent/editor.py"
)
editor_mod = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(editor_mod)
Editor, EditorError = editor_mod.Editor, editor_mod.EditorError

VIEW = "text_editor_code_execution_view_result"
REPLACE = "text_editor_code_execution_str_replace_result"
CREATE = "text_editor_code_execution_create_result"
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(20)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    ws = tmp_path / "workspace"
    ws.mkdir()
    return ws


@pytest.fixture
def ed(root: Path) -> Editor:
    return Editor(str(root), str(root))


def error(fn, *args) -> EditorError:
    with pytest.raises(EditorError) as info:
        fn(*args)
    return info.value


# ----- str_replace -------------------------------------------------------------------


def test_docs_example(ed: Editor, root: Path) -> None:
    (root / "config.json").write_bytes(b'{\n  "setting": "value",\n  "debug": true\n}\n')
    result = ed.str_replace("config.json", '"debug": true', '"debug": false')
    assert result == {
        "type": REPLACE,
        "old_start": 3,
        "old_lines": 1,
        "new_start": 3,
        "new_lines": 1,
        "lines": ['-  "debug": true', '+  "debug": false'],
    }
    assert (root / "config.json").read_bytes() == b'{\n  "setting": "value",\n  "debug": false\n}\n'


def test_docs_example_view(ed: Editor, root: Path) -> None:
    text = '{\n  "setting": "value",\n  "debug": true\n}\n'
    (root / "config.json").write_text(text)
    assert ed.view("config.json") == {
        "type": VIEW, "file_type": "text", "content": text, "num_lines": 4, "start_line": 1, "total_lines": 4,
    }


def test_tabs_stay_tabs(ed: Editor, root: Path) -> None:
    raw = b"def f():\n\tif x:\n\t\treturn 1\n\treturn 2\n"
    (root / "t.py").write_bytes(raw)
    result = ed.str_replace("t.py", "return 1", "return 10")
    assert result["lines"] == ["-\t\treturn 1", "+\t\treturn 10"]
    assert (root / "t.py").read_bytes() == raw.replace(b"return 1\n", b"return 10\n")


def test_crlf_literal(ed: Editor, root: Path) -> None:
    raw = b"one\r\ntwo\r\nthree\r\n"
    (root / "w.txt").write_bytes(raw)
    result = ed.str_replace("w.txt", "two\r\nthree", "2\r\n3")
    assert (result["old_start"], result["old_lines"], result["new_lines"]) == (2, 2, 2)
    assert result["lines"] == ["-two", "-three", "+2", "+3"]
    assert (root / "w.txt").read_bytes() == b"one\r\n2\r\n3\r\n"


def test_crlf_retry_with_lf_old_str(ed: Editor, root: Path) -> None:
    (root / "w.txt").write_bytes(b"one\r\ntwo\r\nthree\r\n")
    result = ed.str_replace("w.txt", "one\ntwo", "uno\ndos\nextra")
    assert result == {
        "type": REPLACE, "old_start": 1, "old_lines": 2, "new_start": 1, "new_lines": 3,
        "lines": ["-one", "-two", "+uno", "+dos", "+extra"],
    }
    assert (root / "w.txt").read_bytes() == b"uno\r\ndos\r\nextra\r\nthree\r\n"


def test_crlf_single_line_edit_keeps_crlf(ed: Editor, root: Path) -> None:
    (root / "w.txt").write_bytes(b"a\r\nb\r\n")
    ed.str_replace("w.txt", "b", "c")
    assert (root / "w.txt").read_bytes() == b"a\r\nc\r\n"


def test_no_final_newline_stays_missing(ed: Editor, root: Path) -> None:
    (root / "n.txt").write_bytes(b"a\nb\nlast")
    result = ed.str_replace("n.txt", "last", "final")
    assert (result["old_start"], result["old_lines"], result["lines"]) == (3, 1, ["-last", "+final"])
    assert (root / "n.txt").read_bytes() == b"a\nb\nfinal"


def test_bom_preserved(ed: Editor, root: Path) -> None:
    raw = "\ufeffname,value\nx,1\n".encode("utf-8")
    (root / "b.csv").write_bytes(raw)
    ed.str_replace("b.csv", "x,1", "y,2")
    assert (root / "b.csv").read_bytes() == b"\xef\xbb\xbfname,value\ny,2\n"
    ed.str_replace("b.csv", "name", "key")  # match on the BOM's line
    assert (root / "b.csv").read_bytes() == b"\xef\xbb\xbfkey,value\ny,2\n"


def test_multiline_hunk_numbers(ed: Editor, root: Path) -> None:
    (root / "m.txt").write_text("l1\nl2\nl3\nl4\nl5\nl6\n")
    # The match starts mid-line 2 and ends mid-line 4: the hunk covers lines 2-4 whole.
    result = ed.str_replace("m.txt", "2\nl3\nl", "2\nNEW\nl")
    assert result == {
        "type": REPLACE, "old_start": 2, "old_lines": 3, "new_start": 2, "new_lines": 3,
        "lines": ["-l2", "-l3", "-l4", "+l2", "+NEW", "+l4"],
    }
    # Growing: one line becomes three.
    result = ed.str_replace("m.txt", "l5", "a\nb\nc")
    assert (result["old_start"], result["old_lines"], result["new_start"], result["new_lines"]) == (5, 1, 5, 3)
    assert (root / "m.txt").read_text() == "l1\nl2\nNEW\nl4\na\nb\nc\nl6\n"


def test_join_with_next_line_is_in_hunk(ed: Editor, root: Path) -> None:
    (root / "j.txt").write_text("a\nb\nc\n")
    result = ed.str_replace("j.txt", "b\n", "B")  # "B" now runs into "c"
    assert result["lines"] == ["-b", "-c", "+Bc"]
    assert (result["old_lines"], result["new_lines"]) == (2, 1)
    assert (root / "j.txt").read_text() == "a\nBc\n"


def test_delete_whole_lines(ed: Editor, root: Path) -> None:
    (root / "d.txt").write_text("keep1\ndrop1\ndrop2\nkeep2\n")
    result = ed.str_replace("d.txt", "drop1\ndrop2\n", "")
    # new_lines 0: new_start is the line before the change (unified-diff convention).
    assert result == {
        "type": REPLACE, "old_start": 2, "old_lines": 2, "new_start": 1, "new_lines": 0,
        "lines": ["-drop1", "-drop2"],
    }
    assert (root / "d.txt").read_text() == "keep1\nkeep2\n"


def test_delete_first_line(ed: Editor, root: Path) -> None:
    (root / "d.txt").write_text("first\nrest\n")
    result = ed.str_replace("d.txt", "first\n", "")
    assert (result["old_start"], result["old_lines"], result["new_start"], result["new_lines"]) == (1, 1, 0, 0)
    assert (root / "d.txt").read_text() == "rest\n"


def test_multiple_matches_lists_every_line(ed: Editor, root: Path) -> None:
    (root / "x.py").write_text("a\nfoo = 1\nb\nc\nd\ne\nfoo = 2\nf\nfoo = 3\n")
    before = (root / "x.py").read_bytes()
    err = error(ed.str_replace, "x.py", "foo", "bar")
    assert err.code == "invalid_tool_input"
    assert "3 times" in err.message and "lines 2, 7, 9" in err.message
    assert str(root / "x.py") in err.message
    assert (root / "x.py").read_bytes() == before


def test_overlapping_matches_are_ambiguous(ed: Editor, root: Path) -> None:
    (root / "o.txt").write_text("aaa\n")
    err = error(ed.str_replace, "o.txt", "aa", "b")
    assert err.code == "invalid_tool_input" and "2 times" in err.message and "line 1" in err.message


def test_not_found_codes(ed: Editor, root: Path) -> None:
    err = error(ed.str_replace, "missing.txt", "a", "b")
    assert err.code == "file_not_found" and "missing.txt" in err.message
    (root / "f.txt").write_text("hello\n")
    err = error(ed.str_replace, "f.txt", "absent", "b")
    assert err.code == "string_not_found" and str(root / "f.txt") in err.message
    assert error(ed.view, "nope/none.txt").code == "file_not_found"


def test_empty_old_str_is_invalid(ed: Editor, root: Path) -> None:
    (root / "f.txt").write_text("hello\n")
    assert error(ed.str_replace, "f.txt", "", "x").code == "invalid_tool_input"


def test_str_replace_binary_and_latin1_refused(ed: Editor, root: Path) -> None:
    (root / "bin").write_bytes(b"ab\x00cd")
    (root / "latin").write_bytes("caf\u00e9\n".encode("latin-1"))
    for name in ("bin", "latin"):
        err = error(ed.str_replace, name, "a", "b")
        assert err.code == "invalid_tool_input" and "UTF-8" in err.message


def test_str_replace_keeps_mode_bits(ed: Editor, root: Path) -> None:
    script = root / "run.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o750)
    ed.str_replace("run.sh", "hi", "there")
    assert stat.S_IMODE(script.stat().st_mode) == 0o750
    assert [p.name for p in root.iterdir()] == ["run.sh"]  # no temp file left behind


# ----- create ------------------------------------------------------------------------


def test_create_new_and_update(ed: Editor, root: Path) -> None:
    assert ed.create("new_file.txt", "Hello, World!") == {"type": CREATE, "is_file_update": False}
    assert (root / "new_file.txt").read_bytes() == b"Hello, World!"  # no newline added
    (root / "new_file.txt").chmod(0o600)
    assert ed.create("new_file.txt", "x\r\n\ty") == {"type": CREATE, "is_file_update": True}
    assert (root / "new_file.txt").read_bytes() == b"x\r\n\ty"
    assert stat.S_IMODE((root / "new_file.txt").stat().st_mode) == 0o600


def test_create_parents_empty_and_unicode(ed: Editor, root: Path) -> None:
    assert ed.create("a/b/c/empty.txt", None)["is_file_update"] is False
    assert (root / "a/b/c/empty.txt").read_bytes() == b""
    ed.create("données/résumé 📄.md", "naïve\n")
    assert (root / "données/résumé 📄.md").read_bytes() == "naïve\n".encode()
    assert ed.view("données/résumé 📄.md")["content"] == "naïve\n"


def test_create_over_directory_refused(ed: Editor, root: Path) -> None:
    (root / "dir").mkdir()
    assert error(ed.create, "dir", "x").code == "invalid_tool_input"
    assert error(ed.create, str(root), "x").code == "invalid_tool_input"
    (root / "file").write_text("")
    assert error(ed.create, "file/child.txt", "x").code == "invalid_tool_input"


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_create_new_file_mode_follows_umask(root: Path, umask: int, mode: int) -> None:
    old = os.umask(umask)
    try:
        ed = Editor(str(root), str(root))  # the process's umask when the editor starts
        ed.create("m.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((root / "m.txt").stat().st_mode) == mode


# ----- view --------------------------------------------------------------------------


def test_view_empty_file(ed: Editor, root: Path) -> None:
    (root / "e.txt").write_bytes(b"")
    assert ed.view("e.txt") == {
        "type": VIEW, "file_type": "text", "content": "", "num_lines": 0, "start_line": 1, "total_lines": 0,
    }


def test_view_without_final_newline(ed: Editor, root: Path) -> None:
    (root / "n.txt").write_bytes(b"a\nb")
    result = ed.view("n.txt")
    assert (result["content"], result["num_lines"], result["total_lines"]) == ("a\nb", 2, 2)


def test_view_keeps_tabs_and_crlf(ed: Editor, root: Path) -> None:
    (root / "c.txt").write_bytes(b"\tx\r\ny\r\n")
    assert ed.view(str(root / "c.txt"))["content"] == "\tx\r\ny\r\n"


def test_view_range(ed: Editor, root: Path) -> None:
    (root / "r.txt").write_bytes(b"1\r\n2\n3\n4\n5")
    result = ed.view("r.txt", [2, 3])
    assert result == {
        "type": VIEW, "file_type": "text", "content": "2\n3\n", "num_lines": 2, "start_line": 2, "total_lines": 5,
    }
    result = ed.view("r.txt", [4, -1])
    assert (result["content"], result["num_lines"], result["start_line"]) == ("4\n5", 2, 4)
    assert ed.view("r.txt", [1, 1])["content"] == "1\r\n"
    for bad in ([0, 2], [6, -1], [3, 2], [2, 6], [1], "1-2", [1.0, 2], [True, 2]):
        err = error(ed.view, "r.txt", bad)
        assert err.code == "invalid_tool_input", bad


def test_view_range_reaches_into_big_file(root: Path) -> None:
    ed = Editor(str(root), str(root), max_view_bytes=64)
    (root / "big.txt").write_text("".join(f"line {i}\n" for i in range(100)))
    err = error(ed.view, "big.txt")
    assert err.code == "invalid_tool_input" and "view_range" in err.message
    assert ed.view("big.txt", [10, 11])["content"] == "line 9\nline 10\n"


def test_view_directory_listing(ed: Editor, root: Path) -> None:
    (root / "src/pkg/deep").mkdir(parents=True)
    (root / "src/pkg/deep/too_deep.py").write_text("")
    (root / "src/main.py").write_text("")
    (root / ".hidden").mkdir()
    (root / ".hidden/secret").write_text("")
    (root / ".env").write_text("")
    (root / "b.txt").write_text("")
    (root / "a.txt").write_text("")
    result = ed.view(".")
    assert result["content"] == "a.txt\nb.txt\nsrc/\nsrc/main.py\nsrc/pkg/\n"
    assert (result["file_type"], result["num_lines"], result["total_lines"], result["start_line"]) == ("text", 5, 5, 1)


def test_view_directory_listing_capped(ed: Editor, root: Path) -> None:
    (root / "many").mkdir()
    for i in range(1005):
        (root / "many" / f"f{i:04d}").write_text("")
    lines = ed.view("many")["content"].splitlines()
    assert len(lines) == 1001 and lines[0] == "f0000" and lines[999] == "f0999"
    assert "5 more entries" in lines[-1]


def test_view_png_and_pdf(ed: Editor, root: Path) -> None:
    (root / "pic.dat").write_bytes(PNG)  # detected by content, not extension
    pdf = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n%%EOF\n"
    (root / "doc.pdf").write_bytes(pdf)
    assert ed.view("pic.dat") == {"type": VIEW, "file_type": "image", "content": base64.b64encode(PNG).decode()}
    assert ed.view("doc.pdf") == {"type": VIEW, "file_type": "pdf", "content": base64.b64encode(pdf).decode()}
    (root / "a.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(16))
    (root / "a.gif").write_bytes(b"GIF89a" + bytes(16))
    (root / "a.webp").write_bytes(b"RIFF\x10\x00\x00\x00WEBPVP8 " + bytes(8))
    for name in ("a.jpg", "a.gif", "a.webp"):
        assert ed.view(name)["file_type"] == "image", name
    (root / "fake.png").write_text("not really an image\n")
    assert ed.view("fake.png")["file_type"] == "text"


def test_view_binary_refused(ed: Editor, root: Path) -> None:
    (root / "blob.bin").write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(100))
    err = error(ed.view, "blob.bin")
    assert err.code == "invalid_tool_input"
    assert "108 bytes" in err.message and "xxd" in err.message
    (root / "latin.txt").write_bytes("na\u00efve\n".encode("latin-1"))
    err = error(ed.view, "latin.txt")
    assert err.code == "invalid_tool_input" and "UTF-8" in err.message and "offset 2" in err.message


def test_view_fifo_refused_without_hanging(ed: Editor, root: Path) -> None:
    os.mkfifo(root / "pipe")
    assert error(ed.view, "pipe").code == "invalid_tool_input"


# ----- paths -------------------------------------------------------------------------


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    out = tmp_path / "outside"
    out.mkdir()
    (out / "secret.txt").write_text("secret\n")
    return out


def test_path_escapes_refused(ed: Editor, root: Path, outside: Path) -> None:
    (root / "link_file").symlink_to(outside / "secret.txt")
    (root / "link_dir").symlink_to(outside)
    (root / "dangling").symlink_to(outside / "not_yet.txt")
    cases = [
        "../outside/secret.txt",
        "sub/../../outside/secret.txt",
        "/etc/passwd",
        str(outside / "secret.txt"),
        "link_file",
        "link_dir/secret.txt",
        "link_dir",
        "dangling",
    ]
    for path in cases:
        for call in (lambda p: ed.view(p), lambda p: ed.create(p, "pwned"), lambda p: ed.str_replace(p, "secret", "pwned")):
            err = error(call, path)
            assert err.code == "invalid_tool_input", path
            assert "outside the workspace" in err.message, path
    assert (outside / "secret.txt").read_text() == "secret\n"
    assert not (outside / "not_yet.txt").exists()
    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]


def test_symlink_inside_root_is_followed(ed: Editor, root: Path) -> None:
    (root / "real.txt").write_text("v1\n")
    (root / "alias.txt").symlink_to("real.txt")
    assert ed.view("alias.txt")["content"] == "v1\n"
    ed.str_replace("alias.txt", "v1", "v2")
    assert (root / "alias.txt").is_symlink() and (root / "real.txt").read_text() == "v2\n"


def test_listing_does_not_follow_symlinked_dirs(ed: Editor, root: Path, outside: Path) -> None:
    (root / "link_dir").symlink_to(outside)
    assert ed.view(".")["content"] == "link_dir\n"


def test_bad_paths(ed: Editor) -> None:
    for path in ("", "   ", "a\x00b", "/etc\x00/passwd", None):
        err = error(ed.view, path)
        assert err.code == "invalid_tool_input", repr(path)
    assert error(ed.create, "x\x00y", "z").code == "invalid_tool_input"


def test_root_itself_is_inside(ed: Editor, root: Path) -> None:
    (root / "f").write_text("")
    assert ed.view(str(root))["content"] == "f\n"


def test_relative_paths_use_workdir(root: Path) -> None:
    (root / "proj").mkdir()
    ed = Editor(str(root), str(root / "proj"))
    ed.create("notes.md", "hi")
    assert (root / "proj/notes.md").read_text() == "hi"
    assert ed.view("../proj/notes.md")["content"] == "hi"


def test_checks_after_open_catch_a_swapped_path(
    ed: Editor, root: Path, outside: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Simulate a symlink swapped in after realpath() ran: realpath no longer resolves
    # anything, so only O_NOFOLLOW and the /proc/self/fd check stand in the way.
    (root / "link_file").symlink_to(outside / "secret.txt")
    (root / "link_dir").symlink_to(outside)
    monkeypatch.setattr(os.path, "realpath", os.path.normpath)
    for path in ("link_file", "link_dir/secret.txt"):
        for call in (lambda p: ed.view(p), lambda p: ed.create(p, "pwned"), lambda p: ed.str_replace(p, "secret", "pwned")):
            assert error(call, path).code == "invalid_tool_input", path
    assert error(ed.create, "link_dir/new.txt", "pwned").code == "invalid_tool_input"
    assert (outside / "secret.txt").read_text() == "secret\n"
    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]


def test_a_link_that_cannot_be_read_is_invalid_input_not_a_crash(
    ed: Editor, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In the sandbox, readlink of /proc/1/root (root's) fails with EACCES for the user, and
    realpath() lets that through: the call is the user's mistake, not an internal error.
    (Simulated here: this host's tests may run as root, which may read that link.)"""
    (root / "root-link").symlink_to("/proc/1/root")
    real_readlink = os.readlink

    def refuse(path: str | os.PathLike[str], *args: object, **kwargs: object) -> str:
        if os.fspath(path).endswith("root-link"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_readlink(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "readlink", refuse)
    for call in (lambda p: ed.view(p), lambda p: ed.create(p, "x"), lambda p: ed.str_replace(p, "a", "b")):
        err = error(call, "root-link/etc/passwd")
        assert err.code == "invalid_tool_input" and "cannot be resolved: Permission denied" in err.message, err.message
