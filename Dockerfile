# aeserve's images, two targets of one build (docs/deploy.md):
#   full (the default): training and serving, on PyTorch (CPU)
#   serve: serving only, without torch or the training stack (the Kubernetes manifests run this one)
#
#   docker build -t aeserve:0.1.0 .
#   docker build -t aeserve-serve:0.1.0 --target serve .
#   docker build -t aeserve-cuda:0.1.0 --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 .   # untested here
#   docker run -p 8000:8000 -v "$PWD/registry:/registry:ro" aeserve-serve:0.1.0
#
# Both run as uid 10001 and serve the registry at /registry (or the URL in AESERVE_REGISTRY) on AESERVE_PORT (8000).
# CI builds both with podman (`podman build --format docker`, which keeps the HEALTHCHECK) on a Debian base of its own,
# trains a version in the full image and serves it from both (.ci/container).
ARG PYTHON_IMAGE=python:3.11-slim

# The project's files, listed once for both targets.
FROM scratch AS source
COPY pyproject.toml README.md /src/
COPY deploy/container/requirements.py /src/deploy/container/
COPY aeserve /src/aeserve
COPY models /src/models
COPY training /src/training
COPY service /src/service
COPY client /src/client

# What both targets share. python3, not python: a plain Debian base has no `python`. The working directory is the
# user's and writable: `aeserve train` keeps its crash-safe state there (.aeserve/state/NAME; mount a volume on
# /var/lib/aeserve to keep it for --resume). Group 0 owns it too, for platforms that run images as an arbitrary uid
# in group 0.
FROM ${PYTHON_IMAGE} AS runtime
RUN useradd --uid 10001 --gid 0 --create-home --home-dir /home/aeserve aeserve \
 && mkdir -p /registry /var/lib/aeserve && chown 10001:0 /registry /var/lib/aeserve && chmod 0775 /registry /var/lib/aeserve
WORKDIR /var/lib/aeserve
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    AESERVE_REGISTRY=/registry AESERVE_HOST=0.0.0.0 AESERVE_PORT=8000
VOLUME ["/registry"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s \
  CMD ["/opt/venv/bin/python", "-c", "import os, urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ.get(\"AESERVE_PORT\", \"8000\")}/health/live', timeout=2)"]
CMD ["aeserve", "serve"]

# serve: the serve extra (read from pyproject.toml) and the project without its dependencies, built apart so that
# only the virtual environment reaches the image.
FROM runtime AS build-serve
RUN python3 -m venv /opt/venv
COPY --from=source /src/pyproject.toml /src/deploy/container/requirements.py /tmp/build/
RUN --mount=type=cache,target=/root/.cache/pip \
    python3 /tmp/build/requirements.py /tmp/build/pyproject.toml serve s3 gcs > /tmp/build/requirements.txt \
 && pip install -r /tmp/build/requirements.txt
COPY --from=source /src /usr/src/aeserve
RUN --mount=type=cache,target=/root/.cache/pip pip install --no-deps /usr/src/aeserve && pip uninstall -q -y pip setuptools

FROM runtime AS serve
COPY --from=build-serve /opt/venv /opt/venv
USER 10001

# full (the default target): installed in place, one layer for torch, one for the rest, one for the project. Copied
# from a build stage, its 1.7 GB environment would be written twice.
FROM runtime AS full
# torch alone from its own index (CPU wheels by default); then everything else from PyPI, torch's dependencies too
# (the list names torch again, so that pip resolves what the installed torch needs).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN python3 -m venv /opt/venv
COPY --from=source /src/pyproject.toml /src/deploy/container/requirements.py /tmp/build/
RUN --mount=type=cache,target=/root/.cache/pip \
    python3 /tmp/build/requirements.py /tmp/build/pyproject.toml dependencies --only torch > /tmp/build/torch.txt \
 && pip install --no-deps --index-url "${TORCH_INDEX}" -r /tmp/build/torch.txt
RUN --mount=type=cache,target=/root/.cache/pip \
    python3 /tmp/build/requirements.py /tmp/build/pyproject.toml dependencies s3 gcs > /tmp/build/requirements.txt \
 && pip install -r /tmp/build/requirements.txt
COPY --from=source /src /usr/src/aeserve
RUN --mount=type=cache,target=/root/.cache/pip pip install --no-deps /usr/src/aeserve && rm -rf /tmp/build /usr/src/aeserve/build
USER 10001
