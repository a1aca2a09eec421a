"""The sandbox is hostile (docs/security.md): tenant A attacks from inside its sandbox while
tenant B calls concurrently over HTTP the whole time. Real server process, real gVisor,
the `mcp` SDK's Streamable HTTP client; every result validated strictly.

What must hold: B sees no error and exact results throughout; A's next call works (its
sandbox restarted if need be, files intact); no process of A's user can open, signal or
trace the agent or anything else the server started; nothing lands on the host's disk
beyond fixed bounds; the server's memory stays bounded."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import docker
import httpx2
import pytest
from conftest import DATA_DIR, IMAGE, TENANT, Session, free_port
from mcp.client import Client
from mcp.client.streamable_http import streamable_http_client

pytestmark = pytest.mark.anyio

A, B = f"{TENANT}-attacker", f"{TENANT}-bystander"
TOKENS = {A: "token-attacker-" + "a" * 20, B: "token-bystander-" + "b" * 20}
MAX_STORED = 8 << 20  # A's stored-bytes cap, small so the output-file flood reaches it


@pytest.fixture(scope="module")
def server(engine: docker.APIClient, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    tokens = tmp_path_factory.mktemp("tokens") / "tokens.json"
    tenants: dict[str, Any] = {name: {"token_sha256": hashlib.sha256(t.encode()).hexdigest()} for name, t in TOKENS.items()}
    tenants[A]["max_stored_bytes"] = MAX_STORED
    tokens.write_text(json.dumps({"tenants": tenants}))
    port = free_port()
    log = tmp_path_factory.mktemp("log") / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mcp_codeexec", "--transport", "http", "--port", str(port), "--tokens", str(tokens),
             "--image", IMAGE, "--data-dir", DATA_DIR, "--timeout", "60", "--memory", "1g",
             "--tmp-size", "64m", "--disk", "2g", *os.environ.get("MCP_CODEEXEC_TEST_SERVER_ARGS", "").split()],
            env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=out, stderr=out,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(150):
            try:
                if httpx2.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx2.HTTPError:
                pass
            assert proc.poll() is None, f"server exited: {log.read_text()[-2000:]}"
            time.sleep(0.2)
        yield base, proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    # Whatever the sandbox did, nothing it sent reached the server's log unbounded.
    assert log.stat().st_size < 2 << 20, f"server log grew to {log.stat().st_size} bytes"


@asynccontextmanager
async def session(base: str, tenant: str) -> AsyncIterator[Session]:
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {TOKENS[tenant]}"}, timeout=300)
    async with Client(streamable_http_client(f"{base}/mcp", http_client=http)) as client:
        yield Session(client)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


# --- the attacks (each a Python script run by bash_code_execution in A's sandbox) ----------

# Every process A's user can see: its uid, and what A could do to it. Prints JSON.
PROBE = r'''
import ctypes, json, os, signal, stat
libc = ctypes.CDLL(None, use_errno=True)
me = os.getpid()
mine = {me, os.getppid()}
report = []
for name in os.listdir("/proc"):
    if not name.isdigit() or int(name) in mine:
        continue
    pid = int(name)
    try:
        uid = os.stat(f"/proc/{pid}").st_uid
    except OSError:
        continue
    entry = {"pid": pid, "uid": uid, "opened": [], "signal": None, "ptrace": None, "mem": None}
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        fds = [str(n) for n in range(0, 16)]
    frame = json.dumps({"id": 1, "kind": "result", "body": {"bogus": 1}}).encode()
    for fd in fds:
        try:
            f = os.open(f"/proc/{pid}/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            continue
        st = os.fstat(f)
        # The container's stdin is the host's /dev/null (a world-writable character device,
        # which gVisor lets anyone reopen): harmless. Anything else is a finding.
        if not (stat.S_ISCHR(st.st_mode) and st.st_mode & 0o777 == 0o666):
            entry["opened"].append(fd)
        for blob in (len(frame).to_bytes(4, "big") + frame, b"\xff\xff\xff\xff", b"\x00\x00\x01\x00{"):
            try:
                os.write(f, blob)
            except OSError:
                pass
        os.close(f)
    try:
        os.kill(pid, 0)
        entry["signal"] = "allowed"
    except PermissionError:
        entry["signal"] = "EPERM"
    except ProcessLookupError:
        entry["signal"] = "gone"
    entry["ptrace"] = libc.ptrace(16, pid, 0, 0) == 0  # PTRACE_ATTACH
    if entry["ptrace"]:
        libc.ptrace(17, pid, 0, 0)  # PTRACE_DETACH
    try:
        open(f"/proc/{pid}/mem", "rb").close()
        entry["mem"] = True
    except OSError:
        entry["mem"] = False
    report.append(entry)
print(json.dumps(report))
'''

# kill -9 (and STOP) every process A's user may signal, but its own command.
KILL_ALL = r'''
import os, signal
mine = {os.getpid(), os.getppid()}
killed = []
for sig in (signal.SIGSTOP, signal.SIGKILL):
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) not in mine:
            try:
                os.kill(int(name), sig)
                killed.append(int(name))
            except OSError:
                pass
print(sorted(set(killed)))
'''


def root_processes(report: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [p for p in report if p["uid"] == 0]


async def bystander(base: str, stop: anyio.Event, errors: list[str], counts: list[int]) -> None:
    """Tenant B: a call after another, each result compared exactly."""
    async with session(base, B) as b:
        await b.edit(command="create", path="b.txt", file_text="mine\n")
        i = 0
        while not stop.is_set():
            i += 1
            r = await b.bash(f"echo b-{i}; cat b.txt")
            if r != {"type": "bash_code_execution_result", "stdout": f"b-{i}\nmine\n", "stderr": "", "return_code": 0, "content": []}:
                errors.append(f"bash {i}: {r}")
            v = await b.edit(command="view", path="b.txt")
            if v.get("content") != "mine\n":
                errors.append(f"view {i}: {v}")
            counts[0] = i


@pytest.fixture(scope="module")
async def attack(server: tuple[str, subprocess.Popen[bytes]]) -> AsyncIterator[tuple[Session, Any]]:
    """A's session, with B calling for as long as the module runs; checks B at the end."""
    base, proc = server
    stop, errors, counts = anyio.Event(), [], [0]
    async with anyio.create_task_group() as tg:
        tg.start_soon(bystander, base, stop, errors, counts)
        async with session(base, A) as a:
            await a.bash("echo keep > kept.txt")
            rss_before = rss_kib(proc.pid)
            yield a, (base, proc)
            assert (await a.bash("cat kept.txt"))["stdout"] == "keep\n"  # A's files outlived every attack
        stop.set()
    assert errors == [], errors[:5]
    assert counts[0] >= 1, "tenant B got no call through"
    assert proc.poll() is None, "the server died"
    grown = rss_kib(proc.pid) - rss_before
    assert grown < 150 * 1024, f"server RSS grew by {grown} KiB"


async def run_python(a: Session, script: str) -> dict[str, Any]:
    return await a.bash(f"python3 - <<'PYEOF'\n{script}\nPYEOF")


async def test_a_fresh_sandbox_runs_nothing_as_the_user_but_the_command(attack: Any) -> None:
    a, _ = attack
    r = await a.bash("python3 -c \"import json, os; print(json.dumps([[os.stat('/proc/'+p).st_uid, int(open('/proc/'+p+'/stat').read().rsplit(')', 1)[1].split()[3]), open('/proc/'+p+'/cmdline').read().split(chr(0))] for p in os.listdir('/proc') if p.isdigit()]))\"")
    listing = json.loads(r["stdout"])
    # The agent's process spawner and bash zygote (agent/process.py) are the user's by
    # design: they start the user's commands with the user's own rights and nothing more.
    helpers = ("mcp-codeexec-spawner", "mcp-codeexec-zygote")
    spawners = [sid for uid, sid, argv in listing if uid == 1000 and helpers[0] in argv]
    zygotes = [sid for uid, sid, argv in listing if uid == 1000 and helpers[1] in argv]
    users = {sid for uid, sid, argv in listing if uid == 1000 and not any(h in argv for h in helpers)}
    assert any(uid == 0 for uid, _, _ in listing), "the agent and init run as root"
    assert len(spawners) <= 1 and len(zygotes) <= 1, listing
    # Every other process of the sandbox user belongs to this command's session.
    assert len(users) == 1, listing


async def test_nothing_the_server_started_can_be_opened_signalled_or_traced(attack: Any) -> None:
    a, _ = attack
    r = await run_python(a, PROBE)
    assert r["return_code"] == 0, r
    report = json.loads(r["stdout"])
    roots = root_processes(report)
    assert len(roots) >= 2, report  # init and the agent, at least
    for p in roots:
        assert p["opened"] == [], f"opened fds {p['opened']} of root process {p['pid']}"
        assert p["signal"] == "EPERM", p
        assert p["ptrace"] is False, p
        assert p["mem"] is False, p
    assert (await a.bash("echo still here"))["stdout"] == "still here\n"


async def test_kill_everything_leaves_the_agent(attack: Any) -> None:
    a, _ = attack
    r = await run_python(a, KILL_ALL)
    assert r["return_code"] == 0, r
    roots = {p["pid"] for p in root_processes(json.loads((await run_python(a, PROBE))["stdout"]))}
    assert roots.isdisjoint(json.loads(r["stdout"])), (r["stdout"], roots)
    assert (await a.bash("cat kept.txt"))["stdout"] == "keep\n"


async def test_flood_every_writable_output(attack: Any) -> None:
    """1 GB into each stdout/stderr A can open: its own are capped, the container's
    (init's, the agent's) cannot be opened; the engine's log stays within its bound."""
    a, (base, _) = attack
    r = await a.bash(
        "for f in /proc/*/fd/1 /proc/*/fd/2; do (head -c 1000000000 /dev/zero > $f) 2>/dev/null & done; "
        "head -c 300000000 /dev/zero; head -c 300000000 /dev/zero >&2; wait; echo done",
    )
    assert r["return_code"] == 0 and r["stdout"].endswith("done\n"), {k: str(v)[-300:] for k, v in r.items()}
    # Capped in the sandbox, then cut again to fit the wire (NUL bytes escape to 6 each).
    assert "characters omitted" in r["stdout"] and "characters omitted" in r["stderr"]
    assert len(json.dumps(r)) < 1 << 20
    api = docker.APIClient(version="auto")
    for c in api.containers(all=True, filters={"name": f"mcp-codeexec.{A}."}):
        path = api.inspect_container(c["Id"])["LogPath"]
        assert not path or not os.path.exists(path) or os.path.getsize(path) <= 1 << 20, path


async def test_fill_tmp_and_home(attack: Any) -> None:
    a, _ = attack
    r = await a.bash("head -c 200000000 /dev/zero > /tmp/fill; echo $?; head -c 200000000 /dev/zero > ~/fill; echo $?")
    assert r["stdout"] == "1\n1\n" and "No space left" in r["stderr"], r
    assert (await a.bash("rm -f /tmp/fill ~/fill; cat kept.txt"))["stdout"] == "keep\n"


async def test_100k_files_are_reported_in_bounds(attack: Any) -> None:
    a, _ = attack
    r = await a.bash(
        "mkdir -p flood && cd flood && python3 -c \"\nfor i in range(100000):\n    open(f'f{i}', 'w').close()\n\" && echo ok"
    )
    assert r["stdout"] == "ok\n", r
    assert len(r["content"]) == 50 and "99950 more files were written" in r["stderr"], r["stderr"][-300:]
    assert (await a.bash("rm -rf flood; echo gone"))["stdout"] == "gone\n"


async def test_watcher_overflow_is_reported_not_lost(attack: Any) -> None:
    """More directories than the watcher follows (8000): output files are then found by
    modification time, and the result says so, instead of silently listing none."""
    a, _ = attack
    r = await a.bash(
        "python3 -c \"\nimport os\nfor i in range(8100):\n    os.makedirs(f'dirs/d{i}')\n\" && echo real > dirs/d8099/result.csv && echo ok"
    )
    assert r["stdout"] == "ok\n", r
    assert "file watcher could follow" in r["stderr"], r["stderr"][-500:]
    assert len(r["content"]) == 1
    assert (await a.bash("rm -rf dirs; echo real > after.csv"))["content"] != []  # watching again


async def test_output_files_stop_at_the_stored_bytes_cap(attack: Any) -> None:
    a, _ = attack
    for round_ in range(4):
        r = await a.bash(f"for i in 1 2 3; do head -c 1500000 /dev/urandom > out{round_}_$i.bin; done")
        if "cap on stored files" in r["stderr"]:
            break
    else:
        pytest.fail("the cap was never reached")
    listing = json.loads((await a.client.read_resource("codeexec://files")).contents[0].text)["files"]
    assert MAX_STORED - 1_500_000 < sum(f["size_bytes"] for f in listing) <= MAX_STORED


SWAPPER = r"""
import os, sys, time
end = time.time() + float(sys.argv[1])
while time.time() < end:
    for i in range(5):
        name = f"race{i}.txt"
        with open(name + ".tmp", "w") as f:
            f.write("inside\n")
        os.replace(name + ".tmp", name)
        time.sleep(0.002)  # a regular file half the time, a symlink out the other half
        try:
            os.symlink("/etc/passwd", name + ".lnk")
            os.replace(name + ".lnk", name)
        except FileExistsError:
            pass
        time.sleep(0.002)
"""


async def test_symlink_race_never_copies_out_what_lies_outside(attack: Any) -> None:
    """Files swapped for symlinks to /etc/passwd (readable by the user, outside the
    workspace) while the server copies outputs out and the editor views them."""
    a, _ = attack
    assert (await a.edit(command="create", path="swap.py", file_text=SWAPPER))["type"].endswith("create_result")
    seen: list[str] = []
    for _ in range(3):
        r = await a.bash("(python3 swap.py 4 &) ; python3 swap.py 1; echo done")
        assert r["stdout"] == "done\n", r
        for entry in r["content"]:
            blob = (await a.client.read_resource(f"codeexec://files/{entry['file_id']}")).contents[0]
            seen.append(base64.b64decode(blob.blob).decode("utf-8", "replace"))
        for _ in range(10):
            v = await a.edit(command="view", path="race0.txt")
            if v["type"] == "text_editor_code_execution_view_result":
                seen.append(v["content"])
            else:  # caught mid-swap: refused, whichever way it saw it
                assert v["error_code"] in ("invalid_tool_input", "file_not_found") and "root:" not in v["error_message"], v
    assert seen and all("root:" not in text for text in seen), ([t[:40] for t in seen], r, v)
