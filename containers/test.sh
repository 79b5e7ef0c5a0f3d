#!/usr/bin/env bash
# `make container-test`: build the images and run FedHyBNN in containers, end to end.
#
#   1. stand-in images and podman (containers/standins.sh; skipped when present)
#   2. the project's images from ./Dockerfile (podman's layer cache makes a rebuild
#      without source changes take seconds)
#   3. on the host: credentials (`hybnn certs`, owned by the images' uid 49999), a small
#      fixed encoder (tests/conftest.py's fixed_encoder), MNIST (`hybnn data`)
#   4. each SuperNode and the SuperExec extract their codes in their own container
#   5. docker-compose.yml up with TLS, SuperNode authentication and the Fleet-only
#      front; the three SuperNodes' public keys registered over the loopback Control API
#   6. `flwr run` for 2 rounds from the host; server.json and the global model checked:
#      finished, 2 rounds, 3 clients in each
#   7. everything taken down, containers and volumes, also on failure or Ctrl-C
#
# Run as root from the repository root after `make install`. Environment:
#   PYTHON              the project's Python (default .venv/bin/python)
#   TORCH_INDEX_URL     passed to the Dockerfile (default: PyTorch's CPU wheel index when
#                       it answers, else https://pypi.org/simple, whose torch brings
#                       about 2.7 GB of CUDA libraries)
#   PIP_CA_BUNDLE       CA bundle for pip in builds (see containers/standins.sh)
#   HYBNN_DATA_ROOT     where MNIST is (default: data, as for the tests)
#   KEEP_WORK=1         keep the work folder (logs, credentials, results) after success
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO"
PYTHON=${PYTHON:-.venv/bin/python}
BIN="$(cd "$(dirname "$PYTHON")" && pwd)"
HYBNN=("$PYTHON" -m simulation.cli)
if [ -z "${TORCH_INDEX_URL:-}" ]; then  # the Dockerfile's default (CPU wheels) when reachable
    TORCH_INDEX_URL=https://pypi.org/simple
    "$PYTHON" -c 'import urllib.request; urllib.request.urlopen("https://download.pytorch.org/whl/cpu/torch/", timeout=10)' \
        2>/dev/null && TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
fi
DATA_ROOT=${HYBNN_DATA_ROOT:-data}
PROJECT=hybnn-container-test
ROUNDS=2
CLIENTS=3
T0=$SECONDS
exec 3>&2  # progress lines go here, also from commands whose output goes to a log file
log() { printf '[container-test %s +%ds] %s\n' "$(date +%H:%M:%S)" "$((SECONDS - T0))" "$*" >&3; }
timed() {
    local label=$1 start=$SECONDS; shift
    "$@"
    log "$label: $((SECONDS - start)) s"
}

[ "$(id -u)" = 0 ] || { echo "container-test runs rootful podman: run it as root" >&2; exit 1; }
[ -x "$PYTHON" ] || { echo "no $PYTHON: run \`make install\` first" >&2; exit 1; }

# 1. podman and the stand-ins.
timed "stand-in images" containers/standins.sh

# 2. The project's images.
if [ -z "${PIP_CA_BUNDLE:-}" ] && compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    PIP_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
fi
BUILD_ARGS=(--build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL")
[ -n "${PIP_CA_BUNDLE:-}" ] && [ "$PIP_CA_BUNDLE" != none ] && BUILD_ARGS+=(--secret "id=pip-ca,src=$PIP_CA_BUNDLE")
for target in supernode superexec; do
    timed "podman build --target $target" podman build -q "${BUILD_ARGS[@]}" --target "$target" \
        -t "localhost/hybnn-$target:1.42.0" . >/dev/null
done
podman image prune -f >/dev/null  # the previous build's last layers, once replaced

# 3. Inputs on the host.
WORK=$(mktemp -d /var/tmp/hybnn-container-test.XXXXXX)
export HYBNN_CERTS=$WORK/certs HYBNN_ENCODER=$WORK/encoder HYBNN_RESULTS=$WORK/results
export HYBNN_MNIST=$WORK/mnist
read -r HYBNN_SUPERLINK_PORT HYBNN_FLEET_PORT < <("$PYTHON" -c '
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks: s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))')
export HYBNN_SUPERLINK_PORT HYBNN_FLEET_PORT
export FLWR_HOME=$WORK/flwr-home FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
compose() { podman-compose -p "$PROJECT" -f "$REPO/docker-compose.yml" "$@"; }

teardown() {
    local status=$?
    trap - EXIT INT TERM
    if [ "$status" != 0 ]; then
        log "FAILED (status $status); container logs follow"
        for c in $(podman ps -a --filter "label=io.podman.compose.project=$PROJECT" --format '{{.Names}}'); do
            echo "----- $c"; podman logs --tail 40 "$c" 2>&1 || true
        done
    fi
    log "taking the stack down"
    # All at once (`down` stops them one by one; a SuperNode takes about 5 s), then removed.
    podman ps -q --filter "label=io.podman.compose.project=$PROJECT" | xargs -r podman stop -t 10 >/dev/null 2>&1 || true
    compose down -v -t 10 >"$WORK/down.log" 2>&1 || cat "$WORK/down.log" >&2
    podman network rm "${PROJECT}_server" "${PROJECT}_fleet" >>"$WORK/down.log" 2>&1 || true  # not removed by `down`
    if [ "$status" = 0 ] && [ -z "${KEEP_WORK:-}" ]; then rm -rf "$WORK"; else log "work folder kept: $WORK"; fi
    log "total: $((SECONDS - T0)) s"
    exit "$status"
}
trap teardown EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

"${HYBNN[@]}" certs --out "$HYBNN_CERTS" --supernodes "$CLIENTS" >/dev/null
chown -R 49999:49999 "$HYBNN_CERTS"        # read by the images' user "app"
install -d -o 49999 -g 49999 "$HYBNN_RESULTS"
"$PYTHON" -c 'import sys; from pathlib import Path; from tests.conftest import fixed_encoder; fixed_encoder(Path(sys.argv[1]))' "$HYBNN_ENCODER"
ENCODER_SHA256=$("$PYTHON" -c 'import sys; from common.encoder.artifact import load_encoder_artifact; print(load_encoder_artifact(sys.argv[1]).sha256)' "$HYBNN_ENCODER")
timed "hybnn data" "${HYBNN[@]}" data --data-root "$DATA_ROOT" >/dev/null
# hybnn writes its files readable by their owner only; the containers' user needs to read these.
install -d "$HYBNN_MNIST" && install -m 644 "$DATA_ROOT"/MNIST/raw/*-ubyte "$HYBNN_MNIST"/
chmod -R a+rX "$HYBNN_ENCODER"
log "work folder $WORK; SuperLink on 127.0.0.1:$HYBNN_SUPERLINK_PORT, front on :$HYBNN_FLEET_PORT"

# 4. Codes, extracted by each service in its own container into its own volume.
extract() { compose run --rm --no-deps -T --entrypoint hybnn "$1" extract --encoder /encoder --data-root /data \
                >"$WORK/extract-$1.log" 2>&1 || { cat "$WORK/extract-$1.log" >&2; return 1; }; }
extract_all() {
    # Two at a time, never two services of the same network at once: parallel
    # `podman-compose run`s of one network race to create it.
    local names=(superexec-serverapp $(seq -f 'supernode-%g' 0 $((CLIENTS - 1)))) i
    for ((i = 0; i < ${#names[@]}; i += 2)); do
        extract "${names[i]}" &
        local first=$!
        [ -n "${names[i + 1]:-}" ] && extract "${names[i + 1]}"
        wait "$first"
    done
}
timed "codes extracted in 1+$CLIENTS containers" extract_all

# 5. The stack.
mkdir -p "$FLWR_HOME"
cat >"$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "containers"

[superlink.containers]
address = "127.0.0.1:$HYBNN_SUPERLINK_PORT"
root-certificates = "$HYBNN_CERTS/ca.crt"
TOML
flwr() { "$BIN/flwr" "$@"; }
stack_up() {
    compose up -d --no-build superlink superexec-serverapp fleet-front >"$WORK/up.log" 2>&1 \
        || { cat "$WORK/up.log" >&2; return 1; }
    local i
    for i in $(seq 60); do  # the SuperLink answers the Control API once it is up
        flwr supernode list containers >/dev/null 2>&1 && break
        sleep 1
    done
    for i in $(seq 0 $((CLIENTS - 1))); do
        flwr supernode register "$HYBNN_CERTS/supernodes/supernode-$i.pub" containers >>"$WORK/register.log" 2>&1 \
            || { cat "$WORK/register.log" >&2; return 1; }
    done
    compose up -d --no-build >>"$WORK/up.log" 2>&1 || { cat "$WORK/up.log" >&2; return 1; }
    for i in $(seq 120); do
        online=$(flwr supernode list containers --format json 2>/dev/null | "$PYTHON" -c '
import json, sys
nodes = json.load(sys.stdin).get("nodes", [])
print(sum(1 for n in nodes if str(n.get("status", "")).lower() == "online"))' 2>/dev/null || echo 0)
        [ "$online" -ge "$CLIENTS" ] && return 0
        sleep 1
    done
    echo "only $online of $CLIENTS SuperNodes came online within 120 s" >&2
    flwr supernode list containers >&2 || true
    return 1
}
timed "stack up, $CLIENTS SuperNodes online" stack_up

# 6. The run.
RUN_CONFIG="num-server-rounds=$ROUNDS local-epochs=1 encoder-path='/encoder' data-root='/data' out-dir='/results'"
RUN_CONFIG+=" encoder-sha256='$ENCODER_SHA256' min-available-nodes=$CLIENTS min-train-nodes=$CLIENTS"
timed "flwr run, $ROUNDS rounds" timeout 900 "$BIN/flwr" run . containers --run-config "$RUN_CONFIG" --stream \
    >"$WORK/flwr-run.log" 2>&1 || { tail -50 "$WORK/flwr-run.log" >&2; exit 1; }
"$PYTHON" - "$HYBNN_RESULTS" "$ROUNDS" "$CLIENTS" "$ENCODER_SHA256" <<'PY'
import json, sys
from pathlib import Path

out, rounds, clients, sha = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
server = json.loads((out / "server.json").read_text())
problems = []
if server.get("status") != "finished":
    problems.append(f"status {server.get('status')!r}, expected 'finished'")
if server.get("encoder_sha256") != sha:
    problems.append(f"encoder {server.get('encoder_sha256')}, expected {sha}")
got = server.get("rounds", [])
if len(got) != rounds:
    problems.append(f"{len(got)} rounds, expected {rounds}")
for r in got:
    ids = sorted(c.get("reported", {}).get("partition_id", -1) for c in r.get("clients", []))  # client-reported
    if ids != list(range(clients)):
        problems.append(f"round {r.get('round')}: clients {ids}, expected {list(range(clients))}")
if not (out / "global").is_dir() or not any((out / "global").iterdir()):
    problems.append("no global model in global/")
if problems:
    sys.exit("container run check failed: " + "; ".join(problems))
accs = ", ".join(f"{r['test_acc']:.4f}" for r in got)
print(f"server.json: finished, {len(got)} rounds, {clients} clients each; global test accuracy per round: {accs}")
PY
log "OK"
