# FedHyBNN images on top of Flower's official ones, pinned to Flower 1.42.0.
#
#   docker compose build            # builds both targets below
#
# target "supernode": flower-supernode plus this project (in process isolation: its
#                     ClientApps run in a SuperExec beside it)
# target "superexec": the same image running flower-superexec (runs the ServerApp for
#                     the SuperLink, which itself runs the stock flwr/superlink image);
#                     with the entrypoint `python -m client.pinned_superexec`, the SuperExec
#                     beside each SuperNode that starts ClientApps of the pinned app bundle only.
#                     Flower's images all hold the whole flwr package, so torch and the
#                     project are installed once, in the supernode stage.
# target "operator":  the same image with the app's pyproject.toml as committed, for the
#                     `flwr` CLI inside the stack (`flwr run .` from /app, `flwr supernode
#                     register`); docker-compose.yml's operator service.
#
# Build arguments and secrets:
#   TORCH_INDEX_URL  where torch comes from. The default, PyTorch's CPU wheel index, has
#                    no CUDA libraries; https://pypi.org/simple works too (its wheel
#                    brings about 2.7 GB of CUDA libraries).
#   secret pip-ca    a CA bundle for pip, needed behind a TLS-intercepting proxy:
#                    `--secret id=pip-ca,src=/etc/ssl/certs/ca-certificates.crt`.
#                    Used by the build only; not stored in the image.
# pip's cache is a build cache mount. torch and its dependencies are downloaded into a
# wheelhouse there and installed from it, so a rebuild does not download them again
# (`pip download` skips the files it already has; pip's own HTTP cache does not help
# behind a proxy that strips the caching headers). torch is installed before the
# project's files are copied, so editing them does not reinstall it. flwr is already
# in the base image, so the project's own `flwr[simulation]` pin is not reinstalled.
#
# Flower's images run as the user "app" (uid 49999, home /app). /data is made theirs,
# so a named volume mounted there is writable; a bind-mounted results folder must be
# writable by uid 49999 on the host.
ARG FLWR_VERSION=1.42.0

FROM flwr/supernode:${FLWR_VERSION} AS supernode
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
USER root
RUN install -d -o 49999 -g 49999 /data
USER app
WORKDIR /app
RUN --mount=type=secret,id=pip-ca,uid=49999 \
    --mount=type=cache,target=/var/cache/pip,uid=49999,gid=49999 \
    export PIP_CACHE_DIR=/var/cache/pip \
 && if [ -s /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi \
 && python -m pip download -d /var/cache/pip/wheelhouse "torch==2.14.1" "torchvision==0.29.1" \
        --index-url "${TORCH_INDEX_URL}" \
 && python -m pip install --no-index --find-links /var/cache/pip/wheelhouse "torch==2.14.1" "torchvision==0.29.1"
COPY --chown=app:app pyproject.toml README.md ./
COPY --chown=app:app common ./common
COPY --chown=app:app client ./client
COPY --chown=app:app server ./server
COPY --chown=app:app simulation ./simulation
RUN --mount=type=secret,id=pip-ca,uid=49999 \
    --mount=type=cache,target=/var/cache/pip,uid=49999,gid=49999 \
    export PIP_CACHE_DIR=/var/cache/pip \
 && if [ -s /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi \
 && sed -i 's/.*"flwr\[simulation\]==.*//' pyproject.toml \
 && python -m pip install .
ENTRYPOINT ["flower-supernode"]

FROM supernode AS superexec
ENTRYPOINT ["flower-superexec"]

FROM supernode AS operator
# The supernode stage dropped the flwr pin from pyproject.toml before `pip install .`;
# the app bundle `flwr run .` sends is made from the file as committed.
COPY --chown=app:app pyproject.toml ./
ENTRYPOINT []
CMD ["flwr", "--help"]
