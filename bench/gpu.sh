#!/usr/bin/env bash
# The CUDA checks, as one script for a lent GPU machine (the device tool): the CUDA tests
# and the CUDA benchmarks, written under $OUT for results/benchmarks/. The GPU machine has
# torch, pandas, seaborn, scikit-learn, pytest-benchmark and tqdm but no registry, so the
# project runs from this tree (PYTHONPATH), not installed; what needs Optuna skips.
#
#   run (device tool), carry [".data"], timeout_s 540:
#     bash bench/gpu.sh
# where .data/ (listed in .git/info/exclude, never committed) holds diabetes.csv.gz:
#   mkdir -p .data && cp ../shared/data/diabetes.csv.gz .data/      (.gitignore lists .data/)
#
# Then copy $OUT/cuda-quick.json into results/benchmarks/ and rerun `widedeep report`. The run
# measures the GPU host's CPU beside its GPU (the CPU-vs-CUDA speedup needs both from one
# machine); the report keeps the newest result per case and device, and names each file's
# machine, so its CPU rows then come from the GPU host.
set -uo pipefail
OUT=${OUT:-/tmp/widedeep-gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD MPLBACKEND=Agg WIDEDEEP_DATA=${WIDEDEEP_DATA:-$PWD/.data}
export WIDEDEEP_MACHINE=${WIDEDEEP_MACHINE:-}
log() { echo "== $*" | tee -a "$OUT/log.txt"; }

log "$(date -u +%FT%TZ) $(python -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$OUT/log.txt" 2>&1 || true
if ! python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    if [ "${1:-}" != "--cpu" ]; then  # --cpu: rehearse the script here, CUDA cases skipping
        log "no CUDA device visible: nothing to check here"
        exit 2
    fi
fi

# 1. CUDA tests: graph replay against eager steps, and the suite's CUDA paths (-rs: say why
#    anything skipped). Fast; a failure here makes the benchmark numbers suspect.
log "tests"
timeout 240 python -m pytest -q -rs -p no:cacheprovider -W ignore::DeprecationWarning \
    tests/test_batched.py tests/test_batched_grad.py tests/test_model.py tests/test_cli.py \
    tests/test_checkpoint.py -k "cuda or graph or batched or manual" 2>&1 | tail -25 | tee "$OUT/tests.txt"
tests=${PIPESTATUS[0]}

# 2. The quick benchmark subset on CPU and CUDA, side by side in one run.
log "benchmarks"
timeout 420 python -m pytest bench/ -q -p no:cacheprovider -m quick \
    --benchmark-json "$OUT/cuda-quick.json" 2>&1 | tail -8 | tee "$OUT/bench.txt"
bench=${PIPESTATUS[0]}
log "tests exit $tests, benchmarks exit $bench"
exit $(( tests || bench ))
