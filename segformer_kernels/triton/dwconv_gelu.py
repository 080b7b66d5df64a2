"""Depthwise 3x3 convolution + bias + exact GELU in token layout, forward and backward.

Tokens stay in the [B, H*W, C] layout the linear layers use: token ``i * W + j`` of
an image is grid cell (i, j), so the 3x3 neighbour (i + dy, j + dx) of a token sits
``dy * W + dx`` tokens away, and every neighbour load is one contiguous run over C.
Batch and grid are flattened into one token axis (token ``b * H * W + i * W + j``);
a neighbour outside the image is masked to zero, which is the conv's zero padding
and also keeps a tile that straddles two images from reading across them.

Backward (pre = conv(x) + bias, y = GELU(pre)):
    dpre = dy * GELU'(pre)                    (pre recomputed from x)
    dx[p] = sum_k w[k] * dpre[p - offset_k]   (the transposed 3x3 conv)
    dw[k] = sum_p x[p] * dpre[p - offset_k],  dbias = sum_p dpre[p]
The weight and bias gradients are per-program fp32 partial sums, added up
afterwards by one deterministic reduction (no atomics).

The @triton.jit helpers (``token_grid_position``, ``dwconv3x3_tile``, ``gelu``,
``gelu_grad``) and the transposed-conv launcher (``launch_backward_dwconv``) are shared
with ``mix_ffn``, which computes the same conv + GELU inside its fc2 GEMM.
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..compile_check import CompileTarget, Launch, build_targets
from .launch import TRITON_DTYPES, Tile, alignment, kernel_launcher, launch_tile, multiple_of

# Taps of the 3x3 stencil; the partial-sum buffer has one more row, for the bias gradient.
TAPS = 9
_TAPS = tl.constexpr(TAPS)

_SQRT_HALF = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)

# --------------------------------------------------------------------------- kernels


@triton.jit
def gelu(z):
    """Exact GELU: z * Phi(z) with Phi the standard normal CDF."""
    return 0.5 * z * (1.0 + tl.erf(z * _SQRT_HALF))


@triton.jit
def gelu_grad(z):
    """d GELU / dz = Phi(z) + z * phi(z)."""
    cdf = 0.5 * (1.0 + tl.erf(z * _SQRT_HALF))
    return cdf + z * tl.exp(-0.5 * z * z) * _INV_SQRT_2PI


@triton.jit
def token_grid_position(tokens, height, width):
    """(row, col) of each flattened token (b * H * W + row * W + col) on its image's grid.

    int32 arithmetic: the division is per token, not per element, and int64 division is slow.
    """
    pixel = tokens % (height * width)
    row = pixel // width
    return row, pixel - row * width


@triton.jit
def _neighbour_mask(row, col, height, width, token_mask, dy: tl.constexpr, dx: tl.constexpr):
    """True where grid cell (row + dy, col + dx) exists (the zero padding is everything else)."""
    mask = token_mask
    if dy < 0:
        mask = mask & (row >= -dy)
    if dy > 0:
        mask = mask & (row < height - dy)
    if dx < 0:
        mask = mask & (col >= -dx)
    if dx > 0:
        mask = mask & (col < width - dx)
    return mask


@triton.jit
def dwconv3x3_tile(
    src_ptr,
    weight_ptr,
    bias_ptr,
    tokens,
    row,
    col,
    token_mask,
    channels,
    channel_mask,
    height,
    width,
    num_channels,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """conv3x3(src) + bias on a [BLOCK_T tokens, BLOCK_C channels] tile, fp32.

    ``src`` is a contiguous [tokens, num_channels] tensor; ``weight`` is [num_channels, 9]
    (the depthwise [C, 1, 3, 3] kernel flattened). Rows of masked tokens come out as
    the bias; masked channels as zero.
    """
    centre = src_ptr + tokens.to(tl.int64)[:, None] * num_channels + channels[None, :]
    acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
    # A runtime loop over the stencil's rows: fewer neighbour loads are in flight at
    # once than with all nine unrolled, which costs registers.
    for ky in range(3):
        dy = ky - 1
        row_mask = token_mask & (row + dy >= 0) & (row + dy < height)
        for kx in tl.static_range(3):
            valid = _neighbour_mask(row, col, height, width, row_mask, 0, kx - 1)
            neighbour = tl.load(
                centre + (dy * width + (kx - 1)) * num_channels,
                mask=valid[:, None] & channel_mask[None, :],
                other=0.0,
            )
            tap = tl.load(weight_ptr + channels * 9 + (ky * 3 + kx), mask=channel_mask, other=0.0)
            acc += neighbour.to(tl.float32) * tap.to(tl.float32)[None, :]
    bias = tl.load(bias_ptr + channels, mask=channel_mask, other=0.0)
    return acc + bias.to(tl.float32)[None, :]


@triton.jit
def _tile_indices(num_tokens, num_channels, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    return tokens, tokens < num_tokens, channels, channels < num_channels


@triton.jit
def _program_tile_pre(x_ptr, weight_ptr, bias_ptr, num_tokens, height, width, num_channels,
                      BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, ALIGN: tl.constexpr):
    """This program's [BLOCK_T, BLOCK_C] tile of conv(x) + bias (the GELU input), with
    the element offsets and mask to read or write the same tile of a token tensor."""
    num_channels = multiple_of(num_channels, ALIGN)
    tokens, token_mask, channels, channel_mask = _tile_indices(num_tokens, num_channels, BLOCK_T, BLOCK_C)
    row, col = token_grid_position(tokens, height, width)
    pre = dwconv3x3_tile(x_ptr, weight_ptr, bias_ptr, tokens, row, col, token_mask, channels, channel_mask,
                         height, width, num_channels, BLOCK_T, BLOCK_C)
    offsets = tokens.to(tl.int64)[:, None] * num_channels + channels[None, :]
    return pre, offsets, token_mask[:, None] & channel_mask[None, :]


@triton.jit
def _dwconv_gelu_forward_kernel(
    x_ptr, weight_ptr, bias_ptr, y_ptr,
    num_tokens, height, width, num_channels,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, ALIGN: tl.constexpr,
):
    pre, offsets, mask = _program_tile_pre(x_ptr, weight_ptr, bias_ptr, num_tokens, height, width, num_channels,
                                           BLOCK_T, BLOCK_C, ALIGN)
    tl.store(y_ptr + offsets, gelu(pre).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dwconv_gelu_backward_dpre_kernel(
    x_ptr, weight_ptr, bias_ptr, grad_ptr, dpre_ptr,
    num_tokens, height, width, num_channels,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, ALIGN: tl.constexpr,
):
    """dpre = dy * GELU'(conv(x) + bias), the gradient at the GELU input."""
    pre, offsets, mask = _program_tile_pre(x_ptr, weight_ptr, bias_ptr, num_tokens, height, width, num_channels,
                                           BLOCK_T, BLOCK_C, ALIGN)
    grad = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(dpre_ptr + offsets, (grad * gelu_grad(pre)).to(dpre_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dwconv_gelu_backward_dwconv_kernel(
    dpre_ptr, src_ptr, weight_ptr, dsrc_ptr, partial_ptr,
    num_tokens, height, width, num_channels,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, ALIGN: tl.constexpr,
):
    """dsrc = the transposed 3x3 conv of dpre, plus the weight and bias gradients as
    per-program partial sums: partial[program, k, c] = sum_p src[p] * dpre[p - offset_k]
    for the taps k = 0..8 and sum_p dpre[p] in row 9.

    A program walks token tiles pid, pid + P, ... (P programs along axis 0), so the
    partial buffer has P rows however many tokens there are; programs running at the
    same time still work on neighbouring tiles and share the halo in L2.
    """
    num_channels = multiple_of(num_channels, ALIGN)
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_mask = channels < num_channels
    # Rows 0..8: the taps; row 9: the bias; rows 10..15 pad the block to a power of two.
    partial_rows = tl.arange(0, 16)
    sums = tl.zeros([16, BLOCK_C], dtype=tl.float32)
    for tile in range(tl.program_id(0), tl.cdiv(num_tokens, BLOCK_T), tl.num_programs(0)):
        tokens = tile * BLOCK_T + tl.arange(0, BLOCK_T)
        token_mask = tokens < num_tokens
        row, col = token_grid_position(tokens, height, width)
        offsets = tokens.to(tl.int64)[:, None] * num_channels + channels[None, :]
        mask = token_mask[:, None] & channel_mask[None, :]
        src = tl.load(src_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        dpre_here = tl.load(dpre_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        sums += tl.where(partial_rows[:, None] == _TAPS, tl.sum(dpre_here, axis=0)[None, :], 0.0)
        acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
        for ky in range(3):  # a runtime loop, as in dwconv3x3_tile
            # Output q = p - offset_k received src[p] through tap k = (ky, kx).
            dy = ky - 1
            row_mask = token_mask & (row - dy >= 0) & (row - dy < height)
            for kx in tl.static_range(3):
                valid = _neighbour_mask(row, col, height, width, row_mask, 0, 1 - kx)
                dpre = tl.load(
                    dpre_ptr + offsets - (dy * width + (kx - 1)) * num_channels,
                    mask=valid[:, None] & channel_mask[None, :],
                    other=0.0,
                ).to(tl.float32)
                tap = tl.load(weight_ptr + channels * 9 + (ky * 3 + kx), mask=channel_mask, other=0.0)
                acc += dpre * tap.to(tl.float32)[None, :]
                sums += tl.where(partial_rows[:, None] == ky * 3 + kx, tl.sum(src * dpre, axis=0)[None, :], 0.0)
        tl.store(dsrc_ptr + offsets, acc.to(dsrc_ptr.dtype.element_ty), mask=mask)
    partial = partial_ptr + tl.program_id(0).to(tl.int64) * (_TAPS + 1) * num_channels
    tl.store(partial + partial_rows[:, None] * num_channels + channels[None, :], sums,
             mask=(partial_rows[:, None] <= _TAPS) & channel_mask[None, :])


KERNELS = {
    "forward": _dwconv_gelu_forward_kernel,
    "backward_dpre": _dwconv_gelu_backward_dpre_kernel,
    "backward_dwconv": _dwconv_gelu_backward_dwconv_kernel,
}


# --------------------------------------------------------------------------- launch configurations


def stencil_tile(num_channels: int) -> Tile:
    """Tile of the stencil kernels: up to 64 contiguous channels (128 B in 16-bit) and
    enough tokens for 2048 elements per program (16 per thread), so narrow C still
    fills a tile. Each element has nine neighbour loads in flight, which is what the
    registers must hold: larger tiles spill."""
    block_c = min(64, triton.next_power_of_2(num_channels))
    return Tile.of(BLOCK_T=min(256, 2048 // block_c), BLOCK_C=block_c, num_warps=4, num_stages=2)


# The transposed-conv kernel runs at most this many programs along the tokens (each
# loops over tiles); its fp32 partial-sum buffer is [programs, 10, C].
MAX_TOKEN_PROGRAMS = 512


# --------------------------------------------------------------------------- launchers
# They take tokens flattened to contiguous [B * H * W, C] matrices.


def _launch_stencil(kernel: str, tensors, height: int, width: int, token_programs: int | None = None) -> None:
    """Launch one stencil kernel over the [tokens, C] matrix tensors[0], by default one
    program per token tile."""
    num_tokens, num_channels = tensors[0].shape
    tile = stencil_tile(num_channels)
    if token_programs is None:
        token_programs = triton.cdiv(num_tokens, tile["BLOCK_T"])
    grid = (token_programs, triton.cdiv(num_channels, tile["BLOCK_C"]))
    launch_tile(KERNELS[kernel], grid, (*tensors, num_tokens, height, width, num_channels),
                {"ALIGN": alignment(num_channels)}, tile)


def launch_forward(x: Tensor, height: int, width: int, weight: Tensor, bias: Tensor) -> Tensor:
    """GELU(conv3x3(x) + bias) for x [B * H * W, C] contiguous."""
    y = torch.empty_like(x)
    _launch_stencil("forward", (x, weight, bias, y), height, width)
    return y


def launch_backward_dpre(grad: Tensor, x: Tensor, height: int, width: int, weight: Tensor, bias: Tensor) -> Tensor:
    """dpre = grad * GELU'(conv3x3(x) + bias), the gradient at the GELU input, in x's dtype."""
    dpre = torch.empty_like(x)
    _launch_stencil("backward_dpre", (x, weight, bias, grad, dpre), height, width)
    return dpre


def launch_backward_dwconv(dpre: Tensor, src: Tensor, height: int, width: int,
                           weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of conv3x3(src) + bias given dpre, the gradient at its output:
    (dsrc [tokens, C], dweight [C, 1, 3, 3], dbias [C]).

    The weight and bias gradients are reduced deterministically: one fp32 row of
    partial sums per program along the tokens, then one sum over those rows.
    """
    num_tokens, num_channels = dpre.shape
    token_programs = min(triton.cdiv(num_tokens, stencil_tile(num_channels)["BLOCK_T"]), MAX_TOKEN_PROGRAMS)
    dsrc = torch.empty_like(src)
    partial = torch.empty((token_programs, TAPS + 1, num_channels), device=src.device, dtype=torch.float32)
    _launch_stencil("backward_dwconv", (dpre, src, weight, dsrc, partial), height, width, token_programs)
    dweight = partial[:, :TAPS].sum(0).t().contiguous().view(num_channels, 1, 3, 3)
    dbias = partial[:, TAPS].sum(0)
    return dsrc, dweight.to(weight.dtype), dbias.to(weight.dtype)


# --------------------------------------------------------------------------- autograd op


@torch.library.custom_op("segformer::dwconv_gelu", mutates_args=())
@kernel_launcher
def _dwconv_gelu_op(x: Tensor, height: int, width: int, weight: Tensor, bias: Tensor) -> Tensor:
    batch, num_tokens, num_channels = x.shape
    y = launch_forward(x.reshape(-1, num_channels).contiguous(), height, width, weight.contiguous(), bias.contiguous())
    return y.view(batch, num_tokens, num_channels)


@_dwconv_gelu_op.register_fake
def _(x, height, width, weight, bias):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("segformer::dwconv_gelu_backward", mutates_args=())
@kernel_launcher
def _dwconv_gelu_backward_op(
    grad: Tensor, x: Tensor, height: int, width: int, weight: Tensor, bias: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    num_channels = x.shape[2]
    x2d = x.reshape(-1, num_channels).contiguous()
    weight = weight.contiguous()
    dpre = launch_backward_dpre(grad.reshape(-1, num_channels).contiguous(), x2d, height, width, weight,
                                bias.contiguous())
    dx, dweight, dbias = launch_backward_dwconv(dpre, x2d, height, width, weight)
    return dx.view(x.shape), dweight, dbias


@_dwconv_gelu_backward_op.register_fake
def _(grad, x, height, width, weight, bias):
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        torch.empty_like(weight, memory_format=torch.contiguous_format),
        torch.empty_like(bias, memory_format=torch.contiguous_format),
    )


def _setup_context(ctx, inputs, output):
    x, height, width, weight, bias = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.grid = (height, width)


def _backward_formula(ctx, grad):
    x, weight, bias = ctx.saved_tensors
    dx, dweight, dbias = _dwconv_gelu_backward_op(grad, x, *ctx.grid, weight, bias)
    return dx, None, None, dweight, dbias


_dwconv_gelu_op.register_autograd(_backward_formula, setup_context=_setup_context)


# --------------------------------------------------------------------------- public function


def dwconv_gelu(x: Tensor, hw: tuple[int, int], weight: Tensor, bias: Tensor) -> Tensor:
    """GELU(depthwise conv3x3(x), zero padding 1, + bias) in token layout.

    x [B, H*W, C], weight [C, 1, 3, 3], bias [C] -> [B, H*W, C] in x's dtype (fp32 math).
    """
    return _dwconv_gelu_op(x, hw[0], hw[1], weight, bias)


# --------------------------------------------------------------------------- compile targets

# Channel widths the model runs the conv on: the Mix-FFN hidden width 4C of every variant.
HIDDEN_WIDTHS = (128, 256, 512, 640, 1024, 1280, 2048)


def _launches():
    """Every (kernel, config, dtype) the launchers above launch for the model's widths."""
    for width, dtype, kernel in itertools.product(HIDDEN_WIDTHS, TRITON_DTYPES, KERNELS):
        yield Launch(kernel, dtype, stencil_tile(width), {"ALIGN": alignment(width)}, shape=f"C={width}")


def compile_targets() -> list[CompileTarget]:
    return build_targets("dwconv_gelu", KERNELS, _launches(), fp32_pointers={"partial_ptr"})
