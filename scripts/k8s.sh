#!/usr/bin/env bash
# A Kubernetes control plane for tests on one Debian 12 machine: etcd (Debian's
# etcd-server) and kube-apiserver built from Debian bookworm's `kubernetes` source
# package. No kubelet, scheduler or controller-manager: tests add a node stand-in
# (tests/k8s/node.py) that does their part of the job for our pods.
#
#   scripts/k8s.sh build        build kube-apiserver once (cached outside the clone,
#                               keyed by version; ~260 s cold on 2 cores, ~1 GB RSS);
#                               prints one line: "cached: PATH" or "built: PATH (Ns)"
#   scripts/k8s.sh path         print the cached kube-apiserver's path (fails if absent)
#   scripts/k8s.sh start DIR    generate certificates and tokens in DIR, start etcd and
#                               kube-apiserver on 127.0.0.1 (free ports), wait until
#                               ready; writes DIR/cluster.env and kubeconfigs (below)
#   scripts/k8s.sh stop DIR     stop what `start DIR` started (pids in DIR)
#
# DIR after start: ca.crt; admin.kubeconfig (system:masters), server.kubeconfig
# (user mcp-codeexec, bound to nothing here: tests apply deploy/kubernetes/rbac.yaml),
# denied.kubeconfig (user mcp-codeexec-denied, no permissions); kubelet.crt/.key
# (the serving certificate a node stand-in presents to the apiserver, signed by ca.crt)
# and kubelet-client.crt (what the apiserver presents to it); cluster.env with
# KUBE_SERVER=https://127.0.0.1:PORT and the tokens.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KUBE_VERSION=1.20.2
DEB_SOURCE=kubernetes
DEB_VERSION="1.20.5+really1.20.2-1.1+deb12u1"
GO=/usr/lib/go-1.19/bin/go
REFLECT2=/usr/share/gocode/src/github.com/modern-go/reflect2
CACHE_ROOT="${MCP_CODEEXEC_CACHE:-$HOME/.cache/mcp-codeexec}"
KUBE_CACHE="$CACHE_ROOT/kube-$KUBE_VERSION"
APISERVER="$KUBE_CACHE/bin/kube-apiserver"
# What the cached binary was built from: rebuild when this recipe changes.
RECIPE="$DEB_VERSION go1.19 reflect2-1.0.2 openapi-gen v1"

say() { printf 'k8s: %s\n' "$*" >&2; }
die() {
    printf 'k8s: error: %s\n' "$*" >&2
    exit 1
}

SUDO=()
[[ "$(id -u)" -eq 0 ]] || SUDO=(sudo)

ensure_packages() {
    local want=() p
    for p in etcd-server golang-1.19-go golang-github-modern-go-reflect2-dev dpkg-dev openssl; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || want+=("$p")
    done
    ((${#want[@]})) || return 0
    say "installing ${want[*]}"
    "${SUDO[@]}" apt-get update -q >/dev/null
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q -o Dpkg::Use-Pty=0 "${want[@]}" >/dev/null
}

# apt-get source with a private deb-src list, so the machine's apt sources stay as
# they are (no Sources indices for every later apt-get update).
fetch_source() { # WORKDIR
    local work="$1" mirror
    mirror="$(python3 "$ROOT/sandbox/debian_sources.py" bookworm | awk '$1 == "bookworm" { print $2 }')"
    [[ -n "$mirror" ]] || mirror=http://deb.debian.org/debian
    mkdir -p "$work/apt/lists/partial"
    printf 'deb-src %s bookworm main\n' "$mirror" >"$work/apt/sources.list"
    local opts=(-o "Dir::Etc::SourceList=$work/apt/sources.list" -o Dir::Etc::SourceParts=/nonexistent
        -o "Dir::State::Lists=$work/apt/lists" -o APT::Sandbox::User=root)
    apt-get "${opts[@]}" update -q
    (cd "$work" && apt-get "${opts[@]}" source -q "$DEB_SOURCE=$DEB_VERSION")
}

build() {
    if [[ -x "$APISERVER" && "$(cat "$KUBE_CACHE/recipe" 2>/dev/null)" == "$RECIPE" ]]; then
        echo "cached: $APISERVER"
        return 0
    fi
    local start=$SECONDS
    ensure_packages
    mkdir -p "$KUBE_CACHE"
    local work="$KUBE_CACHE/work"
    rm -rf "$work"
    mkdir -p "$work"
    local log="$KUBE_CACHE/build.log"
    : >"$log"
    say "building kube-apiserver $KUBE_VERSION from Debian's source (log: $log)"
    if ! (
        set -e -o pipefail
        fetch_source "$work"
        local src
        src="$(find "$work" -maxdepth 1 -type d -name "kubernetes-*" | head -n 1)"
        [[ -n "$src" ]] || { echo "no source tree unpacked"; exit 1; }
        # GOPATH layout: the tree is k8s.io/kubernetes; vendor/k8s.io/* link into staging/.
        mkdir -p "$work/gopath/src/k8s.io"
        mv "$src" "$work/gopath/src/k8s.io/kubernetes"
        cd "$work/gopath/src/k8s.io/kubernetes"
        # The bundled reflect2 1.0.1 breaks on Go >= 1.18 (it reads runtime internals).
        rm -rf vendor/github.com/modern-go/reflect2
        cp -r "$REFLECT2" vendor/github.com/modern-go/reflect2
        export GOPATH="$work/gopath" GO111MODULE=off GOCACHE="$KUBE_CACHE/gocache" GOFLAGS= CGO_ENABLED=0
        "$GO" build -o "$work/openapi-gen" k8s.io/kubernetes/vendor/k8s.io/kube-openapi/cmd/openapi-gen
        # The packages tagged for OpenAPI, named the way Makefile.generated_files names them
        # (staging/src/... as vendor/...), without the code-generator and sample-apiserver.
        local dirs
        dirs="$(find . \( -path ./vendor -o -path './_*' -o -path './.?*' \) -prune -o -type f -name '*.go' -print0 \
            | xargs -0 grep -l '+k8s:openapi-gen=' | xargs -n1 dirname | sed -e 's|^\./||' -e 's|^staging/src|vendor|' \
            | grep -v -e '^vendor/k8s.io/code-generator/' -e '^vendor/k8s.io/sample-apiserver/' \
            | LC_ALL=C sort -u | sed 's|^|k8s.io/kubernetes/|' | paste -sd,)"
        [[ -n "$dirs" ]] || { echo "no packages tagged for openapi-gen"; exit 1; }
        "$work/openapi-gen" --logtostderr -i "$dirs" -p k8s.io/kubernetes/pkg/generated/openapi \
            -O zz_generated.openapi -h vendor/k8s.io/code-generator/hack/boilerplate.go.txt \
            -r "$work/openapi-violations.report"
        "$GO" build -trimpath -o "$work/kube-apiserver" \
            -ldflags "-s -w -X k8s.io/kubernetes/vendor/k8s.io/component-base/version.gitVersion=v$KUBE_VERSION \
                -X k8s.io/kubernetes/vendor/k8s.io/component-base/version.gitMajor=1 \
                -X k8s.io/kubernetes/vendor/k8s.io/component-base/version.gitMinor=20 \
                -X k8s.io/kubernetes/vendor/k8s.io/component-base/version.gitTreeState=clean" \
            k8s.io/kubernetes/cmd/kube-apiserver
    ) >>"$log" 2>&1; then
        tail -n 30 "$log" >&2
        die "building kube-apiserver failed (log: $log)"
    fi
    mkdir -p "$KUBE_CACHE/bin"
    mv "$work/kube-apiserver" "$APISERVER.tmp"
    mv "$APISERVER.tmp" "$APISERVER"
    echo "$RECIPE" >"$KUBE_CACHE/recipe"
    chmod -R u+w "$work" 2>/dev/null || true
    rm -rf "$work" "$KUBE_CACHE/gocache" # the source tree and Go's build cache: ~1.5 GB, not needed again
    echo "built: $APISERVER ($((SECONDS - start))s)"
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# A certificate signed by DIR/ca: NAME CN [SAN] [O]
issue_cert() {
    local dir="$1" name="$2" cn="$3" san="${4:-}" org="${5:-}" subj="/CN=$3"
    [[ -n "$org" ]] && subj="/O=$org/CN=$cn"
    openssl req -new -newkey rsa:2048 -nodes -keyout "$dir/$name.key" -subj "$subj" \
        -out "$dir/$name.csr" 2>/dev/null
    local ext="$dir/$name.ext"
    if [[ -n "$san" ]]; then
        printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth,clientAuth\n' "$san" >"$ext"
    else
        printf 'extendedKeyUsage=clientAuth\n' >"$ext"
    fi
    openssl x509 -req -in "$dir/$name.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
        -days 30 -sha256 -extfile "$ext" -out "$dir/$name.crt" 2>/dev/null
    rm -f "$dir/$name.csr" "$ext"
}

kubeconfig() { # DIR NAME SERVER TOKEN
    cat >"$1/$2.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: test
  cluster: {server: "$3", certificate-authority: "$1/ca.crt"}
users:
- name: $2
  user: {token: "$4"}
contexts:
- name: $2
  context: {cluster: test, user: $2, namespace: default}
current-context: $2
EOF
}

start() {
    local dir="$1"
    [[ -x "$APISERVER" ]] || die "kube-apiserver is not built: run scripts/k8s.sh build"
    command -v etcd >/dev/null || die "etcd not found: apt-get install etcd-server"
    mkdir -p "$dir"
    dir="$(cd "$dir" && pwd)"
    [[ -f "$dir/apiserver.pid" ]] && die "$dir already has a running control plane (stop it first)"
    umask 077
    openssl req -x509 -newkey rsa:2048 -nodes -keyout "$dir/ca.key" -out "$dir/ca.crt" -days 30 \
        -subj "/CN=mcp-codeexec-test-ca" 2>/dev/null
    issue_cert "$dir" apiserver kube-apiserver "IP:127.0.0.1,DNS:localhost"
    issue_cert "$dir" kubelet node-stand-in "IP:127.0.0.1,DNS:localhost"
    issue_cert "$dir" kubelet-client kube-apiserver-kubelet-client "" system:masters
    openssl genrsa -out "$dir/sa.key" 2048 2>/dev/null
    openssl rsa -in "$dir/sa.key" -pubout -out "$dir/sa.pub" 2>/dev/null
    local admin server denied
    admin="$(openssl rand -hex 16)"
    server="$(openssl rand -hex 16)"
    denied="$(openssl rand -hex 16)"
    {
        echo "$admin,admin,admin,system:masters"
        echo "$server,mcp-codeexec,mcp-codeexec"
        echo "$denied,mcp-codeexec-denied,mcp-codeexec-denied"
    } >"$dir/tokens.csv"

    local etcd_port peer_port api_port
    etcd_port="$(free_port)"
    peer_port="$(free_port)"
    api_port="$(free_port)"
    mkdir -p "$dir/etcd"
    setsid etcd --name test --data-dir "$dir/etcd" \
        --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
        --listen-peer-urls "http://127.0.0.1:$peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
        --initial-cluster "test=http://127.0.0.1:$peer_port" --unsafe-no-fsync \
        </dev/null >"$dir/etcd.log" 2>&1 &
    echo $! >"$dir/etcd.pid"

    # Admission as a real cluster's defaults (RuntimeClass refuses an unknown class;
    # ServiceAccount wants the namespace's default account, created below).
    setsid "$APISERVER" --etcd-servers "http://127.0.0.1:$etcd_port" \
        --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$api_port" \
        --tls-cert-file "$dir/apiserver.crt" --tls-private-key-file "$dir/apiserver.key" \
        --client-ca-file "$dir/ca.crt" --token-auth-file "$dir/tokens.csv" \
        --authorization-mode RBAC --anonymous-auth=false \
        --service-account-key-file "$dir/sa.pub" --service-account-signing-key-file "$dir/sa.key" \
        --service-account-issuer https://kubernetes.default.svc \
        --service-cluster-ip-range 10.96.0.0/16 \
        --kubelet-client-certificate "$dir/kubelet-client.crt" --kubelet-client-key "$dir/kubelet-client.key" \
        --kubelet-certificate-authority "$dir/ca.crt" --kubelet-preferred-address-types InternalIP \
        --enable-priority-and-fairness=false --profiling=false --logtostderr --v 1 \
        </dev/null >"$dir/apiserver.log" 2>&1 &
    echo $! >"$dir/apiserver.pid"

    kubeconfig "$dir" admin "https://127.0.0.1:$api_port" "$admin"
    kubeconfig "$dir" server "https://127.0.0.1:$api_port" "$server"
    kubeconfig "$dir" denied "https://127.0.0.1:$api_port" "$denied"
    {
        echo "KUBE_SERVER=https://127.0.0.1:$api_port"
        echo "KUBE_ADMIN_TOKEN=$admin"
        echo "KUBE_SERVER_TOKEN=$server"
        echo "KUBE_DENIED_TOKEN=$denied"
    } >"$dir/cluster.env"

    local deadline=$((SECONDS + 90)) code
    until code="$(curl -s -o /dev/null -w '%{http_code}' --cacert "$dir/ca.crt" \
        -H "Authorization: Bearer $admin" "https://127.0.0.1:$api_port/readyz")" && [[ "$code" == 200 ]]; do
        if ! kill -0 "$(cat "$dir/apiserver.pid")" 2>/dev/null || ! kill -0 "$(cat "$dir/etcd.pid")" 2>/dev/null; then
            tail -n 20 "$dir/etcd.log" "$dir/apiserver.log" >&2
            stop "$dir"
            die "the control plane exited"
        fi
        if ((SECONDS > deadline)); then
            tail -n 20 "$dir/apiserver.log" >&2
            stop "$dir"
            die "kube-apiserver not ready within 90 s"
        fi
        sleep 0.5
    done
    # What a controller-manager would have made by now: the default service account.
    local i
    for i in $(seq 1 20); do
        curl -sf -o /dev/null --cacert "$dir/ca.crt" -H "Authorization: Bearer $admin" \
            -H 'Content-Type: application/json' -X POST \
            -d '{"apiVersion":"v1","kind":"ServiceAccount","metadata":{"name":"default"}}' \
            "https://127.0.0.1:$api_port/api/v1/namespaces/default/serviceaccounts" && break
        sleep 0.5
    done
    echo "https://127.0.0.1:$api_port"
}

stop() {
    local dir="$1" name pid
    for name in apiserver etcd; do
        [[ -f "$dir/$name.pid" ]] || continue
        pid="$(cat "$dir/$name.pid")"
        if kill -0 "$pid" 2>/dev/null; then
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 1 50); do
                kill -0 "$pid" 2>/dev/null || break
                sleep 0.1
            done
            kill -9 "$pid" 2>/dev/null || true
        fi
        rm -f "$dir/$name.pid"
    done
}

case "${1:-}" in
build)
    mkdir -p "$CACHE_ROOT"
    exec 8>"$CACHE_ROOT/kube.lock"
    flock 8
    build
    ;;
path)
    [[ -x "$APISERVER" ]] || die "kube-apiserver is not built: run scripts/k8s.sh build"
    echo "$APISERVER"
    ;;
start) start "${2:?usage: k8s.sh start DIR}" ;;
stop) stop "${2:?usage: k8s.sh stop DIR}" ;;
*) die "usage: k8s.sh build|path|start DIR|stop DIR" ;;
esac
