# syntax=docker/dockerfile:1
# ecr-webhook: a two-stage image.  The build stage builds the project's wheel
# and installs it, with its dependencies, into a virtualenv at /opt/venv; the
# final stage copies only that virtualenv onto a fresh slim Python, so no
# compiler, pip cache or source tree reaches it.  Every dependency ships
# manylinux wheels (cryptography, PyYAML with its libyaml C loader), so not even
# the build stage needs a compiler.
#
#   docker build -t ecr-webhook:0.1.0 .
#
# No Docker engine runs where this project is developed, so the image is not
# built in CI; tests/test_dockerfile.py lints this file with hadolint, checks
# its structure, and builds the wheel the way the build stage does.

# Both stages must use the same Python: the virtualenv's interpreter is a
# symlink to /usr/local/bin/python3.11 of the base image.
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python -m venv /opt/venv
# Only what the wheel is built from (.dockerignore keeps the rest out).
COPY pyproject.toml ./
COPY webhook ./webhook
# `pip wheel` builds in an isolated environment with the build backend named in
# pyproject.toml ([build-system]); the wheel, then its dependencies, go into
# the virtualenv.
RUN pip wheel --no-deps --wheel-dir /dist . \
 && /opt/venv/bin/pip install /dist/ecr_webhook-*.whl \
 && /opt/venv/bin/ecr-webhook --version

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="ecr-webhook" \
      org.opencontainers.image.description="Mutating admission webhook that keeps Amazon EKS system images pullable" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
COPY --from=build /opt/venv /opt/venv
# A numeric UID/GID (no passwd entry needed), so the kubelet can verify
# runAsNonRoot without reading /etc/passwd; 65532 is the "nonroot" user of the
# distroless images, and the manifests run the pod as the same IDs.
USER 65532:65532
# Admission (HTTPS) and metrics (HTTP) ports of `ecr-webhook serve`; the
# manifests pass --port=61443 --metrics-port=61444 (hostNetwork, see
# manifests/base/deployment.yaml).
EXPOSE 8443 9090
ENTRYPOINT ["ecr-webhook"]
CMD ["serve"]
