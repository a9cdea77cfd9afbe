# Every target sets up .venv on first use: `make demo` or `make test` on a fresh clone is enough.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PIP_INSTALL := $(PY) -m pip install --quiet --disable-pip-version-check

IMAGE ?= esm2cli:0.1.0
BASE_IMAGE ?= nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
BASE_DIGEST ?=

.PHONY: install test demo lint format image gpu-wheels clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP_INSTALL) --upgrade pip
	$(PIP_INSTALL) -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/esm2cli embed examples/demo.fasta -o demo-out/demo.parquet \
		-m esm2_t6_8M --load-format dummy --devices sim:2 --overwrite
	$(PY) -c "import pyarrow.parquet as pq; t = pq.read_table('demo-out/demo.parquet'); \
	print(t.schema); print(t.select(['id', 'length', 'truncated']).slice(0, 5).to_pylist())"

lint: $(STAMP)
	$(VENV)/bin/ruff check esm2cli tests benchmarks
	$(VENV)/bin/ruff format --check esm2cli tests benchmarks

format: $(STAMP)
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
	rm -rf $(VENV) demo-out .pytest_cache
