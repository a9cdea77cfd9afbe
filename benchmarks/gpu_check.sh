#!/usr/bin/env bash
# The GPU check: on a fresh machine with one NVIDIA GPU and no internet, in at most 8 minutes (the
# timeouts below add up to 8 minutes; the steps that matter most run first).
# 0. `benchmarks/forward_ab.py` on the 650M architecture, bf16: esm2cli's packed forward (CUDA graphs)
#    against the transformers forward it replaced, side by side on the same batches, at 16k/32k/64k tokens:
#    residues/s, MFU over the published and the measured matmul peak, host ms a forward;
#    then `serve_bench.py`: p50 of one 300-residue protein, one client; and `esm2cli bench --simulate
#    --gpus 8 --launch-ms <the host ms measured>`: whether one process feeds 8 cards;
# 1. the GPU-marked tests (the packed forward, CUDA graphs against eager, varlen against the CPU);
# 2. `esm2cli bench` on the 650M architecture (random weights), each line with what the modeled card (found by
#    name, default MFU and overhead) predicts for the very same batches; 3. `esm2cli bench --simulate h100|h200`
#    beside it, so that the model of the card is checked against the card.
# Optional steps: serve (16 clients, dynamic batching on and off, the engine alone), tokens (residues/s across
# token budgets), score (batched masked copies against one per pass).
# GPU_CHECK_PARTS picks steps (default: forward latency gil tests bench modeled, 7.3 min at most; serve, tokens
# and score add 2 minutes); BENCH_DTYPES the bench's dtypes (default: bfloat16); TOKEN_BUDGETS those of tokens.
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
PARTS=" ${GPU_CHECK_PARTS:-forward latency gil tests bench modeled} "
part() { [[ "$PARTS" == *" $1 "* ]]; }

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/summary.txt"

if part forward; then
    timeout 150 python3 benchmarks/forward_ab.py --model esm2_t33_650M --dtype bfloat16 --sequences 1500 --rounds 2 \
        --budgets "${FORWARD_BUDGETS:-16384,32768,65536}" --json > "$OUT/forward-650M.json" 2>> "$LOG"
    echo "forward a/b: exit $?" | tee -a "$OUT/summary.txt"
    python3 -c "
import json, sys
r = json.load(open(sys.argv[1]))
print(f\"{r['card']}: matmul peak {r['matmul_peak_flops'] / 1e12:.0f} TFLOP/s measured, {(r['published_peak_flops'] or 0) / 1e12:.0f} published\")
for x in r['rows']:
    print(f\"  {x['budget']:>6} tokens: new {x['new_residues_per_s']:,.0f} residues/s, old {x['old_residues_per_s']:,.0f}, \"
          f\"new/old {x['new_over_old']:.2f}x; new MFU {x.get('new_mfu_published', 0):.1%} published, \"
          f\"{x['new_mfu_measured']:.1%} measured; host ms a forward new {x['new_host_ms']:.2f} old {x['old_host_ms']:.2f}; \"
          f\"graph batches {x['graph_batches']}; lowest cos {x['lowest_cosine']:.5f}\")
" "$OUT/forward-650M.json" 2>> "$LOG" | tee -a "$OUT/summary.txt"
fi

if part latency; then
    timeout 80 python3 benchmarks/serve_bench.py --model esm2_t33_650M --clients 1 --requests 100 --length 300 \
        --modes on 2>> "$LOG" | tee "$OUT/serve-latency-300.txt" | tee -a "$OUT/summary.txt"
    echo "serve latency (one 300-residue protein, one client): exit $?" | tee -a "$OUT/summary.txt"
fi

if part gil; then
    host_ms=$(python3 -c "import json,sys; r=json.load(open(sys.argv[1]))['rows']; print(f\"{min(x['new_host_ms'] for x in r):.2f}\")" \
        "$OUT/forward-650M.json" 2>> "$LOG" || echo 2)
    card=$(nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 && echo h200 || echo h100)
    timeout 40 python3 -m esm2cli bench --simulate "$card" --gpus 8 -m esm2_t33_650M --dtype bfloat16 \
        --launch-ms "$host_ms" --sequences 1500 -q 2>> "$LOG" | tee "$OUT/gil-8.txt" | tail -n 12 | tee -a "$OUT/summary.txt"
    echo "8 modeled cards at the measured host cost ($host_ms ms a forward): exit $?" | tee -a "$OUT/summary.txt"
fi

part tests && timeout 90 python3 -m pytest -q -m gpu -p no:cacheprovider tests/runtime/test_replica.py tests/model/test_forward.py tests/model/test_graphs.py \
    tests/runtime/test_gpu.py 2>&1 | tee "$OUT/gpu-tests.log" | tail -n 3 | tee -a "$OUT/summary.txt"

part bench && for dtype in ${BENCH_DTYPES:-bfloat16}; do
    timeout 50 python3 -m esm2cli bench --gpus 1 -m esm2_t33_650M --dtype "$dtype" --sequences 1500 --json -q \
        > "$OUT/bench-650M-$dtype.json" 2>> "$LOG"
    echo "bench $dtype: exit $?" | tee -a "$OUT/summary.txt"
    python3 -c "import json,sys; r=json.load(open(sys.argv[1])); row=r['rows'][0]; m=row.get('predicted_residues_per_s'); print(f\"{r['dtype']}: {row['residues_per_s']:,.0f} residues/s, MFU {row['mfu']:.1%} of {r['peak_gflops']:,.0f} GFLOP/s, padding {r['padding_fraction']:.1%}\" + (f\"; the modeled card on these same batches: {m:,.0f}, real/modeled {row['residues_per_s'] / m:.2f}\" if m else ''))" \
        "$OUT/bench-650M-$dtype.json" 2>> "$LOG" | tee -a "$OUT/summary.txt"
done

if part modeled; then
    card=$(nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 && echo h200 || echo h100)
    timeout 25 python3 -m esm2cli bench --gpus 1 --simulate "$card" -m esm2_t33_650M --dtype bfloat16 --sequences 1500 \
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
    timeout 70 python3 benchmarks/serve_bench.py --model esm2_t33_650M --clients 16 --requests "${SERVE_REQUESTS:-100}" --engine-ceiling \
        2>> "$LOG" | tee "$OUT/serve-650M.txt" | tee -a "$OUT/summary.txt"
    echo "serve bench: exit $?" | tee -a "$OUT/summary.txt"
fi

if part tokens; then
    timeout 25 python3 benchmarks/token_budget.py --model esm2_t33_650M --sequences 300 --dtypes bfloat16 \
        --budgets "${TOKEN_BUDGETS:-4096,16384,32768,65536}" 2>> "$LOG" | tee -a "$OUT/summary.txt"
    echo "token budget: exit $?" | tee -a "$OUT/summary.txt"
fi

if part score; then
    timeout 25 python3 -m benchmarks.score_bench --model esm2_t33_650M --dtype bfloat16 --proteins 2 --length 150 \
        --methods esm2cli,loop --rounds 1 2>> "$LOG" | tee -a "$OUT/summary.txt"
    echo "score bench: exit $?" | tee -a "$OUT/summary.txt"
fi
