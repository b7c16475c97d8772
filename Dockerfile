# swarmtune home node.
#
#   docker build -t swarmtune .                                  # GPU node: PyPI's torch wheel carries CUDA
#   docker run --rm -v swarmtune-data:/data swarmtune keygen     # once: the identity key, in the data volume
#   docker run -d --name swarmtune --gpus all -p 31337:31337 \
#       -v swarmtune-data:/data -v swarmtune-cache:/cache -v "$PWD/swarm.toml:/data/swarm.toml:ro" \
#       swarmtune run --manifest /data/swarm.toml --announce-maddrs /ip4/<your public IP>/tcp/31337
#   docker exec swarmtune swarmtune status
#
# Build arguments (all optional):
#   BASE_IMAGE       any image with Python 3.10-3.12 and Debian/Ubuntu apt; an image without python3
#                    (e.g. nvidia/cuda:12.8.1-runtime-ubuntu24.04) gets it from apt. PyPI's torch
#                    bundles the CUDA libraries, so a CUDA base image is not required for a GPU node:
#                    only the host's NVIDIA driver plus the NVIDIA container toolkit (`--gpus all`).
#   TORCH_VERSION    torch release to install (the project accepts >=2.3,<2.14).
#   TORCH_SPEC       full pip requirement for torch, overriding TORCH_VERSION: a wheel path bind-mounted
#                    at build time (scripts/check_docker.sh uses the local CPU wheel this way) or
#                    e.g. "torch==2.13.0+cpu".
#   TORCH_INDEX_URL  index to take torch from, e.g. https://download.pytorch.org/whl/cpu for a CPU-only
#                    node that does not need the multi-GB CUDA wheel.
#   PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS, PIP_CERT   plain pip settings (a local mirror,
#                    a wheelhouse, the CA bundle of a TLS-intercepting proxy, bind-mounted at build
#                    time); ARGs, so they reach pip during the build without being baked into the
#                    image's environment. Empty (the default) means pip's own default.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_SPEC=""
ARG TORCH_INDEX_URL=""
ARG PIP_INDEX_URL=""
ARG PIP_EXTRA_INDEX_URL=""
ARG PIP_FIND_LINKS=""
ARG PIP_CERT=""

# A virtualenv, not the system site-packages: Debian/Ubuntu pythons refuse `pip install` outside one
# (PEP 668), and it keeps our dependencies apart from whatever the base image ships.
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Python (only if the base lacks it), iproute2's ss (the network byte metrics read p2pd's socket counters
# with it) and the unprivileged user. The uid is 1000 where free, so that a
# bind-mounted host folder can be chowned to it (`chown -R 1000:1000 ./data`). /data holds the private
# key and the control socket: owner only.
RUN set -eux; \
    need="$(command -v ss >/dev/null || echo iproute2)"; \
    if ! command -v python3 >/dev/null || ! python3 -c 'import ensurepip, venv' 2>/dev/null; then \
        need="$need python3 python3-venv ca-certificates"; \
    fi; \
    if [ -n "$need" ]; then \
        apt-get update; \
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $need; \
        rm -rf /var/lib/apt/lists/*; \
    fi; \
    python3 -c 'import sys; assert (3, 10) <= sys.version_info[:2] <= (3, 12), "swarmtune needs Python 3.10-3.12, base has " + sys.version'; \
    python3 -m venv "$VIRTUAL_ENV"; \
    if ! getent passwd swarmtune >/dev/null; then \
        useradd --uid 1000 --user-group --create-home --home-dir /home/swarmtune --shell /bin/sh swarmtune \
        || useradd --user-group --create-home --home-dir /home/swarmtune --shell /bin/sh swarmtune; \
    fi; \
    mkdir -p /data /cache/huggingface /cache/swarmtune; \
    chown -R swarmtune:swarmtune /data /cache; \
    chmod 0700 /data

# torch in its own layer, before the project is copied: editing the code does not re-download it.
RUN set -eux; \
    spec="${TORCH_SPEC:-torch==${TORCH_VERSION}}"; \
    if [ -n "$TORCH_INDEX_URL" ]; then \
        pip install --index-url "$TORCH_INDEX_URL" "$spec"; \
    else \
        pip install "$spec"; \
    fi; \
    python -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'

# Only what the package needs (.dockerignore keeps tests, benchmarks and caches out of the context).
# The installed torch already satisfies the project's pin, so pip keeps it.
COPY pyproject.toml README.md /src/
COPY node /src/node
COPY protocol /src/protocol
RUN set -eux; \
    pip install /src; \
    rm -rf /src; \
    swarmtune --version

# Everything a node must keep across container restarts lives in /data ($SWARMTUNE_HOME):
# identity.key (mode 0600: the node's peer id and the owner of its credit, back it up),
# swarms/<id>/ledger.jsonl, checkpoints, node.json, and the control socket node.sock.
# /cache holds downloaded base models ($HF_HOME) and the built-in tiny model ($SWARMTUNE_CACHE):
# large, re-downloadable, and shareable between nodes on one host.
# A container has its own network namespace, so a fixed p2p port is safe and lets `-p 31337:31337`
# publish it. Override with --host-maddrs / SWARMTUNE_HOST_MADDRS; behind NAT also set
# --announce-maddrs to the address peers can dial.
ENV SWARMTUNE_HOME=/data \
    HF_HOME=/cache/huggingface \
    SWARMTUNE_CACHE=/cache/swarmtune \
    SWARMTUNE_HOST_MADDRS=/ip4/0.0.0.0/tcp/31337
VOLUME ["/data", "/cache"]
EXPOSE 31337/tcp

USER swarmtune
WORKDIR /home/swarmtune

# `swarmtune status --healthcheck` asks the daemon over its control socket: exit 2 when nobody answers,
# 1 when the node is stalled (no round for stall_factor x its last round's time, at least stall_min_s;
# the line it prints says why), 0 otherwise. The socket opens once the node has joined the DHT, which
# can take a long base-model download first: hence the long start period (failures during it do not
# count). It uses the default socket, /data/node.sock: a node started with another --socket needs its
# own healthcheck.
HEALTHCHECK --interval=30s --timeout=20s --start-period=15m --retries=3 CMD ["swarmtune", "status", "--healthcheck"]

# `docker run IMAGE <subcommand> ...` reads like the CLI. Without arguments it prints the help rather
# than starting a node that has no manifest or key yet.
ENTRYPOINT ["swarmtune"]
CMD ["--help"]
