"""The device's own ceilings, the minimum work of each measurement, and how close a
measurement came to it.

Ceilings, measured in the same run as the benchmarks (never datasheet numbers):
  copy bandwidth  = (bytes read + bytes written) / time of ``dst.copy_(src)`` on a large
                    random tensor (1 GiB each way on a GPU);
  GEMM rate       = 2 * n^3 / time of an n x n x n matmul of random tensors in the
                    benchmark dtype (n = 8192, bf16, on a GPU).

Minimum bytes (the floor every row is compared with; see bench/README.md):
  forward   = every input read once + every output written once;
  backward  = every input read once + every upstream gradient read once
              + every input gradient written once;
  fwd+bwd   = forward + backward (between the passes nothing can stay on chip).
  Intermediates (the Mix-FFN hidden tensor, attention scores, saved statistics) are
  not in the floor: that they need not touch memory is the point of fusing.
Minimum flops: 2 x the multiply-adds of the GEMMs and convolutions in the math, what
  ``torch.utils.flop_counter`` counts for the reference (elementwise work such as
  LayerNorm, softmax and GELU is not counted); backward = 2 x forward (a gradient for
  both operands of every product; recomputation is not counted).

A row's floor is max(min_bytes / copy bandwidth, min_flops / GEMM rate); ``bound`` says
which term is larger, ``frac_roofline`` = floor / measured median.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

MODES = ("fwd", "bwd", "fwd+bwd")


@dataclass(frozen=True)
class Ceilings:
    copy_gbps: float
    gemm_tflops: float


def measure_ceilings(timer, device: torch.device, dtype: torch.dtype, smoke: bool) -> tuple[Ceilings, list[dict]]:
    """Copy bandwidth and GEMM rate of this device, plus one row for each."""
    copy_bytes = 2**23 if smoke else 2**30
    source = torch.rand(copy_bytes // 4, device=device)
    target = torch.empty_like(source)
    copy = timer.time(lambda: target.copy_(source))
    moved = 2 * copy_bytes
    copy_gbps = moved / (copy.ms_p50 * 1e-3) / 1e9
    del source, target

    n = 256 if smoke else 8192
    gemm_dtype = torch.float32 if smoke else dtype
    a = torch.randn(n, n, device=device, dtype=gemm_dtype)
    b = torch.randn(n, n, device=device, dtype=gemm_dtype)
    gemm = timer.time(lambda: a @ b)
    flops = 2 * n**3
    gemm_tflops = flops / (gemm.ms_p50 * 1e-3) / 1e12
    del a, b

    ceilings = Ceilings(copy_gbps, gemm_tflops)
    rows = [
        {
            "suite": "ceiling", "op": "copy", "case": f"{copy_bytes // 2**20}MiB", "mode": "copy",
            "dtype": "float32", "shape": {"bytes": copy_bytes}, "timing": copy,
            "min_bytes": moved, "min_flops": 0,
        },
        {
            "suite": "ceiling", "op": "gemm", "case": f"{n}x{n}x{n}", "mode": "matmul",
            "dtype": str(gemm_dtype).removeprefix("torch."), "shape": {"n": n}, "timing": gemm,
            "min_bytes": 3 * n * n * gemm_dtype.itemsize, "min_flops": flops,
        },
    ]
    return ceilings, rows


def tensor_bytes(tensors: Iterable) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def min_bytes(mode: str, input_bytes: int, output_bytes: int, grad_bytes: int) -> int:
    """The floor in bytes for one pass (see the module docstring): ``grad_bytes`` is the
    size of the inputs that get a gradient; upstream gradients have the outputs' sizes."""
    forward = input_bytes + output_bytes
    backward = input_bytes + output_bytes + grad_bytes
    return {"fwd": forward, "bwd": backward, "fwd+bwd": forward + backward}[mode]


def min_flops(mode: str, forward_flops: int) -> int:
    return {"fwd": forward_flops, "bwd": 2 * forward_flops, "fwd+bwd": 3 * forward_flops}[mode]


def throughput(ms: float | None, bytes_: int, flops: int, ceilings: Ceilings | None) -> dict:
    """Achieved rates on the minimum work, and their fractions of the ceilings."""
    if ms is None or ms <= 0:
        return {}
    seconds = ms * 1e-3
    fields = {"achieved_gbps": bytes_ / seconds / 1e9, "achieved_tflops": flops / seconds / 1e12}
    if ceilings is not None:
        bytes_ms = bytes_ / (ceilings.copy_gbps * 1e9) * 1e3
        flops_ms = flops / (ceilings.gemm_tflops * 1e12) * 1e3
        floor_ms = max(bytes_ms, flops_ms)
        fields.update(
            frac_copy_bandwidth=fields["achieved_gbps"] / ceilings.copy_gbps,
            frac_gemm_rate=fields["achieved_tflops"] / ceilings.gemm_tflops,
            roofline_floor_ms=floor_ms,
            frac_roofline=floor_ms / ms,
            bound="memory" if bytes_ms >= flops_ms else "compute",
        )
    return fields
