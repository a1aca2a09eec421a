"""Where a gVisor sentry keeps its Go processor while work waits: reads a Go execution trace of
runsc's sentry and prints every interval in which a goroutine sat in a system call holding a
processor (P) while other goroutines were runnable, grouped by where that call was made.

Why this exists: a sandbox pinned to one core runs its sentry with one P. A goroutine that
enters a blocking host call keeps that P until Go's sysmon takes it back, and sysmon, once
idle, checks only every 10 ms. Under the ptrace platform every stretch of user code is such
a call (the task waits in wait4 while the stub runs), which costs nothing; gVisor's host-fd
notifier waiting in epoll_wait is one too, and there every goroutine behind it just waits.
README.md ("Performance") has what this found; this script is how to see it again, for
example on a newer gVisor.

How to get a trace (runsc writes it while the container runs, and finishes it when it stops):
  1. In /etc/docker/daemon.json, copy the runsc runtime as "runsc-trace" and append
     "--profile", "--trace=/tmp/sentry.trace" to its runtimeArgs; `kill -HUP` dockerd.
  2. Run the workload against it, e.g. the server with `--runtime runsc-trace
     --allow-weak-isolation` driven by bench/workloads.py's calls, then stop the container.
  3. Dump it with a Go at least as new as the one runsc was built with (`go version -m
     $(which runsc)`; Debian's bookworm-backports has golang-1.22-go):
         go tool trace -d=1 /tmp/sentry.trace > /tmp/sentry.txt
  4. .venv/bin/python bench/sentry_trace.py /tmp/sentry.txt

The dump's lines look like
    M=20463 P=0 G=19 StateTransition Time=63306828728192 Resource=Goroutine(19) ... Running->Syscall
followed by indented stack frames. Only goroutine and processor transitions are read.
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import NamedTuple

EVENT = re.compile(r"^M=(-?\d+) P=(-?\d+) G=(-?\d+) StateTransition Time=(\d+) Resource=(Goroutine|Proc)\((\d+)\).* (\w+)->(\w+)$")
FRAME = re.compile(r"^\t(\S+) @ 0x")
# Frames that say nothing about who made the call.
PLUMBING = ("runtime.", "syscall.", "golang.org/x/sys/unix.", "runtime/internal/")


@dataclass
class Stall:
    start: int
    end: int
    holder: int
    site: str
    waiting: int  # goroutines runnable when it began


class Event(NamedTuple):
    time: int
    p: int  # the processor the transition's M held, -1 for none
    kind: str  # "Goroutine" or "Proc"
    ident: int
    old: str
    new: str
    site: str = ""  # for Running->Syscall: the first telling frame of its stack


def read(path: str) -> list[Event]:
    """Every goroutine and processor transition in the dump, in time order."""
    events: list[Event] = []
    pending: Event | None = None  # a Running->Syscall whose stack is still to come
    with open(path, errors="replace") as f:
        for line in f:
            if line.startswith("\t"):
                m = FRAME.match(line)
                if pending is not None and m and not m.group(1).startswith(PLUMBING):
                    events.append(pending._replace(site=m.group(1)))
                    pending = None
                continue
            if pending is not None and line.startswith("M="):
                events.append(pending)
                pending = None
            m = EVENT.match(line)
            if not m:
                continue
            _, p, _, t, kind, ident, old, new = m.groups()
            event = Event(int(t), int(p), kind, int(ident), old, new)
            if kind == "Goroutine" and (old, new) == ("Running", "Syscall"):
                pending = event
            else:
                events.append(event)
    if pending is not None:
        events.append(pending)
    events.sort(key=lambda e: e.time)
    return events


def stalls(events: list[Event]) -> list[Stall]:
    """Intervals in which a P's goroutine was in a system call and another was runnable."""
    runnable: set[int] = set()
    holder: dict[int, tuple[int, int, str]] = {}  # P -> (goroutine, since, site)
    open_: dict[int, Stall] = {}
    found: list[Stall] = []

    def close(p: int, t: int) -> None:
        stall = open_.pop(p, None)
        if stall is not None:
            stall.end = t
            found.append(stall)

    for t, p, kind, ident, old, new, site in events:
        if kind == "Proc":
            if new != "Running":  # retaken (sysmon) or stopped: whoever held it no longer does
                holder.pop(ident, None)
                close(ident, t)
            continue
        if new == "Runnable":
            runnable.add(ident)
        elif old == "Runnable":
            runnable.discard(ident)
        if old == "Running" and new == "Syscall" and p >= 0:
            holder[p] = (ident, t, site)
        elif old == "Syscall":
            for q, (g, _, _) in list(holder.items()):
                if g == ident:
                    holder.pop(q)
                    close(q, t)
        if new == "Running" and p >= 0 and p in holder and holder[p][0] != ident:
            holder.pop(p)
            close(p, t)
        for q, (g, since, where) in holder.items():
            if q not in open_ and runnable - {g}:
                open_[q] = Stall(max(since, t), 0, g, where or "?", len(runnable - {g}))
    end = events[-1].time if events else 0
    for p in list(open_):
        close(p, end)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dump", help="the output of `go tool trace -d=1 TRACE`")
    parser.add_argument("--min-ms", type=float, default=1.0, help="shortest stall to count (default 1 ms)")
    parser.add_argument("--longest", type=int, default=10, help="how many of the longest stalls to list")
    args = parser.parse_args()
    events = read(args.dump)
    found = [s for s in stalls(events) if (s.end - s.start) / 1e6 >= args.min_ms]
    span = (events[-1].time - events[0].time) / 1e6 if events else 0.0
    by_site: dict[str, list[float]] = defaultdict(list)
    for s in found:
        by_site[s.site].append((s.end - s.start) / 1e6)
    print(f"trace: {span:.0f} ms, {len(events)} transitions; stalls of at least {args.min_ms:g} ms: {len(found)}")
    print(f"\n{'system call made in':72} {'stalls':>6} {'total ms':>9} {'max ms':>7}")
    for site, durations in sorted(by_site.items(), key=lambda kv: -sum(kv[1])):
        print(f"{site[:72]:72} {len(durations):6d} {sum(durations):9.1f} {max(durations):7.1f}")
    print(f"\nlongest {args.longest}: at ms (from the trace's start), held by goroutine, runnable behind it")
    t0 = events[0].time if events else 0
    for s in sorted(found, key=lambda s: s.start - s.end)[: args.longest]:
        print(f"  {(s.start - t0) / 1e6:10.3f}  {(s.end - s.start) / 1e6:6.2f} ms  G{s.holder:<6} {s.waiting:3d} waiting  {s.site}")


if __name__ == "__main__":
    main()
