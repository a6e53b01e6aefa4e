# syntax=docker/dockerfile:1.7
#
# Three images from one file (BuildKit builds only the stages a target needs):
#   worker  the serving image, `python -m worker`, without torch (the default target)
#   train   training and ONNX export, `python -m export`, with the train extra
#   bundle  one model bundle directory for the worker pods' initContainer, built with
#           --build-context model-bundle=DIR
# deploy/k8s/README.md has the build commands. Base images are written out in each FROM,
# not passed as build arguments, so that scanners and update bots can read them.

# ---- worker-build: a virtual environment with the worker and its dependencies only
FROM python:3.11-slim-bookworm AS worker-build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/streamrec
WORKDIR /src
COPY pyproject.toml constraints.txt ./
COPY worker/ worker/
COPY schemas/ schemas/
# constraints.txt pins the versions CI tests. The second command fails the build if a
# dependency ever pulls torch into the serving image.
RUN /opt/streamrec/bin/pip install -c constraints.txt . \
 && ! /opt/streamrec/bin/python -c "import torch" 2>/dev/null

# ---- train: torch, onnx and the export package, for `python -m export train`
FROM python:3.11-slim-bookworm AS train
# PyPI's Linux torch wheels depend on several GB of CUDA libraries. This index serves
# CPU-only builds of the same versions, and pip prefers their `+cpu` local version.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN groupadd --system --gid 10001 streamrec \
 && useradd --system --uid 10001 --gid streamrec --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin streamrec \
 && python -m venv /opt/streamrec
WORKDIR /src
COPY pyproject.toml constraints.txt ./
COPY worker/ worker/
COPY schemas/ schemas/
COPY export/ export/
RUN /opt/streamrec/bin/pip install -c constraints.txt --extra-index-url "${TORCH_INDEX_URL}" torch \
 && /opt/streamrec/bin/pip install -c constraints.txt ".[train]"
RUN mkdir -p /work \
 && chown 10001:10001 /work
ENV PATH=/opt/streamrec/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
WORKDIR /work
USER 10001:10001
ENTRYPOINT ["python", "-m", "export"]
CMD ["--help"]

# ---- bundle: the files of one trained bundle, owned by the worker's user
FROM busybox:1.36.1 AS bundle
COPY --from=model-bundle --chown=10001:10001 / /bundle/
USER 10001:10001
CMD ["ls", "-l", "/bundle"]

# ---- worker: the serving image (last stage, so a plain `docker build .` builds it)
FROM python:3.11-slim-bookworm AS worker
RUN groupadd --system --gid 10001 streamrec \
 && useradd --system --uid 10001 --gid streamrec --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin streamrec \
 && mkdir -p /models /var/lib/streamrec \
 && chown 10001:10001 /var/lib/streamrec
COPY --from=worker-build /opt/streamrec /opt/streamrec
# The root filesystem may be read-only (it is on Kubernetes): pip compiled the bytecode at
# build time, and the worker writes only below STREAMREC_STATE_DIR and $HOME. HOME is /tmp
# because onnxruntime (1.32) writes a cache below $HOME/.cache.
ENV PATH=/opt/streamrec/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    STREAMREC_WEB_HOST=0.0.0.0 \
    STREAMREC_BUNDLE_DIR=/models \
    STREAMREC_STATE_DIR=/var/lib/streamrec \
    STREAMREC_LOG_FORMAT=json
WORKDIR /var/lib/streamrec
USER 10001:10001
EXPOSE 6066
# Docker runs this check. Kubernetes ignores it and uses the probes in deploy/k8s/base.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
  CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('STREAMREC_WEB_PORT', '6066'), timeout=3)"
ENTRYPOINT ["python", "-m", "worker"]
