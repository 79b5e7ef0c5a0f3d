# FedHyBNN images on top of Flower's official ones, pinned to Flower 1.42.0.
#
#   docker compose build            # builds both targets below
#
# target "supernode": flower-supernode plus this project (ClientApp runs in a subprocess)
# target "superexec": flower-superexec plus this project (runs the ServerApp for the
#                     SuperLink, which itself runs the stock flwr/superlink image)
#
# Torch comes from the CPU wheel index (no CUDA libraries); flwr is already in the
# base image, so the project's own `flwr[simulation]` pin is not reinstalled.
ARG FLWR_VERSION=1.42.0

FROM flwr/supernode:${FLWR_VERSION} AS supernode
WORKDIR /app
COPY pyproject.toml README.md ./
COPY common ./common
COPY client ./client
COPY server ./server
COPY simulation ./simulation
RUN python -m pip install --no-cache-dir "torch==2.14.1" "torchvision==0.29.1" \
        --index-url https://download.pytorch.org/whl/cpu \
 && sed -i 's/.*"flwr\[simulation\]==.*//' pyproject.toml \
 && python -m pip install --no-cache-dir .
ENTRYPOINT ["flower-supernode"]

FROM flwr/superexec:${FLWR_VERSION} AS superexec
WORKDIR /app
COPY pyproject.toml README.md ./
COPY common ./common
COPY client ./client
COPY server ./server
COPY simulation ./simulation
RUN python -m pip install --no-cache-dir "torch==2.14.1" "torchvision==0.29.1" \
        --index-url https://download.pytorch.org/whl/cpu \
 && sed -i 's/.*"flwr\[simulation\]==.*//' pyproject.toml \
 && python -m pip install --no-cache-dir .
ENTRYPOINT ["flower-superexec"]
