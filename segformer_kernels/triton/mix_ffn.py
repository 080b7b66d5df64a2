"""Mix-FFN, fc2(GELU(dwconv3x3(fc1(x)))), with the 4C-wide GELU output never in memory.

Forward: h = fc1(x) (cuBLAS through torch), then one Triton GEMM for fc2 whose
A-operand tiles [tokens, hidden channels] are computed on the fly from h: the 3x3
neighbourhood of each token is read in token layout (neighbour rows are other
programs' tiles, so the halo comes from L1/L2), conv + bias + GELU happen in
registers, and the fc2 bias is added in the epilogue.

Backward recomputes instead of saving: autograd keeps x, the weights and h, nothing
else. With pre = dwconv(h) + b, a = GELU(pre) and dY the gradient of the output:
    d fc2_b = sum_t dY[t]
    d fc2_w = dY^T a           a GEMM over tokens, computed as (a^T dY)^T so that a,
                               recomputed from h, is the register (A) operand
    dpre    = (dY fc2_w) * GELU'(pre)
                               a GEMM whose epilogue recomputes pre from h
    dh, d dw_w, d dw_b         the transposed 3x3 conv of dpre (dwconv_gelu.launch_backward_dwconv)
    dx = dh fc1_w,  d fc1_w = dh^T x,  d fc1_b = sum_t dh   (torch matmuls)
Weight gradients are fp32 partial sums per program, reduced by one deterministic
sum (no atomics).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ..compile_check import CompileTarget, Launch, build_targets
from .dwconv_gelu import HIDDEN_WIDTHS, dwconv3x3_tile, gelu, gelu_grad, launch_backward_dwconv, token_grid_position
from .launch import (
    DTYPE_PRECISIONS, Tile, alignment, kernel_launcher, launch_tile, multiple_of, resolve_input_precision,
)

# Block names: BLOCK_T tokens, BLOCK_H hidden (4C) channels, BLOCK_CO output channels.

# --------------------------------------------------------------------------- kernels


@triton.jit
def _program_tile(num_rows, num_columns, BLOCK_ROWS: tl.constexpr, BLOCK_COLUMNS: tl.constexpr):
    """This program's rows and columns of a [num_rows, num_columns] result, with their
    masks. 1-D grid in which the column tiles of one row tile are consecutive programs,
    so they run together and share that row tile's loads."""
    column_tiles = tl.cdiv(num_columns, BLOCK_COLUMNS)
    pid = tl.program_id(0)
    rows = (pid // column_tiles) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    columns = (pid % column_tiles) * BLOCK_COLUMNS + tl.arange(0, BLOCK_COLUMNS)
    return rows, rows < num_rows, columns, columns < num_columns


@triton.jit
def _mix_ffn_forward_kernel(
    h_ptr, dw_weight_ptr, dw_bias_ptr, fc2_weight_ptr, fc2_bias_ptr, y_ptr,
    num_tokens, height, width, hidden, out_channels,
    BLOCK_T: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_H: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    ALIGN: tl.constexpr,
):
    """y[t, o] = sum_j a[t, j] fc2_w[o, j] + fc2_b[o], a recomputed tile by tile from h."""
    hidden = multiple_of(hidden, ALIGN)
    out_channels = multiple_of(out_channels, ALIGN)
    tokens, token_mask, outs, out_mask = _program_tile(num_tokens, out_channels, BLOCK_T, BLOCK_CO)
    row, col = token_grid_position(tokens, height, width)
    acc = tl.zeros([BLOCK_T, BLOCK_CO], dtype=tl.float32)
    for k in range(0, hidden, BLOCK_H):
        channels = k + tl.arange(0, BLOCK_H)
        channel_mask = channels < hidden
        a = gelu(dwconv3x3_tile(h_ptr, dw_weight_ptr, dw_bias_ptr, tokens, row, col, token_mask,
                                channels, channel_mask, height, width, hidden, BLOCK_T, BLOCK_H))
        w = tl.load(fc2_weight_ptr + outs[None, :] * hidden + channels[:, None],
                    mask=channel_mask[:, None] & out_mask[None, :], other=0.0)
        acc = tl.dot(a.to(w.dtype), w, acc, input_precision=INPUT_PRECISION)
    acc += tl.load(fc2_bias_ptr + outs, mask=out_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + tokens.to(tl.int64)[:, None] * out_channels + outs[None, :],
             acc.to(y_ptr.dtype.element_ty), mask=token_mask[:, None] & out_mask[None, :])


@triton.jit
def _mix_ffn_backward_fc2_weight_kernel(
    h_ptr, dw_weight_ptr, dw_bias_ptr, grad_ptr, partial_ptr,
    num_tokens, height, width, hidden, out_channels, tokens_per_split,
    BLOCK_H: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_T: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    ALIGN: tl.constexpr,
):
    """partial[s, o, j] = sum over split s's tokens t of dY[t, o] a[t, j], computed as
    (a^T dY)[j, o] so that the recomputed operand is the GEMM's A (register) operand."""
    hidden = multiple_of(hidden, ALIGN)
    out_channels = multiple_of(out_channels, ALIGN)
    channels, channel_mask, outs, out_mask = _program_tile(hidden, out_channels, BLOCK_H, BLOCK_CO)
    split = tl.program_id(1)
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, num_tokens)
    acc = tl.zeros([BLOCK_H, BLOCK_CO], dtype=tl.float32)
    for t in range(start, end, BLOCK_T):
        tokens = t + tl.arange(0, BLOCK_T)
        token_mask = tokens < end
        row, col = token_grid_position(tokens, height, width)
        a = gelu(dwconv3x3_tile(h_ptr, dw_weight_ptr, dw_bias_ptr, tokens, row, col, token_mask,
                                channels, channel_mask, height, width, hidden, BLOCK_T, BLOCK_H))
        # Masked tokens get a = GELU(bias), but their dY rows load as zero.
        grad = tl.load(grad_ptr + tokens.to(tl.int64)[:, None] * out_channels + outs[None, :],
                       mask=token_mask[:, None] & out_mask[None, :], other=0.0)
        acc = tl.dot(tl.trans(a.to(grad.dtype)), grad, acc, input_precision=INPUT_PRECISION)
    partial = partial_ptr + split.to(tl.int64) * out_channels * hidden
    tl.store(partial + outs[None, :] * hidden + channels[:, None], acc,
             mask=channel_mask[:, None] & out_mask[None, :])


@triton.jit
def _mix_ffn_backward_dpre_kernel(
    grad_ptr, fc2_weight_ptr, h_ptr, dw_weight_ptr, dw_bias_ptr, dpre_ptr,
    num_tokens, height, width, hidden, out_channels,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_CO: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    ALIGN: tl.constexpr,
):
    """dpre[t, j] = (sum_o dY[t, o] fc2_w[o, j]) * GELU'(pre[t, j]), pre recomputed from h
    in the epilogue: the gradient at the GELU input, the only 4C-wide tensor written."""
    hidden = multiple_of(hidden, ALIGN)
    out_channels = multiple_of(out_channels, ALIGN)
    tokens, token_mask, channels, channel_mask = _program_tile(num_tokens, hidden, BLOCK_T, BLOCK_H)
    grad_rows = grad_ptr + tokens.to(tl.int64)[:, None] * out_channels
    acc = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float32)
    for k in range(0, out_channels, BLOCK_CO):
        outs = k + tl.arange(0, BLOCK_CO)
        out_mask = outs < out_channels
        grad = tl.load(grad_rows + outs[None, :], mask=token_mask[:, None] & out_mask[None, :], other=0.0)
        w = tl.load(fc2_weight_ptr + outs[:, None] * hidden + channels[None, :],
                    mask=out_mask[:, None] & channel_mask[None, :], other=0.0)
        acc = tl.dot(grad, w, acc, input_precision=INPUT_PRECISION)
    row, col = token_grid_position(tokens, height, width)
    pre = dwconv3x3_tile(h_ptr, dw_weight_ptr, dw_bias_ptr, tokens, row, col, token_mask, channels, channel_mask,
                         height, width, hidden, BLOCK_T, BLOCK_H)
    tl.store(dpre_ptr + tokens.to(tl.int64)[:, None] * hidden + channels[None, :],
             (acc * gelu_grad(pre)).to(dpre_ptr.dtype.element_ty), mask=token_mask[:, None] & channel_mask[None, :])


KERNELS = {
    "forward": _mix_ffn_forward_kernel,
    "backward_fc2_weight": _mix_ffn_backward_fc2_weight_kernel,
    "backward_dpre": _mix_ffn_backward_dpre_kernel,
}


# --------------------------------------------------------------------------- launch configurations


def _output_block(out_channels: int) -> int:
    """One tile covers all of C_out up to 256 (C_out = 32..512 in the model): every
    extra output tile recomputes the conv + GELU operand once more."""
    return min(256, max(16, triton.next_power_of_2(out_channels)))


# Tiles are sized so that the conv operand (nine neighbour loads in flight per element)
# plus the fp32 accumulator fit the registers on sm_80 and sm_90 in every dtype, fp32
# "ieee" dots (the most registers) included; compile_check shows zero spills under
# triton 3.6 and 3.9. Eight warps spread a tile over 256 threads: about 100-150
# registers each instead of the 200-255 (and a few spills) that four warps need for the
# same tile. The weight gradient's widest tile (64 x 256 accumulator) gets sixteen: with
# eight, triton 3.6's ptxas keeps sm_80 at 128 registers and spills the exact fp32 variant.
def tile(kernel: str, out_channels: int) -> Tile:
    """The launch config of ``kernel`` for C_out output channels."""
    block_co = _output_block(out_channels)
    if kernel == "forward":
        return Tile.of(BLOCK_T=64, BLOCK_CO=block_co, BLOCK_H=32, num_warps=8, num_stages=2)
    if kernel == "backward_fc2_weight":
        widest = block_co >= 256
        return Tile.of(BLOCK_H=64, BLOCK_CO=block_co, BLOCK_T=16 if widest else 32, num_warps=16 if widest else 8,
                       num_stages=2)
    # the same tile for every C_out: C_out is this GEMM's reduction (loop) dimension
    return Tile.of(BLOCK_T=64, BLOCK_H=64, BLOCK_CO=32, num_warps=8, num_stages=2)


# The weight-gradient GEMM reduces over all tokens; it splits them so that there are
# about this many programs, but gives each split at least MIN_SPLIT_TOKENS tokens so
# the fp32 partial buffer [splits, C_out, 4C] stays small next to h.
TARGET_PROGRAMS = 512
MIN_SPLIT_TOKENS = 512


def token_splits(num_tokens: int, tiles: int, block_t: int) -> tuple[int, int]:
    """(number of splits, tokens per split, a multiple of block_t)."""
    blocks = triton.cdiv(num_tokens, block_t)
    wanted = max(1, min(triton.cdiv(TARGET_PROGRAMS, tiles), num_tokens // MIN_SPLIT_TOKENS))
    blocks_per_split = triton.cdiv(blocks, wanted)
    return triton.cdiv(blocks, blocks_per_split), blocks_per_split * block_t


# --------------------------------------------------------------------------- launchers
# They take tokens flattened to contiguous [B * H * W, channels] matrices.


def _launch(kernel: str, grid, args, config: Tile, input_precision: str, hidden: int, out_channels: int) -> None:
    constexprs = {"INPUT_PRECISION": input_precision, "ALIGN": alignment(hidden, out_channels)}
    launch_tile(KERNELS[kernel], grid, args, constexprs, config)


def launch_forward(h: Tensor, height: int, width: int, dw_weight: Tensor, dw_bias: Tensor,
                   fc2_weight: Tensor, fc2_bias: Tensor, input_precision: str) -> Tensor:
    """fc2(GELU(dwconv3x3(h) + dw_bias)) for h [tokens, 4C] -> [tokens, C_out]."""
    num_tokens, hidden = h.shape
    out_channels = fc2_weight.shape[0]
    config = tile("forward", out_channels)
    y = h.new_empty((num_tokens, out_channels))
    grid = (triton.cdiv(num_tokens, config["BLOCK_T"]) * triton.cdiv(out_channels, config["BLOCK_CO"]),)
    args = (h, dw_weight, dw_bias, fc2_weight, fc2_bias, y, num_tokens, height, width, hidden, out_channels)
    _launch("forward", grid, args, config, input_precision, hidden, out_channels)
    return y


def launch_backward_fc2_weight(grad: Tensor, h: Tensor, height: int, width: int, dw_weight: Tensor,
                               dw_bias: Tensor, input_precision: str) -> Tensor:
    """d fc2_w = dY^T GELU(dwconv3x3(h) + dw_bias): [C_out, 4C] in h's dtype."""
    num_tokens, hidden = h.shape
    out_channels = grad.shape[1]
    config = tile("backward_fc2_weight", out_channels)
    tiles = triton.cdiv(hidden, config["BLOCK_H"]) * triton.cdiv(out_channels, config["BLOCK_CO"])
    splits, tokens_per_split = token_splits(num_tokens, tiles, config["BLOCK_T"])
    partial = torch.empty((splits, out_channels, hidden), device=h.device, dtype=torch.float32)
    args = (h, dw_weight, dw_bias, grad, partial, num_tokens, height, width, hidden, out_channels, tokens_per_split)
    _launch("backward_fc2_weight", (tiles, splits), args, config, input_precision, hidden, out_channels)
    return partial.sum(0).to(h.dtype)


def launch_backward_dpre(grad: Tensor, h: Tensor, height: int, width: int, dw_weight: Tensor, dw_bias: Tensor,
                         fc2_weight: Tensor, input_precision: str) -> Tensor:
    """dpre = (dY fc2_w) * GELU'(dwconv3x3(h) + dw_bias), the gradient at the GELU input:
    [tokens, 4C] in h's dtype."""
    num_tokens, hidden = h.shape
    out_channels = grad.shape[1]
    config = tile("backward_dpre", out_channels)
    dpre = torch.empty_like(h)
    grid = (triton.cdiv(num_tokens, config["BLOCK_T"]) * triton.cdiv(hidden, config["BLOCK_H"]),)
    args = (grad, fc2_weight, h, dw_weight, dw_bias, dpre, num_tokens, height, width, hidden, out_channels)
    _launch("backward_dpre", grid, args, config, input_precision, hidden, out_channels)
    return dpre


# --------------------------------------------------------------------------- autograd op


@torch.library.custom_op("segformer::mix_ffn", mutates_args=())
@kernel_launcher
def _mix_ffn_op(
    x: Tensor, height: int, width: int, fc1_weight: Tensor, fc1_bias: Tensor, dw_weight: Tensor,
    dw_bias: Tensor, fc2_weight: Tensor, fc2_bias: Tensor, input_precision: str,
) -> tuple[Tensor, Tensor]:
    """(y, h): h = fc1(x) is returned so that autograd can keep it for the backward."""
    batch, num_tokens, _ = x.shape
    hidden = F.linear(x, fc1_weight, fc1_bias).contiguous()
    y = launch_forward(hidden.view(batch * num_tokens, -1), height, width, dw_weight.contiguous(),
                       dw_bias.contiguous(), fc2_weight.contiguous(), fc2_bias.contiguous(), input_precision)
    return y.view(batch, num_tokens, -1), hidden


@_mix_ffn_op.register_fake
def _(x, height, width, fc1_weight, fc1_bias, dw_weight, dw_bias, fc2_weight, fc2_bias, input_precision):
    batch, num_tokens, _ = x.shape
    return (x.new_empty((batch, num_tokens, fc2_weight.shape[0])),
            x.new_empty((batch, num_tokens, fc1_weight.shape[0])))


@torch.library.custom_op("segformer::mix_ffn_backward", mutates_args=())
@kernel_launcher
def _mix_ffn_backward_op(
    grad: Tensor, hidden: Tensor, height: int, width: int, dw_weight: Tensor, dw_bias: Tensor,
    fc2_weight: Tensor, input_precision: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dh, d dw_weight, d dw_bias, d fc2_weight, d fc2_bias) from dY and h."""
    h = hidden.reshape(-1, hidden.shape[2]).contiguous()
    grad = grad.reshape(h.shape[0], -1).contiguous()
    dw_weight, dw_bias = dw_weight.contiguous(), dw_bias.contiguous()
    d_fc2_weight = launch_backward_fc2_weight(grad, h, height, width, dw_weight, dw_bias, input_precision)
    d_fc2_bias = grad.sum(0, dtype=torch.float32).to(grad.dtype)
    dpre = launch_backward_dpre(grad, h, height, width, dw_weight, dw_bias, fc2_weight.contiguous(), input_precision)
    dh, d_dw_weight, d_dw_bias = launch_backward_dwconv(dpre, h, height, width, dw_weight)
    return dh.view(hidden.shape), d_dw_weight, d_dw_bias, d_fc2_weight, d_fc2_bias


@_mix_ffn_backward_op.register_fake
def _(grad, hidden, height, width, dw_weight, dw_bias, fc2_weight, input_precision):
    def new(t):
        return t.new_empty(t.shape)

    return new(hidden), new(dw_weight), new(dw_bias), new(fc2_weight), grad.new_empty((fc2_weight.shape[0],))


def _setup_context(ctx, inputs, output):
    x, height, width, fc1_weight, _, dw_weight, dw_bias, fc2_weight, _, input_precision = inputs
    _, hidden = output
    # h is returned only to be saved; it carries no gradient, and no zero gradient
    # the size of h should be made up for it.
    ctx.mark_non_differentiable(hidden)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, fc1_weight, dw_weight, dw_bias, fc2_weight, hidden)
    ctx.grid = (height, width)
    ctx.input_precision = input_precision


def _backward_formula(ctx, grad, _grad_hidden):
    x, fc1_weight, dw_weight, dw_bias, fc2_weight, hidden = ctx.saved_tensors
    dh, d_dw_weight, d_dw_bias, d_fc2_weight, d_fc2_bias = _mix_ffn_backward_op(
        grad, hidden, *ctx.grid, dw_weight, dw_bias, fc2_weight, ctx.input_precision
    )
    needs = ctx.needs_input_grad
    dx = torch.matmul(dh, fc1_weight) if needs[0] else None
    d_fc1_weight = dh.reshape(-1, dh.shape[2]).t() @ x.reshape(-1, x.shape[2]) if needs[3] else None
    d_fc1_bias = dh.sum((0, 1), dtype=torch.float32).to(dh.dtype) if needs[4] else None
    return dx, None, None, d_fc1_weight, d_fc1_bias, d_dw_weight, d_dw_bias, d_fc2_weight, d_fc2_bias, None


_mix_ffn_op.register_autograd(_backward_formula, setup_context=_setup_context)


# --------------------------------------------------------------------------- public function


def mix_ffn(
    x: Tensor, hw: tuple[int, int], fc1_weight: Tensor, fc1_bias: Tensor, dw_weight: Tensor, dw_bias: Tensor,
    fc2_weight: Tensor, fc2_bias: Tensor, *, input_precision: str | None = None,
) -> Tensor:
    """fc2(GELU(dwconv3x3(fc1(x)))) for x [B, H*W, C] -> [B, H*W, C_out] (inputs assumed
    checked, as ``segformer_kernels.mix_ffn`` checks them).

    ``input_precision``: how fp32 operands meet the tensor cores in the Triton GEMMs
    (see launch.resolve_input_precision); it does not apply to fp16/bf16.
    """
    input_precision = resolve_input_precision(x.dtype, input_precision)
    y, _ = _mix_ffn_op(x, hw[0], hw[1], fc1_weight, fc1_bias, dw_weight, dw_bias, fc2_weight, fc2_bias,
                       input_precision)
    return y


# --------------------------------------------------------------------------- compile targets

# Output widths of fc2: the stage widths C of every variant (hidden widths 4C are in
# dwconv_gelu.HIDDEN_WIDTHS).
OUTPUT_WIDTHS = (32, 64, 128, 160, 256, 320, 512)


def _launches():
    """Every (kernel, config, dtype, fp32 input precision) the launchers launch. The
    configs depend only on C_out; the hidden width 4C is a runtime loop bound, so every
    width in HIDDEN_WIDTHS runs the same compiled kernels (ALIGN covers them all: every
    model width is a multiple of 16)."""
    for kernel, out_channels, (dtype, precision) in itertools.product(KERNELS, OUTPUT_WIDTHS, DTYPE_PRECISIONS):
        constexprs = {"INPUT_PRECISION": precision, "ALIGN": alignment(out_channels, *HIDDEN_WIDTHS)}
        yield Launch(kernel, dtype, tile(kernel, out_channels), constexprs, shape=f"C_out={out_channels}")


def compile_targets() -> list[CompileTarget]:
    return build_targets("mix_ffn", KERNELS, _launches(), fp32_pointers={"partial_ptr"})
