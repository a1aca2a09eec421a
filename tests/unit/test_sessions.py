"""sessions.py: which container serves a call (session, named container, preset, uploads)."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from mcp_codeexec.errors import ContainerExpired
from mcp_codeexec.sessions import Sessions
from unit.conftest import local_settings, manager, workspace

pytestmark = pytest.mark.anyio


async def test_one_container_per_session_created_once(base: str, tmp_path: Path) -> None:
    s = local_settings(base)
    (tmp_path / "seed.txt").write_text("seed")
    async with manager(s) as m:
        sessions = Sessions(m, "me", uploads=[(tmp_path / "seed.txt", f"{s.workdir}/uploads/seed.txt", 0o644)])
        got: list[str] = []

        async def first_call() -> None:
            got.append((await sessions.sandbox("a")).info.id)

        async with anyio.create_task_group() as tg:  # concurrent first calls: one container
            for _ in range(3):
                tg.start_soon(first_call)
        assert len(set(got)) == 1
        assert (await sessions.sandbox("b")).info.id != got[0]
        assert (await sessions.sandbox("a")).info.id == got[0]
        seeded = workspace(s) / "uploads" / "seed.txt"
        assert seeded.read_text() == "seed" and seeded.stat().st_mode & 0o777 == 0o644
        # Another tenant's session of the same name is its own, and gets no uploads.
        other = await sessions.sandbox("a", tenant="guest")
        assert other.info.id != got[0] and other.tenant == "guest"
        assert len(await m.deployment.list("mcp-codeexec.")) == 3


async def test_a_named_container_and_a_preset(base: str) -> None:
    s = local_settings(base)
    async with manager(s) as m:
        made = await m.new("me")
        sessions = Sessions(m, "me", preset=made.info.id)
        assert (await sessions.sandbox("stdio")) is made  # the preset serves the session
        assert (await sessions.sandbox("x", requested=made.info.id)) is made
        with pytest.raises(ContainerExpired):  # a named container must be the caller's
            await sessions.sandbox("x", requested=made.info.id, tenant="guest")
        # The preset applies to the stdio tenant only: another tenant gets a new container.
        assert (await sessions.sandbox("stdio", tenant="guest")).info.id != made.info.id
