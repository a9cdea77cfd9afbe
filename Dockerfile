# esm2cli on a CUDA runtime image. Build: make image (tags esm2cli:<version>).
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    HF_HOME=/cache/huggingface

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

# Dependencies first, in their own layers: they are rebuilt only when the torch pin or
# pyproject.toml change, not on every code change.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"
WORKDIR /app
COPY pyproject.toml README.md ./
RUN mkdir esm2cli && touch esm2cli/__init__.py \
    && pip install . && pip uninstall -y esm2cli && rm -rf esm2cli

COPY esm2cli ./esm2cli
RUN pip install --no-deps . && esm2cli --version

# Non-root; the Hugging Face cache is a volume, so that weights are downloaded once per node or PVC.
RUN useradd --create-home --uid 10001 esm2cli && mkdir -p /cache/huggingface && chown -R esm2cli /cache
VOLUME ["/cache"]
USER 10001
EXPOSE 8000

ENTRYPOINT ["esm2cli"]
CMD ["--help"]
