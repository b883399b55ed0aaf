# The training job's image (SPEC §12). On a GPU host:
#
#   docker build -t magvit-job .
#   docker run --gpus all --restart on-failure --stop-timeout 30 \
#       -e JOB_RUN_URI=s3://my-bucket/runs/exp1 \
#       -e AWS_ACCESS_KEY_ID -e AWS_SECRET_ACCESS_KEY magvit-job train
#
# It builds with the classic builder (Docker Engine 20.10 without BuildKit, a client without
# buildx) and with BuildKit: no instruction here needs BuildKit. docs/deploy.md has the measured
# size and build times, the stop timeout and what restarts a container.
#
# Base image: by default NVIDIA's CUDA 13.0 "base" image, pinned by tag. PyTorch itself comes
# from requirements.txt: PyPI's torch==2.13.0 wheel for Linux x86_64 is the CUDA 13.0 build and
# brings its own CUDA runtime, cuBLAS, cuDNN 9 and NCCL as pip packages (cuda-toolkit==13.0.3,
# nvidia-cudnn-cu13, nvidia-nccl-cu13, ...), so the image runs exactly the pinned torch. A
# "cudnn-runtime" base would add a second copy of those libraries that torch never loads; the
# "base" image still sets NVIDIA_REQUIRE_CUDA, so the NVIDIA container toolkit refuses, with a
# clear message, a host whose driver is too old for CUDA 13.0 (it needs 580 or newer).
# NOTE: this tag was chosen without access to the registry (the machine it was written on
# reaches package registries only) and has not been pulled here; if it is gone, any
# nvidia/cuda:13.0.x-base-ubuntu24.04 tag serves the same purpose.
#
# BASE_IMAGE names another Debian or Ubuntu base with python3 >= 3.11, python3-venv and tini
# in its apt sources, e.g. a local Debian made without a registry (what the CI drill,
# tests/drills/container/drill.sh, builds from; Debian bookworm's python3 is 3.11):
#   debootstrap --variant=minbase bookworm /tmp/rootfs http://deb.debian.org/debian
#   tar -C /tmp/rootfs -c . | docker import - local/debian-bookworm:minbase
#   docker build --build-arg BASE_IMAGE=local/debian-bookworm:minbase -t magvit-job:cpu .
ARG BASE_IMAGE=nvidia/cuda:13.0.0-base-ubuntu24.04
FROM ${BASE_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Python (3.12 on Ubuntu 24.04, 3.11 on Debian 12) in a venv, and tini as PID 1 so that signals
# reach Python and zombies are reaped. The distribution's package versions are not pinned: the
# security updates of the release replace them, and a pin to a superseded version breaks the build.
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        ca-certificates python3 python3-venv tini \
 && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv "$VIRTUAL_ENV"

# Runtime dependencies only (no test tools), in their own layer so code changes reuse it.
# By default from PyPI, and with it the CUDA torch wheel. A build can point pip elsewhere with
# these build args (pip reads them from the environment), e.g. to a wheelhouse that the host's
# own pip downloaded, served on the host's loopback:
#   pip download -r requirements.txt -d wheels && python3 -m http.server -d wheels -b 127.0.0.1 8765 &
#   docker build --network host --build-arg PIP_NO_INDEX=1 \
#       --build-arg PIP_FIND_LINKS=http://127.0.0.1:8765/ ...
# The CI drill does this (with the CPU torch wheel). It is also the way to build behind a
# TLS-inspecting proxy: the build then makes no TLS connection at all, so the proxy's CA bundle
# never has to enter the build, let alone the image. (A BuildKit secret mount would need
# `RUN --mount`, which the classic builder rejects.) They are URLs, never credentials: build
# args stay readable in `docker history`.
ARG PIP_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_NO_INDEX
COPY requirements.txt /app/requirements.txt
RUN pip install --no-cache-dir -r /app/requirements.txt

# Matplotlib's font list, built once here instead of in every new container (which prints a
# non-JSON "building the font cache" line and costs seconds). MPLCONFIGDIR must be writable at
# run time (a read-only root filesystem has a tmpfs on /tmp), so the entrypoint copies this
# file there before Python starts.
RUN MPLCONFIGDIR=/opt/matplotlib python -c "import matplotlib.font_manager" \
 && chmod -R a+rX /opt/matplotlib

# A fixed non-root uid (10001: clear of the base image's uid 1000 "ubuntu"), so that volume
# permissions and Kubernetes' runAsUser can name it. It owns the cache (the local working copy
# of an s3:// run) and the working directory (local run folders, HOME); the code stays
# root-owned and read-only to it.
RUN groupadd --gid 10001 job \
 && useradd --uid 10001 --gid 10001 --home-dir /work --no-create-home --shell /usr/sbin/nologin job \
 && install -d -o 10001 -g 10001 -m 0750 /cache /work

# entrypoint.sh is executable in git (mode 100755), and COPY keeps the mode; no --chmod, which
# the classic builder does not know.
COPY entrypoint.sh /app/entrypoint.sh
# The job as an installed package, as `make venv` installs it (no PYTHONPATH): its pinned
# dependencies are the layer above, so a code change rebuilds only these two small layers.
COPY pyproject.toml /app/src/pyproject.toml
COPY job/ /app/src/job/
RUN python -m pip install --no-cache-dir --no-deps /app/src

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/work \
    MPLCONFIGDIR=/tmp/matplotlib \
    MPL_FONT_CACHE=/opt/matplotlib \
    JOB_CACHE_DIR=/cache

WORKDIR /work
USER 10001:10001

# Healthy while the job's heartbeat is fresh: `python -m job status` on the local working copy
# (no S3 request each interval; see health_check in entrypoint.sh). The start period covers
# the time before the first progress.json (imports, downloading a checkpoint).
HEALTHCHECK --interval=30s --timeout=20s --start-period=3m --retries=3 \
    CMD ["/app/entrypoint.sh", "healthcheck"]

# SIGTERM (docker stop, the kubelet) is handled when the current torch call returns: give it 30 s
# (docker run --stop-timeout 30, compose stop_grace_period, k8s terminationGracePeriodSeconds).
STOPSIGNAL SIGTERM

ENTRYPOINT ["/usr/bin/tini", "--", "/app/entrypoint.sh"]
CMD ["train"]

# Last, so that a new VERSION, REVISION or CREATED changes only the image's metadata: every layer
# above comes from the build cache. Set at build time, e.g.
#   --build-arg REVISION=$(git rev-parse HEAD) --build-arg CREATED=$(date -u +%FT%TZ)
ARG BASE_IMAGE
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="magvit-job" \
      org.opencontainers.image.description="Resumable, monitored PyTorch training job for a MAGVIT-style video tokenizer; syncs its run folder to S3" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"
