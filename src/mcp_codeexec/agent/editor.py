"""The `text_editor_code_execution` editor; runs inside the sandbox (standard library only).

Results are the Claude API wire objects, as plain dicts. The one invariant that shapes
everything here: bytes the caller did not ask to change are written back unchanged (tabs,
CRLF, a missing final newline, a UTF-8 BOM). So files are read as bytes and decoded by us,
never through universal-newline text mode, and only the matched span is ever replaced.

Lines are split on "\\n" only (a "\\r\\n" line is one line ending in "\\n"), like `wc -l`
and diff; a file "a\\nb\\n" and a file "a\\nb" both have 2 lines, "" has 0.
"""

from __future__ import annotations

import base64
import os
import secrets
import stat

_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC
_LISTING_CAP = 1000
_MAX_LISTED_LINES = 200  # of a multi-match error; more would bury the message

# (magic prefix, file_type); WebP ("RIFF....WEBP") is checked separately.
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "image"),
    (b"\xff\xd8\xff", "image"),
    (b"GIF87a", "image"),
    (b"GIF89a", "image"),
    (b"%PDF-", "pdf"),
)


class EditorError(Exception):
    """A failed command; `code` is the wire error_code, `message` the error_message."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def _invalid(message: str) -> EditorError:
    return EditorError("invalid_tool_input", message)


def _file_type(data: bytes) -> str:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image"
    for magic, kind in _MAGIC:
        if data.startswith(magic):
            return kind
    return "text"


def _split_lines(text: str) -> list[str]:
    """Lines with their terminators kept; a final line without "\\n" is still a line."""
    parts = text.split("\n")
    lines = [part + "\n" for part in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines


def _strip_eol(line: str) -> str:
    if line.endswith("\r\n"):
        return line[:-2]
    return line[:-1] if line.endswith("\n") else line


def _line_end(text: str, i: int) -> int:
    """Index just past the line containing position i (past its "\\n", or end of text)."""
    j = text.find("\n", i)
    return len(text) if j == -1 else j + 1


def _find_all(text: str, sub: str) -> list[int]:
    # Overlapping matches count too: "aa" in "aaa" is ambiguous, not unique.
    found, i = [], text.find(sub)
    while i != -1:
        found.append(i)
        i = text.find(sub, i + 1)
    return found


def _to_crlf(s: str) -> str:
    return s.replace("\r\n", "\n").replace("\n", "\r\n")


def _hunk(text: str, start: int, old: str, new: str) -> dict:
    """A no-context unified-diff hunk covering the whole lines the replacement touches."""
    end = start + len(old)
    line_start = text.rfind("\n", 0, start) + 1
    line_end = _line_end(text, end - 1)  # old is non-empty, so end - 1 >= start
    new_seg = text[line_start:start] + new + text[end:line_end]
    if new_seg and not new_seg.endswith("\n") and line_end < len(text):
        # The new text does not end its line, so the next old line joins onto it:
        # that line changed too and belongs in the hunk on both sides.
        line_end = _line_end(text, line_end)
        new_seg = text[line_start:start] + new + text[end:line_end]
    old_lines = _split_lines(text[line_start:line_end])
    new_lines = _split_lines(new_seg)
    old_start = text.count("\n", 0, line_start) + 1
    return {
        "type": "text_editor_code_execution_str_replace_result",
        "old_start": old_start,
        "old_lines": len(old_lines),
        # Unified-diff convention: an empty side starts at the line *before* the change
        # (0 when the change is at the top), as `diff -U0` prints "@@ -3,2 +2,0 @@".
        "new_start": old_start if new_lines else old_start - 1,
        "new_lines": len(new_lines),
        "lines": ["-" + _strip_eol(x) for x in old_lines] + ["+" + _strip_eol(x) for x in new_lines],
    }


def _process_umask() -> int:
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no /proc: read it the only other way (set and restore)
    os.umask(mask)
    return mask


def _read_all(fd: int, limit: int, shown: str) -> bytes:
    chunks, total = [], 0
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
        total += len(chunk)
        if total > limit:  # the file grew past the limit while we read it
            raise _invalid(f"{shown} is larger than {limit} bytes; inspect it with bash (e.g. head, sed -n, python)")
    return b"".join(chunks)


class Editor:
    """view / create / str_replace on files under `root`; relative paths resolve against `workdir`."""

    def __init__(
        self,
        root: str,
        workdir: str,
        *,
        max_view_bytes: int = 16 * 1024 * 1024,
        max_file_bytes: int = 64 * 1024 * 1024,
    ):
        self.root = os.path.realpath(root)
        self.workdir = workdir
        self.max_view_bytes = max_view_bytes
        self.max_file_bytes = max_file_bytes
        # Read once here: the agent calls the editor from worker threads, and umask is
        # process-wide, so it must not be toggled while commands may be spawning.
        self._umask = _process_umask()

    # ----- paths -------------------------------------------------------------------

    def _inside(self, real: str) -> bool:
        return real == self.root or real.startswith(self.root.rstrip(os.sep) + os.sep)

    def _resolve(self, path: object) -> tuple[str, str]:
        """(absolute path as the caller named it, for messages; its realpath, checked)."""
        if not isinstance(path, str) or not path.strip():
            raise _invalid("path must be a non-empty string")
        if "\x00" in path:
            raise _invalid("path must not contain NUL bytes")
        shown = os.path.normpath(os.path.join(self.workdir, path))
        try:
            real = os.path.realpath(shown)
            os.fsencode(real)
        except ValueError as e:  # e.g. lone surrogates that have no file-system bytes
            raise _invalid(f"path {path!r} is not a valid file name: {e}") from None
        except OSError as e:  # a link realpath may not read, e.g. one to /proc/1/root
            raise _invalid(f"path {shown} cannot be resolved: {e.strerror or e}") from None
        if not self._inside(real):
            via = f" (it resolves to {real})" if real != shown else ""
            raise _invalid(f"path {shown} is outside the workspace {self.root}{via}; the editor only works on files under it")
        return shown, real

    def _open(self, shown: str, real: str, flags: int) -> int:
        """Open without following a final symlink, then check what was really opened:
        realpath() ran before open(), and a component could have been swapped since."""
        fd = os.open(real, flags | _NOFOLLOW)
        try:
            where = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return fd  # no /proc: the realpath check stands alone
        if not self._inside(where):
            os.close(fd)
            raise _invalid(f"path {shown} is outside the workspace {self.root} (it resolves to {where})")
        return fd

    @staticmethod
    def _os_error(shown: str, e: OSError, missing_is_not_found: bool) -> EditorError:
        if missing_is_not_found and isinstance(e, FileNotFoundError):
            return EditorError("file_not_found", f"The path {shown} does not exist")
        return _invalid(f"{shown}: {e.strerror or e}")

    # ----- reading ------------------------------------------------------------------

    def _read_file(self, shown: str, fd: int, limit: int) -> bytes:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _invalid(f"{shown} is not a regular file")
        if st.st_size > limit:
            raise _invalid(f"{shown} is {st.st_size} bytes, over the editor's {limit}-byte limit; use bash (e.g. head, sed -n, python) to work with it")
        return _read_all(fd, limit, shown)

    @staticmethod
    def _decode(shown: str, data: bytes) -> str:
        # Strict UTF-8 or nothing: guessing an encoding and writing it back as UTF-8 would
        # rewrite bytes nobody asked to change.
        if data.startswith((b"\xff\xfe", b"\xfe\xff")):
            why = "it looks like UTF-16 text; convert it with iconv -f UTF-16 -t UTF-8"
        elif b"\x00" in data[:8192]:
            why = "it contains NUL bytes, so it is binary"
        else:
            try:
                return data.decode("utf-8")
            except UnicodeDecodeError as e:
                why = f"byte 0x{data[e.start]:02x} at offset {e.start} is not valid UTF-8; it is binary or in another encoding (e.g. Latin-1)"
        raise _invalid(
            f"{shown} is not a UTF-8 text file ({len(data)} bytes): {why}. "
            f"The editor handles UTF-8 text only; inspect it with bash, e.g. `xxd {shown} | head` or python"
        )

    def _listing(self, fd: int) -> str:
        """Entries up to 2 levels deep, sorted, hidden ones skipped, directories with "/".
        Walks by file descriptor and never follows symlinks, so it cannot list outside root."""
        entries: list[str] = []
        left_out = 0

        def walk(dir_fd: int, prefix: str, depth: int) -> None:
            nonlocal left_out
            with os.scandir(dir_fd) as it:
                items = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
            for entry in items:
                is_dir = entry.is_dir(follow_symlinks=False)
                if len(entries) < _LISTING_CAP:
                    entries.append(prefix + entry.name + ("/" if is_dir else ""))
                else:
                    left_out += 1
                if is_dir and depth < 2:
                    try:
                        sub = os.open(entry.name, os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW, dir_fd=dir_fd)
                    except OSError:
                        continue  # unreadable or swapped: list the name, skip its contents
                    try:
                        walk(sub, prefix + entry.name + "/", depth + 1)
                    finally:
                        os.close(sub)

        walk(fd, "", 1)
        if left_out:
            entries.append(f"... {left_out} more entries not shown (listing capped at {_LISTING_CAP}); use bash (ls, find) to see them")
        return "".join(e + "\n" for e in entries)

    def _text_view(self, shown: str, text: str, view_range: object) -> dict:
        lines = _split_lines(text)
        total = len(lines)
        start, end = 1, total
        if view_range is not None:
            if (
                not isinstance(view_range, (list, tuple))
                or len(view_range) != 2
                or not all(type(x) is int for x in view_range)
            ):
                raise _invalid("view_range must be two integers [start_line, end_line], 1-based and inclusive; end_line -1 means to the end of the file")
            start, end = view_range
            if not 1 <= start <= max(total, 1):
                raise _invalid(f"view_range start_line {start} is out of range: {shown} has {total} lines (lines are numbered from 1)")
            if end == -1:
                end = total
            elif not start <= end <= total:
                raise _invalid(f"view_range end_line {end} is out of range: it must be -1 or between start_line {start} and {total}, the number of lines in {shown}")
        content = "".join(lines[start - 1 : end])
        if view_range is not None and len(content.encode("utf-8")) > self.max_view_bytes:
            raise _invalid(f"lines {start}-{end} of {shown} exceed the {self.max_view_bytes}-byte view limit; ask for a narrower view_range")
        return {
            "type": "text_editor_code_execution_view_result",
            "file_type": "text",
            "content": content,
            "num_lines": end - start + 1 if total else 0,
            "start_line": start,
            "total_lines": total,
        }

    # ----- writing ------------------------------------------------------------------

    def _write(self, shown: str, real: str, data: bytes) -> bool:
        """Atomically replace `real` with `data` (temp file + rename in the same directory),
        keeping an existing file's mode bits. Returns whether the file existed."""
        parent, name = os.path.split(real)
        dir_fd = self._open(shown, parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                st = None
            if st is not None and stat.S_ISDIR(st.st_mode):
                raise _invalid(f"{shown} is a directory; give the path of a file")
            if st is not None and not stat.S_ISREG(st.st_mode):
                # A symlink here means it changed after realpath(); never write through it.
                raise _invalid(f"{shown} is not a regular file")
            mode = stat.S_IMODE(st.st_mode) if st else 0o666 & ~self._umask
            tmp = f".{secrets.token_hex(8)}.editor-tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o600, dir_fd=dir_fd)
            try:
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view) :]
                    os.fchmod(fd, mode)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            except BaseException:
                try:
                    os.unlink(tmp, dir_fd=dir_fd)
                except OSError:
                    pass
                raise
        finally:
            os.close(dir_fd)
        return st is not None

    def _too_big_to_view(self, shown: str) -> EditorError:
        return _invalid(
            f"{shown} is over the {self.max_view_bytes}-byte view limit; pass view_range "
            "[start_line, end_line] for part of a text file, or use bash (head, sed -n, grep, python)"
        )

    # ----- commands -----------------------------------------------------------------

    def view(self, path: str, view_range: list[int] | None = None) -> dict:
        shown, real = self._resolve(path)
        try:
            # O_NONBLOCK: opening a FIFO must not hang the agent (it is refused below).
            fd = self._open(shown, real, os.O_RDONLY | os.O_NONBLOCK)
            try:
                st = os.fstat(fd)
                if stat.S_ISDIR(st.st_mode):
                    return self._text_view(shown, self._listing(fd), view_range)
                if view_range is None and st.st_size > self.max_view_bytes:
                    raise self._too_big_to_view(shown)
                # A range may look into a file too big to view whole, up to max_file_bytes.
                data = self._read_file(shown, fd, self.max_file_bytes)
            finally:
                os.close(fd)
        except OSError as e:
            raise self._os_error(shown, e, True) from None
        if view_range is None and len(data) > self.max_view_bytes:  # it grew after fstat
            raise self._too_big_to_view(shown)
        kind = _file_type(data)
        if kind == "text":
            return self._text_view(shown, self._decode(shown, data), view_range)
        if view_range is not None:
            raise _invalid(f"view_range applies to text files only; {shown} is a {kind} file")
        return {
            "type": "text_editor_code_execution_view_result",
            "file_type": kind,
            "content": base64.b64encode(data).decode("ascii"),
        }

    def create(self, path: str, file_text: str | None) -> dict:
        if file_text is None:
            file_text = ""
        if not isinstance(file_text, str):
            raise _invalid("file_text must be a string")
        shown, real = self._resolve(path)
        if path.endswith(("/", os.sep)) or real == self.root:
            raise _invalid(f"{shown} names a directory; give the path of a file")
        try:
            data = file_text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise _invalid(f"file_text cannot be encoded as UTF-8: {e.reason} at index {e.start}") from None
        if len(data) > self.max_file_bytes:
            raise _invalid(f"file_text is {len(data)} bytes, over the {self.max_file_bytes}-byte limit; write large files with bash")
        try:
            os.makedirs(os.path.dirname(real), exist_ok=True)
            existed = self._write(shown, real, data)
        except (FileExistsError, NotADirectoryError):
            raise _invalid(f"cannot create {shown}: a parent of it exists and is not a directory") from None
        except OSError as e:
            raise self._os_error(shown, e, False) from None
        return {"type": "text_editor_code_execution_create_result", "is_file_update": existed}

    def str_replace(self, path: str, old_str: str, new_str: str) -> dict:
        if not isinstance(old_str, str) or not old_str:
            raise _invalid("old_str must be a non-empty string")
        if new_str is None:
            new_str = ""  # some clients omit it to mean "delete"
        if not isinstance(new_str, str):
            raise _invalid("new_str must be a string")
        shown, real = self._resolve(path)
        try:
            fd = self._open(shown, real, os.O_RDONLY | os.O_NONBLOCK)
            try:
                if stat.S_ISDIR(os.fstat(fd).st_mode):
                    raise _invalid(f"{shown} is a directory; str_replace needs a file")
                data = self._read_file(shown, fd, self.max_file_bytes)
            finally:
                os.close(fd)
        except OSError as e:
            raise self._os_error(shown, e, True) from None
        text = self._decode(shown, data)

        found = _find_all(text, old_str)
        if not found and "\r\n" in text and "\n" in old_str and "\r" not in old_str:
            # Models usually type "\n" line breaks even when the file uses CRLF. Retry with
            # both strings in CRLF so the edit lands and the file keeps its line endings;
            # literal matches always win, so an LF region of a mixed file still matches as is.
            old_str, new_str = _to_crlf(old_str), _to_crlf(new_str)
            found = _find_all(text, old_str)
        if not found:
            raise EditorError(
                "string_not_found",
                f"old_str was not found in {shown}; it must match the file exactly, including whitespace and indentation",
            )
        if len(found) > 1:
            numbers: list[int] = []
            line, prev = 1, 0
            for pos in found:
                line += text.count("\n", prev, pos)
                prev = pos
                if not numbers or numbers[-1] != line:
                    numbers.append(line)
            listed = ", ".join(map(str, numbers[:_MAX_LISTED_LINES]))
            if len(numbers) > _MAX_LISTED_LINES:
                listed += f" and {len(numbers) - _MAX_LISTED_LINES} more lines"
            where = "line" if len(numbers) == 1 else "lines"
            raise _invalid(f"old_str occurs {len(found)} times in {shown}, at {where} {listed}; include more context to make it unique")

        start = found[0]
        result = _hunk(text, start, old_str, new_str)
        if old_str != new_str:
            try:
                new_data = (text[:start] + new_str + text[start + len(old_str) :]).encode("utf-8")
            except UnicodeEncodeError as e:
                raise _invalid(f"new_str cannot be encoded as UTF-8: {e.reason}") from None
            if len(new_data) > self.max_file_bytes:
                raise _invalid(f"the edited file would exceed the {self.max_file_bytes}-byte limit")
            try:
                self._write(shown, real, new_data)
            except OSError as e:
                raise self._os_error(shown, e, False) from None
        return result

    # ----- raw transfer (the server copies output files out, uploads in) -------------

    def read_chunk(self, path: str, offset: int, length: int) -> tuple[bytes, int]:
        """Up to `length` bytes at `offset`, and the file's size."""
        shown, real = self._resolve(path)
        try:
            fd = self._open(shown, real, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as e:
            raise self._os_error(shown, e, True) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise _invalid(f"{shown} is not a regular file")
            return os.pread(fd, length, offset), st.st_size
        finally:
            os.close(fd)

    def write_chunk(self, path: str, data: bytes, offset: int, final: bool, mode: int | None) -> int:
        """Write `data` at `offset` (0 creates or truncates); parents are created. Not
        atomic across chunks: for uploads into a fresh container, not for edits."""
        shown, real = self._resolve(path)
        os.makedirs(os.path.dirname(real), exist_ok=True)
        shown, real = self._resolve(path)  # the directories may have been symlinks
        flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if offset == 0 else 0)
        try:
            fd = self._open(shown, real, flags)
        except OSError as e:
            raise self._os_error(shown, e, False) from None
        try:
            view = memoryview(data)
            position = offset
            while view:
                n = os.pwrite(fd, view, position)
                view, position = view[n:], position + n
            if final and mode is not None:
                os.fchmod(fd, mode)
            return os.fstat(fd).st_size
        finally:
            os.close(fd)
