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
    dh, d dw_w, d dw_b         the transposed 3x3 conv of dpre (shared with dwconv_gelu)
    dx = dh fc1_w,  d fc1_w = dh^T x,  d fc1_b = sum_t dh   (torch matmuls)
Weight gradients are fp32 partial sums per program, reduced by one deterministic
sum (no atomics).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ..compile_check import CompileTarget
from .dwconv_gelu import (
    HIDDEN_WIDTHS,
    dwconv3x3_tile,
    dwconv_transpose,
    gelu,
    gelu_grad,
    token_grid_position,
)
from .launch import TRITON_DTYPES, alignment, kernel_launcher, kernel_signature, multiple_of, resolve_input_precision

# Output widths of fc2: the stage widths C of every variant (hidden widths 4C are in
# dwconv_gelu.HIDDEN_WIDTHS).
OUTPUT_WIDTHS = (32, 64, 128, 160, 256, 320, 512)


@triton.jit
def _split_program_id(num_columns, BLOCK: tl.constexpr):
    """(row tile, column tile) of a 1-D grid in which the column tiles of one row tile
    are consecutive programs, so they run together and share that row tile's loads."""
    column_tiles = tl.cdiv(num_columns, BLOCK)
    pid = tl.program_id(0)
    return pid // column_tiles, pid % column_tiles


@triton.jit
def _fc2_forward_kernel(
    h_ptr, dw_weight_ptr, dw_bias_ptr, fc2_weight_ptr, fc2_bias_ptr, y_ptr,
    num_tokens, height, width, hidden, out_channels,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    ALIGN: tl.constexpr,
):
    """y[t, o] = sum_j a[t, j] fc2_w[o, j] + fc2_b[o], a recomputed tile by tile from h."""
    hidden = multiple_of(hidden, ALIGN)
    out_channels = multiple_of(out_channels, ALIGN)
    token_tile, out_tile = _split_program_id(out_channels, BLOCK_N)
    tokens = token_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    outs = out_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    token_mask = tokens < num_tokens
    out_mask = outs < out_channels
    row, col = token_grid_position(tokens, height, width)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, hidden, BLOCK_K):
        channels = k + tl.arange(0, BLOCK_K)
        channel_mask = channels < hidden
        a = gelu(dwconv3x3_tile(h_ptr, dw_weight_ptr, dw_bias_ptr, tokens, row, col, token_mask,
                                channels, channel_mask, height, width, hidden, BLOCK_M, BLOCK_K))
        w = tl.load(fc2_weight_ptr + outs[None, :] * hidden + channels[:, None],
                    mask=channel_mask[:, None] & out_mask[None, :], other=0.0)
        acc = tl.dot(a.to(w.dtype), w, acc, input_precision=INPUT_PRECISION)
    acc += tl.load(fc2_bias_ptr + outs, mask=out_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + tokens.to(tl.int64)[:, None] * out_channels + outs[None, :],
             acc.to(y_ptr.dtype.element_ty), mask=token_mask[:, None] & out_mask[None, :])


@triton.jit
def _fc2_weight_grad_kernel(
    h_ptr, dw_weight_ptr, dw_bias_ptr, grad_ptr, partial_ptr,
    num_tokens, height, width, hidden, out_channels, tokens_per_split,
    BLOCK_J: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_T: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    ALIGN: tl.constexpr,
):
    """partial[s, o, j] = sum over split s's tokens t of dY[t, o] a[t, j], computed as
    (a^T dY)[j, o] so that the recomputed operand is the GEMM's A (register) operand."""
    hidden = multiple_of(hidden, ALIGN)
    out_channels = multiple_of(out_channels, ALIGN)
    channel_tile, out_tile = _split_program_id(out_channels, BLOCK_O)
    channels = channel_tile * BLOCK_J + tl.arange(0, BLOCK_J)
    outs = out_tile * BLOCK_O + tl.arange(0, BLOCK_O)
    channel_mask = channels < hidden
    out_mask = outs < out_channels
    split = tl.program_id(1)
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, num_tokens)
    acc = tl.zeros([BLOCK_J, BLOCK_O], dtype=tl.float32)
    for t in range(start, end, BLOCK_T):
        tokens = t + tl.arange(0, BLOCK_T)
        token_mask = tokens < end
        row, col = token_grid_position(tokens, height, width)
        a = gelu(dwconv3x3_tile(h_ptr, dw_weight_ptr, dw_bias_ptr, tokens, row, col, token_mask,
                                channels, channel_mask, height, width, hidden, BLOCK_T, BLOCK_J))
        # Masked tokens get a = GELU(bias), but their dY rows load as zero.
        grad = tl.load(grad_ptr + tokens.to(tl.int64)[:, None] * out_channels + outs[None, :],
                       mask=token_mask[:, None] & out_mask[None, :], other=0.0)
        acc = tl.dot(tl.trans(a.to(grad.dtype)), grad, acc, input_precision=INPUT_PRECISION)
    partial = partial_ptr + split.to(tl.int64) * out_channels * hidden
    tl.store(partial + outs[None, :] * hidden + channels[:, None], acc,
             mask=channel_mask[:, None] & out_mask[None, :])


@triton.jit
def _fc2_input_grad_kernel(
    grad_ptr, fc2_weight_ptr, h_ptr, dw_weight_ptr, dw_bias_ptr, dpre_ptr,
    num_tokens, height, width, hidden, out_channels,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    ALIGN: tl.constexpr,
):
    """dpre[t, j] = (sum_o dY[t, o] fc2_w[o, j]) * GELU'(pre[t, j]), pre recomputed from h
    in the epilogue: the gradient at the GELU input, the only 4C-wide tensor written."""
    hidden = multiple_of(hidden, ALIGN)
    out_channels = multiple_of(out_channels, ALIGN)
    token_tile, channel_tile = _split_program_id(hidden, BLOCK_N)
    tokens = token_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    channels = channel_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    token_mask = tokens < num_tokens
    channel_mask = channels < hidden
    grad_rows = grad_ptr + tokens.to(tl.int64)[:, None] * out_channels
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, out_channels, BLOCK_K):
        outs = k + tl.arange(0, BLOCK_K)
        out_mask = outs < out_channels
        grad = tl.load(grad_rows + outs[None, :], mask=token_mask[:, None] & out_mask[None, :], other=0.0)
        w = tl.load(fc2_weight_ptr + outs[:, None] * hidden + channels[None, :],
                    mask=out_mask[:, None] & channel_mask[None, :], other=0.0)
        acc = tl.dot(grad, w, acc, input_precision=INPUT_PRECISION)
    row, col = token_grid_position(tokens, height, width)
    pre = dwconv3x3_tile(h_ptr, dw_weight_ptr, dw_bias_ptr, tokens, row, col, token_mask, channels, channel_mask,
                         height, width, hidden, BLOCK_M, BLOCK_N)
    tl.store(dpre_ptr + tokens.to(tl.int64)[:, None] * hidden + channels[None, :],
             (acc * gelu_grad(pre)).to(dpre_ptr.dtype.element_ty), mask=token_mask[:, None] & channel_mask[None, :])


# ---------------------------------------------------------------------------- configs and launchers
# Launchers take tokens flattened to contiguous [B * H * W, channels] matrices.

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

def forward_config(out_channels: int) -> dict[str, int]:
    return {"BLOCK_M": 64, "BLOCK_N": _output_block(out_channels), "BLOCK_K": 32, "num_warps": 8, "num_stages": 2}


def weight_grad_config(out_channels: int) -> dict[str, int]:
    block_o = _output_block(out_channels)
    widest = block_o >= 256
    return {"BLOCK_J": 64, "BLOCK_O": block_o, "BLOCK_T": 16 if widest else 32, "num_warps": 16 if widest else 8,
            "num_stages": 2}


def input_grad_config(out_channels: int) -> dict[str, int]:
    """The same tile for every C_out: C_out is this GEMM's reduction (loop) dimension."""
    return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 8, "num_stages": 2}


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


def _launch(kernel, grid, args, config: dict[str, int], input_precision: str, hidden: int, out_channels: int) -> None:
    constexprs = {k: v for k, v in config.items() if k.startswith("BLOCK_")}
    kernel[grid](*args, **constexprs, INPUT_PRECISION=input_precision, ALIGN=alignment(hidden, out_channels),
                 num_warps=config["num_warps"], num_stages=config["num_stages"])


def fc2_forward(h: Tensor, height: int, width: int, dw_weight: Tensor, dw_bias: Tensor,
                fc2_weight: Tensor, fc2_bias: Tensor, input_precision: str) -> Tensor:
    """fc2(GELU(dwconv3x3(h) + dw_bias)) for h [tokens, 4C] -> [tokens, C_out]."""
    num_tokens, hidden = h.shape
    out_channels = fc2_weight.shape[0]
    config = forward_config(out_channels)
    y = h.new_empty((num_tokens, out_channels))
    grid = (triton.cdiv(num_tokens, config["BLOCK_M"]) * triton.cdiv(out_channels, config["BLOCK_N"]),)
    _launch(_fc2_forward_kernel, grid, (h, dw_weight, dw_bias, fc2_weight, fc2_bias, y,
                                        num_tokens, height, width, hidden, out_channels), config, input_precision,
            hidden, out_channels)
    return y


def fc2_weight_grad(grad: Tensor, h: Tensor, height: int, width: int, dw_weight: Tensor, dw_bias: Tensor,
                    input_precision: str) -> Tensor:
    """d fc2_w = dY^T GELU(dwconv3x3(h) + dw_bias): [C_out, 4C] in h's dtype."""
    num_tokens, hidden = h.shape
    out_channels = grad.shape[1]
    config = weight_grad_config(out_channels)
    tiles = triton.cdiv(hidden, config["BLOCK_J"]) * triton.cdiv(out_channels, config["BLOCK_O"])
    splits, tokens_per_split = token_splits(num_tokens, tiles, config["BLOCK_T"])
    partial = torch.empty((splits, out_channels, hidden), device=h.device, dtype=torch.float32)
    _launch(_fc2_weight_grad_kernel, (tiles, splits),
            (h, dw_weight, dw_bias, grad, partial, num_tokens, height, width, hidden, out_channels, tokens_per_split),
            config, input_precision, hidden, out_channels)
    return partial.sum(0).to(h.dtype)


def fc2_input_grad(grad: Tensor, h: Tensor, height: int, width: int, dw_weight: Tensor, dw_bias: Tensor,
                   fc2_weight: Tensor, input_precision: str) -> Tensor:
    """dpre = (dY fc2_w) * GELU'(dwconv3x3(h) + dw_bias): [tokens, 4C] in h's dtype."""
    num_tokens, hidden = h.shape
    out_channels = grad.shape[1]
    config = input_grad_config(out_channels)
    dpre = torch.empty_like(h)
    grid = (triton.cdiv(num_tokens, config["BLOCK_M"]) * triton.cdiv(hidden, config["BLOCK_N"]),)
    _launch(_fc2_input_grad_kernel, grid, (grad, fc2_weight, h, dw_weight, dw_bias, dpre,
                                           num_tokens, height, width, hidden, out_channels), config, input_precision,
            hidden, out_channels)
    return dpre


# ---------------------------------------------------------------------------- autograd op

@torch.library.custom_op("segformer::mix_ffn", mutates_args=())
@kernel_launcher
def _mix_ffn_op(
    x: Tensor, height: int, width: int, fc1_weight: Tensor, fc1_bias: Tensor, dw_weight: Tensor,
    dw_bias: Tensor, fc2_weight: Tensor, fc2_bias: Tensor, input_precision: str,
) -> tuple[Tensor, Tensor]:
    """(y, h): h = fc1(x) is returned so that autograd can keep it for the backward."""
    batch, num_tokens, _ = x.shape
    hidden = F.linear(x, fc1_weight, fc1_bias).contiguous()
    y = fc2_forward(hidden.view(batch * num_tokens, -1), height, width, dw_weight.contiguous(),
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
    d_fc2_weight = fc2_weight_grad(grad, h, height, width, dw_weight, dw_bias, input_precision)
    d_fc2_bias = grad.sum(0, dtype=torch.float32).to(grad.dtype)
    dpre = fc2_input_grad(grad, h, height, width, dw_weight, dw_bias, fc2_weight.contiguous(), input_precision)
    dh, d_dw_weight, d_dw_bias = dwconv_transpose(dpre, h, height, width, dw_weight)
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
    dh, d_dw_weight, d_dw_bias, d_fc2_weight, d_fc2_bias = torch.ops.segformer.mix_ffn_backward(
        grad, hidden, *ctx.grid, dw_weight, dw_bias, fc2_weight, ctx.input_precision
    )
    needs = ctx.needs_input_grad
    dx = torch.matmul(dh, fc1_weight) if needs[0] else None
    d_fc1_weight = dh.reshape(-1, dh.shape[2]).t() @ x.reshape(-1, x.shape[2]) if needs[3] else None
    d_fc1_bias = dh.sum((0, 1), dtype=torch.float32).to(dh.dtype) if needs[4] else None
    return dx, None, None, d_fc1_weight, d_fc1_bias, d_dw_weight, d_dw_bias, d_fc2_weight, d_fc2_bias, None


_mix_ffn_op.register_autograd(_backward_formula, setup_context=_setup_context)


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


# ---------------------------------------------------------------------------- static compile targets

_KERNELS = {
    "fc2_forward": (_fc2_forward_kernel, forward_config),
    "fc2_weight_grad": (_fc2_weight_grad_kernel, weight_grad_config),
    "fc2_input_grad": (_fc2_input_grad_kernel, input_grad_config),
}


def compile_targets() -> list[CompileTarget]:
    """Every (kernel, config, dtype, fp32 input precision) the launchers launch. The
    configs depend only on C_out; the hidden width 4C is a runtime loop bound, so every
    width in HIDDEN_WIDTHS runs the same compiled kernels."""
    variants = [(dtype, "tf32") for dtype in TRITON_DTYPES] + [(torch.float32, "ieee")]
    targets = []
    for name, (kernel, config_of) in _KERNELS.items():
        widths_of_config: dict[tuple, list[int]] = {}
        for width in OUTPUT_WIDTHS:
            # ALIGN covers C_out and every hidden width (all multiples of 16 in the model).
            key = (*config_of(width).items(), ("ALIGN", alignment(width, *HIDDEN_WIDTHS)))
            widths_of_config.setdefault(key, []).append(width)
        for config_items, widths in widths_of_config.items():
            config = dict(config_items)
            constexprs = {k: v for k, v in config.items() if k.startswith("BLOCK_") or k == "ALIGN"}
            for dtype, precision in variants:
                dtype_name = TRITON_DTYPES[dtype]
                shown = " ".join(f"{k}={v}" for k, v in constexprs.items())
                targets.append(CompileTarget(
                    name=f"{name} {dtype_name}" + (f" {precision}" if dtype_name == "fp32" else ""),
                    kernel=kernel,
                    signature=kernel_signature(kernel, dtype, fp32_pointers={"partial_ptr"}),
                    constexprs={**constexprs, "INPUT_PRECISION": precision},
                    num_warps=config["num_warps"],
                    num_stages=config["num_stages"],
                    config=f"{shown} warps={config['num_warps']} C_out={widths}",
                ))
    return targets
