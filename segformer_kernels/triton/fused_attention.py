"""Efficient self-attention with its projections fused in, for C <= 128 (stages 1-2).

    y = o_proj(attention(q_proj(x), k, v)) = (softmax(q k^T * scale) v) Wo^T + bo,
    q = x Wq^T + bq, per head,

with x [B, N, C] the LayerNorm'd tokens, k, v [B, M, h, d] (h * d = C) from the
spatially reduced sequence, Wq and Wo [C, C]. One program owns a query tile and all
its heads: it computes each head's q from the x tile (prologue), runs the flash loop
of ``attention`` against that head's keys, and accumulates o_h Wo[:, head]^T
(epilogue), so neither q nor o reaches memory in inference. Per query token the
forward moves 4C bytes (16-bit: x in, y out) where q_proj + core + o_proj move 12C.

Training saves o and the row log-sum-exp (as the plain core does) and nothing else:
    dO_h  = dY Wo[:, head]                   recomputed per query tile
    dQ_h  = scale * sum_j dS_j K_j             (attention_core.attention_dq)
    dX    = sum_h dQ_h Wq[head]                in the same program (after the key
                                               loops, from the dQ tiles it stored), then
    dWq   = dQ^T X,  dWo = dY^T O              two cuBLAS GEMMs over all tokens
    dbq, dbo                                   fp32 per-program partial sums
    dK, dV                                     attention's dK/dV kernel, with q and dO
                                               recomputed from x and dY
Only dQ (for the dWq GEMM) and dX are written. The weight gradients are GEMMs over
B*N tokens with [C, C] results; accumulating them in the kernel instead would need
either 2C^2 fp32 of partials per program (at C = 64 and 64 query rows, 1 KB a token,
more than everything else) or [C, C] register accumulators per head.

Why LN1 and the residual add stay outside (bench/notes/attention_fusion.md counts
it): the model already fuses each residual add into the LayerNorm that follows it,
and LN1's output must reach memory anyway for the spatial reduction, so moving either
into this kernel saves no bytes.

Where the kernels run is ``fused_kernels_run``: C <= 128 (past that the [C, C] weights
no longer fit beside the tiles) with C and d multiples of 16 (aligned rows; every
SegFormer stage), and fp32 only up to C = 64. Elsewhere ``fused_attention``
runs q_proj and o_proj through cuBLAS around the plain attention core.
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import reference
from ..compile_check import CompileTarget, Launch, build_targets
from . import attention_core as core
from .attention import SCALE_ARGUMENTS, efficient_attention
from .launch import (
    DTYPE_PRECISIONS, Tile, alignment, kernel_launcher, launch_configs, launch_tiled, multiple_of,
    resolve_input_precision,
)

MAX_FUSED_CHANNELS = 128
MAX_FP32_CHANNELS = 64


# --------------------------------------------------------------------------- kernels


@triton.jit
def _query_weight(WQ, BQ, head, C, chans, dims, HEAD_DIM: tl.constexpr):
    """Wq[head]^T as a [BLOCK_C, BLOCK_D] tile and bq[head] as fp32 [BLOCK_D]."""
    w_t = core.load_tile(WQ + head * HEAD_DIM * C, chans, C, 1, dims, HEAD_DIM, C)
    bias = tl.load(BQ + head * HEAD_DIM + dims, mask=dims < HEAD_DIM, other=0.0).to(tl.float32)
    return w_t, bias


@triton.jit
def _project_queries(x, w_t, bias, rows, N, INPUT_PRECISION: tl.constexpr):
    """q = x Wq[head]^T + bq[head] for one token tile, in x's dtype as q_proj writes it.
    Rows past N are set to zero rather than to the bias, so that their scores are zero
    and everything computed from them stays finite."""
    q = tl.dot(x, w_t, input_precision=INPUT_PRECISION) + bias[None, :]
    return tl.where(rows[:, None] < N, q, 0.0).to(x.dtype)


@triton.jit
def _output_weight(WO, head, C, chans, dims, HEAD_DIM: tl.constexpr):
    """Wo[:, head] as a [BLOCK_C, BLOCK_D] tile."""
    return core.load_tile(WO + head * HEAD_DIM, chans, C, C, dims, HEAD_DIM, 1)


@triton.jit
def _query_tile(N, C, ALIGN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """A per-query-tile program's batch, token rows, channel and head-dim ranges, the
    offset of its batch's [N, C] tokens (1-D grid, query blocks fastest), and C as a
    multiple of ALIGN (the launcher checked it is one)."""
    C = multiple_of(C, ALIGN)
    pid_n, batch = core.query_block_and_head(N, BLOCK_N)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return batch, rows, tl.arange(0, BLOCK_C), tl.arange(0, BLOCK_D), batch.to(tl.int64) * N * C, C


@triton.jit
def _fused_attention_forward_kernel(
    X, WQ, BQ, K, V, WO, BO, Y, O, LSE,
    stride_kb, stride_km, stride_kh, stride_kd,
    stride_vb, stride_vm, stride_vh, stride_vd,
    N, M, C, heads, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, ALIGN: tl.constexpr, CONTIGUOUS_D: tl.constexpr,
    SAVE_FOR_BACKWARD: tl.constexpr,
):
    """One program per (query block, batch), all heads. X, Y, O are contiguous
    ([B, N, C]; O as [B, N, h, d]); qk_scale = scale * log2(e)."""
    batch, rows, chans, dims, tokens, C = _query_tile(N, C, ALIGN, BLOCK_N, BLOCK_C, BLOCK_D)

    x = core.load_tile(X + tokens, rows, N, C, chans, C, 1)
    acc = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
    for head in range(heads):
        w_t, bias = _query_weight(WQ, BQ, head, C, chans, dims, HEAD_DIM)
        q = _project_queries(x, w_t, bias, rows, N, INPUT_PRECISION)
        k_base, k_token_stride, k_dim_stride = core.head_view(K, batch, head, stride_kb, stride_km, stride_kh,
                                                              stride_kd, ALIGN, CONTIGUOUS_D)
        v_base, v_token_stride, v_dim_stride = core.head_view(V, batch, head, stride_vb, stride_vm, stride_vh,
                                                              stride_vd, ALIGN, CONTIGUOUS_D)
        out, lse = core.attend(q, k_base, v_base, k_token_stride, k_dim_stride, v_token_stride, v_dim_stride, M,
                               qk_scale, dims, HEAD_DIM, BLOCK_M, INPUT_PRECISION)
        # o reaches o_proj in the input dtype, as the unfused core writes it
        out = out.to(x.dtype)
        if SAVE_FOR_BACKWARD:
            core.store_tile(O + tokens + head * HEAD_DIM, out, rows, N, C, dims, HEAD_DIM, 1)
            tl.store(LSE + tl.cast(batch * heads + head, tl.int64) * N + rows, lse, mask=rows < N)
        w_o = _output_weight(WO, head, C, chans, dims, HEAD_DIM)
        acc = tl.dot(out, tl.trans(w_o), acc, input_precision=INPUT_PRECISION)
    acc += tl.load(BO + chans, mask=chans < C, other=0.0).to(tl.float32)[None, :]
    core.store_tile(Y + tokens, acc, rows, N, C, chans, C, 1)


@triton.jit
def _fused_attention_backward_dx_kernel(
    X, WQ, BQ, K, V, WO, O, DY, LSE, DELTA, DQ, DX, DBQ, DBO,
    stride_kb, stride_km, stride_kh, stride_kd,
    stride_vb, stride_vm, stride_vh, stride_vd,
    N, M, C, heads, scale, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, ALIGN: tl.constexpr, CONTIGUOUS_D: tl.constexpr,
):
    """One program per (query block, batch), all heads: per head dO from dY, delta =
    rowsum(dO * O) (stored for the dK/dV kernel), dQ (stored for the dWq GEMM) and its
    share of dX; then dX, and this program's column sums of dQ and dY into row
    ``program`` of the fp32 bias-gradient partials DBQ and DBO [programs, C]."""
    batch, rows, chans, dims, tokens, C = _query_tile(N, C, ALIGN, BLOCK_N, BLOCK_C, BLOCK_D)
    partials = tl.program_id(0).to(tl.int64) * C

    # x, dY and the weights are loaded where needed (L1/L2 hits) rather than held in
    # registers across the key loop.
    for head in range(heads):
        w_t, bias = _query_weight(WQ, BQ, head, C, chans, dims, HEAD_DIM)
        q = _project_queries(core.load_tile(X + tokens, rows, N, C, chans, C, 1), w_t, bias, rows, N, INPUT_PRECISION)
        dy = core.load_tile(DY + tokens, rows, N, C, chans, C, 1)
        do = tl.dot(dy, _output_weight(WO, head, C, chans, dims, HEAD_DIM), input_precision=INPUT_PRECISION)
        do = do.to(dy.dtype)
        o = core.load_tile(O + tokens + head * HEAD_DIM, rows, N, C, dims, HEAD_DIM, 1)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        stats = tl.cast(batch * heads + head, tl.int64) * N + rows
        tl.store(DELTA + stats, delta, mask=rows < N)
        lse2 = tl.load(LSE + stats, mask=rows < N, other=0.0) * core.LOG2E_IN_KERNEL
        k_base, k_token_stride, k_dim_stride = core.head_view(K, batch, head, stride_kb, stride_km, stride_kh,
                                                              stride_kd, ALIGN, CONTIGUOUS_D)
        v_base, v_token_stride, v_dim_stride = core.head_view(V, batch, head, stride_vb, stride_vm, stride_vh,
                                                              stride_vd, ALIGN, CONTIGUOUS_D)
        # Rows past N have q = 0, lse = 0 and dO = 0, so their dQ is exactly zero.
        dq = scale * core.attention_dq(q, do, delta, lse2, k_base, v_base, k_token_stride, k_dim_stride,
                                       v_token_stride, v_dim_stride, M, qk_scale, dims, HEAD_DIM, BLOCK_M,
                                       INPUT_PRECISION)
        core.store_tile(DQ + tokens + head * HEAD_DIM, dq, rows, N, C, dims, HEAD_DIM, 1)
        tl.store(DBQ + partials + head * HEAD_DIM + dims, tl.sum(dq, 0), mask=dims < HEAD_DIM)
    # dX = sum_h dQ_h Wq[head], from the dQ tiles just stored (in the input dtype, as the
    # dX GEMM would read them; L1/L2 hits) rather than from a [BLOCK_N, BLOCK_C] fp32
    # accumulator kept live through every key loop, which forced 32-row tiles at C >= 64.
    # The barrier: other threads of this program stored those elements.
    tl.debug_barrier()
    dx = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
    for head in range(heads):
        dq = core.load_tile(DQ + tokens + head * HEAD_DIM, rows, N, C, dims, HEAD_DIM, 1)
        w_q = core.load_tile(WQ + head * HEAD_DIM * C, dims, HEAD_DIM, C, chans, C, 1)  # Wq[head], [BLOCK_D, BLOCK_C]
        dx = tl.dot(dq, w_q, dx, input_precision=INPUT_PRECISION)
    core.store_tile(DX + tokens, dx, rows, N, C, chans, C, 1)
    dy = core.load_tile(DY + tokens, rows, N, C, chans, C, 1)
    tl.store(DBO + partials + chans, tl.sum(dy.to(tl.float32), 0), mask=chans < C)


@triton.jit
def _fused_attention_backward_dkdv_kernel(
    X, WQ, BQ, K, V, WO, DY, LSE, DELTA, DK, DV,
    stride_kb, stride_km, stride_kh, stride_kd,
    stride_vb, stride_vm, stride_vh, stride_vd,
    stride_ds, stride_db, stride_dm, stride_dh, stride_dd,
    N, M, C, heads, rows_per_split, scale, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, ALIGN: tl.constexpr, CONTIGUOUS_D: tl.constexpr,
):
    """attention's dK/dV program (key block, query split, batch*head), with each query
    tile's q and dO recomputed from x and dY instead of read."""
    split, pid_bh, batch, head, keys, dims = core.key_program(N, M, heads, rows_per_split, BLOCK_M, BLOCK_D)
    C = multiple_of(C, ALIGN)
    chans = tl.arange(0, BLOCK_C)
    row_range = tl.arange(0, BLOCK_N)
    tokens = batch.to(tl.int64) * N * C
    stats_base = pid_bh.to(tl.int64) * N

    k = core.load_head_rows(K, batch, head, stride_kb, stride_km, stride_kh, stride_kd, keys, M, dims,
                            HEAD_DIM, ALIGN, CONTIGUOUS_D)
    v = core.load_head_rows(V, batch, head, stride_vb, stride_vm, stride_vh, stride_vd, keys, M, dims,
                            HEAD_DIM, ALIGN, CONTIGUOUS_D)
    w_t, bias = _query_weight(WQ, BQ, head, C, chans, dims, HEAD_DIM)
    w_o = _output_weight(WO, head, C, chans, dims, HEAD_DIM)

    dk = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    row_start, row_end = core.split_rows(split, rows_per_split, N)
    # Rows past N: q = 0 (see _project_queries), dO = 0, lse = delta = 0, so they add
    # nothing (as in attention's dK/dV kernel).
    for start_n in range(row_start, row_end, BLOCK_N):
        rows = start_n + row_range
        x = core.load_tile(X + tokens, rows, N, C, chans, C, 1)
        q = _project_queries(x, w_t, bias, rows, N, INPUT_PRECISION)
        dy = core.load_tile(DY + tokens, rows, N, C, chans, C, 1)
        do = tl.dot(dy, w_o, input_precision=INPUT_PRECISION).to(dy.dtype)
        lse2 = tl.load(LSE + stats_base + rows, mask=rows < N, other=0.0) * core.LOG2E_IN_KERNEL
        delta = tl.load(DELTA + stats_base + rows, mask=rows < N, other=0.0)
        dk, dv = core.accumulate_dkdv(k, v, tl.trans(q), do, lse2, delta, dk, dv, qk_scale, INPUT_PRECISION)

    core.store_key_partials(DK, DV, dk * scale, dv, split, batch, head, stride_ds, stride_db, stride_dm, stride_dh,
                            stride_dd, keys, M, dims, HEAD_DIM, ALIGN, CONTIGUOUS_D)


KERNELS = {"forward": _fused_attention_forward_kernel, "backward_dx": _fused_attention_backward_dx_kernel,
           "backward_dkdv": _fused_attention_backward_dkdv_kernel}


# --------------------------------------------------------------------------- launch configurations

# Every table maps a kernel to {(BLOCK_C, BLOCK_D): autotune candidates}; a shape takes
# the set of the smallest listed shape that covers it (so a set listed only under
# (128, 64) serves every stage). core.tile(query rows, key rows, warps, stages). Every
# candidate listed for a stage shape compiles with zero spills for sm_80 and sm_90 under
# triton 3.6 and 3.9 (compile_targets() lists them), except where a comment says no tile
# can. ptxas's register use is far from monotonic in the tile size (it also trades
# registers for occupancy on its own), so each set is what passed, not a rule.

# 16-bit inputs, by the stage shapes of STAGE_SHAPES: (C, heads) = (32, 1), (64, 1),
# (64, 2), (128, 2). Query tiles of 64+ rows where they fit (sm_90 takes HGMMA only for
# dots of 64+ rows). backward_dx at d = 64 holds q, dO and the dQ accumulator across
# the key loop: at C = 64 one 64-row tile fits (255 registers on sm_80, no margin), at
# C = 128 (two heads) every 64-row tile tried spills, so it gets 32- and 16-row tiles.
# dK/dV wants 64+ key rows for HGMMA.
HALF_TILES = {
    "forward": {
        (32, 32): (core.tile(128, 64, 8, 2), core.tile(64, 64, 8, 2), core.tile(64, 32, 4, 2)),
        (64, 64): (core.tile(64, 32, 4, 2), core.tile(128, 32, 8, 2), core.tile(64, 32, 8, 2)),
        (64, 32): (core.tile(128, 64, 8, 2), core.tile(64, 64, 4, 2), core.tile(128, 32, 8, 2)),
        (128, 64): (core.tile(64, 16, 8, 2), core.tile(32, 64, 8, 2), core.tile(32, 32, 4, 2)),
    },
    "backward_dx": {
        (32, 32): (core.tile(64, 32, 4, 2), core.tile(64, 64, 8, 2), core.tile(128, 32, 8, 2)),
        (64, 64): (core.tile(64, 32, 8, 2), core.tile(32, 32, 8, 2), core.tile(32, 64, 8, 2)),
        (64, 32): (core.tile(64, 32, 4, 2), core.tile(64, 32, 8, 2), core.tile(64, 16, 8, 2)),
        (128, 64): (core.tile(32, 32, 8, 1), core.tile(32, 64, 8, 1)),
    },
    "backward_dkdv": {
        (32, 32): (core.tile(64, 64, 4, 2), core.tile(64, 128, 8, 2), core.tile(32, 64, 4, 2)),
        (64, 64): (core.tile(32, 64, 4, 2), core.tile(32, 128, 8, 2), core.tile(32, 64, 8, 3)),
        (64, 32): (core.tile(64, 64, 4, 2), core.tile(64, 128, 8, 2), core.tile(64, 64, 8, 2)),
        (128, 64): (core.tile(32, 64, 8, 2), core.tile(16, 64, 4, 2), core.tile(32, 32, 4, 2)),
    },
}
# fp32 (up to MAX_FP32_CHANNELS, see fused_kernels_run): one config per kernel and dot
# precision, clean at every shape. fp32 tiles take twice the registers of 16-bit ones,
# hence 8 warps and 16-32 query rows. Exact ("ieee") dots run on the FMA units (the
# tests' path), and an FMA tl.dot holds each thread's rows and columns of both operands
# over the whole reduction, so the C-long projections need the smallest tiles.
TF32_TILES = {
    "forward": {(64, 64): (core.tile(32, 32, 8, 2),)},
    "backward_dx": {(64, 64): (core.tile(16, 32, 8, 2),)},
    "backward_dkdv": {(64, 64): (core.tile(32, 32, 8, 2),)},
}
IEEE_TILES = {
    "forward": {(64, 64): (core.tile(16, 16, 8, 2),)},
    "backward_dx": {(64, 64): (core.tile(16, 32, 8, 1),)},
    "backward_dkdv": {(64, 64): (core.tile(16, 16, 8, 1),)},
}


def _block_c(channels: int) -> int:
    return max(16, triton.next_power_of_2(channels))


def tiles(kernel: str, channels: int, head_dim: int, dtype: torch.dtype, input_precision: str) -> tuple[Tile, ...]:
    """The configs the launcher autotunes over on a GPU."""
    if dtype == torch.float32:
        table = (IEEE_TILES if input_precision == "ieee" else TF32_TILES)[kernel]
    else:
        table = HALF_TILES[kernel]
    shape = (_block_c(channels), core.block_d(head_dim))
    larger = [s for s in table if s[0] >= shape[0] and s[1] >= shape[1]]
    return table[min(larger) if larger else max(table)]


def fused_kernels_run(channels: int, head_dim: int, dtype: torch.dtype) -> bool:
    """Whether the fused kernels take this shape (compile_targets() lists these): C up to
    MAX_FUSED_CHANNELS with C and d multiples of 16, so that token and weight rows load as
    aligned vectors (without those hints, every tile tried spills at C = 128), and fp32
    only up to MAX_FP32_CHANNELS (at C = 128 the fp32 backward spills with every tile
    tried; fp32 is the accuracy path, not the fast one). Everything else, SegFormer's
    stages 3-4 among it, runs the projections through cuBLAS around the attention kernel."""
    if channels > MAX_FUSED_CHANNELS or channels % 16 or head_dim % 16:
        return False
    return dtype != torch.float32 or channels <= MAX_FP32_CHANNELS


def _aligned(t: Tensor) -> bool:
    """Head dim contiguous and every other stride a multiple of 16 elements."""
    return t.stride(-1) == 1 and alignment(*t.stride()[:-1]) == 16


def _constexprs(x: Tensor, k: Tensor, input_precision: str) -> dict[str, object]:
    channels, head_dim = x.shape[-1], k.shape[-1]
    return {
        "HEAD_DIM": head_dim, "BLOCK_D": core.block_d(head_dim), "BLOCK_C": _block_c(channels),
        "INPUT_PRECISION": input_precision, "ALIGN": 16, "CONTIGUOUS_D": True,
    }


# --------------------------------------------------------------------------- launchers


def _launch(kernel: str, grid, args, constexprs: dict, x: Tensor, m: int, reset_to_zero: tuple[str, ...] = ()) -> None:
    configs = _configs(kernel, constexprs, x)
    # the sizes a config choice depends on, and every constexpr (each is its own compile)
    launch_tiled(KERNELS[kernel], grid, args, constexprs, configs, ("C", *constexprs), m, reset_to_zero)


def _configs(kernel: str, constexprs: dict, x: Tensor) -> tuple[Tile, ...]:
    return launch_configs(tiles(kernel, x.shape[-1], constexprs["HEAD_DIM"], x.dtype, constexprs["INPUT_PRECISION"]))


def _query_grid(n: int, batch: int):
    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]) * batch,)

    return grid


def launch_forward(
    x: Tensor, q_weight: Tensor, q_bias: Tensor, k: Tensor, v: Tensor, out_weight: Tensor, out_bias: Tensor,
    scale: float, input_precision: str, save_for_backward: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    batch, n, channels = x.shape
    m, heads, head_dim = k.shape[1:]
    x = x.contiguous()
    y = torch.empty_like(x)
    if save_for_backward:
        out = torch.empty((batch, n, heads, head_dim), dtype=x.dtype, device=x.device)
        lse = torch.empty((batch, heads, n), dtype=torch.float32, device=x.device)
    else:  # never written: SAVE_FOR_BACKWARD=False compiles the stores out
        out = x.new_empty(0)
        lse = x.new_empty(0, dtype=torch.float32)
    args = (
        x, q_weight.contiguous(), q_bias, k, v, out_weight.contiguous(), out_bias, y, out, lse,
        *k.stride(), *v.stride(), n, m, channels, heads, scale * core.LOG2E,
    )
    constexprs = {**_constexprs(x, k, input_precision), "SAVE_FOR_BACKWARD": save_for_backward}
    _launch("forward", _query_grid(n, batch), args, constexprs, x, m)
    return y, out, lse


def launch_backward(
    grad_y: Tensor, x: Tensor, q_weight: Tensor, q_bias: Tensor, k: Tensor, v: Tensor, out_weight: Tensor,
    out: Tensor, lse: Tensor, scale: float, input_precision: str,
) -> tuple[Tensor, ...]:
    batch, n, channels = x.shape
    m, heads, _ = k.shape[1:]
    x, grad_y = x.contiguous(), grad_y.contiguous()
    q_weight, out_weight = q_weight.contiguous(), out_weight.contiguous()
    grad_q = torch.empty_like(x)
    grad_x = torch.empty_like(x)
    delta = torch.empty((batch, heads, n), dtype=torch.float32, device=x.device)
    constexprs = _constexprs(x, k, input_precision)
    # One row per program, sized for the smallest tile the autotuner may pick and zeroed,
    # so that the rows a larger tile leaves unused add nothing to the sums. The autotuner
    # zeroes them again before each candidate's benchmark run and before the winner's
    # run (reset_to_zero): a benchmark run of a smaller tile fills rows that the winner
    # does not write.
    programs = triton.cdiv(n, min(t["BLOCK_N"] for t in _configs("backward_dx", constexprs, x))) * batch
    partial_q_bias = torch.zeros((programs, channels), dtype=torch.float32, device=x.device)
    partial_out_bias = torch.zeros_like(partial_q_bias)
    dx_args = (
        x, q_weight, q_bias, k, v, out_weight, out, grad_y, lse, delta, grad_q, grad_x,
        partial_q_bias, partial_out_bias, *k.stride(), *v.stride(), n, m, channels, heads, scale, scale * core.LOG2E,
    )
    _launch("backward_dx", _query_grid(n, batch), dx_args, constexprs, x, m, reset_to_zero=("DBQ", "DBO"))

    rows_per_split, partial_k, partial_v = core.key_gradient_partials(k, n)
    splits = partial_k.shape[0]

    def dkdv_grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * splits * batch * heads,)

    dkdv_args = (
        x, q_weight, q_bias, k, v, out_weight, grad_y, lse, delta, partial_k, partial_v,
        *k.stride(), *v.stride(), *partial_k.stride(), n, m, channels, heads, rows_per_split, scale, scale * core.LOG2E,
    )
    _launch("backward_dkdv", dkdv_grid, dkdv_args, constexprs, x, m)
    grad_k, grad_v = core.sum_key_partials(partial_k, partial_v, k.dtype)

    tokens_x, tokens_dq = x.reshape(-1, channels), grad_q.reshape(-1, channels)
    grad_q_weight = tokens_dq.t() @ tokens_x
    grad_out_weight = grad_y.reshape(-1, channels).t() @ out.reshape(-1, channels)
    grad_q_bias = partial_q_bias.sum(0).to(q_bias.dtype)
    grad_out_bias = partial_out_bias.sum(0).to(q_bias.dtype)
    return grad_x, grad_q_weight, grad_q_bias, grad_k, grad_v, grad_out_weight, grad_out_bias


# --------------------------------------------------------------------------- autograd op


@torch.library.custom_op("segformer::fused_attention", mutates_args=())
@kernel_launcher
def _fused_attention_op(
    x: Tensor, q_weight: Tensor, q_bias: Tensor, k: Tensor, v: Tensor, out_weight: Tensor, out_bias: Tensor,
    scale: float, input_precision: str, save_for_backward: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (y [B, N, C], o [B, N, h, d], row log-sum-exp fp32 [B, h, N]); o and the
    log-sum-exp are what the backward needs, empty unless ``save_for_backward``."""
    return launch_forward(x, q_weight, q_bias, k, v, out_weight, out_bias, scale, input_precision, save_for_backward)


@_fused_attention_op.register_fake
def _fused_attention_op_fake(x, q_weight, q_bias, k, v, out_weight, out_bias, scale, input_precision,
                             save_for_backward):
    batch, n, _ = x.shape
    heads, head_dim = k.shape[2:]
    if not save_for_backward:
        return x.new_empty(x.shape), x.new_empty(0), x.new_empty(0, dtype=torch.float32)
    return (
        x.new_empty(x.shape), x.new_empty((batch, n, heads, head_dim)),
        x.new_empty((batch, heads, n), dtype=torch.float32),
    )


@torch.library.custom_op("segformer::fused_attention_backward", mutates_args=())
@kernel_launcher
def _fused_attention_backward_op(
    grad_y: Tensor, x: Tensor, q_weight: Tensor, q_bias: Tensor, k: Tensor, v: Tensor, out_weight: Tensor,
    out: Tensor, lse: Tensor, scale: float, input_precision: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return launch_backward(grad_y, x, q_weight, q_bias, k, v, out_weight, out, lse, scale, input_precision)


@_fused_attention_backward_op.register_fake
def _fused_attention_backward_op_fake(grad_y, x, q_weight, q_bias, k, v, out_weight, out, lse, scale,
                                      input_precision):
    return tuple(t.new_empty(t.shape) for t in (x, q_weight, q_bias, k, v, out_weight, q_bias))


def _setup_context(ctx, inputs, output):
    x, q_weight, q_bias, k, v, out_weight, _, scale, input_precision, _ = inputs
    _, out, lse = output
    ctx.save_for_backward(x, q_weight, q_bias, k, v, out_weight, out, lse)
    ctx.scale = scale
    ctx.input_precision = input_precision
    ctx.mark_non_differentiable(out, lse)


def _backward_formula(ctx, grad_y, _grad_out, _grad_lse):
    grads = _fused_attention_backward_op(grad_y, *ctx.saved_tensors, ctx.scale, ctx.input_precision)
    return (*grads, None, None, None)


_fused_attention_op.register_autograd(_backward_formula, setup_context=_setup_context)


# --------------------------------------------------------------------------- public function


def fused_attention(
    x: Tensor, q_weight: Tensor, q_bias: Tensor, k: Tensor, v: Tensor, out_weight: Tensor, out_bias: Tensor,
    scale: float | None = None, *, input_precision: str | None = None,
) -> Tensor:
    """o_proj(attention(q_proj(x), k, v)) on the Triton kernels: x [B, N, C], k and v
    [B, M, h, d] (any strides, h * d = C), weights [C, C], biases [C] -> [B, N, C].

    Inputs are assumed checked (``segformer_kernels.fused_attention`` checks them);
    ``input_precision`` as in ``attention.efficient_attention``."""
    heads, head_dim = k.shape[2:]
    scale = head_dim**-0.5 if scale is None else float(scale)
    input_precision = resolve_input_precision(x.dtype, input_precision)
    if not fused_kernels_run(x.shape[-1], head_dim, x.dtype):
        return reference.projected_attention(
            x, q_weight, q_bias, k, v, out_weight, out_bias, scale,
            attention=lambda q, k, v, scale: efficient_attention(q, k, v, scale, input_precision=input_precision),
        )
    # The kernels assume aligned k and v (fused_kernels_run); the projections' outputs
    # are, and copying the M reduced tokens otherwise costs little.
    k, v = (t if _aligned(t) else t.contiguous() for t in (k, v))
    inputs = (x, q_weight, q_bias, k, v, out_weight, out_bias)
    # o and the log-sum-exp are written only when a backward can follow
    save_for_backward = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
    y, _, _ = _fused_attention_op(*inputs, scale, input_precision, save_for_backward)
    return y


# --------------------------------------------------------------------------- compile targets

_TENSOR_POINTERS = {"X", "WQ", "BQ", "K", "V", "WO", "BO", "Y", "O", "DY", "DQ", "DX", "DK", "DV"}
_STAT_POINTERS = {"LSE", "DELTA", "DBQ", "DBO"}  # fp32 row statistics and bias-gradient partials
# (C, heads) of stages 1-2 of every variant: B0 32/1 and 64/2, B1-B5 64/1 and 128/2.
STAGE_SHAPES = ((32, 1), (64, 1), (64, 2), (128, 2))


def _launches():
    """Every (kernel, config, dtype, stage shape, dot precision) the launchers can launch
    on a GPU; the forward with and without the saved outputs, dK/dV also with fp32
    partial buffers (several query splits) for 16-bit inputs."""
    for (dtype, precision), (channels, heads), kernel in itertools.product(DTYPE_PRECISIONS, STAGE_SHAPES, KERNELS):
        head_dim = channels // heads
        if not fused_kernels_run(channels, head_dim, dtype):
            continue
        constexprs = {"HEAD_DIM": head_dim, "BLOCK_D": core.block_d(head_dim), "BLOCK_C": _block_c(channels),
                      "INPUT_PRECISION": precision, "ALIGN": 16, "CONTIGUOUS_D": True}
        # the forward compiles with and without the outputs the backward needs
        saves = ({"SAVE_FOR_BACKWARD": False}, {"SAVE_FOR_BACKWARD": True}) if kernel == "forward" else ({},)
        split_partials = (False, True) if kernel == "backward_dkdv" and dtype != torch.float32 else (False,)
        for tile, save, partials in itertools.product(
            tiles(kernel, channels, head_dim, dtype, precision), saves, split_partials
        ):
            yield Launch(kernel, dtype, tile, {**constexprs, **save},
                         shape=f"C={channels} h={heads}" + (" partials" if partials else ""),
                         fp32_pointers=frozenset({"DK", "DV"} if partials else ()))


def compile_targets() -> list[CompileTarget]:
    return build_targets("fused_attention", KERNELS, _launches(), pointers=_TENSOR_POINTERS,
                         fp32_pointers=_STAT_POINTERS, floats=SCALE_ARGUMENTS)
