#!/usr/bin/env bash
# The GPU check: on a fresh machine with one NVIDIA GPU and no internet, in at most 8 minutes (the default
# steps' timeouts add up to 445 s, plus 25 s for the import check; the steps that matter most run first).
# First the imports (torch, transformers, esm2cli and every package it imports): when one is missing it stops
# within seconds with one line naming them, exit 3, instead of spending the loan on steps that cannot run.
# 0. `benchmarks/forward_ab.py` on the 650M architecture, bf16: esm2cli's packed forward (CUDA graphs)
#    against the transformers forward it replaced, side by side on the same batches, at 16k/32k/64k tokens:
#    residues/s, MFU over the published and the measured matmul peak, host ms a forward;
#    then `serve_bench.py`: p50 of one 300-residue protein, one client; and `esm2cli bench --simulate
#    --gpus 8 --launch-ms <the host ms measured>`: whether one process feeds 8 cards (skipped, never guessed,
#    when the forward step measured no host cost);
# 1. the GPU-marked tests (the packed forward, CUDA graphs against eager, varlen against the CPU);
# 2. `esm2cli bench` on the 650M architecture (random weights), each line with what the modeled card (found by
#    name, default MFU and overhead) predicts for the very same batches; 3. `esm2cli bench --simulate h100|h200`
#    beside it, so that the model of the card is checked against the card.
# Optional steps: serve (16 clients, dynamic batching on and off, the engine alone), tokens (residues/s across
# token budgets), score (batched masked copies against one per pass).
# Optional step esmc: ESM C 600M (beside transformers' EsmcModel) and 6B in bf16, benchmarks/esmc_gpu.py (5 min at most).
# GPU_CHECK_PARTS picks steps (default: forward invariance gil tests bench modeled, 7.4 min at most; latency
# adds 80 s, serve, tokens and score 2 minutes); BENCH_DTYPES the bench's dtypes (default: bfloat16); TOKEN_BUDGETS those of tokens;
# PYTHON the interpreter (default: python3).
# Results go under $OUT (default: gpu-results/), a few files only (a GPU machine sends back a handful):
# summary.txt (written first: one line a step, "FAILED" where one failed), run.log (every step's full output
# and errors), forward-650M.json and bench-650M-<dtype>.json. The exit status is 0 only when every step passed.
#
# The machine is expected to have python3 with torch (CUDA), transformers, pyarrow, numpy, click, tqdm,
# fsspec, aiohttp, httpx, prometheus-client and pytest. What it lacks (biopython, and fastapi with
# what it needs) travels as wheels in .whl/ (ignored by git): `make gpu-wheels` fetches them.
set -uo pipefail
OUT=${OUT:-gpu-results}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
LOG="$OUT/run.log"
: > "$SUMMARY"
: > "$LOG"
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
say() { echo "$*" | tee -a "$SUMMARY"; }

if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        >> "$LOG" 2>&1 || { say "gpu_check: cannot install the wheels in .whl/ (see run.log)"; exit 3; }
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# Every module esm2cli and these steps import, by the name pip knows it under.
missing=$(timeout "${GPU_CHECK_IMPORT_TIMEOUT:-25}" "$PY" - 2>> "$LOG" <<'PYEOF'
import importlib
packages = {
    "torch": "torch", "transformers": "transformers", "numpy": "numpy", "click": "click", "Bio": "biopython",
    "tqdm": "tqdm", "pyarrow": "pyarrow", "fsspec": "fsspec", "fastapi": "fastapi", "starlette": "starlette",
    "pydantic": "pydantic", "uvicorn": "uvicorn", "h11": "h11", "prometheus_client": "prometheus-client",
    "httpx": "httpx", "aiohttp": "aiohttp", "pytest": "pytest",
}
missing = []
for module, package in packages.items():
    try:
        importlib.import_module(module)
    except Exception:
        missing.append(package)
if not missing:
    for module in ("esm2cli.cli", "esm2cli.serve.app", "esm2cli.model.forward"):
        try:
            importlib.import_module(module)
        except Exception as exc:
            missing.append(f"{module} ({type(exc).__name__}: {exc})")
print(", ".join(missing))
PYEOF
)
status=$?
if (( status == 124 )); then
    say "gpu_check: importing the packages took over ${GPU_CHECK_IMPORT_TIMEOUT:-25} s with $PY; nothing was run"
    exit 3
fi
if (( status != 0 )) || [[ -n "$missing" ]]; then
    say "gpu_check: cannot import ${missing:-anything with $PY (exit $status)}; carry .whl: make gpu-wheels (torch and transformers must be on the machine)"
    exit 3
fi

failed=0
# record NAME STATUS: one summary line a step; any non-zero status fails the check.
record() {
    if (( $2 == 0 )); then say "$1: ok"; else say "$1: FAILED (exit $2)"; failed=1; fi
}
PARTS=" ${GPU_CHECK_PARTS:-forward invariance gil tests bench modeled} "
part() { [[ "$PARTS" == *" $1 "* ]]; }

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
} 2>> "$LOG" | tee -a "$SUMMARY"
gpu_name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>> "$LOG" | head -n 1 | tr '[:upper:]' '[:lower:]')
case "$gpu_name" in  # the modeled card (config.GPU_PEAKS) that the modeled steps compare with this one
    *h200*) card=h200 ;; *h100*) card=h100 ;; *a100*) card=a100 ;; *a10g*) card=a10g ;; *l4*) card=l4 ;;
    *) card=h100; say "no model of '$gpu_name' in config.GPU_PEAKS: the modeled steps use the H100's" ;;
esac

if part forward; then
    timeout 150 "$PY" benchmarks/forward_ab.py --model esm2_t33_650M --dtype bfloat16 --sequences 1500 --rounds 2 \
        --budgets "${FORWARD_BUDGETS:-16384,32768,65536}" --json > "$OUT/forward-650M.json" 2>> "$LOG"
    record "forward a/b" $?
    "$PY" -c "
import json, sys
r = json.load(open(sys.argv[1]))
print(f\"{r['card']}: matmul peak {r['matmul_peak_flops'] / 1e12:.0f} TFLOP/s measured, {(r['published_peak_flops'] or 0) / 1e12:.0f} published\")
for x in r['rows']:
    print(f\"  {x['budget']:>6} tokens: new {x['new_residues_per_s']:,.0f} residues/s, old {x['old_residues_per_s']:,.0f}, \"
          f\"new/old {x['new_over_old']:.2f}x; new MFU {x.get('new_mfu_published', 0):.1%} published, \"
          f\"{x['new_mfu_measured']:.1%} measured; host ms a forward new {x['new_host_ms']:.2f} old {x['old_host_ms']:.2f}; \"
          f\"graph batches {x['graph_batches']}; lowest cos {x['lowest_cosine']:.5f}\")
" "$OUT/forward-650M.json" 2>> "$LOG" | tee -a "$SUMMARY"
fi

part esmc && { timeout 300 "$PY" benchmarks/esmc_gpu.py --out "$OUT" 2>> "$LOG" | tee -a "$SUMMARY"; record "esmc 600M (beside transformers) and 6B, bf16" "${PIPESTATUS[0]}"; }
# Batch invariance: one protein in 3 batch compositions bit for bit, and residues/s of the invariant and the batch-dependent forward.
if part invariance; then timeout 90 "$PY" benchmarks/invariance_check.py 2>> "$LOG" | tee -a "$SUMMARY"; record "batch invariance" "${PIPESTATUS[0]}"; fi

if part latency; then
    timeout 80 "$PY" benchmarks/serve_bench.py --model esm2_t33_650M --clients 1 --requests 100 --length 300 \
        --modes on 2>> "$LOG" | tee -a "$LOG" | tail -n 6 | tee -a "$SUMMARY"
    record "serve latency (one 300-residue protein, one client)" $?
fi

if part gil; then
    # The host cost measured by the forward step; without it this step has nothing to model, and says so.
    host_ms=$("$PY" -c "import json,sys; r=json.load(open(sys.argv[1]))['rows']; print(f\"{min(x['new_host_ms'] for x in r):.2f}\")" \
        "$OUT/forward-650M.json" 2>> "$LOG")
    if [[ -z "$host_ms" ]]; then
        say "8 modeled cards: FAILED (no host cost measured: the forward a/b step did not run or failed)"
        failed=1
    else
        timeout 40 "$PY" -m esm2cli bench --simulate "$card" --gpus 8 -m esm2_t33_650M --dtype bfloat16 \
            --launch-ms "$host_ms" --sequences 1500 -q 2>> "$LOG" | tee -a "$LOG" | tail -n 12 | tee -a "$SUMMARY"
        record "8 modeled cards at the measured host cost ($host_ms ms a forward)" $?
    fi
fi

if part tests; then
    timeout 90 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/runtime/test_replica.py tests/model/test_forward.py \
        tests/model/test_graphs.py tests/model/test_invariant.py tests/runtime/test_gpu.py 2>&1 | tee -a "$LOG" | tail -n 3 | tee -a "$SUMMARY"
    record "GPU tests" $?
fi

if part bench; then
    for dtype in ${BENCH_DTYPES:-bfloat16}; do
        timeout 50 "$PY" -m esm2cli bench --gpus 1 -m esm2_t33_650M --dtype "$dtype" --sequences 1500 --json -q \
            > "$OUT/bench-650M-$dtype.json" 2>> "$LOG"
        record "bench $dtype" $?
        "$PY" -c "import json,sys; r=json.load(open(sys.argv[1])); row=r['rows'][0]; m=row.get('predicted_residues_per_s'); print(f\"{r['dtype']}: {row['residues_per_s']:,.0f} residues/s, MFU {row['mfu']:.1%} of {r['peak_gflops']:,.0f} GFLOP/s, padding {r['padding_fraction']:.1%}\" + (f\"; the modeled card on these same batches: {m:,.0f}, real/modeled {row['residues_per_s'] / m:.2f}\" if m else ''))" \
            "$OUT/bench-650M-$dtype.json" 2>> "$LOG" | tee -a "$SUMMARY"
    done
fi

if part modeled; then
    timeout 25 "$PY" -m esm2cli bench --gpus 1 --simulate "$card" -m esm2_t33_650M --dtype bfloat16 --sequences 1500 \
        --json -q > "$SCRATCH/bench-650M-modeled.json" 2>> "$LOG"
    record "modeled $card bench" $?
    "$PY" -c "
import json, sys
m = json.load(open(sys.argv[1]))['rows'][0]['residues_per_s']
try:
    r = json.load(open(sys.argv[2]))['rows'][0]['residues_per_s']
    print(f'modeled {sys.argv[3]} (defaults): {m:,.0f} residues/s; real card: {r:,.0f}; real/modeled {r / m:.2f}')
except (OSError, KeyError, ValueError):
    print(f'modeled {sys.argv[3]} (defaults): {m:,.0f} residues/s')
" "$SCRATCH/bench-650M-modeled.json" "$OUT/bench-650M-bfloat16.json" "$card" 2>> "$LOG" | tee -a "$SUMMARY"
fi

if part serve; then
    timeout 70 "$PY" benchmarks/serve_bench.py --model esm2_t33_650M --clients 16 --requests "${SERVE_REQUESTS:-100}" \
        --engine-ceiling 2>> "$LOG" | tee -a "$LOG" | tail -n 12 | tee -a "$SUMMARY"
    record "serve bench" $?
fi

if part tokens; then
    timeout 25 "$PY" benchmarks/token_budget.py --model esm2_t33_650M --sequences 300 --dtypes bfloat16 \
        --budgets "${TOKEN_BUDGETS:-4096,16384,32768,65536}" 2>> "$LOG" | tee -a "$SUMMARY"
    record "token budget" $?
fi

if part score; then
    timeout 25 "$PY" -m benchmarks.score_bench --model esm2_t33_650M --dtype bfloat16 --proteins 2 --length 150 \
        --methods esm2cli,loop --rounds 1 2>> "$LOG" | tee -a "$SUMMARY"
    record "score bench" $?
fi

(( failed == 0 )) && say "gpu_check: every step passed" || say "gpu_check: a step FAILED (see above and run.log)"
exit "$failed"
