"""Comparison helpers shared by the kernel tests (DESIGN.md section 7)."""

from __future__ import annotations

import functools

import torch

# ||out - ref|| / ||ref|| allowed per dtype, against an fp64 reference.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}

# The interpreter's bf16 arithmetic is wrong: bf16 is a GPU check.
CPU_DTYPES = (torch.float32, torch.float16)
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Token grids that are not multiples of anything: 1x1, a single row, primes.
ODD_GRIDS = [(1, 1), (1, 17), (7, 5), (13, 29)]


def kernel_dtypes() -> tuple[torch.dtype, ...]:
    return GPU_DTYPES if torch.cuda.is_available() else CPU_DTYPES


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in fp64 (the plain norm of out when ref is zero)."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    denominator = ref.norm().item() or 1.0
    return (out - ref).norm().item() / denominator


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "output", scale: float = 1.0):
    """Fail unless out is finite, has ref's shape, and is within the dtype's
    relative-norm tolerance (times ``scale``, for ops whose error grows with depth)."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{what}: {(~torch.isfinite(out)).sum().item()} non-finite elements"
    err = rel_err(out, ref)
    tolerance = TOLERANCE[dtype] * scale
    assert err <= tolerance, f"{what}: relative error {err:.3e} > {tolerance:.1e} ({dtype})"


def nan_filled(allocate):
    """Wrap an allocator so float results come back filled with NaN."""

    @functools.wraps(allocate)
    def wrapper(*args, **kwargs):
        t = allocate(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    return wrapper


def grads(outputs: torch.Tensor, inputs, upstream: torch.Tensor | None = None):
    """Gradients of ``(outputs * upstream).sum()`` for each input (a fresh random
    upstream gradient when none is given): returns (grads, upstream)."""
    if upstream is None:
        upstream = torch.randn_like(outputs)
    return torch.autograd.grad(outputs, inputs, upstream, allow_unused=False), upstream


def tiny_segformer(num_labels: int = 4, kernels: str = "torch", **changes):
    """A seeded SegFormer with B0's structure, one block per stage and narrow stages: fast on CPU."""
    from segformer import SegFormer, SegFormerConfig

    torch.manual_seed(0)
    settings = dict(num_labels=num_labels, hidden_sizes=(16, 32, 32, 64), decoder_hidden_size=32, depths=(1, 1, 1, 1),
                    num_attention_heads=(1, 2, 2, 4))
    settings.update(changes)
    return SegFormer(SegFormerConfig.preset("b0").replace(**settings), kernels=kernels)
