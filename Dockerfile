# aeserve: the HTTP service, with the registry mounted at /registry, or at a URL (s3://, gs://) in AESERVE_REGISTRY.
#   docker build -t aeserve .                                   # CPU PyTorch (default)
#   docker build -t aeserve-cuda --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 .
#   docker run -p 8000:8000 -v "$PWD/registry:/registry:ro" aeserve
#   docker run -p 8000:8000 -e AESERVE_REGISTRY=s3://bucket/prefix -e AWS_ACCESS_KEY_ID=... -e AWS_SECRET_ACCESS_KEY=... aeserve
# No image is built in CI (no container daemon there): the same install runs in CI's fresh virtual environment.
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
WORKDIR /src
RUN python -m venv /opt/venv
# torch first, from the chosen index, so the project install below finds the pin already met.
RUN /opt/venv/bin/pip install --no-cache-dir --index-url "${TORCH_INDEX}" torch==2.13.0
COPY pyproject.toml README.md ./
COPY aeserve ./aeserve
COPY models ./models
COPY training ./training
COPY service ./service
COPY client ./client
RUN /opt/venv/bin/pip install --no-cache-dir '.[s3,gcs]'

FROM ${PYTHON_IMAGE}
COPY --from=build /opt/venv /opt/venv
RUN useradd --create-home --uid 10001 aeserve && mkdir -p /registry && chown aeserve /registry
USER aeserve
ENV PATH=/opt/venv/bin:$PATH AESERVE_REGISTRY=/registry PYTHONUNBUFFERED=1
VOLUME ["/registry"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health/live', timeout=2)" || exit 1
CMD ["aeserve", "serve", "--host", "0.0.0.0", "--port", "8000"]
