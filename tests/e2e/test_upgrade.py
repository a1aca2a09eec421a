"""A container made by an earlier version (agent exec'd as uid 1000 into `sleep infinity`)
is re-created in the current layout on its next use, with its workspace and files intact."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import anyio
import docker
import pytest
from conftest import IMAGE, TENANT, connect

pytestmark = pytest.mark.anyio


def legacy_container(api: docker.APIClient, container_id: str) -> str:
    """The way version 0.1.0 made a sandbox (without a disk quota), with a file in it."""
    name, volume = f"mcp-codeexec.{TENANT}.{container_id}", f"mcp-codeexec-ws.{container_id}"
    now = datetime.now(UTC).replace(microsecond=0)
    labels = {
        "org.mcp-codeexec.managed": "1",
        "org.mcp-codeexec.created_at": now.isoformat().replace("+00:00", "Z"),
        "org.mcp-codeexec.expires_at": (now + timedelta(days=1)).isoformat().replace("+00:00", "Z"),
    }
    api.create_volume(volume, labels=labels)
    host = api.create_host_config(
        runtime="runsc", network_mode="none", cap_drop=["ALL"], security_opt=["no-new-privileges"], read_only=True,
        init=True, binds={volume: {"bind": "/workspace", "mode": "rw"}},
        tmpfs={"/tmp": "rw,size=64m,mode=1777", "/home/sandbox": "rw,size=64m,uid=1000,gid=1000,mode=0755"},
    )
    api.create_container(IMAGE, command=["sh", "-c", "echo old > /workspace/old.txt; sleep infinity"], name=name,
                         user="1000:1000", working_dir="/workspace", labels={**labels, "org.mcp-codeexec.volume": volume},
                         host_config=host, network_disabled=True)
    api.start(name)
    return name


async def test_a_legacy_container_is_upgraded_with_its_files(engine: docker.APIClient) -> None:
    container_id = "container_" + "L" * 24
    name = legacy_container(engine, container_id)
    try:
        async with connect("--container", container_id, "--disk", "0", "--memory", "1g") as session:
            r = await session.bash("cat old.txt; id -u; echo new > new.txt")
            assert r["stdout"] == "old\n1000\n" and session.last_meta["container"]["id"] == container_id, r
        info = engine.inspect_container(name)
        assert info["Config"]["Labels"]["org.mcp-codeexec.layout"] == "2"
        assert info["Config"]["User"] == "0:0" and sorted(info["HostConfig"]["CapAdd"]) == ["KILL", "SETGID", "SETUID"]
        assert info["Config"]["Labels"]["org.mcp-codeexec.expires_at"].startswith(str(datetime.now(UTC).year))
    finally:
        engine.remove_container(name, force=True)
        engine.remove_volume(f"mcp-codeexec-ws.{container_id}", force=True)


async def test_a_server_with_other_settings_reloads_the_agent(engine: docker.APIClient) -> None:
    """Another server (here: another --memory, so another rlimit) on a running container
    reloads its agent: promptly (the old connections end), and the reloaded agent starts
    under the hard limit the first one set (raising it needs a capability it lacks)."""
    async with connect("--memory", "512m", "--no-prepare") as first:
        assert (await first.bash("echo first"))["stdout"] == "first\n"
        cid = first.last_meta["container"]["id"]
        async with connect("--memory", "1g", "--container", cid, "--no-prepare") as second:
            with anyio.fail_after(30):  # before the fix: ~90 s, then `unavailable`
                r = await second.bash("echo second; ulimit -v")
            assert r["stdout"] == f"second\n{512 * 1024}\n", r
        assert (await first.bash("echo again"))["stdout"] == "again\n"
