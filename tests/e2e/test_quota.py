"""The workspace disk quota works however the server runs: writing past `--disk 64m` fails
with ENOSPC inside that sandbox only, the workspace's root belongs to the sandbox user
(uid 1000), deleted files give their space back to the host, a lost loop device is
re-attached, and an expired sandbox's filesystem and loop device go with it; `doctor` says
which way the quota works. Three ways of running the real server over stdio, real Docker,
real gVisor:

- "root": the server runs as root and attaches loop devices itself (direct);
- "user": the server runs as a non-root user in the `docker` group (a Linux desktop
  user): the engine attaches them, in helper containers;
- "compose": the server runs the way deploy/compose.yaml runs it: in a container, as the
  non-root user `mcp` with the engine socket's group added, the socket mounted and its data
  directory (XDG_DATA_HOME=/data, so the quota directory too) on a named volume. The real
  compose image cannot be built here (`FROM python:3.11-slim-bookworm` needs a registry),
  so an image FROM the sandbox image (Debian bookworm's Python 3.11 and e2fsprogs, as
  python:3.11-slim-bookworm has) adds the same user, directory and environment as
  deploy/Dockerfile, and the project's code and its installed dependencies are mounted
  read-only instead of pip-installed. Nothing else of the host is mounted, and the
  container is not privileged: the quota has only the engine socket to work with.

The non-root servers run under Debian's /usr/bin/python3 (the test's own interpreter may
live where other users cannot read it), with this checkout and the test environment's
site-packages on PYTHONPATH.
"""

from __future__ import annotations

import contextlib
import grp
import io
import os
import pwd
import secrets
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta

import anyio
import docker
import pytest
from conftest import DATA_DIR, IMAGE, TENANT, Session, connect, remove_test_containers
from mcp.client import Client
from mcp.client.stdio import StdioServerParameters

import mcp_codeexec
from mcp_codeexec.config import Settings
from mcp_codeexec.deployment import docker as d
from mcp_codeexec.deployment import quota as q
from mcp_codeexec.deployment.base import SandboxSpec
from mcp_codeexec.deployment.docker import DockerDeployment
from mcp_codeexec.errors import BackendUnavailable
from mcp_codeexec.sandbox import ContainerInfo, sandbox_spec

pytestmark = pytest.mark.anyio

MiB = 1 << 20
USER = "mcpuser"
SOCKET = "/var/run/docker.sock"
SRC = os.path.dirname(os.path.dirname(os.path.abspath(mcp_codeexec.__file__)))
SITE = sysconfig.get_paths()["purelib"]
PYTHON = "/usr/bin/python3"  # Debian's, as in the sandbox image and python:3.11-slim-bookworm
COMPOSE_IMAGE = f"mcp-codeexec-compose-emulation:{TENANT}"
COMPOSE_DATA = f"mcp-codeexec-{TENANT}-server-data"
MODES = ("root", "user", "compose")
# Mirrors deploy/Dockerfile (its user, data directory and environment) on the sandbox image.
COMPOSE_DOCKERFILE = f"""FROM {IMAGE}
USER root
RUN useradd --system --home /data mcp && mkdir -p /data && chown mcp /data
ENV XDG_DATA_HOME=/data HOME=/data
USER mcp
"""


# Fill the workspace: write 1 MiB chunks until the filesystem says no.
FILL = r"""python3 - <<'EOF'
import errno
n = 0
try:
    with open("fill.bin", "wb") as f:
        while True:
            f.write(b"x" * (1 << 20)); f.flush(); n += 1
except OSError as e:
    print(n, errno.errorcode[e.errno])
EOF"""


def workspace_volume(engine: docker.APIClient, session: Session) -> dict:
    cid = session.last_meta["container"]["id"]
    name = engine.inspect_container(f"mcp-codeexec.{TENANT}.{cid}")["Config"]["Labels"]["org.mcp-codeexec.volume"]
    return engine.inspect_volume(name)


def run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def hosts(engine: docker.APIClient) -> Iterator[None]:
    """The non-root user (in the docker group, the socket group-accessible) and the
    compose emulation's image and data volume; all removed again afterwards."""
    assert os.geteuid() == 0, "these tests set up a user and run the server as root too"
    out = run(PYTHON, "-c", "import sys; print(sys.version_info[:2])")
    assert out.strip() == str(sys.version_info[:2]), f"{PYTHON} is {out}, the test environment {sys.version_info[:2]}"
    created = False
    try:
        pwd.getpwnam(USER)
    except KeyError:
        run("useradd", "--create-home", "--groups", "docker", USER)
        created = True
    assert USER in grp.getgrnam("docker").gr_mem, f"{USER} exists but is not in the docker group"
    st = os.stat(SOCKET)
    docker_gid = grp.getgrnam("docker").gr_gid
    if st.st_gid != docker_gid or not st.st_mode & 0o060 == 0o060:
        os.chown(SOCKET, -1, docker_gid)
        os.chmod(SOCKET, st.st_mode | 0o060)
    for chunk in engine.build(fileobj=io.BytesIO(COMPOSE_DOCKERFILE.encode()), tag=COMPOSE_IMAGE, rm=True,
                              network_mode="none", decode=True):
        assert "error" not in chunk, chunk
    engine.create_volume(COMPOSE_DATA)
    opened = searchable_for_others(SRC, SITE)  # a checkout under a 0700 directory (mktemp -d)
    try:
        yield
    finally:
        for directory, mode in opened:
            os.chmod(directory, mode)
        remove_test_containers(engine)  # their filesystems may be in the data volume
        for c in engine.containers(all=True, filters={"ancestor": COMPOSE_IMAGE}):
            engine.remove_container(c["Id"], force=True)
        engine.remove_volume(COMPOSE_DATA, force=True)
        # The compose emulation's image stays (a thin layer on the sandbox image, rebuilt
        # from cache next time): deleting it took the engine over two minutes in CI.
        if (st.st_gid, st.st_mode) != (os.stat(SOCKET).st_gid, os.stat(SOCKET).st_mode):
            os.chown(SOCKET, -1, st.st_gid)
            os.chmod(SOCKET, st.st_mode)
        if created:
            run("userdel", "--remove", USER)


def searchable_for_others(*paths: str) -> list[tuple[str, int]]:
    """Let other users pass through (o+x, not list) every directory above `paths` that
    keeps them out, so the non-root server can import this checkout; (directory, old mode)
    to put back."""
    opened = []
    for path in paths:
        directory = os.path.dirname(os.path.abspath(path))
        while directory != "/":
            mode = os.stat(directory).st_mode & 0o7777
            if not mode & 0o001 and (directory, mode) not in opened:
                os.chmod(directory, mode | 0o001)
                opened.append((directory, mode))
            directory = os.path.dirname(directory)
    return opened


def python(mode: str, *args: str, user: str = USER, home: str | None = None) -> StdioServerParameters:
    """Python with the project, run as `mode` says (and as `user` in mode "user")."""
    path = f"{SRC}:{SITE}"
    if mode == "root":
        return StdioServerParameters(command=sys.executable, args=list(args), env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if mode == "user":
        return StdioServerParameters(
            command=q.find_tool("runuser") or "runuser", args=["-u", user, "--", PYTHON, *args],
            env={"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home or pwd.getpwnam(user).pw_dir,
                 "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"},
        )
    assert mode == "compose"
    docker_gid = os.stat(SOCKET).st_gid  # compose: group_add "${DOCKER_GID}"
    return StdioServerParameters(
        command="docker",
        args=["run", "--interactive", "--rm", "--name", f"mcp-codeexec-{TENANT}-server-{secrets.token_hex(3)}",
              "--group-add", str(docker_gid), "--volume", f"{SOCKET}:{SOCKET}", "--volume", f"{COMPOSE_DATA}:/data",
              "--volume", f"{SRC}:{SRC}:ro", "--volume", f"{SITE}:{SITE}:ro",
              "--env", f"PYTHONPATH={path}", "--env", "PYTHONUNBUFFERED=1", COMPOSE_IMAGE, PYTHON, *args],
        env=dict(os.environ),
    )


def server(mode: str, *args: str) -> StdioServerParameters:
    """The real server, run as `mode` says, over stdio."""
    data = ("--data-dir", DATA_DIR) if mode == "root" else ()
    return python(mode, "-m", "mcp_codeexec", "--image", IMAGE, "--tenant", TENANT, "--timeout", "60",
                  "--memory", "1g", "--disk", "64m", *data, *args)


def execute(params: StdioServerParameters) -> subprocess.CompletedProcess[str]:
    return subprocess.run([params.command, *params.args], env=params.env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120)


def expected_dir(engine: docker.APIClient, mode: str) -> str:
    """Where the server's default quota directory is, as the host sees it."""
    if mode == "root":
        return q.ROOT_DIR
    if mode == "user":
        return os.path.join(pwd.getpwnam(USER).pw_dir, ".local/share/mcp-codeexec/workspaces")
    return os.path.join(engine.inspect_volume(COMPOSE_DATA)["Mountpoint"], "mcp-codeexec/workspaces")


def devices_of(image: str) -> list[str]:
    """The loop devices attached to the file (by inode, whichever namespace attached it)."""
    return run("losetup", "--list", "--noheadings", "--output", "NAME", "--associated", image).split()


def backing_file(device: str) -> str:
    """The file a loop device is attached to ("" once detached)."""
    try:
        return open(f"/sys/block/{os.path.basename(device)}/loop/backing_file").read()
    except FileNotFoundError:
        return ""


@pytest.mark.parametrize("mode", MODES)
async def test_enospc_at_the_quota_and_other_sandboxes_unaffected(engine, hosts, mode):
    async with Client(server(mode)) as client:
        a = Session(client)
        r = await a.bash("stat -c %u:%g . && echo keep > keep.txt && ls -A")
        assert r["stdout"] == "1000:1000\nkeep.txt\n", r  # the sandbox user's, and empty but for ours
        r = await a.bash(FILL)
        written, code = r["stdout"].split()
        assert code == "ENOSPC", r
        assert 40 <= int(written) <= 64, r  # ext4's metadata takes a little of the 64 MiB
        df = await a.bash("df -B1 --output=size . | tail -1")
        assert 50 * MiB <= int(df["stdout"]) <= 64 * MiB, df
        # The host: the file is where this way of running puts it, holds at most the quota,
        # and is attached to the loop device the volume's link leads to.
        volume = workspace_volume(engine, a)
        image = volume["Labels"][q.FILE_LABEL]
        assert os.path.dirname(image) == expected_dir(engine, mode)
        assert volume["Options"] == {"type": "ext4", "device": image[: -len(".img")] + ".dev", "o": "nodev,nosuid,discard"}
        assert os.stat(image).st_size == 64 * MiB and os.stat(image).st_blocks * 512 <= 64 * MiB
        assert devices_of(image) == [os.readlink(volume["Options"]["device"])]
        if mode != "root":
            assert os.stat(image).st_uid != 0  # made by the server's own user
        # The sandbox and its files are fine; other paths still write.
        r = await a.bash("cat keep.txt; echo t > /tmp/t && echo tmp-ok")
        assert r["stdout"] == "keep\ntmp-ok\n", r
        # Another sandbox, with a quota of its own, is unaffected.
        async with Client(server(mode)) as other:
            b = Session(other)
            r = await b.bash("head -c 20M /dev/zero > twenty.bin && ls -l twenty.bin | awk '{print $5}'")
            assert r["stdout"] == f"{20 * MiB}\n" and r["return_code"] == 0, r
            assert workspace_volume(engine, b)["Name"] != volume["Name"]
        # Space comes back when files are deleted (and goes back to the host: discard).
        r = await a.bash("rm fill.bin && head -c 10M /dev/zero > ten.bin && echo ok")
        assert r["stdout"] == "ok\n", r
        with anyio.fail_after(20):  # ext4 discards freed blocks when its journal commits (5 s)
            while os.stat(image).st_blocks * 512 >= 40 * MiB:
                await anyio.sleep(0.5)


@pytest.mark.parametrize("mode", MODES)
async def test_a_lost_loop_device_is_reattached(engine, hosts, mode, tmp_path):
    """A host reboot detaches every loop device, and /dev/loopN may then hold another file:
    the next start re-attaches the workspace's own file (never mounts the stranger)."""
    async with Client(server(mode, "--idle-stop", "2s", "--reap-interval", "1s")) as client:
        a = Session(client)
        await a.bash("echo precious > keep.txt")
        volume = workspace_volume(engine, a)
        image, link = volume["Labels"][q.FILE_LABEL], volume["Options"]["device"]
        old_device = os.readlink(link)
        name = f"mcp-codeexec.{TENANT}.{a.last_meta['container']['id']}"
        with anyio.fail_after(20):  # idle stop
            while engine.inspect_container(name)["State"]["Running"]:
                await anyio.sleep(0.25)
        # "Reboot": detach it, and put a stranger's filesystem on the same device number.
        run("losetup", "--detach", old_device)
        stranger = tmp_path / "stranger.img"
        run("truncate", "-s", "16M", str(stranger))
        run("mkfs.ext4", "-q", "-F", str(stranger))
        run("losetup", old_device, str(stranger))
        try:
            assert not q.is_attached(image, link)
            r = await a.bash("cat keep.txt; ls")
            assert r["stdout"] == "precious\nkeep.txt\n", r
            assert q.is_attached(image, link) and os.readlink(link) != old_device
            assert devices_of(image) == [os.readlink(link)]
        finally:
            subprocess.run(["losetup", "--detach", old_device], check=False)


# What the server does when a sandbox expires (or its owner deletes it).
REMOVE = "import sys, anyio; from mcp_codeexec.deployment.docker import DockerDeployment; " \
         "anyio.run(DockerDeployment().remove, sys.argv[1])"


@pytest.mark.parametrize("mode", MODES)
async def test_a_removed_sandbox_takes_its_filesystem_along(engine, hosts, mode):
    """Removing a sandbox removes its volume, detaches its loop device and deletes its files.
    Done here by the server's code as the server's user, not by waiting for expiry: any
    server on the engine (another test run's too) reaps expired sandboxes of every tenant."""
    async with Client(server(mode)) as client:
        a = Session(client)
        await a.bash("echo x > x.txt")
        volume = workspace_volume(engine, a)
        name = f"mcp-codeexec.{TENANT}.{a.last_meta['container']['id']}"
    image, link = volume["Labels"][q.FILE_LABEL], volume["Options"]["device"]
    device = os.readlink(link)
    assert devices_of(image) == [device]
    res = execute(python(mode, "-c", REMOVE, name))
    assert res.returncode == 0 and "could not" not in res.stderr, res.stderr
    assert volume["Name"] not in {v["Name"] for v in engine.volumes()["Volumes"] or []}
    assert not os.path.exists(image) and not os.path.lexists(link) and not os.path.exists(link[: -len(".dev")] + ".loop")
    assert os.path.basename(image) not in backing_file(device)


async def test_no_quota_with_disk_0(engine):
    async with connect("--timeout", "20", "--memory", "1g", "--disk", "0") as a:
        await a.bash("true")
        volume = workspace_volume(engine, a)
        assert q.FILE_LABEL not in (volume["Labels"] or {}) and not volume["Options"]


@pytest.mark.parametrize("mode", MODES)
def test_doctor_says_which_way_the_quota_works(engine, hosts, mode):
    out = execute(python(mode, "-m", "mcp_codeexec", "doctor", "--quick", "--disk", "64m")).stdout
    line = next(line for line in out.splitlines() if "disk quota" in line)
    way = "by this server (root)" if mode == "root" else f"through the engine (helper containers of {IMAGE})"
    assert line.startswith("ok    disk quota: 64 MiB per workspace") and way in line and "attached yes" in line, out
    assert expected_dir(engine, mode) in line, out


def test_quota_setup_says_why_not(tmp_path):
    def no_engine() -> docker.APIClient:
        raise RuntimeError("the Docker Engine is not reachable")

    assert q.workspace_quota(0, str(tmp_path), IMAGE, no_engine) is None
    blocked = tmp_path / "file"
    blocked.write_text("")
    with pytest.raises(q.QuotaUnavailable, match="cannot create"):
        q.setup(64 * MiB, str(blocked / "sub"), IMAGE, no_engine)
    assert q.setup(64 * MiB, str(tmp_path), IMAGE, no_engine).how == "direct"  # as root: no engine needed


def test_doctor_says_plainly_when_no_way_works(engine, hosts):
    """Not root, and not allowed to use the engine: no way to attach loop devices."""
    directory = tempfile.mkdtemp(prefix="mcp-codeexec-quota-")
    os.chown(directory, pwd.getpwnam("nobody").pw_uid, -1)
    try:
        res = execute(python("user", "-m", "mcp_codeexec", "doctor", "--quick", "--disk", "64m", "--quota-dir", directory,
                             user="nobody", home=directory))
    finally:
        shutil.rmtree(directory)
    line = next(line for line in res.stdout.splitlines() if "disk quota" in line)
    assert line.startswith("WARN  disk quota: not possible here: not root, and through the engine: "), res.stdout
    assert line.endswith("the server runs without a workspace quota"), res.stdout


async def test_workspaces_no_container_uses_are_collected(engine, tmp_path):
    """A create the engine refuses leaves no volume and no filesystem behind. A workspace
    volume that no container uses (its server was killed between making the volume and its
    container) is removed, with its filesystem and loop device, once housekeeping has seen
    it unused in passes 10 minutes apart (here the first sighting is backdated instead of
    waited for). A helper container its server never removed goes once it is older than
    a helper ever lives. A stopped sandbox's volume stays. Component level: the Docker
    backend as root (direct), on the real engine, with real loop devices."""
    backend = DockerDeployment(wanted=q.Wanted(64 * MiB, str(tmp_path / "ws"), IMAGE))
    await backend.check(IMAGE)
    assert backend.quota is not None and backend.quota.how == "direct"
    settings = Settings(image=IMAGE, memory_bytes=512 << 20)

    def new_spec() -> SandboxSpec:
        info = ContainerInfo.new(timedelta(hours=1))
        return sandbox_spec(settings, f"mcp-codeexec.{TENANT}.{info.id}", f"mcp-codeexec-ws.{info.id}", info)

    def volumes() -> set[str]:
        return {v["Name"] for v in engine.volumes()["Volumes"] or []}

    def housekeeping() -> None:
        backend._collected_at = -1e9  # due now
        backend._collect_orphans()

    refused = replace(new_spec(), image="mcp-codeexec-no-such-image:0")
    with pytest.raises(BackendUnavailable):
        await backend.create(refused)
    assert refused.volume not in volumes() and not os.path.exists(backend.quota.image(refused.volume))

    stray, kept = new_spec(), new_spec()
    await backend.create(stray)
    await backend.create(kept)  # created, never started
    # A helper container its server never removed (killed while losetup ran), holding the
    # stray's volume, as the plain volume's handover does.
    helper = engine.create_container(IMAGE, command=["true"], labels={q.HELPER_LABEL: "1"},
                                     host_config=engine.create_host_config(binds={stray.volume: {"bind": "/w", "mode": "rw"}}))["Id"]
    try:
        engine.remove_container(stray.name)  # as if its server died before making it
        image_file = backend.quota.image(stray.volume)
        device = os.readlink(backend.quota.link(stray.volume))
        assert devices_of(str(image_file)) == [device]
        await anyio.to_thread.run_sync(housekeeping)
        assert engine.inspect_container(helper)  # minutes old at most: kept (its server may be running it)
        assert stray.volume in volumes() and image_file.exists() and stray.volume not in backend._unused_since
        with pytest.MonkeyPatch.context() as m:
            m.setattr(d, "_HELPER_MAX_AGE", -1.0)  # as if ten minutes had passed
            await anyio.to_thread.run_sync(housekeeping)
        assert helper not in {c["Id"] for c in engine.containers(all=True)}
        assert stray.volume in volumes() and image_file.exists()  # first seen unused: kept
        backend._unused_since[stray.volume] -= 600
        await anyio.to_thread.run_sync(housekeeping)
        assert stray.volume not in volumes() and not image_file.exists()
        assert not os.path.lexists(backend.quota.link(stray.volume)) and image_file.name not in backing_file(device)
        assert kept.volume in volumes() and backend.quota.image(kept.volume).exists()
        assert kept.volume not in backend._unused_since
    finally:
        with contextlib.suppress(docker.errors.NotFound):
            engine.remove_container(helper, force=True)
        await backend.remove(stray.name)
        await backend.remove(kept.name)
    assert kept.volume not in volumes() and not backend.quota.image(kept.volume).exists()
