#!/usr/bin/env bash
# Everything a lent GPU should run, in one command that ends inside 10 minutes:
# the whole test suite with compiled kernels (bf16, tf32 and the model-sized shapes
# included), then the benchmark suite within the time that is left.
#
#     scripts/gpu_check.sh            # results: bench/results/<gpu-name>/, logs in $OUT when set
#
# Runs from the working tree (PYTHONPATH=.) and installs nothing: the GPU image has
# torch, triton and no network. Test and benchmark budgets are in seconds.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
logs=${OUT:-$(mktemp -d)}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$logs/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$logs/gpu.txt"

timeout "${SK_TEST_BUDGET_S:-240}" python3 -m pytest -q --durations=15 -p no:cacheprovider \
    tests/ 2>&1 | tee "$logs/pytest.log"
echo "pytest exit: ${PIPESTATUS[0]}" | tee -a "$logs/pytest.log"

bench/run_gpu.sh --budget-s "${SK_BENCH_BUDGET_S:-300}"
