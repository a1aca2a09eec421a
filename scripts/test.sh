#!/usr/bin/env bash
# Set the machine up (scripts/setup.sh), run the test suite, and stop dockerd
# again if and only if this run started it. Arguments go to pytest.
# Exits with pytest's status.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1

STARTED_FILE="$(mktemp "${TMPDIR:-/tmp}/mcp-codeexec-dockerd.XXXXXX")"
export MCP_CODEEXEC_DOCKERD_STARTED_FILE="$STARTED_FILE"

SUDO=()
[[ "$(id -u)" -eq 0 ]] || SUDO=(sudo)

# shellcheck disable=SC2329 # (used by the EXIT trap)
# Running, and not a zombie (its parent exited; init may be slow to reap it).
alive() { [[ -r "/proc/$1/stat" && "$(awk '{ print $3 }' "/proc/$1/stat" 2>/dev/null)" != Z ]]; }

# shellcheck disable=SC2329
stop_dockerd() {
    local pid i
    pid="$(cat "$STARTED_FILE" 2>/dev/null || true)"
    rm -f "$STARTED_FILE"
    [[ -n "$pid" ]] || return 0
    if alive "$pid"; then
        echo "test.sh: stopping the dockerd that setup started (pid $pid)" >&2
        "${SUDO[@]}" kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 60; i++)); do
            alive "$pid" || break
            sleep 0.5
        done
        if alive "$pid"; then
            echo "test.sh: dockerd (pid $pid) still running after 30s; killing it" >&2
            "${SUDO[@]}" kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    if [[ "$(cat "$ROOT/.cache/dockerd.pid" 2>/dev/null || true)" == "$pid" ]]; then
        rm -f "$ROOT/.cache/dockerd.pid"
    fi
}
trap stop_dockerd EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

scripts/setup.sh || exit $?
# Static checks first (config in pyproject.toml): seconds, and a failure stops the run.
.venv/bin/ruff check src tests bench || exit $?
.venv/bin/mypy || exit $?
.venv/bin/python -m pytest -q tests/unit tests/e2e "$@"
exit $?
