# Every target sets up .venv on first use: `make demo` or `make test` on a fresh clone is enough.
# torch: the version constraints.txt pins. From PyPI that is, on Linux x86_64, the CUDA build (several GB of
# nvidia-* wheels); `make demo TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu` installs PyTorch's CPU-only
# build instead (about 200 MB). macOS and Windows get a CPU build from PyPI either way.
VENV ?= .venv
PY := $(VENV)/bin/python
RUNTIME_STAMP := $(VENV)/.runtime-stamp
DEV_STAMP := $(VENV)/.dev-stamp
DOCS_STAMP := $(VENV)/.docs-stamp
PIP_INSTALL := $(PY) -m pip install --quiet --disable-pip-version-check
TORCH_INDEX_URL ?=

IMAGE ?= esm2cli:0.1.0
BASE_IMAGE ?= nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
BASE_DIGEST ?=

.PHONY: install test demo docs docs-serve lint format image gpu-wheels clean

# The runtime: what esm2cli needs to run (make demo). The tests and the docs add their extras on top.
$(RUNTIME_STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP_INSTALL) --upgrade pip
	$(if $(TORCH_INDEX_URL),$(PIP_INSTALL) --index-url $(TORCH_INDEX_URL) "$$(grep '^torch==' constraints.txt)")
	$(PIP_INSTALL) -c constraints.txt -e .
	touch $@

$(DEV_STAMP): $(RUNTIME_STAMP)
	$(PIP_INSTALL) -c constraints.txt -e ".[dev]"
	touch $@

$(DOCS_STAMP): $(RUNTIME_STAMP)
	$(PIP_INSTALL) -c constraints.txt -e ".[docs]"
	touch $@

install: $(RUNTIME_STAMP)

test: $(DEV_STAMP)
	$(PY) -m pytest -q

demo: $(RUNTIME_STAMP)
	$(VENV)/bin/esm2cli embed examples/demo.fasta -o demo-out/demo.parquet \
		-m esm2_t6_8M --load-format dummy --devices sim:2 --overwrite
	$(PY) -c "import pyarrow.parquet as pq; t = pq.read_table('demo-out/demo.parquet'); \
	print(t.schema); print(t.select(['id', 'length', 'truncated']).slice(0, 5).to_pylist())"
	@echo "Random weights: these embeddings are meaningless. Next: .venv/bin/esm2cli --help (or: source .venv/bin/activate)"

# The documentation site (docs/, mkdocs.yml) into site/; --strict fails on a broken link or a page left out.
docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

docs-serve: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve

lint: $(DEV_STAMP)
	$(VENV)/bin/ruff check esm2cli tests benchmarks
	$(VENV)/bin/ruff format --check esm2cli tests benchmarks
	$(VENV)/bin/mypy

format: $(DEV_STAMP)
	$(VENV)/bin/ruff format esm2cli tests benchmarks
	$(VENV)/bin/ruff check --fix esm2cli tests benchmarks

# The base image by digest (pass BASE_DIGEST=sha256:... to pin one; else the tag's current digest, printed).
image:
	@digest="$(BASE_DIGEST)"; \
	if [ -z "$$digest" ]; then \
		digest=$$(docker buildx imagetools inspect $(BASE_IMAGE) --format '{{json .Manifest.Digest}}' | tr -d '"'); \
		echo "base image $(BASE_IMAGE)@$$digest (pin it: make image BASE_DIGEST=$$digest)"; \
	fi; \
	docker build --build-arg BASE_IMAGE=$(BASE_IMAGE) --build-arg BASE_DIGEST=$$digest -t $(IMAGE) .

# What benchmarks/gpu_check.sh needs on a GPU machine with no internet (Python 3.12, torch there):
# the packages its image lacks, as wheels in .whl/, at the versions constraints.txt pins.
GPU_WHEELS := biopython fastapi starlette pydantic pydantic_core annotated-types typing-inspection \
	typing_extensions opentelemetry-api uvicorn
gpu-wheels:
	mkdir -p .whl
	python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
		$$(for p in $(GPU_WHEELS); do grep -i -E "^$$p==" constraints.txt; done)

clean:
	rm -rf $(VENV) demo-out site .pytest_cache
