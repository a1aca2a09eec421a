#!/usr/bin/env python3
"""What sleeping sandboxes cost and save (issue 13: gVisor checkpoint/restore), measured in
one run on this host, through the server's own sandbox code (sandbox.Sandbox over the
Docker backend: the same start, restore, agent connection and requests a tool call uses).

Usage: .venv/bin/python bench/checkpoint.py [--rounds 10] [--density 8]

Rows (p50 and p99 in ms, and p50 against the floor):
- floor: a warm call (`echo` through the connected agent);
- cold start to first result: the sandbox stopped, then the same call (start, agent load);
- restore to first result: the sandbox checkpointed, then the same call (restore, reconnect);
- the same with pandas imported and a 100 MB DataFrame in the REPL, against what a cold
  start costs to get back there (start, import pandas, rebuild the DataFrame);
- checkpoint time and image size, idle and with pandas + the DataFrame;
- density: N idle sandboxes running (host memory, PSS of their gVisor processes) and then
  checkpointed (host memory, disk), and how many checkpointed sandboxes this disk holds.
"""

from __future__ import annotations

import argparse
import secrets
import shutil
import sys
import time
from datetime import timedelta
from pathlib import Path

import anyio
import anyio.abc

from mcp_codeexec.agent import protocol as p
from mcp_codeexec.config import Settings
from mcp_codeexec.deployment.base import remove_all
from mcp_codeexec.deployment.docker import DockerDeployment
from mcp_codeexec.sandbox import ContainerInfo, Sandbox, sandbox_spec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import pct, sandbox_memory_kib  # noqa: E402  (bench/bench.py)

DATAFRAME = "import numpy as np, pandas as pd\ndf = pd.DataFrame(np.random.rand(1_310_720, 10))\nprint(df.shape)"


def echo(settings: Settings) -> p.Exec:
    return p.Exec(command="echo ok", cwd=settings.workdir, timeout=60, max_output=1000, stream=False)


def cell(settings: Settings, code: str) -> p.Repl:
    return p.Repl(code=code, timeout=120, max_output=1000, timeout_is_result=True, stream=False, cwd=settings.workdir)


async def new_sandbox(backend: DockerDeployment, settings: Settings, tg: anyio.abc.TaskGroup, prefix: str) -> Sandbox:
    info = ContainerInfo.new(timedelta(hours=2))
    name = f"{prefix}{info.id}"
    await backend.create(sandbox_spec(settings, name, f"mcp-codeexec-ws.{info.id}", info))
    sandbox = Sandbox(settings, backend, tg, name, info)
    await sandbox.request(echo(settings), 90)
    return sandbox


async def first_result(sandbox: Sandbox, request: p.Request) -> float:
    started = time.perf_counter()
    reply = await sandbox.request(request, 180)
    assert not isinstance(reply, p.Failure) and reply.return_code == 0, reply
    return time.perf_counter() - started


async def main(args: argparse.Namespace) -> None:
    settings = Settings(memory_bytes=2 << 30)
    backend = DockerDeployment(settings.runtime)
    await backend.check(settings.image)
    if not backend.can_checkpoint:
        sys.exit("this engine cannot checkpoint (scripts/setup.sh turns on its experimental mode)")
    prefix = f"mcp-codeexec.bench-ckpt-{secrets.token_hex(3)}."
    rows: list[tuple[str, str, str, str]] = []

    def row(what: str, samples: list[float], floor: float | None) -> None:
        p50 = pct(samples, 0.5)
        rows.append((what, f"{p50:.0f}", f"{pct(samples, 0.99):.0f}", f"{p50 / floor:.1f}x" if floor else "1.0x"))

    try:
        async with anyio.create_task_group() as tg:
            s = await new_sandbox(backend, settings, tg, prefix)
            warm = [await first_result(s, echo(settings)) for _ in range(args.rounds * 5)]
            floor = pct(warm, 0.5)
            row("warm call (floor)", warm, None)

            cold = []
            for _ in range(args.rounds):
                await s.stop()
                cold.append(await first_result(s, echo(settings)))
            row("cold start to first result", cold, floor)

            restore, slept, idle_sizes = [], [], []
            for _ in range(args.rounds):
                t = time.perf_counter()
                what, size = await s.sleep()
                assert what == "checkpointed", what
                slept.append(time.perf_counter() - t)
                idle_sizes.append(size or 0)
                restore.append(await first_result(s, echo(settings)))
                notice = s.take_notice()
                assert not notice, notice
            row("restore to first result (idle sandbox)", restore, floor)
            row("checkpoint (idle sandbox)", slept, floor)

            # pandas + a 100 MB DataFrame in the REPL.
            t = time.perf_counter()
            await first_result(s, cell(settings, DATAFRAME))
            rebuild = time.perf_counter() - t
            restore_df, slept_df, df_sizes = [], [], []
            for _ in range(max(3, args.rounds // 2)):
                t = time.perf_counter()
                what, size = await s.sleep()
                assert what == "checkpointed", what
                slept_df.append(time.perf_counter() - t)
                df_sizes.append(size or 0)
                restore_df.append(await first_result(s, cell(settings, "print(df.shape)")))
            cold_df = []
            for _ in range(max(3, args.rounds // 2)):
                await s.stop()
                cold_df.append(await first_result(s, cell(settings, DATAFRAME)))
            row("restore to first result (pandas + 100 MB DataFrame)", restore_df, floor)
            row("cold start + import pandas + rebuild the DataFrame", cold_df, floor)
            row("checkpoint (pandas + 100 MB DataFrame)", slept_df, floor)
            await s.detach()

            # Density: idle sandboxes running, then all checkpointed.
            crowd = [await new_sandbox(backend, settings, tg, prefix) for _ in range(args.density)]
            ids = [backend.api.inspect_container(c.name)["Id"] for c in crowd]
            running_kib = sum(sandbox_memory_kib(i) for i in ids)
            crowd_sizes = [(await c.sleep())[1] or 0 for c in crowd]
            asleep_kib = sum(sandbox_memory_kib(i) for i in ids)
            tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await remove_all(backend, prefix)

    mib = 1 << 20
    free = shutil.disk_usage(backend._root_dir).free
    per = sum(crowd_sizes) / len(crowd_sizes)
    print(f"checkpoint/restore on this host (runsc, {args.rounds} rounds; first DataFrame build {rebuild * 1000:.0f} ms)\n")
    print(f"| {'what':<52} | {'p50 ms':>7} | {'p99 ms':>7} | {'p50 / floor':>11} |")
    print(f"|{'-' * 54}|{'-' * 9}|{'-' * 9}|{'-' * 13}|")
    for what, p50, p99, ratio in rows:
        print(f"| {what:<52} | {p50:>7} | {p99:>7} | {ratio:>11} |")
    print()
    print(f"checkpoint image, idle sandbox: {sum(idle_sizes) / len(idle_sizes) / mib:.1f} MiB (mean)")
    print(f"checkpoint image, pandas + 100 MB DataFrame: {sum(df_sizes) / len(df_sizes) / mib:.1f} MiB (mean)")
    print(f"{args.density} idle sandboxes running: {running_kib / 1024:.0f} MiB host memory (PSS), "
          f"{running_kib / 1024 / args.density:.1f} MiB each")
    print(f"the same {args.density} checkpointed: {asleep_kib / 1024:.0f} MiB host memory, "
          f"{sum(crowd_sizes) / mib:.0f} MiB disk ({per / mib:.1f} MiB each)")
    print(f"this disk ({free / (1 << 30):.0f} GiB free under {backend._root_dir}) holds ~{int(free / per)} checkpointed idle "
          f"sandboxes; host memory held while asleep: {asleep_kib / 1024 / args.density:.1f} MiB each")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--density", type=int, default=8)
    anyio.run(main, ap.parse_args())
