"""metrics.py: counters, the latency histogram and gauges in Prometheus text format."""

from __future__ import annotations

from mcp_codeexec import wire
from mcp_codeexec.metrics import Metrics


def test_render_counts_outcomes_errors_and_buckets() -> None:
    m = Metrics()
    m.observe("bash_code_execution", wire.BashResult(stdout="", stderr="", return_code=0), 0.02)
    m.observe("bash_code_execution", wire.BashError(error_code="unavailable"), 3.0)
    m.observe("text_editor_code_execution", wire.CreateResult(is_file_update=False), 400.0)
    m.gauges["pool_size"] = lambda: 2
    lines = m.render().splitlines()
    assert 'mcp_codeexec_calls_total{tool="bash_code_execution",outcome="ok"} 1' in lines
    assert 'mcp_codeexec_calls_total{tool="bash_code_execution",outcome="error"} 1' in lines
    assert 'mcp_codeexec_errors_total{tool="bash_code_execution",code="unavailable"} 1' in lines
    # Cumulative buckets: 0.02 s is in every bucket from 0.025 on, 3 s from 5 on.
    assert 'mcp_codeexec_call_seconds_bucket{tool="bash_code_execution",le="0.01"} 0' in lines
    assert 'mcp_codeexec_call_seconds_bucket{tool="bash_code_execution",le="0.025"} 1' in lines
    assert 'mcp_codeexec_call_seconds_bucket{tool="bash_code_execution",le="2.5"} 1' in lines
    assert 'mcp_codeexec_call_seconds_bucket{tool="bash_code_execution",le="5"} 2' in lines
    assert 'mcp_codeexec_call_seconds_bucket{tool="bash_code_execution",le="+Inf"} 2' in lines
    assert 'mcp_codeexec_call_seconds_sum{tool="bash_code_execution"} 3.020000' in lines
    assert 'mcp_codeexec_call_seconds_count{tool="bash_code_execution"} 2' in lines
    # Past the largest bucket: only +Inf counts it.
    assert 'mcp_codeexec_call_seconds_bucket{tool="text_editor_code_execution",le="300"} 0' in lines
    assert 'mcp_codeexec_call_seconds_bucket{tool="text_editor_code_execution",le="+Inf"} 1' in lines
    assert lines[-2:] == ["# TYPE mcp_codeexec_pool_size gauge", "mcp_codeexec_pool_size 2"]


def test_empty_metrics_still_declare_their_types() -> None:
    text = Metrics().render()
    assert text.endswith("\n")
    assert "# TYPE mcp_codeexec_calls_total counter" in text and "# TYPE mcp_codeexec_call_seconds histogram" in text
    assert "_bucket" not in text
