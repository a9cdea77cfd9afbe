# esm2cli on a CUDA runtime image. Build: make image (tags esm2cli:<version>; resolves the base digest).
# The base image is pinned by digest and every Python package by constraints.txt, so that two builds
# of the same commit install the same bytes:
#   docker build --build-arg BASE_DIGEST=sha256:... -t esm2cli:0.1.0 .
ARG BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ARG BASE_DIGEST
FROM ${BASE_IMAGE}@${BASE_DIGEST}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH \
    HF_HOME=/cache/huggingface \
    XDG_CACHE_HOME=/tmp/.cache

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

# Dependencies first, in their own layers: they are rebuilt only when the torch pin, pyproject.toml or
# constraints.txt change, not on every code change. torch comes from the CUDA index at the version that
# constraints.txt pins (its +cu128 local version satisfies the pin); the second install then brings
# every other package, torch's own dependencies included, to the versions constraints.txt pins, with the
# [h5] extra (h5py) so that `-o out.h5` and `--format h5` work in the image as they do elsewhere.
WORKDIR /app
COPY pyproject.toml README.md constraints.txt ./
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"
RUN mkdir esm2cli && touch esm2cli/__init__.py \
    && pip install -c constraints.txt ".[h5]" && pip uninstall -y esm2cli && rm -rf esm2cli

COPY esm2cli ./esm2cli
RUN pip install --no-deps . && esm2cli --version && python -c "import h5py"

# Non-root; the Hugging Face cache is a volume, so that weights are downloaded once per node or PVC.
# The image also runs with a read-only root filesystem given writable /tmp and /cache volumes.
RUN useradd --create-home --uid 10001 esm2cli && mkdir -p /cache/huggingface && chown -R esm2cli /cache
VOLUME ["/cache"]
USER 10001
EXPOSE 8000

ENTRYPOINT ["esm2cli"]
CMD ["--help"]
