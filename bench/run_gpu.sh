#!/usr/bin/env bash
# The whole GPU benchmark suite in one command, under 10 minutes on an H100:
#
#     bench/run_gpu.sh [more `python -m bench` arguments]
#
# Runs from the working tree (PYTHONPATH=.), installs nothing and needs no network;
# transformers is used when installed and skipped with a note when not. Results:
# bench/results/<gpu-name>/{rows.jsonl,report.md,*.png,run.log} and the README section
# bench/results/PERFORMANCE.md. Items the time budget (--budget-s, default 450 s) left
# out are rows with status "skipped"; fill them in with a second call, e.g.
#     bench/run_gpu.sh --only '/compile$' --merge --budget-s 540
# Without .git on the machine, pass the commit: SK_GIT_COMMIT=<hash> bench/run_gpu.sh
# When $OUT is set (a device machine that sends back what is written there), the
# results are copied there too: results.tar.gz (the results folder and PERFORMANCE.md),
# report.md, rows.jsonl and run.log.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

results=$(python3 - <<'PY'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("no CUDA GPU visible: on CPU run `python -m bench --smoke`")
from bench.measure import results_dir_name
print("bench/results/" + results_dir_name(torch.cuda.get_device_name()))
PY
)
log=$(mktemp)
python3 -m bench "$@" 2>&1 | tee "$log"
mkdir -p "$results"
cp "$log" "$results/run.log"
if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then
    tar czf "$OUT/results.tar.gz" -C bench/results "$(basename "$results")" PERFORMANCE.md
    cp "$results/report.md" "$results/rows.jsonl" "$results/run.log" "$OUT/"
fi
