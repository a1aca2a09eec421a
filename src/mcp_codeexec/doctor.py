"""`mcp-codeexec doctor`: is this host ready to run sandboxes? Says what is missing and the
command that fixes it.

Checks, in order: the Docker Engine; the gVisor runtime registered with it (its binary,
release, platform, network setting); a sandbox actually starting under it; the sandbox
image and its manifest; checkpoint/restore (a sandbox with a Python variable is put to
sleep and woken up: idle sandboxes keep their memory); the workspace disk quota mechanism
(losetup as root here, or through the engine in helper containers; mkfs.ext4; loop
devices: a small filesystem is made, attached and removed).

Exit status: 0 when the server can run sandboxes here (warnings allowed: e.g. no disk
quota, which the server then runs without), 1 when something essential is missing.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta

import docker
import docker.errors

from mcp_codeexec.config import Settings, format_size, parse_size
from mcp_codeexec.constants import RUNSC_MIN_RELEASE
from mcp_codeexec.deployment import quota as q
from mcp_codeexec.deployment.image import INPUTS_LABEL, ManifestUnavailable, read_manifest

SETUP = "scripts/setup.sh (in the mcp-codeexec repository)"
BUILD = "sandbox/build.sh (in the mcp-codeexec repository)"


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    failed: int = 0
    warned: int = 0

    def ok(self, what: str, detail: str) -> None:
        self.lines.append(f"ok    {what}: {detail}")

    def warn(self, what: str, detail: str, fix: str | None = None) -> None:
        self.warned += 1
        self.lines.append(f"WARN  {what}: {detail}")
        if fix:
            self.lines.append(f"      fix: {fix}")

    def fail(self, what: str, detail: str, fix: str | None = None) -> None:
        self.failed += 1
        self.lines.append(f"FAIL  {what}: {detail}")
        if fix:
            self.lines.append(f"      fix: {fix}")

    def print(self) -> None:
        for line in self.lines:
            print(line, flush=True)
        self.lines.clear()


def check_engine(r: Report) -> docker.APIClient | None:
    # The engine the server would use: DOCKER_HOST, as the server reads it (docker.APIClient
    # alone ignores DOCKER_HOST and would check the default socket instead).
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    try:
        api = docker.APIClient(base_url=host, version="auto", timeout=30)
        info = api.info()
    except Exception as exc:  # noqa: BLE001 - any failure means no usable engine
        r.fail("engine", f"Docker Engine not reachable at {host} ({exc})",
               f"start it: {SETUP}; or `apt-get install docker.io` and run `dockerd`")
        return None
    r.ok("engine", f"Docker Engine {info.get('ServerVersion', '?')} at {host}, storage {info.get('Driver', '?')}, "
         f"cgroup v{info.get('CgroupVersion', '?')}, {info.get('NCPU', '?')} CPUs")
    if not host.startswith("unix://"):
        r.fail("engine", f"DOCKER_HOST={host}: the server talks to the engine over a unix socket only",
               "unset DOCKER_HOST, or point it at a unix:// socket")
    return api


def _runsc_release(path: str) -> tuple[str, int | None]:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot run {path} ({exc})", None
    m = re.search(r"(20\d{6})", out)
    return (out.splitlines() or ["?"])[0].strip(), int(m.group(1)) if m else None


def check_runtime(r: Report, api: docker.APIClient, runtime: str) -> bool:
    runtimes = api.info().get("Runtimes") or {}
    if runtime not in runtimes:
        r.fail("runtime", f"the engine has no runtime {runtime!r} (it has: {', '.join(runtimes) or 'none'})",
               f"{SETUP} installs gVisor and registers it in /etc/docker/daemon.json")
        return False
    if runtime != "runsc":
        r.warn("runtime", f"{runtime}: sandboxes share the host kernel (needs --allow-weak-isolation)",
               "use runsc (gVisor): " + SETUP)
        return True
    entry = runtimes[runtime] or {}
    path = entry.get("path") or "runsc"
    args = entry.get("runtimeArgs") or []
    version, release = _runsc_release(path)
    platform = next((a.split("=", 1)[1] for a in args if a.startswith("--platform=")), None)
    platform_text = platform or ("systrap (runsc's default)" if release and release >= 20230101 else "ptrace (runsc's default)")
    r.ok("runtime", f"runsc at {path}: {version}; platform {platform_text}; args {' '.join(args) or '(none)'}")
    if release is not None and release < RUNSC_MIN_RELEASE:
        r.warn("runtime", f"gVisor release {release} is older than 2024: `ls` and `stat` fail with EINVAL inside",
               f"{SETUP} (installs runsc from bookworm-backports)")
    if "--network=none" not in args:
        r.warn("runtime", "runsc's runtimeArgs lack --network=none (gVisor then may refuse to start in the host's network namespace)",
               SETUP)
    return True


def check_start(r: Report, api: docker.APIClient, runtime: str, image: str) -> None:
    """A real sandbox-like container: starts, runs, and sees what the limits say."""
    name = f"mcp-codeexec-doctor-{secrets.token_hex(4)}"
    started = time.monotonic()
    try:
        api.create_container(
            image, name=name, user="1000:1000", network_disabled=True,
            command=["python3", "-c", "import os, socket; print(os.cpu_count(), [n for _, n in socket.if_nameindex()])"],
            host_config=api.create_host_config(runtime=runtime, network_mode="none", cap_drop=["ALL"], read_only=True,
                                               security_opt=["no-new-privileges"], cpuset_cpus=q.pick_cpuset(1)),
        )
        api.start(name)
        code = api.wait(name, timeout=120)["StatusCode"]
        out = api.logs(name).decode(errors="replace").strip()
    except Exception as exc:  # noqa: BLE001 - report whatever went wrong
        r.fail("sandbox", f"a {runtime} container of {image} did not run: {exc}",
               f"see the engine's log; {SETUP} registers runsc with the runtimeArgs that work on such hosts")
        return
    finally:
        try:
            api.remove_container(name, force=True)
        except docker.errors.APIError:
            pass
    if code != 0:
        r.fail("sandbox", f"a {runtime} container of {image} exited {code}: {out[-300:]}")
    else:
        r.ok("sandbox", f"a {runtime} container started and ran in {time.monotonic() - started:.1f}s "
             f"(CPUs seen when pinned to 1: {out.split()[0]}; network interfaces: {' '.join(out.split()[1:])})")


def check_checkpoint(r: Report, runtime: str, image: str) -> None:
    """One sandbox made as the server makes them, a REPL variable set, checkpointed through
    the backend, restored, and the variable read back."""
    import anyio  # the server's own path, which is asynchronous

    from mcp_codeexec.agent import protocol as p
    from mcp_codeexec.deployment.docker import DockerDeployment
    from mcp_codeexec.sandbox import ContainerInfo, Sandbox, sandbox_spec

    settings = Settings(runtime=runtime, image=image, memory_bytes=512 << 20)
    info = ContainerInfo.new(timedelta(minutes=10))
    name = f"mcp-codeexec-doctor-{secrets.token_hex(4)}"
    spec = sandbox_spec(settings, name, f"{name}-ws", info)
    cell = lambda code: p.Repl(code=code, timeout=60, max_output=1000, timeout_is_result=True,  # noqa: E731
                               stream=False, cwd=settings.workdir)

    async def attempt() -> str:
        backend = DockerDeployment(runtime)
        await backend.check(image)
        if not backend.can_checkpoint:
            return "off: the engine is not in experimental mode" if runtime == "runsc" else f"off: runtime {runtime}"
        await backend.create(spec)
        try:
            async with anyio.create_task_group() as tg:
                sandbox = Sandbox(settings, backend, tg, name, info)
                await sandbox.request(cell("x = 41"), 90)
                started = time.monotonic()
                what, size = await sandbox.sleep()
                slept = time.monotonic() - started
                if what != "checkpointed":
                    raise RuntimeError(f"the sandbox was {what}, not checkpointed: {sandbox.take_notice().strip()}")
                started = time.monotonic()
                reply = await sandbox.request(cell("print(x + 1)"), 90)
                woke = time.monotonic() - started
                if reply.stdout != "42\n":
                    raise RuntimeError(f"the variable did not survive: {(reply.stdout + reply.stderr)[-300:]}")
                await sandbox.detach()
                tg.cancel_scope.cancel()
            return f"a sandbox slept in {slept:.1f}s ({(size or 0) >> 20} MiB image) and woke with its memory in {woke:.1f}s"
        finally:
            with anyio.CancelScope(shield=True):
                await backend.remove(name)

    try:
        detail = anyio.run(attempt)
    except Exception as exc:  # noqa: BLE001 - report whatever went wrong
        r.warn("checkpoint", f"checkpoint/restore failed: {exc}; idle sandboxes will be stopped (files kept, memory lost)",
               f"{SETUP} turns on the engine's experimental mode; see the engine's log")
        return
    if detail.startswith("off"):
        r.warn("checkpoint", f"{detail}; idle sandboxes will be stopped (files kept, memory lost)",
               f"{SETUP} sets \"experimental\": true in /etc/docker/daemon.json and restarts dockerd")
    else:
        r.ok("checkpoint", detail)


def check_image(r: Report, api: docker.APIClient, image: str) -> bool:
    try:
        info = api.inspect_image(image)
    except docker.errors.NotFound:
        r.fail("image", f"{image} not found", f"build it: {BUILD} (registry-free: --no-registry)")
        return False
    labels = (info.get("Config") or {}).get("Labels") or {}
    r.ok("image", f"{image}: {info['Id'][7:19]}, {int(info.get('Size') or 0) / 1e9:.2f} GB, "
         f"inputs hash {labels.get(INPUTS_LABEL, '(none)')}")
    try:
        manifest = read_manifest(api, image)
    except (ManifestUnavailable, docker.errors.APIError) as exc:
        r.fail("manifest", str(exc), f"rebuild the image: {BUILD}")
        return True
    libs, tools = manifest.get("libraries") or {}, manifest.get("tools") or {}
    some = ", ".join(f"{name} {lib['version']}" for name, lib in list(libs.items())[:4])
    r.ok("manifest", f"Python {manifest.get('python')}, {len(libs)} libraries ({some}, ...), tools: {', '.join(sorted(tools))}")
    return True


def check_quota(r: Report, api: docker.APIClient | None, size: int, directory: str, image: str) -> None:
    if size <= 0:
        r.warn("disk quota", "off (--disk 0): a workspace can fill the host's disk")
        return

    def engine() -> docker.APIClient:
        if api is None:
            raise RuntimeError("the Docker Engine is not reachable")
        return api

    try:
        quota = q.setup(16 << 20, directory, image, engine)
    except q.QuotaUnavailable as exc:
        reason = str(exc)
        fixes = {
            "cannot create": "pass --quota-dir with a directory this user can write",
            "not writable": "pass --quota-dir with a directory this user can write",
            "loop-control": "modprobe loop (a VM or container may need its host to allow loop devices)",
            "e2fsprogs": "apt-get install e2fsprogs",
            "losetup": "apt-get install mount (or use a helper image with util-linux)",
            "does not see the quota directory": "put --quota-dir on a volume or bind mount of the server's container",
            "is in the server's own container": "put --quota-dir on a volume or bind mount of the server's container",
            "helper image": f"build the sandbox image: {BUILD}",
            "not reachable": "let this user use the engine (the docker group), or run the server as root",
        }
        fix = next((v for k, v in fixes.items() if k in reason), "run the server as root, or as a user who may use the engine")
        r.warn("disk quota", f"not possible here: {reason}; the server runs without a workspace quota", fix)
        return
    # A real one, end to end: make, attach, check, release.
    volume = f"mcp-codeexec-doctor-{secrets.token_hex(4)}"
    try:
        started = time.monotonic()
        options = quota.create(volume)
        made = time.monotonic() - started
        attached = quota.attached(volume)
        started = time.monotonic()
        quota.release(volume)
        released = time.monotonic() - started
    except q.QuotaError as exc:
        r.warn("disk quota", f"a test filesystem could not be made and attached ({quota.how}): {exc}",
               "check that loop devices can be attached here (losetup -f)")
        return
    how = "by this server (root)" if quota.how == "direct" else f"through the engine (helper containers of {image})"
    on_host = quota.paths.to_host(quota.directory)
    where = quota.directory if on_host == quota.directory else f"{quota.directory} (on the engine's host: {on_host})"
    detail = (f"{format_size(size)} per workspace: ext4 in a sparse file on a loop device attached {how}, "
              f"under {where} (test: made and attached in {made:.2f}s, released in {released:.2f}s, "
              f"mount options {options['o']}, attached {'yes' if attached else 'NO'})")
    (r.ok if attached else r.warn)("disk quota", detail)
    if api is not None:
        try:
            existing = {v["Name"] for v in api.volumes().get("Volumes") or []}
            orphans = quota.orphans(existing, min_age=0)
            if orphans:
                r.warn("disk quota", f"{len(orphans)} workspace filesystems under {quota.directory} have no volume any more "
                       "(the server releases them within 10 minutes of its next sandbox)")
        except docker.errors.APIError:
            pass


def main(argv: list[str] | None = None) -> int:
    d = Settings()
    ap = argparse.ArgumentParser(prog="mcp-codeexec doctor", description=__doc__.split("\n\n")[0])
    ap.add_argument("--image", default=d.image, help=f"sandbox image (default {d.image})")
    ap.add_argument("--runtime", default=d.runtime, help=f"OCI runtime for sandboxes (default {d.runtime})")
    ap.add_argument("--disk", default="5g", help="workspace quota to check for (default 5g; 0: none)")
    ap.add_argument("--quota-dir", default=d.quota_dir or q.default_dir(), help=f"(default {d.quota_dir or q.default_dir()})")
    ap.add_argument("--quick", action="store_true", help="do not start a sandbox")
    args = ap.parse_args(argv)

    r = Report()
    api = check_engine(r)
    r.print()
    if api is not None:
        runtime_ok = check_runtime(r, api, args.runtime)
        r.print()
        image_ok = check_image(r, api, args.image)
        r.print()
        if runtime_ok and image_ok and not args.quick:
            check_start(r, api, args.runtime, args.image)
            r.print()
            check_checkpoint(r, args.runtime, args.image)
            r.print()
    check_quota(r, api, parse_size(args.disk), args.quota_dir, args.image)
    r.print()
    if r.failed:
        print(f"\n{r.failed} essential problem(s): sandboxes cannot run here until fixed.")
        return 1
    print(f"\nready{f' ({r.warned} warning(s))' if r.warned else ''}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
