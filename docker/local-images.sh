#!/usr/bin/env bash
# Builds every image the compose stack needs without any image registry: only Debian's packages
# (debootstrap, apt) and PyPI. For machines that cannot pull python:, postgres:, redis: or
# nvidia/cuda: images. Needs root (debootstrap), a running Docker engine and docker/compose.local.yml's
# images:
#
#   slimgpt-local/debian:bookworm   Debian bookworm (minbase) by debootstrap, then `docker import`
#   slimgpt-local/python:3.11       + Debian's python3 and python3-venv        (docker/local/)
#   slimgpt-local/postgres:15       + Debian's postgresql-15, official-image entrypoint conventions
#   slimgpt-local/redis:7           + Debian's redis-server
#   slimgpt-api:local               docker/api.Dockerfile on slimgpt-local/python
#   slimgpt-worker:cpu-local        docker/worker.Dockerfile on slimgpt-local/python, CPU torch
#
# Usage: docker/local-images.sh [--rebuild-base]
#   The four base images are built only when missing (or with --rebuild-base); the project's two
#   images are always rebuilt (cached layers make that quick when only code changed).
# Environment:
#   TORCH_WHEEL_DIR  a folder holding a CPU torch wheel for the image's Python (cp311) to use
#                    instead of downloading one (default: /opt/wheels when it has one); without
#                    one, torch comes from https://download.pytorch.org/whl/cpu
#   DEBIAN_MIRROR    default http://deb.debian.org/debian
#   NICE             niceness of debootstrap and the docker client (default 10). The build steps
#                    run under the Docker daemon: on a shared machine start dockerd with nice too.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
NICE="${NICE:-10}"
REBUILD_BASE=0
[[ "${1:-}" == "--rebuild-base" ]] && REBUILD_BASE=1

DEBIAN_IMAGE=slimgpt-local/debian:bookworm
PYTHON_IMAGE=slimgpt-local/python:3.11
POSTGRES_IMAGE=slimgpt-local/postgres:15
REDIS_IMAGE=slimgpt-local/redis:7
API_IMAGE=slimgpt-api:local
WORKER_IMAGE=slimgpt-worker:cpu-local

log() { printf '[local-images %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
timed() {  # timed LABEL CMD...: runs CMD, logs how long it took
    local label="$1" start=$SECONDS
    shift
    "$@"
    log "$label: $((SECONDS - start)) s"
}
have_image() { docker image inspect "$1" >/dev/null 2>&1; }
build() {  # build TAG DOCKERFILE CONTEXT [ARGS...]; --network host reaches the package registries
    local tag="$1" file="$2" context="$3"
    shift 3
    nice -n "$NICE" docker build --network host -t "$tag" -f "$file" "$@" "$context"
}

CLEANUP=()
cleanup() {
    local item
    for item in "${CLEANUP[@]}"; do eval "$item" || true; done
}
trap cleanup EXIT

debian_base() {
    local rootfs
    rootfs="$(mktemp -d /var/tmp/slimgpt-rootfs.XXXXXX)"
    CLEANUP+=("rm -rf '$rootfs'")
    nice -n "$NICE" debootstrap --variant=minbase --include=ca-certificates bookworm \
        "$rootfs" "$DEBIAN_MIRROR"
    cat > "$rootfs/etc/apt/sources.list" <<EOF
deb $DEBIAN_MIRROR bookworm main
deb $DEBIAN_MIRROR bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
EOF
    # As in Debian's official slim images: no documentation, manuals or translations.
    cat > "$rootfs/etc/dpkg/dpkg.cfg.d/docker-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
EOF
    printf 'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n' \
        > "$rootfs/etc/apt/apt.conf.d/90-no-recommends"
    # Downloaded packages are deleted once installed, so no image layer keeps them.
    cat > "$rootfs/etc/apt/apt.conf.d/90-no-cache" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
    # Certificate authorities this host added (e.g. of a TLS-inspecting egress proxy), so pip and
    # apt inside builds trust what the host trusts. Only these local base images carry them.
    if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
        cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
        chroot "$rootfs" update-ca-certificates >/dev/null
    fi
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
        "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*
    tar -C "$rootfs" -c . | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
        --change 'CMD ["bash"]' - "$DEBIAN_IMAGE" >/dev/null
}

base_images() {
    if (( REBUILD_BASE )) || ! have_image "$DEBIAN_IMAGE"; then
        timed "debootstrap + import $DEBIAN_IMAGE" debian_base
    fi
    local image file
    for image in "$PYTHON_IMAGE:python" "$POSTGRES_IMAGE:postgres" "$REDIS_IMAGE:redis"; do
        file="${image##*:}"
        image="${image%:*}"
        if (( REBUILD_BASE )) || ! have_image "$image"; then
            timed "build $image" build "$image" "$ROOT/docker/local/$file.Dockerfile" \
                "$ROOT/docker/local" --build-arg "DEBIAN_IMAGE=$DEBIAN_IMAGE"
        fi
    done
}

# A torch wheel already on this host, served over HTTP on the loopback for the build (the build
# runs with --network host), so it never lands in an image layer or the build context.
torch_args() {
    local dir="${TORCH_WHEEL_DIR:-/opt/wheels}" wheel port pid
    wheel="$(ls "$dir"/torch-*-cp311-*linux*_x86_64.whl 2>/dev/null | head -n 1 || true)"
    if [[ -z "$wheel" ]]; then
        log "no cp311 torch wheel in $dir: the CPU build comes from download.pytorch.org"
        TORCH_ARGS=(--build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
                    --build-arg TORCH_SPEC=torch)
        return
    fi
    port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    python3 -m http.server --bind 127.0.0.1 --directory "$dir" "$port" >/dev/null 2>&1 &
    pid=$!
    CLEANUP+=("kill $pid")
    local version
    version="$(basename "$wheel" | cut -d- -f2)"
    log "torch $version from $wheel (served on 127.0.0.1:$port for the build)"
    TORCH_ARGS=(--build-arg TORCH_INDEX_URL=https://pypi.org/simple
                --build-arg "TORCH_FIND_LINKS=http://127.0.0.1:$port/"
                --build-arg "TORCH_SPEC=torch==$version")
}

project_images() {
    timed "build $API_IMAGE" build "$API_IMAGE" "$ROOT/docker/api.Dockerfile" "$ROOT" \
        --build-arg "PYTHON_IMAGE=$PYTHON_IMAGE"
    torch_args
    timed "build $WORKER_IMAGE" build "$WORKER_IMAGE" "$ROOT/docker/worker.Dockerfile" "$ROOT" \
        --build-arg "BASE_IMAGE=$PYTHON_IMAGE" "${TORCH_ARGS[@]}"
}

base_images
project_images
docker image ls --format '{{.Repository}}:{{.Tag}}\t{{.Size}}' \
    | grep -E '^(slimgpt-local/|slimgpt-api:local|slimgpt-worker:cpu-local)' >&2
