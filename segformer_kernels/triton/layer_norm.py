"""LayerNorm over the last dimension, optionally fused with the residual add.

Forward: one program normalises BLOCK_T rows (tokens) of BLOCK_C = next_pow2(C) columns
held in registers, with fp32 statistics; with a residual it also writes
``s = x + residual`` (the new residual stream of a pre-norm block) in the same
pass, so the sum never makes a round trip through memory before being normalised.
The per-row mean and 1/std (fp32) are saved for the backward.

Backward: each program walks a contiguous range of rows, writes dx (plus the
gradient that flows into ``s`` directly) and accumulates dweight and dbias in fp32
registers; every program writes its own partial row and a plain sum over programs
finishes the reduction, so weight gradients are deterministic (no atomics).
"""

from __future__ import annotations

import functools
import itertools
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..compile_check import CompileTarget, Launch, build_targets
from .launch import TRITON_DTYPES, Tile, kernel_launcher, launch_tile

# --------------------------------------------------------------------------- kernels


@triton.jit
def _layer_norm_forward_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    bias_ptr,
    normed_ptr,
    summed_ptr,
    mean_ptr,
    rstd_ptr,
    rows,
    channels,
    x_row_stride,
    x_col_stride,
    residual_row_stride,
    residual_col_stride,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    col = tl.arange(0, BLOCK_C)
    row_mask = row < rows
    col_mask = col < channels
    mask = row_mask[:, None] & col_mask[None, :]
    row64 = row.to(tl.int64)[:, None]

    x = tl.load(x_ptr + row64 * x_row_stride + col[None, :] * x_col_stride, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(
            residual_ptr + row64 * residual_row_stride + col[None, :] * residual_col_stride, mask=mask, other=0.0
        )
        # Round the sum to the stream's dtype before normalising: the stored stream and
        # the statistics then describe the same tensor, as in the reference.
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(summed_ptr.dtype.element_ty)
        tl.store(summed_ptr + row64 * channels + col[None, :], x, mask=mask)
    s = x.to(tl.float32)

    mean = tl.sum(s, axis=1) / channels
    centered = tl.where(mask, s - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(centered * centered, axis=1) / channels + eps)
    weight = tl.load(weight_ptr + col, mask=col_mask, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + col, mask=col_mask, other=0.0).to(tl.float32)
    normed = centered * rstd[:, None] * weight[None, :] + bias[None, :]
    tl.store(normed_ptr + row64 * channels + col[None, :], normed.to(normed_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + row, mean, mask=row_mask)
    tl.store(rstd_ptr + row, rstd, mask=row_mask)


@triton.jit
def _layer_norm_backward_kernel(
    grad_normed_ptr,
    grad_summed_ptr,
    summed_ptr,
    weight_ptr,
    mean_ptr,
    rstd_ptr,
    grad_x_ptr,
    weight_partial_ptr,
    bias_partial_ptr,
    rows,
    channels,
    rows_per_program,
    grad_normed_row_stride,
    grad_normed_col_stride,
    grad_summed_row_stride,
    grad_summed_col_stride,
    summed_row_stride,
    summed_col_stride,
    HAS_GRAD_SUMMED: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    program = tl.program_id(0)
    col = tl.arange(0, BLOCK_C)
    col_mask = col < channels
    weight = tl.load(weight_ptr + col, mask=col_mask, other=0.0).to(tl.float32)
    weight_acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
    bias_acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)

    first_row = program * rows_per_program
    for start in range(first_row, first_row + rows_per_program, BLOCK_T):
        row = start + tl.arange(0, BLOCK_T)
        row_mask = row < rows
        mask = row_mask[:, None] & col_mask[None, :]
        row64 = row.to(tl.int64)[:, None]

        s = tl.load(summed_ptr + row64 * summed_row_stride + col[None, :] * summed_col_stride, mask=mask, other=0.0)
        dy = tl.load(
            grad_normed_ptr + row64 * grad_normed_row_stride + col[None, :] * grad_normed_col_stride,
            mask=mask,
            other=0.0,
        ).to(tl.float32)
        mean = tl.load(mean_ptr + row, mask=row_mask, other=0.0)
        rstd = tl.load(rstd_ptr + row, mask=row_mask, other=0.0)

        x_hat = tl.where(mask, (s.to(tl.float32) - mean[:, None]) * rstd[:, None], 0.0)
        weighted_dy = dy * weight[None, :]
        # d/dx of (x - mean) * rstd: remove the components along 1 and along x_hat.
        along_x_hat = tl.sum(x_hat * weighted_dy, axis=1) / channels
        along_one = tl.sum(weighted_dy, axis=1) / channels
        dx = (weighted_dy - (x_hat * along_x_hat[:, None] + along_one[:, None])) * rstd[:, None]
        if HAS_GRAD_SUMMED:
            dx += tl.load(
                grad_summed_ptr + row64 * grad_summed_row_stride + col[None, :] * grad_summed_col_stride,
                mask=mask,
                other=0.0,
            ).to(tl.float32)
        tl.store(grad_x_ptr + row64 * channels + col[None, :], dx.to(grad_x_ptr.dtype.element_ty), mask=mask)

        weight_acc += dy * x_hat
        bias_acc += dy

    tl.store(weight_partial_ptr + program * channels + col, tl.sum(weight_acc, axis=0), mask=col_mask)
    tl.store(bias_partial_ptr + program * channels + col, tl.sum(bias_acc, axis=0), mask=col_mask)


KERNELS = {"forward": _layer_norm_forward_kernel, "backward": _layer_norm_backward_kernel}


# --------------------------------------------------------------------------- launch configurations

# Elements one program keeps per [BLOCK_T, BLOCK_C] tile. The backward holds
# about twice as many live tiles (inputs plus two accumulators), so it takes fewer rows.
# 4096 forward elements (x, residual, sum and output live: ~200 registers) spilled
# under triton 3.6 with a residual at C = 32 and 64; 2048 keeps both versions clean.
_FORWARD_TILE = 2048
_BACKWARD_TILE = 1024
# Backward programs per SM: enough to fill the GPU, few enough that the partial
# buffer [programs, C] and its final sum stay small.
_BACKWARD_PROGRAMS_PER_SM = 2
# The interpreter has no SMs; a fixed count keeps the partial sums deterministic.
_INTERPRETER_BACKWARD_PROGRAMS = 4
# The backward's row loop prefetches the next rows' loads one iteration ahead.
_NUM_STAGES = 2


@functools.lru_cache(maxsize=None)
def tile(kernel: str, channels: int) -> Tile:
    """The launch config of ``kernel`` for C channels: whole rows of BLOCK_C = next_pow2(C)."""
    block_c = triton.next_power_of_2(channels)
    num_warps = min(16, max(4, block_c // 512))
    if kernel == "forward":
        # at least two rows a warp: fewer (4 rows of 512 over 4 warps) made triton 3.6's
        # ptxas spill on sm_80
        rows = max(2 * num_warps, _FORWARD_TILE // block_c)
    else:
        rows = max(1, _BACKWARD_TILE // block_c)
    return Tile.of(BLOCK_T=rows, BLOCK_C=block_c, num_warps=num_warps, num_stages=_NUM_STAGES)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _backward_programs(device: torch.device, row_blocks: int) -> int:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        limit = _BACKWARD_PROGRAMS_PER_SM * _sm_count(index)
    else:
        limit = _INTERPRETER_BACKWARD_PROGRAMS
    return max(1, min(row_blocks, limit))


# --------------------------------------------------------------------------- launchers


def _as_rows(t: Tensor, channels: int) -> Tensor:
    """[..., C] as a [rows, C] view (a copy only when no single row stride exists)."""
    return t.reshape(-1, channels)


def launch_forward(
    x: Tensor, weight: Tensor, bias: Tensor, eps: float, residual: Optional[Tensor]
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(normed, summed, mean, rstd); ``summed`` is empty without a residual."""
    channels = x.shape[-1]
    x_rows = _as_rows(x, channels)
    rows = x_rows.shape[0]
    normed = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    mean = torch.empty(rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    if residual is None:
        summed = x.new_empty(0)
        residual_rows, summed_out = x_rows, normed  # placeholders, never touched
    else:
        residual_rows = _as_rows(residual, channels)
        summed = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        summed_out = summed
    config = tile("forward", channels)
    args = (
        x_rows, residual_rows, weight, bias, normed, summed_out, mean, rstd, rows, channels,
        x_rows.stride(0), x_rows.stride(1), residual_rows.stride(0), residual_rows.stride(1), eps,
    )
    launch_tile(KERNELS["forward"], (triton.cdiv(rows, config["BLOCK_T"]),), args,
                {"HAS_RESIDUAL": residual is not None}, config)
    return normed, summed, mean, rstd


def launch_backward(
    grad_normed: Tensor, grad_summed: Optional[Tensor], summed: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad of the normalised input, fp32 grad of weight, fp32 grad of bias)."""
    channels = summed.shape[-1]
    summed_rows = _as_rows(summed, channels)
    grad_normed_rows = _as_rows(grad_normed, channels)
    grad_summed_rows = grad_normed_rows if grad_summed is None else _as_rows(grad_summed, channels)
    rows = summed_rows.shape[0]
    config = tile("backward", channels)
    row_blocks = triton.cdiv(rows, config["BLOCK_T"])
    programs = _backward_programs(summed.device, row_blocks)
    rows_per_program = triton.cdiv(row_blocks, programs) * config["BLOCK_T"]
    programs = triton.cdiv(rows, rows_per_program)

    grad_x = torch.empty(summed.shape, dtype=summed.dtype, device=summed.device)
    weight_partial = torch.empty((programs, channels), dtype=torch.float32, device=summed.device)
    bias_partial = torch.empty_like(weight_partial)
    args = (
        grad_normed_rows, grad_summed_rows, summed_rows, weight, mean, rstd, grad_x, weight_partial, bias_partial,
        rows, channels, rows_per_program, grad_normed_rows.stride(0), grad_normed_rows.stride(1),
        grad_summed_rows.stride(0), grad_summed_rows.stride(1), summed_rows.stride(0), summed_rows.stride(1),
    )
    launch_tile(KERNELS["backward"], (programs,), args, {"HAS_GRAD_SUMMED": grad_summed is not None}, config)
    return grad_x, weight_partial.sum(0), bias_partial.sum(0)


# --------------------------------------------------------------------------- autograd op


@torch.library.custom_op("segformer::layer_norm", mutates_args=())
@kernel_launcher
def _layer_norm_op(
    x: Tensor, weight: Tensor, bias: Tensor, eps: float, residual: Optional[Tensor]
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (normed, summed, mean, rstd); ``summed`` is empty without a residual
    (the schema needs a fixed number of outputs, and an output may not alias x)."""
    return launch_forward(x, weight, bias, eps, residual)


@_layer_norm_op.register_fake
def _(x, weight, bias, eps, residual):
    rows = x.numel() // x.shape[-1]
    summed = x.new_empty(0) if residual is None else x.new_empty(x.shape)
    mean = x.new_empty(rows, dtype=torch.float32)
    return x.new_empty(x.shape), summed, mean, torch.empty_like(mean)


@torch.library.custom_op("segformer::layer_norm_backward", mutates_args=())
@kernel_launcher
def _layer_norm_backward_op(
    grad_normed: Tensor, grad_summed: Optional[Tensor], summed: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (grad of the normalised input, fp32 grad of weight, fp32 grad of bias).
    ``summed`` is the tensor that was normalised; ``grad_summed`` is the gradient
    that reached it directly (the residual stream), added to its gradient."""
    return launch_backward(grad_normed, grad_summed, summed, weight, mean, rstd)


@_layer_norm_backward_op.register_fake
def _(grad_normed, grad_summed, summed, weight, mean, rstd):
    channels = summed.shape[-1]
    weight_grad = summed.new_empty(channels, dtype=torch.float32)
    return summed.new_empty(summed.shape), weight_grad, torch.empty_like(weight_grad)


def _setup_context(ctx, inputs, output):
    x, weight, bias, _, residual = inputs
    _, summed, mean, rstd = output
    ctx.has_residual = residual is not None
    ctx.weight_dtype, ctx.bias_dtype = weight.dtype, bias.dtype
    ctx.mark_non_differentiable(mean, rstd)
    if residual is None:
        ctx.mark_non_differentiable(summed)
    # Unused outputs get None instead of a materialised zero gradient (a wasted pass).
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x if residual is None else summed, weight, mean, rstd)


def _backward_formula(ctx, grad_normed, grad_summed, _grad_mean, _grad_rstd):
    summed, weight, mean, rstd = ctx.saved_tensors
    if not ctx.has_residual:
        grad_summed = None
    if grad_normed is None:
        # Only the residual stream was used: s = x + residual passes its gradient through.
        return grad_summed, None, None, None, grad_summed
    grad_x, grad_weight, grad_bias = _layer_norm_backward_op(grad_normed, grad_summed, summed, weight, mean, rstd)
    grad_residual = grad_x if ctx.has_residual else None
    return grad_x, grad_weight.to(ctx.weight_dtype), grad_bias.to(ctx.bias_dtype), None, grad_residual


_layer_norm_op.register_autograd(_backward_formula, setup_context=_setup_context)


# --------------------------------------------------------------------------- public function


def layer_norm(
    x: Tensor, weight: Tensor, bias: Tensor, eps: float, residual: Tensor | None = None
) -> Tensor | tuple[Tensor, Tensor]:
    """LayerNorm over the last dim (fp32 statistics); with ``residual``, returns
    ``(LN(x + residual), x + residual)`` like ``reference.layer_norm``."""
    normed, summed, _, _ = _layer_norm_op(x, weight, bias, eps, residual)
    return normed if residual is None else (normed, summed)


# --------------------------------------------------------------------------- compile targets

# Every LayerNorm width in MiT-B0..B5 (hidden sizes; 160 and 320 are not powers of two).
_MODEL_CHANNELS = (32, 64, 128, 160, 256, 320, 512)
# fp32 buffers besides the input-dtype tensors: the parameters (fp32 under AMP), the row
# statistics and the weight-gradient partials.
_FP32_POINTERS = {"weight_ptr", "bias_ptr", "mean_ptr", "rstd_ptr", "weight_partial_ptr", "bias_partial_ptr"}


def _launches():
    """Every (kernel, config, dtype) the launchers launch for the model's widths, with
    and without the residual (forward) or the gradient reaching the sum (backward).
    Weights are listed as fp32 (the model keeps fp32 parameters under AMP)."""
    flags = {"forward": "HAS_RESIDUAL", "backward": "HAS_GRAD_SUMMED"}
    for channels, dtype, kernel, flag in itertools.product(_MODEL_CHANNELS, TRITON_DTYPES, KERNELS, (False, True)):
        yield Launch(kernel, dtype, tile(kernel, channels), {flags[kernel]: flag}, shape=f"C={channels}")


def compile_targets() -> list[CompileTarget]:
    return build_targets("layer_norm", KERNELS, _launches(), fp32_pointers=_FP32_POINTERS, floats={"eps"})
