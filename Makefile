# Every target sets up .venv on first use: `make demo` or `make test` on a fresh clone is enough.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PIP_INSTALL := $(PY) -m pip install --quiet --disable-pip-version-check

IMAGE ?= esm2cli:0.1.0

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

image:
	docker build -t $(IMAGE) .

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
