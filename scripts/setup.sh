#!/usr/bin/env bash
# Prepare this machine to run and test mcp-codeexec. Idempotent; meant for
# Debian 12, run as root (or a user with sudo).
#
#  1. apt-installs docker.io, runsc, debootstrap, python3-venv (and npm, for the
#     conformance test) if missing;
#  2. picks the gVisor platform: $MCP_CODEEXEC_RUNSC_PLATFORM if set, else
#     the fastest the host supports by measurement (src/mcp_codeexec/platforms.py:
#     kvm where /dev/kvm works, systrap, ptrace; a spawn and a Python import
#     timed under each; cached in ~/.cache/mcp-codeexec/ per runsc release,
#     kernel and /dev/kvm), and merges a "runsc" runtime with it into
#     /etc/docker/daemon.json (scripts/daemon_json.py; also "experimental":
#     true, for checkpoint/restore);
#  3. starts dockerd if it is not answering (systemd when it is PID 1, else
#     in the background, log .cache/dockerd.log, pid in .cache/dockerd.pid);
#     reloads it (SIGHUP) if the runtimes changed, restarts it (once) if it
#     is not in experimental mode, which checkpoint/restore needs (its
#     running containers stop then);
#  4. builds the sandbox image (sandbox/build.sh; MCP_CODEEXEC_IMAGE_SOURCE=
#     auto|registry|no-registry picks its mode, default auto);
#  5. creates .venv and installs the project with its test extra (again only
#     when pyproject.toml changed);
#  6. npm-installs the OAuth tests' tools (an OpenID provider, the MCP Inspector,
#     Node 22) into ~/.cache/mcp-codeexec/oidc-<hash of tests/oidc/package*.json>;
#  7. installs the real upstream MCP servers the tool calling tests call
#     (tests/upstreams/pins.txt), cached under ~/.cache/mcp-codeexec/upstreams;
#  8. builds kube-apiserver for the Kubernetes backend's tests (scripts/k8s.sh
#     build: etcd-server and Go from apt, kube-apiserver from Debian's source;
#     ~5 min once, then cached under ~/.cache/mcp-codeexec/kube-VERSION/).
#     MCP_CODEEXEC_KUBE=0 skips it (tests/e2e/test_kubernetes.py then fails).
#
# Quiet on success apart from a short summary on stdout; details in .cache/.
# If MCP_CODEEXEC_DOCKERD_STARTED_FILE names a file, the pid of a dockerd that
# this run started is written there (scripts/test.sh uses it to stop it).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
CACHE="$ROOT/.cache"
LOG="$CACHE/setup.log"
DOCKERD_LOG="$CACHE/dockerd.log"
DOCKERD_PIDFILE="$CACHE/dockerd.pid"
DAEMON_JSON=/etc/docker/daemon.json
PLATFORM_OVERRIDE="${MCP_CODEEXEC_RUNSC_PLATFORM:-}"
CONSTANTS="$ROOT/src/mcp_codeexec/constants.py"
USER_CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/mcp-codeexec"
IMAGE_SOURCE="${MCP_CODEEXEC_IMAGE_SOURCE:-auto}"
DOCKERD_TIMEOUT=60

mkdir -p "$CACHE"
START=$SECONDS

say() { printf 'setup: %s\n' "$*"; }
die() {
    printf 'setup: error: %s\n' "$*" >&2
    exit 1
}
# Run a step with its output appended to the log; on failure show the tail.
logged() { # DESCRIPTION CMD...
    local what="$1"
    shift
    printf '\n===== %s %s\n' "$(date '+%F %T')" "$what" >>"$LOG"
    local mark
    mark=$(wc -l <"$LOG")
    if ! "$@" >>"$LOG" 2>&1; then
        printf 'setup: error: %s failed; last lines of %s:\n' "$what" "$LOG" >&2
        show_tail "$LOG" "$mark"
        exit 1
    fi
}
show_tail() { # FILE LINE: the last lines of FILE written after line LINE
    tail -n +"$(($2 + 1))" "$1" | tail -n 30 | sed -e 's/^/    /' >&2
}

SUDO=()
if [[ "$(id -u)" -ne 0 ]]; then
    command -v sudo >/dev/null || die "not root and sudo is not installed"
    SUDO=(sudo)
fi

# One setup at a time (several MCP clients may start serve.sh together).
exec 9>"$CACHE/setup.lock"
flock 9

# Look a command up in PATH and in the sbin directories (not in a user's PATH).
find_cmd() {
    local c="$1" d
    if command -v "$c" >/dev/null 2>&1; then
        command -v "$c"
        return 0
    fi
    for d in /usr/local/sbin /usr/sbin /sbin; do
        [[ -x "$d/$c" ]] && { echo "$d/$c"; return 0; }
    done
    return 1
}

# ------------------------------------------------------------ 1. packages
# gVisor releases before 2024 reject statx(AT_NO_AUTOMOUNT), so coreutils'
# ls and stat fail with EINVAL inside the sandbox. Bookworm's own runsc is
# release 2022-12-19; bookworm-backports has 2024-07-29, which works. So on
# bookworm, runsc comes from backports (MCP_CODEEXEC_RUNSC_BACKPORTS=0: don't).
USE_BACKPORTS="${MCP_CODEEXEC_RUNSC_BACKPORTS:-1}"
CODENAME="$(. /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-}")"
BACKPORTS_SOURCES=/etc/apt/sources.list.d/mcp-codeexec-backports.sources
notes=()

apt_install() { # PACKAGE...
    logged "apt-get install $*" "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q -o Dpkg::Use-Pty=0 "$@"
}
runsc_release() { "$1" --version 2>/dev/null | grep -oE '20[0-9]{6}' | head -n 1; }

# Adds a $CODENAME-backports source (on the machine's own Debian mirror)
# unless one is configured. Fails if no Debian mirror is configured.
ensure_backports_source() {
    local found mirror
    found="$(python3 "$ROOT/sandbox/debian_sources.py" "$CODENAME" "$CODENAME-backports")"
    grep -q "^$CODENAME-backports " <<<"$found" && return 0
    mirror="$(awk -v s="$CODENAME" '$1 == s { print $2 }' <<<"$found")"
    [[ -n "$mirror" ]] || return 1
    printf 'Types: deb\nURIs: %s\nSuites: %s-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
        "$mirror" "$CODENAME" | "${SUDO[@]}" tee "$BACKPORTS_SOURCES" >/dev/null
    notes+=("added $BACKPORTS_SOURCES")
}

apt_updated=0
if ! command -v python3 >/dev/null; then
    say "installing python3 (log: $LOG)"
    logged "apt-get update" "${SUDO[@]}" apt-get update -q
    apt_updated=1
    apt_install python3 python3-venv
    notes+=("installed python3 python3-venv")
fi

RUNSC_MIN_RELEASE="$(python3 "$CONSTANTS" RUNSC_MIN_RELEASE)"
missing=()
{ find_cmd dockerd && find_cmd docker; } >/dev/null || missing+=(docker.io)
find_cmd debootstrap >/dev/null || missing+=(debootstrap)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
# The sandbox image's Python libraries are wheels installed by the host's pip
# (sandbox/wheels.py); workspace disk quotas need losetup, mkfs.ext4 and debugfs.
python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
{ find_cmd mkfs.ext4 && find_cmd debugfs; } >/dev/null || missing+=(e2fsprogs)
find_cmd losetup >/dev/null || missing+=(mount)
# npm runs the official MCP conformance suite in the tests (it fetches its own pinned Node).
find_cmd npx >/dev/null || missing+=(npm)
runsc_pkg=""
runsc_fallback=""
backports_ok=0
if [[ "$USE_BACKPORTS" != 0 && "$CODENAME" == bookworm ]]; then
    backports_ok=1
fi
if RUNSC="$(find_cmd runsc)"; then
    rel="$(runsc_release "$RUNSC")"
    if [[ -n "$rel" && "$rel" -lt "$RUNSC_MIN_RELEASE" ]]; then
        if ((backports_ok)); then
            runsc_pkg="runsc/$CODENAME-backports" # upgrade
        else
            notes+=("warning: runsc release $rel is older than 2024: ls and stat fail inside the sandbox")
        fi
    fi
else
    runsc_fallback=runsc
    if ((backports_ok)); then
        runsc_pkg="runsc/$CODENAME-backports"
    else
        runsc_pkg=runsc
    fi
fi
if [[ "$runsc_pkg" == */* ]] && ! ensure_backports_source; then
    notes+=("warning: no Debian mirror for $CODENAME in the apt sources; runsc not from backports")
    runsc_pkg="$runsc_fallback"
fi
[[ -n "$runsc_pkg" ]] && missing+=("$runsc_pkg")

if ((${#missing[@]})); then
    say "installing ${missing[*]} (log: $LOG)"
    if ((!apt_updated)) || [[ "$runsc_pkg" == */* ]]; then
        logged "apt-get update" "${SUDO[@]}" apt-get update -q
    fi
    if [[ "$runsc_pkg" == */* ]] && ! (apt_install "${missing[@]}") 2>/dev/null; then
        # Backports unusable: the distribution's runsc (if none is installed).
        notes+=("warning: could not install $runsc_pkg; see $LOG")
        retry=()
        for p in "${missing[@]}"; do
            [[ "$p" == "$runsc_pkg" ]] && p="$runsc_fallback"
            [[ -n "$p" ]] && retry+=("$p")
        done
        missing=("${retry[@]}")
        ((${#missing[@]} == 0)) || apt_install "${missing[@]}"
    elif [[ "$runsc_pkg" != */* ]]; then
        apt_install "${missing[@]}"
    fi
    summary_pkgs="installed ${missing[*]}"
else
    summary_pkgs="present"
fi
DOCKERD="$(find_cmd dockerd)" || die "dockerd not found after installing docker.io"
RUNSC="$(find_cmd runsc)" || die "runsc not found after installing it"
summary_pkgs+=" (runsc release $(runsc_release "$RUNSC" || true))"

if [[ -n "${MCP_CODEEXEC_DOCKER:-}" ]]; then
    read -r -a DOCKER_CMD <<<"$MCP_CODEEXEC_DOCKER"
elif [[ -x /usr/bin/docker ]]; then
    DOCKER_CMD=(/usr/bin/docker) # the distribution's client matches its daemon
else
    DOCKER_CMD=(docker)
fi
export MCP_CODEEXEC_DOCKER="${DOCKER_CMD[*]}" # same client for build.sh
dk() { "${DOCKER_CMD[@]}" "$@"; }
docker_ok() { dk version --format '{{.Server.Version}}' >/dev/null 2>&1; }
docker_has_runsc() {
    # shellcheck disable=SC2016 # a Go template
    dk info --format '{{range $name, $_ := .Runtimes}}{{$name}} {{end}}' 2>/dev/null \
        | tr ' ' '\n' | grep -qx runsc
}

# ------------------------------------------------------- 2. daemon.json
# The platform: the override, or the fastest by measurement (cached: the probe
# takes up to a minute where KVM hangs).
if [[ -n "$PLATFORM_OVERRIDE" ]]; then
    PLATFORM="$PLATFORM_OVERRIDE"
    summary_platform="$PLATFORM (MCP_CODEEXEC_RUNSC_PLATFORM)"
else
    mkdir -p "$USER_CACHE"
    key="$(runsc_release "$RUNSC" || true)-$(uname -r)-$([[ -e /dev/kvm ]] && echo kvm || echo nokvm)"
    choice_file="$USER_CACHE/runsc-platform.$key"
    if [[ ! -s "$choice_file" ]]; then
        say "timing the gVisor platforms this host supports (once per runsc release and kernel)"
        "${SUDO[@]}" python3 "$ROOT/src/mcp_codeexec/platforms.py" "$RUNSC" >"$choice_file.tmp" 2>>"$LOG" \
            || { rm -f "$choice_file.tmp"; die "no gVisor platform works here (see $LOG)"; }
        mv "$choice_file.tmp" "$choice_file"
    fi
    IFS=$'\t' read -r PLATFORM why <"$choice_file"
    summary_platform="$PLATFORM, $why"
fi
command -v python3 >/dev/null || die "python3 not found"
# Prints unchanged, reload (runtimes changed) or restart (experimental added).
daemon_json_state="$("${SUDO[@]}" python3 "$ROOT/scripts/daemon_json.py" "$DAEMON_JSON" "$RUNSC" "$PLATFORM" "$PLATFORM")" \
    || die "could not update $DAEMON_JSON"
summary_json="$daemon_json_state"

# ------------------------------------------------------------- 3. dockerd
systemd_is_init() { [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null; }

wait_for_docker() { # PID-or-empty
    local deadline=$((SECONDS + DOCKERD_TIMEOUT))
    until docker_ok; do
        if [[ -n "${1:-}" && ! -d "/proc/$1" ]]; then
            printf 'setup: error: dockerd exited; last lines of %s:\n' "$DOCKERD_LOG" >&2
            show_tail "$DOCKERD_LOG" "$DOCKERD_LOG_MARK"
            exit 1
        fi
        ((SECONDS < deadline)) || die "dockerd did not answer within ${DOCKERD_TIMEOUT}s (log: $DOCKERD_LOG)"
        sleep 0.5
    done
}

dockerd_pid() {
    local p
    p="$(cat /var/run/docker.pid 2>/dev/null || true)"
    [[ -n "$p" && -d "/proc/$p" ]] && { echo "$p"; return 0; }
    pidof dockerd 2>/dev/null | awk '{ print $1 }'
}

start_dockerd() { # [restart]: a daemon that ran before, so not ours to stop
    # Own session, no inherited descriptors (not the lock, not the caller's
    # stdout: serve.sh's stdout is an MCP stream).
    printf '\n===== %s starting %s\n' "$(date '+%F %T')" "$DOCKERD" >>"$DOCKERD_LOG"
    DOCKERD_LOG_MARK=$(wc -l <"$DOCKERD_LOG")
    "${SUDO[@]}" setsid "$DOCKERD" </dev/null >>"$DOCKERD_LOG" 2>&1 9>&- &
    local launcher=$! pid
    wait_for_docker "$launcher"
    pid="$(dockerd_pid)"
    [[ -n "$pid" ]] || pid="$launcher"
    echo "$pid" >"$DOCKERD_PIDFILE"
    if [[ -n "${MCP_CODEEXEC_DOCKERD_STARTED_FILE:-}" && "${1:-}" != restart ]]; then
        echo "$pid" >"$MCP_CODEEXEC_DOCKERD_STARTED_FILE"
    fi
    summary_dockerd="started (pid $pid, log .cache/dockerd.log)"
}

if docker_ok; then
    summary_dockerd="running"  # restarted below if daemon.json had to add experimental mode
elif [[ "$(id -u)" -ne 0 ]] && sudo -n "${DOCKER_CMD[@]}" version >/dev/null 2>&1; then
    die "dockerd runs but $(id -un) may not use it: add the user to the docker group (or run as root)"
elif systemd_is_init; then
    logged "systemctl start docker" "${SUDO[@]}" systemctl start docker
    wait_for_docker ""
    summary_dockerd="started by systemd"
else
    start_dockerd
fi

# A daemon that was already running reads changed runtimes again on SIGHUP.
if [[ "$daemon_json_state" == reload && "$summary_dockerd" == running ]] || ! docker_has_runsc; then
    if systemd_is_init; then
        logged "systemctl reload docker" "${SUDO[@]}" systemctl reload docker
    else
        pid="$(dockerd_pid)"
        [[ -n "$pid" ]] || die "cannot find dockerd's pid to reload it"
        "${SUDO[@]}" kill -HUP "$pid"
    fi
    deadline=$((SECONDS + 20))
    until docker_has_runsc; do
        ((SECONDS < deadline)) || die "dockerd does not list the runsc runtime after a reload (see $DAEMON_JSON, $DOCKERD_LOG)"
        sleep 0.5
    done
    summary_dockerd+=", reloaded"
fi
summary_dockerd+=", runtimes include runsc"

# Experimental mode is read at start only: a daemon without it is restarted,
# once (its containers stop; mcp-codeexec's restart on their next use).
docker_experimental() { [[ "$(dk info --format '{{.ExperimentalBuild}}' 2>/dev/null)" == true ]]; }
if ! docker_experimental; then
    if systemd_is_init; then
        logged "systemctl restart docker" "${SUDO[@]}" systemctl restart docker
        wait_for_docker ""
    else
        pid="$(dockerd_pid)"
        [[ -n "$pid" ]] || die "cannot find dockerd's pid to restart it in experimental mode"
        "${SUDO[@]}" kill -TERM "$pid"
        deadline=$((SECONDS + 60))
        while [[ -d "/proc/$pid" ]]; do
            ((SECONDS < deadline)) || die "dockerd (pid $pid) did not exit within 60s; restart it by hand"
            sleep 0.2
        done
        start_dockerd restart
    fi
    docker_experimental || die "dockerd is not in experimental mode after a restart (see $DAEMON_JSON, $DOCKERD_LOG)"
    summary_dockerd+=", restarted in experimental mode"
fi
summary_dockerd+=", experimental (checkpoints)"

# ---------------------------------------------------------- 4. the image
# build.sh prints one line on stdout ("cached: ..." or "built: ...") and
# progress only when it actually builds.
summary_image="$("$ROOT/sandbox/build.sh" "--$IMAGE_SOURCE")" || die "building the sandbox image failed (log: $CACHE/build.log)"

# ------------------------------------------------------------ 5. the venv
VENV="$ROOT/.venv"
STAMP="$CACHE/venv.stamp"
if [[ ! -f pyproject.toml ]]; then
    summary_venv="skipped: no pyproject.toml yet"
else
    if [[ -e "$VENV" ]] && ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
        rm -rf "$VENV" "$STAMP" # broken (e.g. its interpreter is gone)
    fi
    if [[ ! -e "$VENV" ]]; then
        logged "python3 -m venv .venv" python3 -m venv "$VENV"
        summary_venv="created .venv; "
    else
        summary_venv=""
    fi
    want="$(sha256sum pyproject.toml | cut -c1-64) $("$VENV/bin/python" -c 'import sys; print(sys.version.split()[0])')"
    installed() {
        "$VENV/bin/python" - <<'PY' >/dev/null 2>&1
import importlib.metadata, tomllib
with open("pyproject.toml", "rb") as f:
    importlib.metadata.version(tomllib.load(f)["project"]["name"])
PY
    }
    if [[ "$(cat "$STAMP" 2>/dev/null || true)" != "$want" ]] || ! installed; then
        say "installing the project into .venv (log: $CACHE/pip.log)"
        LOG="$CACHE/pip.log" logged "pip install -e .[test]" \
            "$VENV/bin/python" -m pip install --disable-pip-version-check -q -e '.[test]' 
        echo "$want" >"$STAMP"
        summary_venv+="installed .[test]"
    else
        summary_venv+="up to date"
    fi
fi

# ----------------------------------------------- 6. OAuth test tools (npm)
# tests/e2e/test_oauth.py runs a real OpenID provider (oidc-provider) and the MCP Inspector on the
# Node they need, all pinned in tests/oidc/package.json + package-lock.json. Installed once per
# version set, outside the clone (the test finds the same directory from the same two files).
OIDC_KEY="$(cat tests/oidc/package.json tests/oidc/package-lock.json | sha256sum | cut -c1-16)"
OIDC_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/mcp-codeexec/oidc-$OIDC_KEY"
if [[ -f "$OIDC_DIR/.installed" && -x "$OIDC_DIR/node_modules/.bin/node" ]]; then
    summary_oidc="cached ($OIDC_DIR)"
else
    say "installing the OAuth test tools into $OIDC_DIR (log: $CACHE/npm.log)"
    rm -rf "$OIDC_DIR"
    mkdir -p "$OIDC_DIR"
    cp tests/oidc/package.json tests/oidc/package-lock.json "$OIDC_DIR/"
    LOG="$CACHE/npm.log" logged "npm ci (OAuth test tools)" env NO_UPDATE_NOTIFIER=1 \
        npm ci --prefix "$OIDC_DIR" --no-audit --no-fund --fetch-retries=2
    touch "$OIDC_DIR/.installed"
    summary_oidc="installed ($OIDC_DIR)"
fi

# ------------------------------------------- 7. upstream MCP servers for tests
# Real MCP servers that the programmatic tool calling tests call (tests/upstreams/pins.txt):
# npm packages under a prefix and PyPI ones in a venv of their own (their own mcp version),
# cached outside the clone by a hash of the pins, Node's and Python's versions. The tests
# find them through .cache/upstreams.
PINS="$ROOT/tests/upstreams/pins.txt"
if [[ -f "$PINS" ]]; then
    key="$( (cat "$PINS"; node --version 2>/dev/null; python3 --version) | sha256sum | cut -c1-16)"
    UPSTREAMS="${XDG_CACHE_HOME:-$HOME/.cache}/mcp-codeexec/upstreams/$key"
    if [[ -f "$UPSTREAMS/.done" ]]; then
        summary_upstreams="cached: $UPSTREAMS"
    else
        say "installing the tests' upstream MCP servers into $UPSTREAMS (log: $LOG)"
        rm -rf "$UPSTREAMS"
        mkdir -p "$UPSTREAMS"
        mapfile -t npm_pkgs < <(awk '$1 == "npm" { print $2 }' "$PINS")
        mapfile -t pypi_pkgs < <(awk '$1 == "pypi" { print $2 }' "$PINS")
        if ((${#npm_pkgs[@]})); then
            logged "npm install (upstreams)" env NO_UPDATE_NOTIFIER=1 npm install --prefix "$UPSTREAMS/npm" \
                --no-audit --no-fund --fetch-retries=2 "${npm_pkgs[@]}"
        fi
        if ((${#pypi_pkgs[@]})); then
            logged "venv (upstreams)" python3 -m venv "$UPSTREAMS/venv"
            logged "pip install (upstreams)" "$UPSTREAMS/venv/bin/python" -m pip install -q "${pypi_pkgs[@]}"
        fi
        touch "$UPSTREAMS/.done"
        summary_upstreams="installed: $UPSTREAMS"
    fi
    echo "$UPSTREAMS" >"$CACHE/upstreams"
else
    summary_upstreams="none pinned"
fi

# ------------------------------------------------ 8. the test control plane
if [[ "${MCP_CODEEXEC_KUBE:-1}" == 0 ]]; then
    summary_kube="skipped (MCP_CODEEXEC_KUBE=0)"
else
    summary_kube="$("$ROOT/scripts/k8s.sh" build 2>>"$LOG")" || die "building kube-apiserver failed (log: $LOG)"
fi

say "packages: $summary_pkgs"
for n in "${notes[@]}"; do say "$n"; done
say "gVisor platform: $summary_platform"
say "daemon.json: $summary_json"
say "dockerd: $summary_dockerd"
say "image: $summary_image"
say "venv: $summary_venv"
say "OAuth test tools: $summary_oidc"
say "upstream MCP servers: $summary_upstreams"
say "kube-apiserver: $summary_kube"
say "done in $((SECONDS - START))s"
