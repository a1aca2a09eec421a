"""Files kept on the host: outputs that commands create (and, remotely, uploads).

Each file has an id in the API's style (`file_…`), belongs to one tenant, and is stored
as `<root>/<tenant>/<id>/content` with its metadata beside it in `meta.json`. Files are
kept after their container expires, until deleted or past the optional retention. Another
tenant's file id is indistinguishable from one that does not exist.
"""

from __future__ import annotations

import json
import mimetypes
import os
import re
import secrets
import shutil
import string
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

_ALPHABET = string.ascii_letters + string.digits
_ID = re.compile(r"file_[A-Za-z0-9]{24}")
_MAGIC = [
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"%PDF-", "application/pdf"),
]
IMAGE_TYPES = {"image/png", "image/jpeg", "image/gif", "image/webp"}
# Files a tenant may keep, unless configured: bounds the host disk in every mode, stdio too.
DEFAULT_MAX_STORED_BYTES = 1 << 30


def new_file_id() -> str:
    return "file_" + "".join(secrets.choice(_ALPHABET) for _ in range(24))


def sanitize_filename(name: str) -> str:
    """A safe single path component: no directories, no control characters, <= 255 bytes."""
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if ch.isprintable()).strip().lstrip(".")
    while len(name.encode()) > 255:
        name = name[:-1]
    return name or "file"


def sniff_mime(filename: str, head: bytes) -> str:
    for magic, mime in _MAGIC:
        if head.startswith(magic):
            return mime
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return mimetypes.guess_type(filename)[0] or "application/octet-stream"


@dataclass(frozen=True)
class FileMeta:
    id: str
    filename: str
    size_bytes: int
    mime_type: str
    created_at: str
    tenant: str
    container_id: str | None  # the container a command made it in; None for uploads
    path: str | None  # its path in that container

    @property
    def is_image(self) -> bool:
        return self.mime_type in IMAGE_TYPES


class StoreFull(Exception):
    """Keeping this file would take the tenant past its stored-bytes cap."""


class FileStore:
    """`cap(tenant)` is how many bytes of files a tenant may keep (outputs and uploads
    together, plus `elsewhere(tenant)`: bytes it keeps outside the store, its containers'
    checkpoint images); past it `add` raises StoreFull. File usage is counted once per
    tenant from disk, then kept up to date (one server process writes a data directory)."""

    def __init__(self, root: Path, retention: float | None = None, cap: Callable[[str], int] | None = None,
                 elsewhere: Callable[[str], int] | None = None) -> None:
        self.root = root
        self.retention = retention  # seconds; None keeps files until deleted
        self.cap = cap or (lambda tenant: DEFAULT_MAX_STORED_BYTES)
        self.elsewhere = elsewhere or (lambda tenant: 0)
        self._used: dict[str, int] = {}  # files' bytes per tenant
        self._lock = threading.Lock()  # add/delete run in worker threads

    def used(self, tenant: str) -> int:
        return self._files_used(tenant) + self.elsewhere(tenant)

    def _files_used(self, tenant: str) -> int:
        with self._lock:
            if tenant not in self._used:
                self._used[tenant] = sum(m.size_bytes for m in self.list(tenant))
            return self._used[tenant]

    def room(self, tenant: str) -> int:
        """Bytes the tenant may still store."""
        return max(0, self.cap(tenant) - self.used(tenant))

    def _dir(self, tenant: str, file_id: str) -> Path | None:
        return self.root / tenant / file_id if _ID.fullmatch(file_id) else None

    def add(self, tenant: str, filename: str, data: bytes, container_id: str | None = None, path: str | None = None) -> FileMeta:
        files, elsewhere = self._files_used(tenant), self.elsewhere(tenant)
        if files + elsewhere + len(data) > self.cap(tenant):
            raise StoreFull(
                f"keeping {len(data)} more bytes would exceed the {self.cap(tenant)}-byte cap on stored files "
                f"({files} bytes of files stored" + (f", {elsewhere} of saved sandbox memory" if elsewhere else "")
                + "); delete files to make room"
            )
        file_id = new_file_id()
        meta = FileMeta(
            id=file_id,
            filename=sanitize_filename(filename),
            size_bytes=len(data),
            mime_type=sniff_mime(filename, data[:16]),
            created_at=datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
            tenant=tenant,
            container_id=container_id,
            path=path,
        )
        final = self.root / tenant / file_id
        staging = self.root / tenant / f".{file_id}.partial"
        staging.mkdir(parents=True, exist_ok=False)
        (staging / "content").write_bytes(data)
        (staging / "meta.json").write_text(json.dumps(asdict(meta)))
        os.replace(staging, final)  # a file is there whole, or not at all
        with self._lock:
            self._used[tenant] = self._used.get(tenant, files) + len(data)
        return meta

    def get(self, tenant: str, file_id: str) -> FileMeta | None:
        directory = self._dir(tenant, file_id)
        try:
            return FileMeta(**json.loads((directory / "meta.json").read_text())) if directory else None
        except (OSError, ValueError, TypeError):
            return None

    def read(self, tenant: str, file_id: str) -> bytes | None:
        directory = self._dir(tenant, file_id)
        try:
            return (directory / "content").read_bytes() if directory else None
        except OSError:
            return None

    def list(self, tenant: str) -> list[FileMeta]:
        found = []
        base = self.root / tenant
        if base.is_dir():
            for entry in base.iterdir():
                meta = self.get(tenant, entry.name)
                if meta is not None:
                    found.append(meta)
        return sorted(found, key=lambda m: m.created_at, reverse=True)

    def delete(self, tenant: str, file_id: str) -> bool:
        directory = self._dir(tenant, file_id)
        if directory is None or not directory.is_dir():
            return False
        shutil.rmtree(directory)
        with self._lock:
            self._used.pop(tenant, None)  # counted again on next use
        return True

    def prune(self) -> int:
        """Delete files older than the retention; returns how many."""
        if self.retention is None or not self.root.is_dir():
            return 0
        cutoff = time.time() - self.retention
        removed = 0
        for tenant in self.root.iterdir():
            for entry in tenant.iterdir() if tenant.is_dir() else []:
                if _ID.fullmatch(entry.name) and entry.stat().st_mtime < cutoff:
                    shutil.rmtree(entry, ignore_errors=True)
                    removed += 1
                    with self._lock:
                        self._used.pop(tenant.name, None)
        return removed


UPLOADS_DIR = "uploads"


def upload_plan(specs: tuple[str, ...], workdir: str) -> list[tuple[Path, str, int | None]]:
    """(host file, path in the sandbox, mode) for each `PATH[:ro]` named at start; a
    directory brings its whole tree. Raises ValueError for a path that does not exist."""
    plan = []
    for spec in specs:
        read_only = spec.endswith(":ro")
        host = Path(spec[:-3] if read_only else spec).expanduser().resolve()
        if not host.exists():
            raise ValueError(f"upload {spec!r}: no such file or directory")
        mode = 0o444 if read_only else None
        target = f"{workdir}/{UPLOADS_DIR}/{sanitize_filename(host.name)}"
        if host.is_dir():
            for file in sorted(p for p in host.rglob("*") if p.is_file() and not p.is_symlink()):
                relative = "/".join(sanitize_filename(part) for part in file.relative_to(host).parts)
                plan.append((file, f"{target}/{relative}", mode))
        else:
            plan.append((host, target, mode))
    return plan


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "mcp-codeexec"
