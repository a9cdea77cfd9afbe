#!/usr/bin/env bash
# The GPU check: on a fresh machine with one NVIDIA GPU and no internet, in well under 8 minutes.
# Runs the GPU-marked tests, then `esm2cli bench` on the 650M architecture (random weights) in bf16
# and fp32, and writes everything under $OUT (default: gpu-results/).
#
# The machine is expected to have python3 with torch (CUDA), transformers, pyarrow, numpy, click, tqdm,
# fsspec and pytest. What it lacks travels as wheels in .whl/ (ignored by git), fetched here with:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl biopython==1.88
set -uo pipefail
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/machine.txt"

timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_model.py tests/test_gpu.py 2>&1 \
    | tee "$OUT/gpu-tests.log"

for dtype in bfloat16 float32; do
    timeout 150 python3 -m esm2cli bench --gpus 1 -m esm2_t33_650M --dtype "$dtype" --sequences 1500 --json -q \
        > "$OUT/bench-650M-$dtype.json" 2> "$OUT/bench-650M-$dtype.log"
    echo "bench $dtype: exit $?"
    python3 -c "import json,sys; r=json.load(open(sys.argv[1])); row=r['rows'][0]; print(f\"{r['dtype']}: {row['residues_per_s']:,.0f} residues/s, MFU {row['mfu']:.1%} of {r['peak_gflops']:,.0f} GFLOP/s, padding {r['padding_fraction']:.1%}\")" \
        "$OUT/bench-650M-$dtype.json" 2>&1 | tee -a "$OUT/summary.txt"
done
