"""Spatial reduction (SegFormer's sequence reduction) as one fused Triton kernel,
with a hand-written backward.

    y = LayerNorm(Conv2d(C, C_out, kernel=stride=sr)(x on its (H, W) grid))

seen as the paper writes it: each non-overlapping sr x sr patch of tokens is one
row of a [M, C*sr^2] matrix that is multiplied by the flattened conv weight. The
forward gathers those rows straight from the token tensor (no im2col copy, no
NCHW transpose), accumulates the GEMM in fp32, and applies bias and LayerNorm in
the epilogue, because one program holds whole output rows (C_out <= 512 in the
variants).

K order. The GEMM's K dimension runs over (ky, kx) outer and C inner, so every
load of x is a run of C contiguous channels of one token. The conv weight's
natural flattening is (c, ky, kx); the launchers re-lay it out as [C_out, sr, sr, C]
(see ``_weight_by_cell``).

Backward, from the saved pre-LayerNorm rows z (fp32) and their mean and rstd:
  1. ``_spatial_reduction_backward_layer_norm_kernel`` (M = N/sr^2 rows, cheap): dz
     per row, written once in the input dtype; per-program partial sums of
     d ln_weight, d ln_bias and d bias (fp32, summed afterwards: deterministic).
  2. ``_spatial_reduction_backward_dx_kernel``: dx = dz @ W, a GEMM whose rows are
     scattered back to the tokens of their patch. Each token lies in at most one
     patch, so this is a plain store, no atomics. Its rows run over the
     ceil(H/sr) x ceil(W/sr) patches covering the grid: patches the conv drops have
     dz = 0, so the tokens in the dropped rows and columns get their zero gradient
     written like any other.
  3. ``_spatial_reduction_backward_weight_kernel``: dW = dz^T @ patches, tiled over
     (C_out, K) and split over rows into fp32 partial buffers that are summed
     afterwards (deterministic).
LayerNorm backward and dx are separate kernels so that the dx GEMM's tiles do
not have to hold whole C_out rows (which would force small row blocks and many
re-reads of the weight); dz is only M x C_out, written once and read twice.
"""

from __future__ import annotations

import itertools
from typing import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..compile_check import CompileTarget, Launch, build_targets
from .launch import (
    DTYPE_PRECISIONS, Tile, alignment, kernel_launcher, launch_tile, multiple_of, resolve_input_precision,
)

# Split the weight-gradient reduction over rows until about this many programs
# run (a few per SM on current GPUs), but keep every split at least
# SPLIT_ROWS_PER_OUT_CHANNEL * C_out rows long: a split writes a partial dW of
# C_out x C*sr^2 fp32 that the sum reads back, 8*C_out bytes per K column against
# the 2 bytes per row and K column of 16-bit x the split reads, so the partials
# stay under a quarter of that traffic.
WEIGHT_GRAD_TARGET_PROGRAMS = 1024
SPLIT_ROWS_PER_OUT_CHANNEL = 16

# The LayerNorm backward's programs (each writes one partial row of the three
# parameter gradients): enough to fill the GPU, few enough that the partials
# stay small next to dz.
LAYER_NORM_BACKWARD_PROGRAMS = 256

# The variants' (C, sr) pairs where SR runs (stage 4 has sr = 1 and no SR); the
# conv maps C to C_out = C.
VARIANT_CHANNELS = {32: 8, 64: 8, 128: 4, 160: 2, 320: 2}


# --------------------------------------------------------------------------- kernels


@triton.jit
def _patch_origin(row, patches_per_image, reduced_width, width, sr, stride_xb, stride_xn):
    """Offset in x of the top-left token of reduced row ``row`` (b, py, px)."""
    image = row // patches_per_image
    patch = row - image * patches_per_image
    py = patch // reduced_width
    px = patch - py * reduced_width
    return image.to(tl.int64) * stride_xb + (py * sr * width + px * sr) * stride_xn


@triton.jit
def _k_step(step, channel_blocks, sr, BLOCK_C: tl.constexpr):
    """K step -> (patch cell ky, kx; channel offsets). Cells outer, channels inner."""
    cell = step // channel_blocks
    ky = cell // sr
    kx = cell - ky * sr
    offsets = (step - cell * channel_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    return ky, kx, offsets


@triton.jit
def _aligned(channels, out_channels, stride_xb, stride_xn, ALIGN: tl.constexpr):
    """The channel counts and x's strides as multiples of ALIGN, as the launcher checked
    they are, so the compiler knows rows of channels load as wide vectors."""
    return (multiple_of(channels, ALIGN), multiple_of(out_channels, ALIGN), multiple_of(stride_xb, ALIGN),
            multiple_of(stride_xn, ALIGN))


@triton.jit
def _spatial_reduction_forward_kernel(
    x_ptr, w_ptr, bias_ptr, ln_w_ptr, ln_b_ptr,
    y_ptr, z_ptr, mean_ptr, rstd_ptr,
    rows, patches_per_image, reduced_width, width, channels, out_channels, sr, eps,
    stride_xb, stride_xn,
    BLOCK_M: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_C: tl.constexpr, ALIGN: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """BLOCK_M reduced rows: gather patches, GEMM with the [C_out, sr, sr, C] weight
    (fp32 accumulation), + bias, LayerNorm. Writes y, the pre-LN rows z (fp32) and
    the per-row mean and rstd for the backward."""
    channels, out_channels, stride_xb, stride_xn = _aligned(channels, out_channels, stride_xb, stride_xn, ALIGN)
    row = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = row < rows
    origin = _patch_origin(row, patches_per_image, reduced_width, width, sr, stride_xb, stride_xn)
    cols = tl.arange(0, BLOCK_CO)
    col_ok = cols < out_channels
    k_total = sr * sr * channels
    channel_blocks = tl.cdiv(channels, BLOCK_C)

    acc = tl.zeros((BLOCK_M, BLOCK_CO), dtype=tl.float32)
    for step in range(0, sr * sr * channel_blocks):
        ky, kx, ch = _k_step(step, channel_blocks, sr, BLOCK_C)
        ch_ok = ch < channels
        patch = tl.load(
            x_ptr + origin[:, None] + (ky * width + kx) * stride_xn + ch[None, :],
            mask=row_ok[:, None] & ch_ok[None, :], other=0.0,
        )
        w_tile = tl.load(
            w_ptr + cols[None, :] * k_total + (ky * sr + kx) * channels + ch[:, None],
            mask=ch_ok[:, None] & col_ok[None, :], other=0.0,
        )
        acc = tl.dot(patch, w_tile, acc, input_precision=INPUT_PRECISION)

    # Padded columns are exactly 0 in acc and bias, so they add nothing to the sums.
    z = acc + tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    mean = tl.sum(z, axis=1) / out_channels
    centered = tl.where(col_ok[None, :], z - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(centered * centered, axis=1) / out_channels + eps)
    ln_w = tl.load(ln_w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    ln_b = tl.load(ln_b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = centered * rstd[:, None] * ln_w[None, :] + ln_b[None, :]

    out_offsets = row[:, None] * out_channels + cols[None, :]
    out_mask = row_ok[:, None] & col_ok[None, :]
    tl.store(y_ptr + out_offsets, y.to(y_ptr.dtype.element_ty), mask=out_mask)
    tl.store(z_ptr + out_offsets, z, mask=out_mask)
    tl.store(mean_ptr + row, mean, mask=row_ok)
    tl.store(rstd_ptr + row, rstd, mask=row_ok)


@triton.jit
def _spatial_reduction_backward_layer_norm_kernel(
    dy_ptr, z_ptr, mean_ptr, rstd_ptr, ln_w_ptr,
    dz_ptr, partial_ptr,
    rows, out_channels, blocks_per_program,
    BLOCK_M: tl.constexpr, BLOCK_CO: tl.constexpr, ALIGN: tl.constexpr,
):
    """LayerNorm backward over ``blocks_per_program`` blocks of BLOCK_M rows:
    dz = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), dxhat = dy * ln_w,
    and this program's sums over its rows of dy * xhat, dy and dz, stored as
    partials [3, programs, C_out] (d ln_weight, d ln_bias, d bias)."""
    out_channels = multiple_of(out_channels, ALIGN)
    cols = tl.arange(0, BLOCK_CO)
    col_ok = cols < out_channels
    ln_w = tl.load(ln_w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    sum_dy_xhat = tl.zeros((BLOCK_CO,), dtype=tl.float32)
    sum_dy = tl.zeros((BLOCK_CO,), dtype=tl.float32)
    sum_dz = tl.zeros((BLOCK_CO,), dtype=tl.float32)
    for block in range(0, blocks_per_program):
        row = (tl.program_id(0) * blocks_per_program + block) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = row < rows
        offsets = row[:, None] * out_channels + cols[None, :]
        mask = row_ok[:, None] & col_ok[None, :]
        # Masked rows and columns load as zeros, which makes their xhat, dy and dz zero.
        dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + offsets, mask=mask, other=0.0)
        mean = tl.load(mean_ptr + row, mask=row_ok, other=0.0)
        rstd = tl.load(rstd_ptr + row, mask=row_ok, other=0.0)
        xhat = tl.where(mask, (z - mean[:, None]) * rstd[:, None], 0.0)
        dxhat = dy * ln_w[None, :]
        mean_dxhat = tl.sum(dxhat, axis=1) / out_channels
        mean_dxhat_xhat = tl.sum(dxhat * xhat, axis=1) / out_channels
        dz = tl.where(mask, (dxhat - mean_dxhat[:, None] - xhat * mean_dxhat_xhat[:, None]) * rstd[:, None], 0.0)
        tl.store(dz_ptr + offsets, dz.to(dz_ptr.dtype.element_ty), mask=mask)
        sum_dy_xhat += tl.sum(dy * xhat, axis=0)
        sum_dy += tl.sum(dy, axis=0)
        sum_dz += tl.sum(dz, axis=0)

    partial = partial_ptr + tl.program_id(0) * out_channels + cols
    programs = tl.num_programs(0)
    tl.store(partial, sum_dy_xhat, mask=col_ok)
    tl.store(partial + programs * out_channels, sum_dy, mask=col_ok)
    tl.store(partial + 2 * programs * out_channels, sum_dz, mask=col_ok)


@triton.jit
def _spatial_reduction_backward_dx_kernel(
    dz_ptr, w_ptr, dx_ptr,
    covering_patches, height, width, channels, out_channels, sr,
    reduced_height, reduced_width, covering_height, covering_width,
    BLOCK_M: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_C: tl.constexpr, ALIGN: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """dx at patch cell (ky, kx), BLOCK_C channels, for BLOCK_M patches of the
    covering ceil(H/sr) x ceil(W/sr) grid: dz @ W[:, ky, kx, channels], stored at
    the cell's token of each patch (zeros for patches the conv drops)."""
    channels = multiple_of(channels, ALIGN)
    out_channels = multiple_of(out_channels, ALIGN)
    patch = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    patch_ok = patch < covering_patches
    covering_per_image = covering_height * covering_width
    image = patch // covering_per_image
    local = patch - image * covering_per_image
    py = local // covering_width
    px = local - py * covering_width
    reduced = patch_ok & (py < reduced_height) & (px < reduced_width)
    row = image * (reduced_height * reduced_width) + py * reduced_width + px

    channel_blocks = tl.cdiv(channels, BLOCK_C)
    ky, kx, ch = _k_step(tl.program_id(1), channel_blocks, sr, BLOCK_C)
    ch_ok = ch < channels
    w_cell = w_ptr + (ky * sr + kx) * channels + ch[None, :]
    k_total = sr * sr * channels

    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for start in range(0, out_channels, BLOCK_CO):
        n = start + tl.arange(0, BLOCK_CO)
        n_ok = n < out_channels
        dz = tl.load(
            dz_ptr + row[:, None] * out_channels + n[None, :], mask=reduced[:, None] & n_ok[None, :], other=0.0
        )
        w_tile = tl.load(w_cell + n[:, None] * k_total, mask=n_ok[:, None] & ch_ok[None, :], other=0.0)
        acc = tl.dot(dz, w_tile, acc, input_precision=INPUT_PRECISION)

    token = (py * sr + ky) * width + px * sr + kx
    token_ok = patch_ok & (py * sr + ky < height) & (px * sr + kx < width)
    tl.store(
        dx_ptr + image.to(tl.int64)[:, None] * height * width * channels + token[:, None] * channels + ch[None, :],
        acc.to(dx_ptr.dtype.element_ty),
        mask=token_ok[:, None] & ch_ok[None, :],
    )


@triton.jit
def _spatial_reduction_backward_weight_kernel(
    x_ptr, dz_ptr, partial_ptr,
    rows, rows_per_split, patches_per_image, reduced_width, width, channels, out_channels, sr,
    stride_xb, stride_xn,
    BLOCK_CO: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, ALIGN: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """One [BLOCK_CO, BLOCK_C] tile of dW (in the [C_out, sr, sr, C] layout) summed
    over one split of the rows: dz^T @ patches, written to that split's fp32 partial."""
    channels, out_channels, stride_xb, stride_xn = _aligned(channels, out_channels, stride_xb, stride_xn, ALIGN)
    co = tl.program_id(0) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_ok = co < out_channels
    channel_blocks = tl.cdiv(channels, BLOCK_C)
    ky, kx, ch = _k_step(tl.program_id(1), channel_blocks, sr, BLOCK_C)
    ch_ok = ch < channels
    split = tl.program_id(2)
    cell_offset = (ky * width + kx) * stride_xn

    acc = tl.zeros((BLOCK_CO, BLOCK_C), dtype=tl.float32)
    for start in range(0, rows_per_split, BLOCK_M):
        row = split * rows_per_split + start + tl.arange(0, BLOCK_M)
        row_ok = row < rows
        origin = _patch_origin(row, patches_per_image, reduced_width, width, sr, stride_xb, stride_xn)
        patch = tl.load(
            x_ptr + origin[:, None] + cell_offset + ch[None, :],
            mask=row_ok[:, None] & ch_ok[None, :], other=0.0,
        )
        dz_t = tl.load(
            dz_ptr + row[None, :] * out_channels + co[:, None],
            mask=co_ok[:, None] & row_ok[None, :], other=0.0,
        )
        acc = tl.dot(dz_t, patch, acc, input_precision=INPUT_PRECISION)

    k_total = sr * sr * channels
    tl.store(
        partial_ptr + split.to(tl.int64) * out_channels * k_total
        + co[:, None] * k_total + (ky * sr + kx) * channels + ch[None, :],
        acc,
        mask=co_ok[:, None] & ch_ok[None, :],
    )


KERNELS = {
    "forward": _spatial_reduction_forward_kernel,
    "backward_layer_norm": _spatial_reduction_backward_layer_norm_kernel,
    "backward_dx": _spatial_reduction_backward_dx_kernel,
    "backward_weight": _spatial_reduction_backward_weight_kernel,
}


# --------------------------------------------------------------------------- launch configurations


def _channel_block(channels: int, limit: int) -> int:
    """BLOCK_C: the largest of 64/32/16 (within ``limit``) that divides C, so no
    lane is masked off; otherwise one power of two covering C up to ``limit``."""
    for block in (64, 32, 16):
        if block <= limit and channels % block == 0:
            return block
    return max(16, min(limit, triton.next_power_of_2(channels)))


def tile(kernel: str, out_channels: int, channels: int, dtype: torch.dtype, input_precision: str) -> Tile:
    """The launch config of ``kernel`` for C input and C_out output channels. Exact fp32
    dots ("ieee") run on the FMA units with both operands in registers: their tiles are
    halved (rows and C_out step of the forward and of dx, the row step of dW) so they
    compile without spills like the tensor-core ones."""
    exact = input_precision == "ieee"
    if kernel == "forward":
        # Whole rows of C_out (BLOCK_CO = next_pow2(C_out)) for the LayerNorm. BLOCK_M
        # shrinks as C_out grows so that the fp32 [BLOCK_M, BLOCK_CO] accumulator takes at
        # most 64 registers a thread (32 up to C_out = 256; the epilogue keeps about three
        # such tiles live), and BLOCK_C shrinks to keep a weight tile [BLOCK_C, BLOCK_CO]
        # within 32 KB of shared memory per pipeline stage.
        block_co = max(16, triton.next_power_of_2(out_channels))
        num_warps = 4 if block_co <= 64 else 8
        block_m = max(16, min(64, 64 * 32 * num_warps // block_co) // (2 if exact else 1))
        limit = max(16, min(32 if exact else 64, 32768 // (block_co * dtype.itemsize)))
        return Tile.of(BLOCK_M=block_m, BLOCK_CO=block_co, BLOCK_C=_channel_block(channels, limit),
                       num_warps=num_warps, num_stages=3)
    if kernel == "backward_layer_norm":
        # Whole rows again, about five fp32 tiles live: 16 registers a thread per tile,
        # which leaves room for several programs per SM (the kernel is memory-bound).
        block_co = triton.next_power_of_2(out_channels)
        return Tile.of(BLOCK_M=max(1, min(64, 2048 // block_co)), BLOCK_CO=block_co, num_warps=4, num_stages=1)
    block_c = _channel_block(channels, 64)
    if kernel == "backward_dx":
        # dx = dz @ W: [BLOCK_M patches, BLOCK_C channels], BLOCK_CO of C_out a step.
        # BLOCK_CO is at most BLOCK_C: a narrow channel block (32 for C = 160) with
        # 64-wide steps spilled for fp32 on sm_80 under triton 3.6, while the 32 x 32 step
        # is the tile C = 32 uses, which compiles without spills for every dtype and both
        # archs.
        block_co = max(16, min(32 if exact else 64, block_c, triton.next_power_of_2(out_channels)))
        return Tile.of(BLOCK_M=32 if exact else 64, BLOCK_CO=block_co, BLOCK_C=block_c, num_warps=4, num_stages=3)
    # dW = dz^T @ patches: [BLOCK_CO, BLOCK_C] per program, BLOCK_M rows a step.
    block_co = max(16, min(64, triton.next_power_of_2(out_channels)))
    return Tile.of(BLOCK_CO=block_co, BLOCK_M=32 if exact else 64, BLOCK_C=block_c, num_warps=4, num_stages=3)


def layer_norm_backward_grid(rows: int, block_m: int) -> tuple[int, int]:
    """(programs, blocks_per_program): about LAYER_NORM_BACKWARD_PROGRAMS programs,
    each over consecutive row blocks, so the partial sums stay few."""
    row_blocks = triton.cdiv(rows, block_m)
    blocks_per_program = triton.cdiv(row_blocks, LAYER_NORM_BACKWARD_PROGRAMS)
    return triton.cdiv(row_blocks, blocks_per_program), blocks_per_program


def weight_grad_split(rows: int, tiles: int, block_m: int, out_channels: int) -> tuple[int, int]:
    """(splits, rows_per_split), rows_per_split a multiple of BLOCK_M, for the
    weight-gradient reduction over ``rows`` by ``tiles`` tiles of dW. Depends on
    the shape only, so the summation order (and the result) is fixed."""
    shortest = max(block_m, SPLIT_ROWS_PER_OUT_CHANNEL * out_channels)
    splits = max(1, min(triton.cdiv(WEIGHT_GRAD_TARGET_PROGRAMS, tiles), rows // shortest))
    rows_per_split = triton.cdiv(triton.cdiv(rows, splits), block_m) * block_m
    return triton.cdiv(rows, rows_per_split), rows_per_split


# --------------------------------------------------------------------------- launchers


def _channels_contiguous(x: Tensor) -> Tensor:
    """The kernels read runs of C contiguous channels; any other token layout
    (e.g. a transposed NCHW view) is copied by each launcher. Slices of wider
    tensors keep stride 1 over C and are read in place."""
    return x if x.stride(2) == 1 else x.contiguous()


def _weight_by_cell(weight: Tensor) -> Tensor:
    """[C_out, C, sr, sr] -> contiguous [C_out, sr, sr, C]: the GEMM's K order, so a
    weight tile is contiguous over C like the x patches it multiplies. Forward and
    backward each copy the weight once: C_out*C*sr^2 elements against the B*M*C*sr^2
    of x their kernels read, i.e. C_out/(B*M) of the activation traffic (64/256 at
    batch 1 on stage 1 at 512x512, less with any batch), and it stays in L2."""
    return weight.permute(0, 2, 3, 1).contiguous()


def launch_forward(x: Tensor, hw: tuple[int, int], weight: Tensor, bias: Tensor, ln_weight: Tensor,
                   ln_bias: Tensor, eps: float, input_precision: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> y [B, M, C_out] (x's dtype), z [B*M, C_out] (pre-LayerNorm, fp32), mean and rstd [B*M] (fp32)."""
    x = _channels_contiguous(x)
    batch, _, channels = x.shape
    out_channels, sr = weight.shape[0], weight.shape[-1]
    height, width = hw
    reduced_width = width // sr
    patches = (height // sr) * reduced_width
    rows = batch * patches
    config = tile("forward", out_channels, channels, x.dtype, input_precision)

    y = x.new_empty(batch, patches, out_channels)
    z = torch.empty(rows, out_channels, device=x.device, dtype=torch.float32)
    mean = torch.empty(rows, device=x.device, dtype=torch.float32)
    rstd = torch.empty(rows, device=x.device, dtype=torch.float32)
    args = (
        x, _weight_by_cell(weight), bias.contiguous(), ln_weight.contiguous(), ln_bias.contiguous(), y, z, mean, rstd,
        rows, patches, reduced_width, width, channels, out_channels, sr, eps, x.stride(0), x.stride(1),
    )
    constexprs = {"ALIGN": alignment(channels, out_channels, x.stride(0), x.stride(1)),
                  "INPUT_PRECISION": input_precision}
    launch_tile(KERNELS["forward"], (triton.cdiv(rows, config["BLOCK_M"]),), args, constexprs, config)
    return y, z, mean, rstd


def launch_backward(dy: Tensor, x: Tensor, hw: tuple[int, int], weight: Tensor, ln_weight: Tensor, z: Tensor,
                    mean: Tensor, rstd: Tensor, input_precision: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> grads of (x, weight, bias, ln_weight, ln_bias)."""
    x = _channels_contiguous(x)
    # dy has only M = N/sr^2 rows: an upstream gradient in another layout (an
    # expanded one from a sum, say) is cheap to make contiguous.
    dy = dy.contiguous()
    batch, _, channels = x.shape
    out_channels, sr = weight.shape[0], weight.shape[-1]
    height, width = hw
    reduced_height, reduced_width = height // sr, width // sr
    rows = batch * reduced_height * reduced_width
    f32 = {"device": x.device, "dtype": torch.float32}

    def config(kernel: str) -> Tile:
        return tile(kernel, out_channels, channels, x.dtype, input_precision)

    ln_config = config("backward_layer_norm")
    programs, blocks_per_program = layer_norm_backward_grid(rows, ln_config["BLOCK_M"])
    dz = x.new_empty(rows, out_channels)
    param_partials = torch.empty(3, programs, out_channels, **f32)
    args = (dy, z, mean, rstd, ln_weight.contiguous(), dz, param_partials, rows, out_channels, blocks_per_program)
    launch_tile(KERNELS["backward_layer_norm"], (programs,), args, {"ALIGN": alignment(out_channels)}, ln_config)

    dx_config = config("backward_dx")
    covering_height, covering_width = triton.cdiv(height, sr), triton.cdiv(width, sr)
    covering_patches = batch * covering_height * covering_width
    dx = torch.empty(batch, height * width, channels, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(covering_patches, dx_config["BLOCK_M"]), sr * sr * triton.cdiv(channels, dx_config["BLOCK_C"]))
    args = (
        dz, _weight_by_cell(weight), dx, covering_patches, height, width, channels, out_channels, sr,
        reduced_height, reduced_width, covering_height, covering_width,
    )
    constexprs = {"ALIGN": alignment(channels, out_channels), "INPUT_PRECISION": input_precision}
    launch_tile(KERNELS["backward_dx"], grid, args, constexprs, dx_config)

    weight_config = config("backward_weight")
    grid_co = triton.cdiv(out_channels, weight_config["BLOCK_CO"])
    grid_k = sr * sr * triton.cdiv(channels, weight_config["BLOCK_C"])
    splits, rows_per_split = weight_grad_split(rows, grid_co * grid_k, weight_config["BLOCK_M"], out_channels)
    weight_partials = torch.empty(splits, out_channels, sr, sr, channels, **f32)
    args = (
        x, dz, weight_partials, rows, rows_per_split, reduced_height * reduced_width, reduced_width, width, channels,
        out_channels, sr, x.stride(0), x.stride(1),
    )
    constexprs = {"ALIGN": alignment(channels, out_channels, x.stride(0), x.stride(1)),
                  "INPUT_PRECISION": input_precision}
    launch_tile(KERNELS["backward_weight"], (grid_co, grid_k, splits), args, constexprs, weight_config)

    d_weight = weight_partials.sum(0).permute(0, 3, 1, 2).to(weight.dtype, memory_format=torch.contiguous_format)
    d_ln_weight, d_ln_bias, d_bias = (partial.sum(0).to(weight.dtype) for partial in param_partials)
    return dx, d_weight, d_bias, d_ln_weight, d_ln_bias


# --------------------------------------------------------------------------- autograd op


@torch.library.custom_op("segformer::spatial_reduction", mutates_args=())
@kernel_launcher
def _spatial_reduction_op(
    x: Tensor, hw: Sequence[int], weight: Tensor, bias: Tensor, ln_weight: Tensor, ln_bias: Tensor, eps: float,
    input_precision: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (y, z, mean, rstd); z, mean and rstd are for the backward only.

    The backward keeps z, the pre-LayerNorm rows, in fp32 instead of recomputing
    them: z has M = N/sr^2 rows (C_out*4 bytes each), while recomputing it would
    repeat the whole forward GEMM and its pass over the N tokens of x."""
    return launch_forward(x, tuple(hw), weight, bias, ln_weight, ln_bias, eps, input_precision)


@_spatial_reduction_op.register_fake
def _(x, hw, weight, bias, ln_weight, ln_bias, eps, input_precision):
    sr = weight.shape[-1]
    patches = (hw[0] // sr) * (hw[1] // sr)
    rows = x.shape[0] * patches
    return (
        x.new_empty(x.shape[0], patches, weight.shape[0]),
        x.new_empty(rows, weight.shape[0], dtype=torch.float32),
        x.new_empty(rows, dtype=torch.float32),
        x.new_empty(rows, dtype=torch.float32),
    )


@torch.library.custom_op("segformer::spatial_reduction_backward", mutates_args=())
@kernel_launcher
def _spatial_reduction_backward_op(
    dy: Tensor, x: Tensor, hw: Sequence[int], weight: Tensor, ln_weight: Tensor, z: Tensor, mean: Tensor,
    rstd: Tensor, input_precision: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> grads of (x, weight, bias, ln_weight, ln_bias)."""
    return launch_backward(dy, x, tuple(hw), weight, ln_weight, z, mean, rstd, input_precision)


@_spatial_reduction_backward_op.register_fake
def _(dy, x, hw, weight, ln_weight, z, mean, rstd, input_precision):
    out_channels = weight.shape[0]
    return (
        x.new_empty(x.shape),
        torch.empty_like(weight, memory_format=torch.contiguous_format),
        x.new_empty(out_channels, dtype=weight.dtype),
        x.new_empty(out_channels, dtype=weight.dtype),
        x.new_empty(out_channels, dtype=weight.dtype),
    )


def _setup_context(ctx, inputs, output):
    x, hw, weight, _bias, ln_weight, _ln_bias, _eps, input_precision = inputs
    _y, z, mean, rstd = output
    ctx.save_for_backward(x, weight, ln_weight, z, mean, rstd)
    ctx.hw = tuple(hw)
    ctx.input_precision = input_precision
    ctx.mark_non_differentiable(z, mean, rstd)


def _backward_formula(ctx, dy, _dz, _dmean, _drstd):
    x, weight, ln_weight, z, mean, rstd = ctx.saved_tensors
    dx, d_weight, d_bias, d_ln_weight, d_ln_bias = _spatial_reduction_backward_op(
        dy, x, ctx.hw, weight, ln_weight, z, mean, rstd, ctx.input_precision
    )
    return dx, None, d_weight, d_bias, d_ln_weight, d_ln_bias, None, None


_spatial_reduction_op.register_autograd(_backward_formula, setup_context=_setup_context)


# --------------------------------------------------------------------------- public function


def spatial_reduction(
    x: Tensor, hw: tuple[int, int], weight: Tensor, bias: Tensor, ln_weight: Tensor, ln_bias: Tensor, eps: float,
    *, input_precision: str | None = None,
) -> Tensor:
    """The Triton spatial reduction: x [B, H*W, C] (any strides) -> [B, (H//sr)*(W//sr), C_out].

    Arguments as segformer_kernels.reference.spatial_reduction, assumed checked
    (``segformer_kernels.spatial_reduction`` checks them). ``input_precision``: see
    launch.resolve_input_precision; it only affects fp32 inputs on a GPU."""
    input_precision = resolve_input_precision(x.dtype, input_precision)
    return _spatial_reduction_op(x, hw, weight, bias, ln_weight, ln_bias, eps, input_precision)[0]


# --------------------------------------------------------------------------- compile targets

_FP32_BUFFERS = {"z_ptr", "mean_ptr", "rstd_ptr", "partial_ptr"}


def _launches():
    """Every (kernel, config, dtype) the launchers pick for the variants' SR stages
    (C_out = C). sr is a runtime argument: it changes loop trip counts, not the
    compiled code. ALIGN is 16, as for every C the variants use; fp32 dots come in
    both precisions (resolve_input_precision picks "ieee" under torch's default)."""
    for (dtype, precision), (channels, sr), kernel in itertools.product(
        DTYPE_PRECISIONS, VARIANT_CHANNELS.items(), KERNELS
    ):
        constexprs = {"ALIGN": 16}
        if "INPUT_PRECISION" in KERNELS[kernel].arg_names:
            constexprs["INPUT_PRECISION"] = precision
        yield Launch(kernel, dtype, tile(kernel, channels, channels, dtype, precision), constexprs,
                     shape=f"C={channels} (sr={sr})")


def compile_targets() -> list[CompileTarget]:
    return build_targets("spatial_reduction", KERNELS, _launches(), fp32_pointers=_FP32_BUFFERS, floats={"eps"})
