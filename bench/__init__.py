"""Benchmarks for segformer-kernels: every fused op and the whole model, side by side with
the eager reference, SDPA, torch.compile and transformers, against the device's own
measured copy bandwidth and GEMM rate.

    python -m bench                     # the GPU suite -> bench/results/<gpu-name>/
    python -m bench --smoke --out DIR   # tiny CPU run that checks the pipeline (timings mean nothing)
    python -m bench.report --rows DIR/rows.jsonl --out DIR   # report and plots from rows
    pytest bench/ --benchmark-only      # the kernel benchmarks as pytest-benchmark tests (GPU)

Nothing here touches a GPU at import time, and this file imports nothing heavy:
``python -m bench --smoke`` must set TRITON_INTERPRET before triton is imported.
See bench/README.md for the row schema and the minimum-bytes / minimum-flops formulas.
"""

from pathlib import Path

PROVIDERS = ("eager", "sdpa", "compile", "fused", "transformers")
RESULTS_ROOT = Path(__file__).resolve().parent / "results"
# From a checkout, results go into the repository (bench/results/<gpu>/, runs/bench-smoke/).
# Installed (pip install segformer-kernels ships this folder as the package segformer_bench),
# the package folder is read-only in spirit: results go under the current folder instead.
IN_CHECKOUT = (Path(__file__).resolve().parent.parent / "pyproject.toml").is_file()
