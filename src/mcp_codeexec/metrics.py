"""Prometheus metrics, in the text exposition format (no client library needed for a
handful of counters and one histogram)."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any

_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self) -> None:
        self.calls: Counter[tuple[str, str]] = Counter()  # (tool, outcome)
        self.errors: Counter[tuple[str, str]] = Counter()  # (tool, error_code)
        self.latency: dict[str, list[int]] = {}  # tool -> cumulative counts per bucket (+Inf last)
        self.latency_sum: defaultdict[str, float] = defaultdict(float)
        self.gauges: dict[str, Callable[[], float]] = {}

    def observe(self, tool: str, result: Any, seconds: float) -> None:
        code = getattr(result, "error_code", None)
        self.calls[(tool, "error" if code else "ok")] += 1
        if code:
            self.errors[(tool, code)] += 1
        counts = self.latency.setdefault(tool, [0] * (len(_BUCKETS) + 1))
        for i, bound in enumerate(_BUCKETS):
            if seconds <= bound:
                counts[i] += 1
        counts[-1] += 1
        self.latency_sum[tool] += seconds

    def render(self) -> str:
        lines = [
            "# HELP mcp_codeexec_calls_total Tool calls by outcome.",
            "# TYPE mcp_codeexec_calls_total counter",
            *(f'mcp_codeexec_calls_total{{tool="{t}",outcome="{o}"}} {n}' for (t, o), n in sorted(self.calls.items())),
            "# HELP mcp_codeexec_errors_total Tool error results by error code.",
            "# TYPE mcp_codeexec_errors_total counter",
            *(f'mcp_codeexec_errors_total{{tool="{t}",code="{c}"}} {n}' for (t, c), n in sorted(self.errors.items())),
            "# HELP mcp_codeexec_call_seconds Tool call latency.",
            "# TYPE mcp_codeexec_call_seconds histogram",
        ]
        for tool, counts in sorted(self.latency.items()):
            for bound, count in zip((*_BUCKETS, "+Inf"), counts):
                lines.append(f'mcp_codeexec_call_seconds_bucket{{tool="{tool}",le="{bound}"}} {count}')
            lines.append(f'mcp_codeexec_call_seconds_sum{{tool="{tool}"}} {self.latency_sum[tool]:.6f}')
            lines.append(f'mcp_codeexec_call_seconds_count{{tool="{tool}"}} {counts[-1]}')
        for name, read in sorted(self.gauges.items()):
            lines += [f"# TYPE mcp_codeexec_{name} gauge", f"mcp_codeexec_{name} {read()}"]
        return "\n".join(lines) + "\n"
