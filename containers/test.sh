#!/usr/bin/env bash
# `make container-test`: build the images and run FedHyBNN in containers, end to end.
#
#   1. stand-in images and podman (containers/standins.sh; skipped when present)
#   2. the project's images from ./Dockerfile (podman's layer cache makes a rebuild
#      without source changes take seconds)
#   3. on the host: credentials (`hybnn certs`, owned by the images' uid 49999), a small
#      fixed encoder (tests/conftest.py's fixed_encoder), MNIST (`hybnn data`)
#   4. the pin: the app bundle's sha256 computed in the operator service (what its
#      `flwr run .` sends) and on the host's checkout, which must agree; written to
#      certs/app.sha256 for the SuperNodes' pinned SuperExecs
#   5. each SuperNode's pinned SuperExec (where its ClientApps run) and the ServerApp's
#      SuperExec extract their codes in their own container
#   6. docker-compose.yml up with TLS, SuperNode authentication and the Fleet-only
#      front; the three SuperNodes' public keys registered by the operator service
#      (`flwr supernode register` inside the stack); each pinned SuperExec has read the pin
#   7. a stranger on the host, with ca.crt: only the front's port is published;
#      `flwr ls` and `flwr run` against 127.0.0.1:8000 (and any other published port)
#      cannot connect; through the front they get 403 (Fleet API only)
#   8. a foreign app bundle submitted from the operator service: every SuperNode's
#      pinned SuperExec refuses it (its log line), its ServerApp gets an error reply
#      (INVALID_FAB) from each node, and its ClientApp never runs (no marker file)
#   9. `flwr run` for 2 rounds from the operator service; server.json and the global
#      model checked: finished, 2 rounds, 3 clients in each; no SuperNode refused it
#  10. everything taken down, containers and volumes, also on failure or Ctrl-C
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
for target in supernode superexec operator; do
    timed "podman build --target $target" podman build -q "${BUILD_ARGS[@]}" --target "$target" \
        -t "localhost/hybnn-$target:1.42.0" . >/dev/null
done
podman image prune -f >/dev/null  # the previous build's last layers, once replaced

# 3. Inputs on the host.
WORK=$(mktemp -d /var/tmp/hybnn-container-test.XXXXXX)
export HYBNN_CERTS=$WORK/certs HYBNN_ENCODER=$WORK/encoder HYBNN_RESULTS=$WORK/results
export HYBNN_MNIST=$WORK/mnist
HYBNN_FLEET_PORT=$("$PYTHON" -c '
import socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export HYBNN_FLEET_PORT
export FLWR_HOME=$WORK/stranger-flwr-home  # the host's flwr CLI is the stranger's (step 6)
# podman-compose prints its podman commands and their exit codes ("exit code: N");
# unbuffered, so that they stay in order with the containers' output.
compose() { PYTHONUNBUFFERED=1 podman-compose -p "$PROJECT" -f "$REPO/docker-compose.yml" "$@"; }
# podman-compose 1.0.3's `run` exits 0 whatever its command did, and ignores compose
# profiles: one-off containers run with --no-deps (else it would start the whole file,
# operator included), and their status is the "exit code" it prints.
oneoff() {  # oneoff LOG [RUN OPTIONS] SERVICE [CMD...]: a one-off container; output to LOG, CMD's status
    local log=$1 status; shift
    compose run --rm --no-deps -T "$@" >"$log" 2>&1 || true
    # Its last line; a progress bar's unended line (tqdm's \r) may precede it on the same line.
    status=$(sed -n 's/^.*exit code: \([0-9][0-9]*\)$/\1/p' "$log" | tail -n 1)
    return "${status:-1}"
}
operator() { local log=$1; shift; oneoff "$log" operator "$@"; }  # operator LOG CMD...: CMD in the operator service
json_in() {  # the first JSON object in a log (podman-compose's lines around it)
    "$PYTHON" -c '
import json, sys
text = open(sys.argv[1]).read()
start = text.find("{")
print(json.dumps(json.JSONDecoder().raw_decode(text[start:])[0]) if start >= 0 else "{}")' "$1"
}
NODES=($(seq -f 'supernode-%g' 0 $((CLIENTS - 1))))
EXECS=($(seq -f 'supernode-%g-exec' 0 $((CLIENTS - 1))))  # each SuperNode's pinned SuperExec
STACK=(superlink superexec-serverapp fleet-front "${NODES[@]}" "${EXECS[@]}")  # all but the operator
container() { echo "${PROJECT}_$1_1"; }  # a service's container, as podman-compose names it

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
log "work folder $WORK; front on :$HYBNN_FLEET_PORT, the SuperLink's port published nowhere"

# 4. The pin: the sha256 of the bundle the operator service's `flwr run .` sends (Flower
# builds it from the image's /app, which has no .git), and the checkout's own.
pin() {
    local image host
    operator "$WORK/pin.log" python -m simulation.app_bundle --sha256 || { cat "$WORK/pin.log" >&2; return 1; }
    image=$(grep -m1 -oE '^[0-9a-f]{64}' "$WORK/pin.log") || { cat "$WORK/pin.log" >&2; return 1; }
    host=$("$PYTHON" -m simulation.app_bundle --sha256)
    if [ "$image" != "$host" ]; then
        echo "the operator image's app bundle has sha256 $image, the checkout's $host: rebuild the images" >&2
        return 1
    fi
    printf '%s\n' "$image" >"$WORK/app.sha256"
    install -o 49999 -g 49999 -m 444 "$WORK/app.sha256" "$HYBNN_CERTS/app.sha256"
    APP_SHA256=$image
    log "app bundle sha256 $APP_SHA256 (the operator image's and the checkout's): the SuperNodes' pin"
}
timed "pin computed" pin

# 5. Codes, extracted by each service in its own container into its own volume (a
# SuperNode's ClientApps run in its pinned SuperExec's container).
extract() { oneoff "$WORK/extract-$1.log" --entrypoint hybnn "$1" extract --encoder /encoder --data-root /data \
                || { cat "$WORK/extract-$1.log" >&2; return 1; }; }
extract_all() {
    # Two at a time, the first two on different networks: parallel `podman-compose run`s
    # of one network race to create it (the first pair creates both).
    local names=(superexec-serverapp "${EXECS[@]}") i
    for ((i = 0; i < ${#names[@]}; i += 2)); do
        extract "${names[i]}" &
        local first=$!
        [ -n "${names[i + 1]:-}" ] && extract "${names[i + 1]}"
        wait "$first"
    done
}
timed "codes extracted in 1+$CLIENTS containers" extract_all

# 6. The stack; the operator service registers the keys and watches the SuperNodes come online.
online_count() {  # SuperNodes "online" as the operator's `flwr supernode list` shows them
    operator "$WORK/list.log" flwr supernode list containers --format json || { echo 0; return; }
    json_in "$WORK/list.log" | "$PYTHON" -c '
import json, sys
nodes = json.load(sys.stdin).get("nodes", [])
print(sum(1 for n in nodes if str(n.get("status", "")).lower() == "online"))'
}
stack_up() {
    compose up -d --no-build superlink superexec-serverapp fleet-front >"$WORK/up.log" 2>&1 \
        || { cat "$WORK/up.log" >&2; return 1; }
    local i deadline=$((SECONDS + 90))
    until operator "$WORK/list.log" flwr supernode list containers; do  # the Control API is up
        ((SECONDS < deadline)) || { cat "$WORK/list.log" >&2; return 1; }
        sleep 1
    done
    for i in $(seq 0 $((CLIENTS - 1))); do
        operator "$WORK/register-$i.log" flwr supernode register "/certs/supernodes/supernode-$i.pub" containers \
            || { cat "$WORK/register-$i.log" >&2; return 1; }
    done
    compose up -d --no-build "${STACK[@]}" >>"$WORK/up.log" 2>&1 || { cat "$WORK/up.log" >&2; return 1; }
    deadline=$((SECONDS + 180))
    while online=$(online_count); ((online < CLIENTS)); do
        ((SECONDS < deadline)) || break
        sleep 2
    done
    ((online >= CLIENTS)) || {
        echo "only $online of $CLIENTS SuperNodes came online within 180 s" >&2
        cat "$WORK/list.log" >&2
        return 1
    }
    local exec
    for exec in "${EXECS[@]}"; do  # each pinned SuperExec has read the pin
        until podman logs "$(container "$exec")" 2>&1 | grep -q "Pinned app bundle: sha256 $APP_SHA256"; do
            ((SECONDS < deadline)) || { echo "$exec did not start pinned to $APP_SHA256:" >&2
                                        podman logs --tail 20 "$(container "$exec")" >&2; return 1; }
            sleep 2
        done
    done
}
timed "stack up, keys registered by the operator service, $CLIENTS SuperNodes online, pinned" stack_up

# 7. A stranger on the host with ca.crt: a flwr connection to 127.0.0.1:PORT.
stranger_connection() {  # stranger_connection PORT: the host's flwr config, connection "stranger"
    mkdir -p "$FLWR_HOME"
    printf '[superlink]\ndefault = "stranger"\n\n[superlink.stranger]\naddress = "127.0.0.1:%s"\nroot-certificates = "%s"\n' \
        "$1" "$HYBNN_CERTS/ca.crt" >"$FLWR_HOME/config.toml"
}
stranger_fails() {  # stranger_fails LOG EXPECTED CMD...: CMD must fail, and say EXPECTED
    local log=$1 expected=$2; shift 2
    if "$@" >"$log" 2>&1; then echo "the stranger's \`${*:1:3}\` succeeded:" >&2; cat "$log" >&2; return 1; fi
    grep -q "$expected" "$log" || { echo "the stranger's \`${*:1:3}\` failed, but not with \"$expected\":" >&2; cat "$log" >&2; return 1; }
}
stranger_check() {
    local name port others=() published
    # Every port the stack publishes on the host: the front's alone.
    for name in $(podman ps --filter "label=io.podman.compose.project=$PROJECT" --format '{{.Names}}'); do
        while read -r _ _ published; do
            [ -n "$published" ] || continue
            port=${published##*:}
            log "published: $name ${published}"
            [[ $name == *fleet-front* && $port == "$HYBNN_FLEET_PORT" ]] || others+=("$port")
        done < <(podman port "$name")
    done
    for port in 8000 "${others[@]}"; do  # the SuperLink's own port, and anything else published
        stranger_connection "$port"
        stranger_fails "$WORK/stranger-ls-$port.log" "unavailable" "$BIN/flwr" ls stranger
        stranger_fails "$WORK/stranger-run-$port.log" "unavailable" "$BIN/flwr" run . stranger
        log "stranger on 127.0.0.1:$port: flwr ls and flwr run: $(grep -m1 -o 'Connection to the SuperLink is unavailable' "$WORK/stranger-ls-$port.log" || true)"
    done
    ((${#others[@]} == 0)) || { echo "published beyond the front: ports ${others[*]}" >&2; return 1; }
    # Through the front: TLS works, the Control API is refused.
    stranger_connection "$HYBNN_FLEET_PORT"
    stranger_fails "$WORK/stranger-ls-front.log" "403" "$BIN/flwr" ls stranger
    stranger_fails "$WORK/stranger-register-front.log" "403" \
        "$BIN/flwr" supernode register "$HYBNN_CERTS/supernodes/supernode-0.pub" stranger
    log "stranger through the front: flwr ls and flwr supernode register get 403"
    # Not a check but a fact for docs/security.md: the host routes to its container
    # networks, so the SuperLink container's own address may answer a local process.
    local address answer
    address=$(podman inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}' "${PROJECT}_superlink_1" \
        | awk '{print $1}')
    answer=$("$PYTHON" - "$address" "$HYBNN_CERTS/ca.crt" <<'PY'
import socket, ssl, sys
address, ca = sys.argv[1], sys.argv[2]
try:
    with socket.create_connection((address, 8000), timeout=5) as raw:
        with ssl.create_default_context(cafile=ca).wrap_socket(raw, server_hostname="superlink") as tls:
            tls.sendall(b"GET /health HTTP/1.1\r\nHost: superlink\r\nConnection: close\r\n\r\n")
            status_line = tls.recv(200).split(b"\r\n")[0].decode(errors="replace")
    print(f"answers: TLS as 'superlink', GET /health -> {status_line}")
except OSError as err:
    print(f"does not answer: {err}")
PY
)
    log "from the host, the SuperLink container's address $address:8000 $answer"
}
timed "stranger check" stranger_check

# 8. A foreign app bundle (tests/test_private_network.py's), submitted from the operator
# service: its ClientApp would write a marker into the client's data volume, its ServerApp
# writes the replies it gets. podman-compose 1.0.3's `run` ignores -v, so the app travels
# as a hex-encoded tar in an environment variable.
FOREIGN_CLIENT_MARKER=/data/foreign-client-ran
FOREIGN_REPLIES=/tmp/foreign-replies.json  # in the ServerApp's container
foreign_check() {
    local hex run_id exec refusals foreign_sha256
    hex=$("$PYTHON" - "$WORK/foreign-src" "$FOREIGN_CLIENT_MARKER" "$FOREIGN_REPLIES" "$CLIENTS" <<'PY'
import io, sys, tarfile
from pathlib import Path
from tests.test_private_network import _foreign_federated_app

app = _foreign_federated_app(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), nodes=int(sys.argv[4]))
buffer = io.BytesIO()
with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
    tar.add(app, arcname="foreign")
print(buffer.getvalue().hex())
PY
)
    oneoff "$WORK/foreign-run.log" -e "FOREIGN_APP_HEX=$hex" operator sh -c 'python -c "
import io, os, tarfile
tarfile.open(fileobj=io.BytesIO(bytes.fromhex(os.environ[\"FOREIGN_APP_HEX\"]))).extractall(\"/tmp\")
" && timeout 300 flwr run /tmp/foreign containers --stream' || { tail -30 "$WORK/foreign-run.log" >&2; return 1; }
    run_id=$(grep -m1 -oE 'Successfully started run [0-9]+' "$WORK/foreign-run.log" | grep -oE '[0-9]+$') \
        || { echo "no run id in the foreign run's log" >&2; tail -30 "$WORK/foreign-run.log" >&2; return 1; }
    for exec in "${EXECS[@]}"; do
        refusals=$(podman logs "$(container "$exec")" 2>&1 | grep "Refused run $run_id:" || true)
        [ -n "$refusals" ] || { echo "$exec did not refuse the foreign run $run_id:" >&2
                                podman logs --tail 30 "$(container "$exec")" >&2; return 1; }
        grep -q "not the pinned $APP_SHA256" <<<"$refusals" || { echo "$exec: $refusals" >&2; return 1; }
        foreign_sha256=$(grep -m1 -oE 'has sha256 [0-9a-f]{64}' <<<"$refusals" | grep -oE '[0-9a-f]{64}$')
        [ "$foreign_sha256" != "$APP_SHA256" ] || { echo "$exec refused the pinned bundle" >&2; return 1; }
        # The volume is there (the container answers), the marker is not.
        podman exec "$(container "$exec")" sh -c "test -d /data/features && test ! -e $FOREIGN_CLIENT_MARKER" \
            || { echo "the foreign ClientApp ran on $exec ($FOREIGN_CLIENT_MARKER), or its container is gone" >&2
                 return 1; }
        log "$exec: $(grep -m1 -o 'Refused run.*' <<<"$refusals")"
    done
    podman exec "$(container superexec-serverapp)" cat "$FOREIGN_REPLIES" >"$WORK/foreign-replies.json" \
        || { echo "the foreign ServerApp wrote no replies" >&2; return 1; }
    "$PYTHON" - "$WORK/foreign-replies.json" "$CLIENTS" <<'PY' || return 1
import json, sys
from flwr.common.constant import ErrorCode

replies, clients = json.load(open(sys.argv[1])), int(sys.argv[2])
codes = sorted(code for _, code, _ in replies)
if codes != [ErrorCode.INVALID_FAB] * clients:
    sys.exit(f"the foreign ServerApp's replies: {replies}; expected {clients} errors INVALID_FAB")
print(f"the foreign ServerApp got {len(replies)} error replies, code INVALID_FAB ({ErrorCode.INVALID_FAB})")
PY
    log "foreign run $run_id (bundle sha256 ${foreign_sha256:0:16}...): refused by all $CLIENTS SuperNodes, no ClientApp of it ran"
}
timed "foreign app bundle refused" foreign_check

# 9. The run, from the operator service.
RUN_CONFIG="num-server-rounds=$ROUNDS local-epochs=1 encoder-path='/encoder' data-root='/data' out-dir='/results'"
RUN_CONFIG+=" encoder-sha256='$ENCODER_SHA256' min-available-nodes=$CLIENTS min-train-nodes=$CLIENTS"
timed "flwr run from the operator service, $ROUNDS rounds" \
    operator "$WORK/flwr-run.log" timeout 900 flwr run . containers --run-config "$RUN_CONFIG" --stream \
    || { tail -50 "$WORK/flwr-run.log" >&2; exit 1; }
RUN_ID=$(grep -m1 -oE 'Successfully started run [0-9]+' "$WORK/flwr-run.log" | grep -oE '[0-9]+$' || true)
for exec in "${EXECS[@]}"; do
    if [ -z "$RUN_ID" ] || podman logs "$(container "$exec")" 2>&1 | grep -q "Refused run $RUN_ID:"; then
        echo "$exec refused the operator's run ${RUN_ID:-(no run id in its log)}" >&2; exit 1
    fi
done
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
