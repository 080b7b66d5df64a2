"""One small forward and backward of every kernel on the GPU, for compute-sanitizer:

    compute-sanitizer --tool memcheck python3 scripts/sanitize_kernels.py

Runs fp16 (every autotuned kernel's candidates) and fp32 on tiny shapes, synchronises,
and prints the ops it ran. scripts/gpu_check.sh runs it under memcheck and racecheck.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers import run_every_op  # noqa: E402


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("sanitize_kernels: no CUDA GPU visible")
    device = torch.device("cuda")
    for dtype in (torch.float16, torch.float32):
        torch.manual_seed(0)
        ops = run_every_op(device, dtype)
        torch.cuda.synchronize()
        print(f"sanitize_kernels: {dtype}: ran {', '.join(ops)}")


if __name__ == "__main__":
    main()
