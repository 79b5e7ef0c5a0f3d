#!/usr/bin/env bash
# Podman and the stand-in images this project's Dockerfile and docker-compose.yml need
# on a Debian machine that reaches Debian's and PyPI's packages but no image registry.
# Run as root. Every step is skipped when its result is already there, so a second run
# takes seconds. What it does (docs/containers.md has the details and timings):
#
#   1. apt-get install podman podman-compose debootstrap runc and CNI's dnsname plugin
#      (only those missing)
#   2. /etc/containers/containers.conf from containers/containers.conf (if absent)
#   3. localhost/debian-base:<codename>: debootstrap --variant=minbase from the Debian
#      mirror in this machine's apt sources, imported with `podman import`
#   4. the stand-ins of containers/Containerfile.standins under the official names
#      docker.io/flwr/{superlink,supernode,superexec}:1.42.0 and docker.io/library/nginx:1.22
#
# Environment: PIP_CA_BUNDLE (default: the system bundle when /usr/local/share/ca-certificates
# holds extra CAs, as behind a TLS-intercepting proxy; "none" to pass none).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
FLWR_VERSION=1.42.0
NGINX_IMAGE=docker.io/library/nginx:1.22

log() { printf '[standins %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
timed() {  # timed LABEL CMD...: run CMD, print how long it took
    local label=$1 start=$SECONDS; shift
    "$@"
    log "$label: $((SECONDS - start)) s"
}
has_image() { podman image exists "$1"; }

# 1. Tools from Debian. Without --no-install-recommends docker-compose would pull in
#    docker.io and containerd.
missing=()
command -v podman >/dev/null || missing+=(podman)
command -v podman-compose >/dev/null || missing+=(podman-compose)
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v runc >/dev/null || missing+=(runc)  # the runtime containers.conf names
# Name resolution between containers (compose service names) on podman 4.3's CNI networks.
[ -x /usr/lib/cni/dnsname ] || missing+=(golang-github-containernetworking-plugin-dnsname)
if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    timed "apt-get install" bash -c "apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends ${missing[*]} >/dev/null"
fi

# 2. Runtime settings (the why is in the file's comments).
if [ ! -s /etc/containers/containers.conf ]; then
    log "writing /etc/containers/containers.conf"
    install -D -m 644 "$HERE/containers.conf" /etc/containers/containers.conf
fi

# CA bundle for pip inside builds (a build secret: used by the build, not stored in the image).
if [ -z "${PIP_CA_BUNDLE:-}" ]; then
    if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
        PIP_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
    else
        PIP_CA_BUNDLE=none
    fi
fi
SECRET_ARGS=()
[ "$PIP_CA_BUNDLE" != none ] && SECRET_ARGS=(--secret "id=pip-ca,src=$PIP_CA_BUNDLE")

# 3. Debian base from this machine's own mirror and release.
. /etc/os-release
CODENAME=${VERSION_CODENAME:?no VERSION_CODENAME in /etc/os-release}
BASE=localhost/debian-base:$CODENAME
debian_mirror() {  # the first http(s) URI apt uses for "$CODENAME main" (deb822 or one-line)
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        awk -v s="$CODENAME" '
            /^[[:space:]]*$/ { if (uri && suite) { print uri; exit } uri = ""; suite = 0; next }
            /^URIs:/ { uri = $2 }
            /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == s) suite = 1 }
            END { if (uri && suite) print uri }' "$f"
    done
    cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
        | awk -v s="$CODENAME" '$1 == "deb" && $3 == s { print $2 }'
}
if ! has_image "$BASE"; then
    MIRROR=$(debian_mirror | grep -m1 -E '^https?://' || true)
    [ -n "$MIRROR" ] || { echo "no Debian mirror for $CODENAME in the apt sources" >&2; exit 1; }
    ROOTFS=$(mktemp -d /var/tmp/debian-rootfs.XXXXXX)
    trap 'rm -rf "$ROOTFS"' EXIT
    log "debootstrap --variant=minbase $CODENAME from $MIRROR"
    timed "debootstrap" debootstrap --variant=minbase "$CODENAME" "$ROOTFS" "$MIRROR" >/dev/null
    timed "podman import" bash -c "tar -C '$ROOTFS' -c . | podman import -q --change 'CMD [\"/bin/bash\"]' - '$BASE' >/dev/null"
    rm -rf "$ROOTFS"
    trap - EXIT
fi

# 4. Stand-ins under the official names.
build_standin() {  # build_standin TARGET TAG...
    local target=$1; shift
    local tags=() t
    for t in "$@"; do tags+=(-t "$t"); done
    timed "podman build --target $target" podman build -q "${SECRET_ARGS[@]}" \
        --build-arg "DEBIAN_BASE=$BASE" --build-arg "FLWR_VERSION=$FLWR_VERSION" \
        --target "$target" "${tags[@]}" -f "$HERE/Containerfile.standins" "$HERE" >/dev/null
}
has_image localhost/flwr-base:$FLWR_VERSION || build_standin flwr-base localhost/flwr-base:$FLWR_VERSION
for role in superlink supernode superexec; do
    has_image docker.io/flwr/$role:$FLWR_VERSION || build_standin $role docker.io/flwr/$role:$FLWR_VERSION
done
has_image $NGINX_IMAGE || build_standin nginx $NGINX_IMAGE
log "stand-ins ready: $BASE, docker.io/flwr/{superlink,supernode,superexec}:$FLWR_VERSION, $NGINX_IMAGE"
