"""Small pieces every kernel module shares: dot precision and alignment hints."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

INPUT_PRECISIONS = ("tf32", "ieee")


def resolve_input_precision(dtype: torch.dtype, input_precision: str | None) -> str:
    """How fp32 operands meet the tensor cores in tl.dot: "tf32" (fast, ~5e-4 relative
    error) or "ieee" (exact fp32). None follows torch's own setting for fp32 matmuls
    (``torch.set_float32_matmul_precision``: "highest", torch's default, means exact),
    so the fp32 model gives what a torch fp32 model gives. 16-bit dots are exact either
    way, so they always get "tf32": one compiled variant, not two."""
    if input_precision is not None and input_precision not in INPUT_PRECISIONS:
        raise ValueError(f"input_precision must be one of {INPUT_PRECISIONS} or None, got {input_precision!r}")
    if dtype != torch.float32:
        return "tf32"
    if input_precision is None:
        return _torch_fp32_matmul_precision()
    return input_precision


# torch.compile cannot trace the getter; it reads the setting once, when it traces
@torch._dynamo.assume_constant_result
def _torch_fp32_matmul_precision() -> str:
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


@triton.jit
def multiple_of(value, ALIGN: tl.constexpr):
    """``value``, which the launcher checked is a multiple of ALIGN, written so that the
    compiler knows it too: rows of ALIGN-aligned channels load as wide vectors."""
    return value // ALIGN * ALIGN


def alignment(*values: int) -> int:
    """ALIGN for the kernels: the largest power of two up to 16 (the divisibility Triton
    itself specialises integer arguments on) that divides every value."""
    align = 16
    while any(value % align for value in values):
        align //= 2
    return align
