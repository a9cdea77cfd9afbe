#!/usr/bin/env bash
# The GPU check: on a fresh machine with one NVIDIA GPU and no internet, in about 8 minutes (the
# timeouts below add up to 8.2 minutes).
# 1. the GPU-marked tests;
# 2. `esm2cli bench` on the 650M architecture (random weights) in bf16 and fp32, each line with what the
#    modeled card (found by name, default MFU and overhead) predicts for the very same batches;
# 3. `benchmarks/serve_bench.py` on the 650M architecture: 16 single-sequence clients, dynamic
#    batching on and off in one run, and the engine alone (the serve issue's 3x check);
# 4. `benchmarks/gelu_ab.py` on the 650M architecture: transformers' GELU against the fused one;
# 5. `benchmarks/token_budget.py` on the 650M architecture: residues/s at 4k, 16k and 32k tokens a batch.
# 6. `benchmarks/score_bench.py` on the 650M architecture: batched masked copies (PLL) against one per pass.
# 7. `esm2cli bench --simulate h100|h200` (the modeled card, no model run) beside the real bench of step 2,
#    on the same workload, so that the model of the card is checked against the card.
# GPU_CHECK_PARTS picks steps (default: all): tests bench modeled serve gelu tokens score; BENCH_DTYPES the
# bench's dtypes (default: bfloat16 float32); TOKEN_BUDGETS the budgets of step 5.
# Results go under $OUT (default: gpu-results/): summary.txt first, then the JSON and logs.
#
# The machine is expected to have python3 with torch (CUDA), transformers, pyarrow, numpy, click, tqdm,
# fsspec, aiohttp, httpx, prometheus-client and pytest. What it lacks (biopython, and fastapi with
# what it needs) travels as wheels in .whl/ (ignored by git): `make gpu-wheels` fetches them.
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
LOG="$OUT/run.log"
PARTS=" ${GPU_CHECK_PARTS:-tests bench modeled serve gelu tokens score} "
part() { [[ "$PARTS" == *" $1 "* ]]; }

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/summary.txt"

part tests && timeout 90 python3 -m pytest -q -m gpu -p no:cacheprovider tests/model/test_model.py tests/runtime/test_gpu.py 2>&1 \
    | tee "$OUT/gpu-tests.log" | tail -n 3 | tee -a "$OUT/summary.txt"

part bench && for dtype in ${BENCH_DTYPES:-bfloat16 float32}; do
    timeout 70 python3 -m esm2cli bench --gpus 1 -m esm2_t33_650M --dtype "$dtype" --sequences 1500 --json -q \
        > "$OUT/bench-650M-$dtype.json" 2>> "$LOG"
    echo "bench $dtype: exit $?" | tee -a "$OUT/summary.txt"
    python3 -c "import json,sys; r=json.load(open(sys.argv[1])); row=r['rows'][0]; m=row.get('predicted_residues_per_s'); print(f\"{r['dtype']}: {row['residues_per_s']:,.0f} residues/s, MFU {row['mfu']:.1%} of {r['peak_gflops']:,.0f} GFLOP/s, padding {r['padding_fraction']:.1%}\" + (f\"; the modeled card on these same batches: {m:,.0f}, real/modeled {row['residues_per_s'] / m:.2f}\" if m else ''))" \
        "$OUT/bench-650M-$dtype.json" 2>> "$LOG" | tee -a "$OUT/summary.txt"
done

if part modeled; then
    card=$(nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 && echo h200 || echo h100)
    timeout 40 python3 -m esm2cli bench --gpus 1 --simulate "$card" -m esm2_t33_650M --dtype bfloat16 --sequences 1500 \
        --json -q > "$OUT/bench-650M-modeled.json" 2>> "$LOG"
    echo "modeled $card bench: exit $?" | tee -a "$OUT/summary.txt"
    python3 -c "
import json, sys
m = json.load(open(sys.argv[1]))['rows'][0]['residues_per_s']
try:
    r = json.load(open(sys.argv[2]))['rows'][0]['residues_per_s']
    print(f'modeled {sys.argv[3]} (defaults): {m:,.0f} residues/s; real card: {r:,.0f}; real/modeled {r / m:.2f}')
except (OSError, KeyError, ValueError):
    print(f'modeled {sys.argv[3]} (defaults): {m:,.0f} residues/s')
" "$OUT/bench-650M-modeled.json" "$OUT/bench-650M-bfloat16.json" "$card" 2>> "$LOG" | tee -a "$OUT/summary.txt"
fi

if part serve; then
    timeout 130 python3 benchmarks/serve_bench.py --model esm2_t33_650M --clients 16 --requests "${SERVE_REQUESTS:-200}" --engine-ceiling \
        2>> "$LOG" | tee "$OUT/serve-650M.txt" | tee -a "$OUT/summary.txt"
    echo "serve bench: exit $?" | tee -a "$OUT/summary.txt"
fi

if part gelu; then
    timeout 50 python3 -m benchmarks.gelu_ab --model esm2_t33_650M --sequences 200 --rounds 4 \
        2>> "$LOG" | tee -a "$OUT/summary.txt"
    echo "gelu a/b: exit $?" | tee -a "$OUT/summary.txt"
fi

if part tokens; then
    timeout 40 python3 benchmarks/token_budget.py --model esm2_t33_650M --sequences 300 --dtypes bfloat16 \
        --budgets "${TOKEN_BUDGETS:-4096,16384,32768,65536}" 2>> "$LOG" | tee -a "$OUT/summary.txt"
    echo "token budget: exit $?" | tee -a "$OUT/summary.txt"
fi

if part score; then
    timeout 40 python3 -m benchmarks.score_bench --model esm2_t33_650M --dtype bfloat16 --proteins 2 --length 150 \
        --methods esm2cli,loop --rounds 1 2>> "$LOG" | tee -a "$OUT/summary.txt"
    echo "score bench: exit $?" | tee -a "$OUT/summary.txt"
fi
