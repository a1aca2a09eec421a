"""bench/sentry_trace.py on small hand-written trace dumps (the format of `go tool trace -d=1`):
a goroutine in a system call that keeps the only P while another is runnable is one stall,
attributed to the first frame of its stack that is not plumbing, and it ends when sysmon
takes the P back or the call returns; a call with nothing runnable behind it is none."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("sentry_trace", ROOT / "bench" / "sentry_trace.py")
assert spec is not None and spec.loader is not None
sentry_trace = importlib.util.module_from_spec(spec)
sys.modules["sentry_trace"] = sentry_trace  # dataclasses look their module up there
spec.loader.exec_module(sentry_trace)

MS = 1_000_000


def goroutine(t: int, g: int, change: str, m: int = 7, p: int = 0, stack: tuple[str, ...] = ()) -> str:
    line = f'M={m} P={p} G={g} StateTransition Time={t} Resource=Goroutine({g}) Reason="" GoID={g} {change}\n'
    if stack:
        line += "Stack=\n" + "".join(f"\t{frame} @ 0x1\n\t\tfile.go:1\n" for frame in stack) + "\n"
    return line


def proc(t: int, change: str, m: int = 9) -> str:
    return f'M={m} P=-1 G=-1 StateTransition Time={t} Resource=Proc(0) Reason="" ProcID=0 {change}\n'


EPOLL = ("syscall.Syscall6", "golang.org/x/sys/unix.EpollWait", "gvisor.dev/gvisor/pkg/fdnotifier.epollWait")


def run(tmp_path: Path, text: str) -> list:
    dump = tmp_path / "dump.txt"
    dump.write_text(text)
    return sentry_trace.stalls(sentry_trace.read(str(dump)))


def test_a_held_p_with_work_behind_it_is_a_stall_until_sysmon_retakes_it(tmp_path: Path) -> None:
    found = run(
        tmp_path,
        goroutine(0, 5, "NotExist->Runnable")
        + goroutine(1 * MS, 19, "Running->Syscall", stack=EPOLL)
        + proc(16 * MS, "Running->Idle")  # sysmon takes the P back
        + proc(16 * MS + 10, "Idle->Running", m=8)
        + goroutine(16 * MS + 20, 5, "Runnable->Running", m=8),
    )
    assert len(found) == 1
    stall = found[0]
    assert (stall.start, stall.end, stall.holder, stall.waiting) == (1 * MS, 16 * MS, 19, 1)
    assert stall.site == "gvisor.dev/gvisor/pkg/fdnotifier.epollWait"


def test_a_held_p_with_nothing_runnable_is_no_stall_and_a_return_ends_one(tmp_path: Path) -> None:
    found = run(
        tmp_path,
        goroutine(0, 19, "Running->Syscall", stack=EPOLL)  # nothing waits: harmless
        + goroutine(2 * MS, 19, "Syscall->Running")
        + goroutine(3 * MS, 19, "Running->Syscall", stack=EPOLL)
        + goroutine(4 * MS, 6, "Waiting->Runnable", m=3)  # woken while the P is held
        + goroutine(7 * MS, 19, "Syscall->Running")  # the call returns: the stall ends
        + goroutine(8 * MS, 6, "Runnable->Running"),
    )
    assert [(s.start, s.end, s.holder) for s in found] == [(4 * MS, 7 * MS, 19)]
