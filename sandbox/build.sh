#!/usr/bin/env bash
# Build the mcp-codeexec sandbox image.
#
#   sandbox/build.sh [--auto|--registry|--no-registry]
#
# Produces mcp-codeexec-sandbox:<hash> and points mcp-codeexec-sandbox:latest
# at it. <hash> is the first 16 hex digits of a sha256 over the build inputs
# (the files of sandbox/ that shape the image, this script, the wheel set that
# pins.txt locks, and the choice of base image). If that tag already exists
# nothing is built ("cached"), and nothing else is run either.
#
# The Python libraries are wheels installed on the host (sandbox/wheels.py,
# with the host's pip, which needs only a package index: no registry, and no
# CA certificates inside the build) into .cache/wheels/<key>/, where <key>
# hashes pins.txt's locked section and wheels.py; the build copies that tree
# into the image.
#
#   --registry     FROM the registry's debian:bookworm-slim
#                  (override with MCP_CODEEXEC_BASE_IMAGE).
#   --no-registry  FROM a base image made locally with debootstrap from the
#                  Debian mirror configured in this machine's apt sources
#                  (override with MCP_CODEEXEC_DEBIAN_MIRROR); no container
#                  registry is contacted.
#   --auto         (default) reuse whichever image is already built; else use
#                  the registry if its base image is present or can be pulled,
#                  else the registry-free path.
#
# A new image is built under a temporary tag, checked, and only then tagged,
# so a failed or partial build never replaces a good image. Build output goes
# to .cache/build.log in the repository; this script prints a short summary.
# Environment: MCP_CODEEXEC_DOCKER (docker client command), MCP_CODEEXEC_BASE_IMAGE,
# MCP_CODEEXEC_DEBIAN_MIRROR, MCP_CODEEXEC_PULL_TIMEOUT (seconds, default 120).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
CACHE="$ROOT/.cache"
LOG="$CACHE/build.log"

IMAGE_REPO=mcp-codeexec-sandbox
BASE_REPO=mcp-codeexec-base
REGISTRY_BASE="${MCP_CODEEXEC_BASE_IMAGE:-debian:bookworm-slim}"
SUITE=bookworm
VARIANT=minbase
PULL_TIMEOUT="${MCP_CODEEXEC_PULL_TIMEOUT:-120}"
# Files of sandbox/ that shape the image (besides this script).
# What the Docker build context holds (besides the wheel tree's site/ and bin/).
CONTEXT_FILES=(Dockerfile packages.txt pins.txt manifest.py bash_run.c wrappers)
INPUT_FILES=(Dockerfile packages.txt pins.txt manifest.py wheels.py bash_run.c)
for f in "$HERE"/wrappers/*; do INPUT_FILES+=("wrappers/${f##*/}"); done

mode=auto
for arg in "$@"; do
    case "$arg" in
        --auto) mode=auto ;;
        --registry) mode=registry ;;
        --no-registry) mode=no-registry ;;
        -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "build.sh: unknown argument: $arg (try --help)" >&2; exit 2 ;;
    esac
done

say() { printf 'build.sh: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

# Prefer the distribution's client (it matches a distribution daemon); a
# newer client negotiates the API version down anyway.
if [[ -n "${MCP_CODEEXEC_DOCKER:-}" ]]; then
    read -r -a DOCKER_CMD <<<"$MCP_CODEEXEC_DOCKER"
elif [[ -x /usr/bin/docker ]]; then
    DOCKER_CMD=(/usr/bin/docker)
else
    DOCKER_CMD=(docker)
fi
dk() { "${DOCKER_CMD[@]}" "$@"; }

SUDO=()
if [[ "$(id -u)" -ne 0 ]]; then
    SUDO=(sudo)
fi

image_id() { dk image inspect --format '{{.Id}}' "$1" 2>/dev/null; }
image_exists() { dk image inspect "$1" >/dev/null 2>&1; }

short_sha() { sha256sum | cut -c1-16; }

mkdir -p "$CACHE"
: >>"$LOG"
LOG_MARK=0 # line of $LOG where the current step's output starts
log_section() {
    printf '\n===== %s %s =====\n' "$(date '+%F %T')" "$*" >>"$LOG"
    LOG_MARK=$(wc -l <"$LOG")
}
fail_with_log() {
    say "error: $* -- last lines of $LOG:"
    tail -n +"$((LOG_MARK + 1))" "$LOG" | tail -n 40 | sed -e 's/^/    /' >&2
    exit 1
}

dk version --format '{{.Server.Version}}' >/dev/null 2>&1 \
    || die "cannot reach the Docker daemon with '${DOCKER_CMD[*]}' (run scripts/setup.sh)"

# One build at a time (setup.sh may be run by several clients at once).
exec 8>"$CACHE/build.lock"
flock 8

# ---------------------------------------------------------------- hashing

# Hash of the image inputs for a given base choice ("registry:IMAGE" or
# "debootstrap:BASETAG").
image_hash() {
    local f
    {
        for f in "${INPUT_FILES[@]}"; do
            printf 'file %s ' "$f"
            sha256sum <"$HERE/$f"
        done
        printf 'file build.sh '
        sha256sum <"${BASH_SOURCE[0]}"
        printf 'wheels %s\n' "$WHEELS_KEY"
        printf 'base %s\n' "$1"
    } | short_sha
}

# ------------------------------------------------------------------ wheels

command -v python3 >/dev/null || die "python3 is needed (scripts/setup.sh installs it)"
WHEELS_KEY="$(python3 "$HERE/wheels.py" key)" || die "pins.txt has no locked wheels (python3 sandbox/wheels.py lock)"
WHEELS_DIR="$CACHE/wheels/$WHEELS_KEY"

# Installs the locked wheels into $WHEELS_DIR (site/, bin/) unless already there.
prepare_wheels() {
    if [[ -f "$WHEELS_DIR/DIGEST" ]]; then
        say "wheels $WHEELS_KEY: cached"
        return
    fi
    python3 -m pip --version >/dev/null 2>&1 \
        || die "the host's python3 has no pip (apt-get install python3-pip, or run scripts/setup.sh)"
    say "installing the Python libraries of pins.txt into $WHEELS_DIR (log: $LOG)"
    mkdir -p "$CACHE/wheels"
    log_section "wheels.py install $WHEELS_DIR"
    python3 "$HERE/wheels.py" install "$WHEELS_DIR" "$CACHE/wheels/downloads" >>"$LOG" 2>&1 \
        || fail_with_log "installing the wheels failed"
    # Older installs are of no further use.
    find "$CACHE/wheels" -mindepth 1 -maxdepth 1 -type d ! -name downloads ! -name "$WHEELS_KEY" \
        -exec rm -rf {} + 2>/dev/null || true
}

# ------------------------------------------------- Debian sources of the host

# "SUITE URI" lines for the bookworm, bookworm-updates and bookworm-security
# suites found in the host's apt sources (see debian_sources.py).
host_debian_sources() {
    python3 "$HERE/debian_sources.py" "$SUITE" "$SUITE-updates" "$SUITE-security"
}

# Sets DEB_MIRROR, DEB_SOURCES (deb822 text for the image) and BASE_TAG.
plan_debootstrap_base() {
    local lines s uri updates_uri="" security_uri=""
    if ! command -v python3 >/dev/null; then
        say "python3 is needed to read the apt sources"
        return 1
    fi
    lines="$(host_debian_sources)"
    DEB_MIRROR="${MCP_CODEEXEC_DEBIAN_MIRROR:-}"
    while read -r s uri; do
        case "$s" in
            "$SUITE") [[ -n "$DEB_MIRROR" ]] || DEB_MIRROR="$uri" ;;
            "$SUITE-updates") updates_uri="$uri" ;;
            "$SUITE-security") security_uri="$uri" ;;
        esac
    done <<<"$lines"
    [[ -n "$DEB_MIRROR" ]] || return 1
    DEB_MIRROR="${DEB_MIRROR%/}"
    DEB_SOURCES="Types: deb
URIs: $DEB_MIRROR
Suites: $SUITE${updates_uri:+ $SUITE-updates}
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"
    if [[ -n "$security_uri" ]]; then
        DEB_SOURCES+="
Types: deb
URIs: $security_uri
Suites: $SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"
    fi
    DEB_INCLUDE=""
    if [[ "$DEB_SOURCES" == *"URIs: https://"* ]]; then
        DEB_INCLUDE="--include=ca-certificates" # apt in the image needs it for https
    fi
    DEB_ARCH="$(dpkg --print-architecture)"
    local h
    h="$({
        printf 'suite %s variant %s arch %s include %s\n' "$SUITE" "$VARIANT" "$DEB_ARCH" "$DEB_INCLUDE"
        printf 'mirror %s\n%s\n' "$DEB_MIRROR" "$DEB_SOURCES"
        declare -f make_base_image
    } | short_sha)"
    BASE_TAG="$BASE_REPO:$SUITE-$h"
}

ROOTFS=""
cleanup_rootfs() {
    [[ -n "$ROOTFS" && -d "$ROOTFS" ]] || return 0
    # debootstrap mounts proc/sys inside the target; never rm -rf across a mount.
    local m
    while read -r m; do
        "${SUDO[@]}" umount -l "$m" 2>/dev/null || true
    done < <(awk -v r="$ROOTFS" '$2 == r || index($2, r "/") == 1 { print $2 }' /proc/mounts | sort -r)
    "${SUDO[@]}" rm -rf --one-file-system "$ROOTFS"
    ROOTFS=""
}

TMP_TAGS=()
cleanup() {
    local t
    cleanup_rootfs
    for t in "${TMP_TAGS[@]}"; do
        dk image rm "$t" >/dev/null 2>&1 || true
    done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Debootstraps a minimal Debian into a temporary directory and imports it as
# $BASE_TAG. (Its definition is part of the base image's hash.)
make_base_image() {
    command -v debootstrap >/dev/null || die "debootstrap is not installed (scripts/setup.sh installs it)"
    ROOTFS="$(mktemp -d "${TMPDIR:-/var/tmp}/mcp-codeexec-rootfs.XXXXXX")"
    log_section "debootstrap $SUITE into $ROOTFS from $DEB_MIRROR"
    # shellcheck disable=SC2086 # DEB_INCLUDE is empty or one word
    "${SUDO[@]}" debootstrap --variant="$VARIANT" --arch="$DEB_ARCH" $DEB_INCLUDE \
        "$SUITE" "$ROOTFS" "$DEB_MIRROR" >>"$LOG" 2>&1 \
        || fail_with_log "debootstrap failed"
    # Trim like the slim image: no package lists, caches, docs, man pages,
    # translations; no host-specific files; the host's Debian sources.
    # shellcheck disable=SC2016 # expanded by the inner sh
    "${SUDO[@]}" env R="$ROOTFS" SOURCES="$DEB_SOURCES" sh -euc '
        cd "$R"
        rm -rf var/lib/apt/lists/* var/cache/apt/*.bin var/cache/apt/archives/*.deb \
               var/log/apt/* var/log/dpkg.log var/log/bootstrap.log \
               usr/share/man/* usr/share/info/*
        find usr/share/doc -mindepth 1 ! -type d ! -name copyright -delete
        find usr/share/doc -mindepth 1 -type d -empty -delete
        find usr/share/locale -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
        : > etc/resolv.conf
        : > etc/hostname
        rm -f etc/apt/sources.list
        mkdir -p etc/apt/sources.list.d
        printf "%s" "$SOURCES" > etc/apt/sources.list.d/debian.sources
    ' >>"$LOG" 2>&1 || fail_with_log "trimming the debootstrapped tree failed"
    local tmp="$BASE_REPO:tmp-$$"
    TMP_TAGS+=("$tmp")
    log_section "docker import -> $tmp"
    "${SUDO[@]}" tar -C "$ROOTFS" --numeric-owner -cf - . \
        | dk import \
            --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
            --change 'CMD ["bash"]' \
            - "$tmp" >>"$LOG" 2>&1 \
        || fail_with_log "docker import failed"
    cleanup_rootfs
    dk tag "$tmp" "$BASE_TAG"
    dk image rm "$tmp" >/dev/null 2>&1 || true
}

# ------------------------------------------------------------------ images

point_latest_at() {
    local target="$IMAGE_REPO:$1"
    if [[ "$(image_id "$IMAGE_REPO:latest" || true)" != "$(image_id "$target")" ]]; then
        dk tag "$target" "$IMAGE_REPO:latest"
        say "tagged $IMAGE_REPO:latest -> $target"
    fi
}

report_cached() {
    point_latest_at "$1"
    echo "cached: $IMAGE_REPO:$1 ($2)"
}

build_image() { # BASE_REF HASH WHAT
    local base_ref="$1" hash="$2" what="$3" tmp="$IMAGE_REPO:tmp-$2-$$"
    local proxy_args=() v
    for v in http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY; do
        [[ -n "${!v:-}" ]] && proxy_args+=(--build-arg "$v")
    done
    local built="$IMAGE_REPO:tmp-built-$2-$$" manifest
    TMP_TAGS+=("$built" "$tmp")
    prepare_wheels
    log_section "docker build $built FROM $base_ref"
    # The context: sandbox's files and the wheel tree, as one tar stream.
    tar -cf - -C "$HERE" "${CONTEXT_FILES[@]}" -C "$WHEELS_DIR" site bin \
        | dk build --network=host --force-rm \
            --build-arg "BASE=$base_ref" --build-arg "INPUTS_HASH=$hash" "${proxy_args[@]}" \
            -t "$built" -f Dockerfile - >>"$LOG" 2>&1 \
        || fail_with_log "docker build failed"
    # Check the result before it replaces anything (no network inside).
    log_section "checking $built"
    manifest="$(dk run --rm --network=none --user 1000:1000 "$built" python3 -c '
import json
m = json.load(open("/etc/mcp-codeexec/manifest.json"))
assert m["python"].startswith("3.11.") and m["libraries"] and m["tools"], m
print(json.dumps(m, sort_keys=True, separators=(",", ":")))')" \
        || fail_with_log "the new image does not work"
    # The manifest also as a label: the server reads it with the image's metadata,
    # without creating a container.
    log_section "labelling $tmp"
    printf 'FROM %s\nARG MANIFEST\nLABEL org.mcp-codeexec.manifest=$MANIFEST\n' "$built" \
        | dk build --force-rm --build-arg "MANIFEST=$manifest" -t "$tmp" - >>"$LOG" 2>&1 \
        || fail_with_log "labelling the image failed"
    dk image rm "$built" >/dev/null 2>&1 || true
    [[ "$(dk image inspect --format '{{index .Config.Labels "org.mcp-codeexec.inputs-hash"}}' "$tmp")" == "$hash" ]] \
        || fail_with_log "the new image lacks its inputs-hash label"
    [[ "$(dk image inspect --format '{{index .Config.Labels "org.mcp-codeexec.manifest"}}' "$tmp")" == "$manifest" ]] \
        || fail_with_log "the new image lacks its manifest label"
    dk tag "$tmp" "$IMAGE_REPO:$hash"
    dk image rm "$tmp" >/dev/null 2>&1 || true
    point_latest_at "$hash"
    echo "built: $IMAGE_REPO:$hash ($what) in $((SECONDS - START))s"
}

use_registry() {
    local hash
    hash="$(image_hash "registry:$REGISTRY_BASE")"
    if image_exists "$IMAGE_REPO:$hash"; then
        report_cached "$hash" "FROM $REGISTRY_BASE"
        return
    fi
    say "building $IMAGE_REPO:$hash FROM $REGISTRY_BASE (log: $LOG)"
    build_image "$REGISTRY_BASE" "$hash" "FROM $REGISTRY_BASE"
}

use_debootstrap() {
    local hash
    plan_debootstrap_base || die "no http(s) mirror for Debian $SUITE (main) in /etc/apt/sources.list{,.d/}; set MCP_CODEEXEC_DEBIAN_MIRROR"
    hash="$(image_hash "debootstrap:$BASE_TAG")"
    if image_exists "$IMAGE_REPO:$hash"; then
        report_cached "$hash" "FROM $BASE_TAG"
        return
    fi
    if image_exists "$BASE_TAG"; then
        say "base $BASE_TAG: cached"
    else
        say "making base $BASE_TAG with debootstrap from $DEB_MIRROR (log: $LOG)"
        make_base_image
    fi
    say "building $IMAGE_REPO:$hash FROM $BASE_TAG (log: $LOG)"
    build_image "$BASE_TAG" "$hash" "FROM $BASE_TAG, debootstrapped"
}

registry_reachable() {
    image_exists "$REGISTRY_BASE" && return 0
    log_section "docker pull $REGISTRY_BASE (timeout ${PULL_TIMEOUT}s)"
    timeout "$PULL_TIMEOUT" "${DOCKER_CMD[@]}" pull "$REGISTRY_BASE" >>"$LOG" 2>&1
}

START=$SECONDS
case "$mode" in
    registry) use_registry ;;
    no-registry) use_debootstrap ;;
    auto)
        # Whatever was built before wins (no registry probe when cached).
        h="$(image_hash "registry:$REGISTRY_BASE")"
        if image_exists "$IMAGE_REPO:$h"; then
            report_cached "$h" "FROM $REGISTRY_BASE"
        elif plan_debootstrap_base && h="$(image_hash "debootstrap:$BASE_TAG")" \
                && image_exists "$IMAGE_REPO:$h"; then
            report_cached "$h" "FROM $BASE_TAG"
        elif registry_reachable; then
            use_registry
        else
            say "registry not reachable ($REGISTRY_BASE cannot be pulled): using debootstrap"
            use_debootstrap
        fi
        ;;
esac
