#!/usr/bin/env bash
# Everything a lent GPU should run, in one command that ends inside 9 minutes:
#
#     PYTHONPATH=. bash scripts/gpu_check.sh     # logs in $OUT when set, else a temp folder
#
#   1. the gpu-marked tests (bf16 and tf32 correctness at model shapes, a bf16 training
#      step against the fp32 reference, CUDA graphs), then the rest of the suite with
#      compiled kernels as far as its time allows;
#   2. the benchmark suite (results: bench/results/<gpu-name>/, see bench/run_gpu.sh);
#   3. one small forward and backward of every kernel under compute-sanitizer's memcheck
#      and racecheck (skipped with a note where the tool is missing or refuses the device);
#   4. a summary table: tests passed/failed per file, sanitizer verdicts, headline speedups.
#
# Installs nothing and needs no network. Every step has a time limit cut to what is left
# of SK_GPU_CHECK_S (default 520 s), so the script ends in time whatever hangs.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
logs=${OUT:-$(mktemp -d)}
mkdir -p "$logs"
deadline=$((SECONDS + ${SK_GPU_CHECK_S:-520}))

# seconds for a step: what it wants, or less so that `reserve` seconds stay for the rest
limit() {
    local want=$1 reserve=$2 left=$((deadline - SECONDS - $2))
    ((left < want)) && want=$left
    ((want < 1)) && want=1
    echo "$want"
}
# run a step under a limit; SIGINT first, so pytest and the benchmark write what they have
run_limited() {
    local seconds=$1
    shift
    timeout -s INT -k 15 "$seconds" "$@"
}

{
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || echo "nvidia-smi failed"
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, \
'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
} 2>&1 | tee "$logs/gpu.txt"

echo "== 1. gpu-marked tests"
run_limited "$(limit 170 330)" python3 -m pytest -q -m gpu -p no:cacheprovider --durations=10 \
    --junitxml="$logs/pytest-gpu.xml" tests/ 2>&1 | tee "$logs/pytest-gpu.log"
echo "== 1b. the rest of the suite on the GPU"
run_limited "$(limit 90 240)" python3 -m pytest -q -m "not gpu" -p no:cacheprovider --durations=10 \
    --junitxml="$logs/pytest-rest.xml" tests/ 2>&1 | tee "$logs/pytest-rest.log"

echo "== 2. benchmarks"
bench_s=$(limit 200 100)
run_limited "$bench_s" bash bench/run_gpu.sh --budget-s "$((bench_s > 60 ? bench_s - 45 : 15))" 2>&1 \
    | tee "$logs/bench.log"

echo "== 3. compute-sanitizer"
sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
: >"$logs/sanitizer.txt"
if [ -z "$sanitizer" ]; then
    echo "sanitizer: skipped (compute-sanitizer not found)" | tee -a "$logs/sanitizer.txt"
else
    # compile every kernel first, outside the sanitizer, so its runs only execute them
    run_limited "$(limit 60 70)" python3 scripts/sanitize_kernels.py 2>&1 | tee "$logs/sanitize-warmup.log"
    for tool in memcheck racecheck; do
        # without the caching allocator, an access past a tensor is past an allocation
        run_limited "$(limit 90 20)" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool "$tool" \
            --error-exitcode 3 python3 scripts/sanitize_kernels.py >"$logs/sanitizer-$tool.log" 2>&1
        status=$?
        tail -n 5 "$logs/sanitizer-$tool.log"
        if grep -qiE "not supported|unsupported|is not available|Could not find" "$logs/sanitizer-$tool.log"; then
            verdict="skipped (the tool refused this device: see sanitizer-$tool.log)"
        elif [ "$status" -eq 0 ]; then
            verdict="clean"
        elif [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
            verdict="timed out (no verdict)"
        elif [ "$status" -eq 3 ]; then
            verdict="ERRORS (see sanitizer-$tool.log)"
        else
            verdict="failed to run, exit $status (see sanitizer-$tool.log)"
        fi
        echo "sanitizer $tool: $verdict" | tee -a "$logs/sanitizer.txt"
    done
fi

echo "== summary"
python3 - "$logs" <<'PY'
import glob
import os
import sys
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict

logs = sys.argv[1]
counts = defaultdict(Counter)
for run in ("gpu", "rest"):
    path = os.path.join(logs, f"pytest-{run}.xml")
    if not os.path.exists(path):
        counts[f"({run} run: no report, killed or not run)"]["failed"] += 1
        continue
    for case in ET.parse(path).getroot().iter("testcase"):
        where = case.get("file") or case.get("classname", "?").replace(".", "/") + ".py"
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed"
            elif child.tag == "skipped":
                outcome = "skipped"
        counts[f"{run}: {where}"][outcome] += 1
width = max([len(name) for name in counts] + [10])
print(f"{'tests':<{width}}  passed  failed  skipped")
for name in sorted(counts):
    c = counts[name]
    print(f"{name:<{width}}  {c['passed']:>6}  {c['failed']:>6}  {c['skipped']:>7}")
total = sum(counts.values(), Counter())
print(f"{'total':<{width}}  {total['passed']:>6}  {total['failed']:>6}  {total['skipped']:>7}")
with open(os.path.join(logs, "sanitizer.txt")) as f:
    print(f.read().strip() or "sanitizer: not run")
reports = sorted(glob.glob("bench/results/*/report.md"), key=os.path.getmtime)
headlines = []
if reports:
    with open(reports[-1]) as f:
        headlines = [line.strip() for line in f if "fused vs eager" in line]
print(f"headline speedups ({reports[-1] if reports else 'no benchmark report'}):")
for line in headlines or ["none measured"]:
    print("  " + line)
PY
