"""Efficient self-attention core for N >> M: flash-style forward and hand-written backward.

``softmax(q k^T * scale) v`` for every (batch, head), with q [B, N, h, d] from all N
tokens and k, v [B, M, h, d] from the spatially reduced sequence (docs/design.md, "What is fused, and why").
The N x M score matrix never reaches memory: the forward keeps an online softmax per
query row and stores only the row log-sum-exp; the backward recomputes the
probabilities from q, k and that log-sum-exp.

Layouts: q, k, v, o, dq, dk, dv are read and written through their strides in the
[B, tokens, heads, head_dim] layout the projections produce (slices of a fused
projection output work as they are; nothing is transposed or copied). The row
log-sum-exp and the backward's row dot products delta = rowsum(dO * O) are fp32
[B, heads, N].

Backward work split (N is huge, M small):
  * ``_attention_backward_dq_kernel``: one program per (query block, batch*head) walks
    all key blocks and writes dQ; it also writes delta for the second kernel.
  * ``_attention_backward_dkdv_kernel``: one program per (key block, query split,
    batch*head) walks the query blocks of its split and accumulates that key block's
    dK and dV in registers. Splits are summed afterwards in fp32 (deterministic, no
    atomics); see ``_query_split_rows`` for how many splits there are.
The score products are computed twice in the backward (once per kernel). Computing
them once would need either atomics or an fp32 read-modify-write of an [M, d] dK/dV
partial for every query block, which at M = 2048 moves far more bytes than the
recomputation costs in tensor-core time.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._backend import INTERPRET
from .launch import (
    INPUT_PRECISIONS,
    INTERPRET_AUTOTUNE,
    TRITON_DTYPES,
    alignment,
    kernel_launcher,
    kernel_signature,
    launch_autotuned,
    multiple_of,
    resolve_input_precision,
)
from ..compile_check import CompileTarget

LOG2E = 1.4426950408889634
# Globals a kernel reads must be constexpr.
_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(0.6931471805599453)


# --------------------------------------------------------------------------- kernels


@triton.jit
def _head_base(ptr, batch, head, stride_batch, stride_head):
    """Pointer to element [batch, 0, head, 0]; int64 so huge batches cannot overflow.
    (tl.cast, not .to: a loop index is a plain int under the interpreter.)"""
    return ptr + tl.cast(batch, tl.int64) * stride_batch + tl.cast(head, tl.int64) * stride_head


@triton.jit
def _layout(stride_batch, stride_token, stride_head, stride_dim, ALIGN: tl.constexpr, CONTIGUOUS_D: tl.constexpr):
    """One [B, tokens, heads, d] tensor's strides as the compiler should see them: the
    launcher checked that the first three are multiples of ALIGN and, with CONTIGUOUS_D,
    that the head-dim stride is 1, so rows load as wide vectors (also in the compile
    check, which does not specialise integer arguments the way a launch does)."""
    if CONTIGUOUS_D:
        stride_dim = 1
    return (
        multiple_of(stride_batch, ALIGN), multiple_of(stride_token, ALIGN), multiple_of(stride_head, ALIGN), stride_dim
    )


@triton.jit
def _tile_pointers(base, offs_a, stride_a, offs_b, stride_b):
    """Pointers of an [A, B] tile whose element (i, j) is base[offs_a[i]*stride_a + offs_b[j]*stride_b]."""
    return base + offs_a[:, None] * stride_a + offs_b[None, :] * stride_b


@triton.jit
def _tile_mask(offs_a, size_a, offs_b, size_b):
    return (offs_a[:, None] < size_a) & (offs_b[None, :] < size_b)


@triton.jit
def _load_tile(base, offs_a, size_a, stride_a, offs_b, size_b, stride_b):
    """[A, B] tile, zero outside [size_a, size_b]. Loading with (rows, cols) gives the
    tile, loading with (cols, rows) gives its transpose straight from memory."""
    return tl.load(
        _tile_pointers(base, offs_a, stride_a, offs_b, stride_b),
        mask=_tile_mask(offs_a, size_a, offs_b, size_b),
        other=0.0,
    )


@triton.jit
def _store_tile(base, value, offs_a, size_a, stride_a, offs_b, size_b, stride_b):
    tl.store(
        _tile_pointers(base, offs_a, stride_a, offs_b, stride_b),
        value.to(base.dtype.element_ty),
        mask=_tile_mask(offs_a, size_a, offs_b, size_b),
    )


@triton.jit
def _query_block_and_head(N, BLOCK_N: tl.constexpr):
    """(query block, batch*head) of this program. The grid is 1-D (batch*heads may pass
    the 65535 limit of the other grid axes) with query blocks fastest, so the programs
    of one head run together and share its K and V in L2."""
    pid = tl.program_id(0)
    query_blocks = tl.cdiv(N, BLOCK_N)
    return pid % query_blocks, pid // query_blocks


@triton.jit
def _attend(q, k_base, v_base, stride_km, stride_kd, stride_vm, stride_vd, M, qk_scale, dims,
            HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """softmax(q k^T * scale) v for one query tile q [BLOCK_N, BLOCK_D] against all M keys
    of one head, with an online softmax over key blocks. qk_scale = scale * log2(e):
    scores live in log2 units so the softmax uses exp2. Returns the normalised output
    (fp32) and the row log-sum-exp in natural-log units, log(sum_j exp(scale * q.k_j))."""
    key_range = tl.arange(0, BLOCK_M)
    row_max = tl.full([q.shape[0]], float("-inf"), tl.float32)
    row_sum = tl.zeros([q.shape[0]], tl.float32)
    acc = tl.zeros([q.shape[0], q.shape[1]], tl.float32)
    for start_m in range(0, M, BLOCK_M):
        keys = start_m + key_range
        k_t = _load_tile(k_base, dims, HEAD_DIM, stride_kd, keys, M, stride_km)  # [BLOCK_D, BLOCK_M]
        v = _load_tile(v_base, keys, M, stride_vm, dims, HEAD_DIM, stride_vd)
        scores = tl.dot(q, k_t, input_precision=INPUT_PRECISION) * qk_scale
        # Keys past M must get zero probability (M >= 1, so every row has a finite max).
        scores = tl.where(keys[None, :] < M, scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, 1))
        p = tl.exp2(scores - new_max[:, None])
        correction = tl.exp2(row_max - new_max)
        row_sum = row_sum * correction + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * correction[:, None], input_precision=INPUT_PRECISION)
        row_max = new_max
    # Normalise by exp2(-log2(sum)): the log2 is needed for the LSE anyway, and a true
    # division would bring in the IEEE-division slow-path subroutine and its stack frame.
    log2_sum = tl.log2(row_sum)
    return acc * tl.exp2(-log2_sum)[:, None], (row_max + log2_sum) * _LN2


@triton.jit
def _probabilities(scores2, lse2):
    """exp2(scores - lse) in log2 units, at most 1 as a probability is. Keys past M load as
    zero rows, so their score is 0 and, unclamped, their p = exp2(-lse) overflows once a
    row's log-sum-exp is low (scores around -25 do it in 16 bits): inf times their zero K
    or V row is NaN. Clamped, their p is at most 1 and meets only zero rows of K and V (or
    lands in dK/dV rows that are never stored), so they add nothing. A clamp, not a mask
    on the key index: the backward_dx tile has no registers to spare for the mask."""
    return tl.exp2(tl.minimum(scores2 - lse2, 0.0))


@triton.jit
def _attention_dq(q, do, delta, lse2, k_base, v_base, stride_km, stride_kd, stride_vm, stride_vd, M, qk_scale,
                  dims, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """sum_j dS_j K_j over all M keys of one head for one query tile, dS = P * (dO V^T - delta),
    P recomputed from q and lse2 (the row log-sum-exp in log2 units). Returns fp32, not yet
    multiplied by the softmax scale."""
    key_range = tl.arange(0, BLOCK_M)
    dq = tl.zeros([q.shape[0], q.shape[1]], tl.float32)
    for start_m in range(0, M, BLOCK_M):
        keys = start_m + key_range
        k_t = _load_tile(k_base, dims, HEAD_DIM, stride_kd, keys, M, stride_km)  # [BLOCK_D, BLOCK_M]
        v_t = _load_tile(v_base, dims, HEAD_DIM, stride_vd, keys, M, stride_vm)
        p = _probabilities(tl.dot(q, k_t, input_precision=INPUT_PRECISION) * qk_scale, lse2[:, None])
        dp = tl.dot(do, v_t, input_precision=INPUT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k_t.dtype), tl.trans(k_t), dq, input_precision=INPUT_PRECISION)
    return dq


@triton.jit
def _accumulate_dkdv(k, v, q_t, do, lse2, delta, dk, dv, qk_scale, INPUT_PRECISION: tl.constexpr):
    """One query tile's share of dV = P^T dO and dK = dS^T Q (not yet scaled) for one key
    tile, computed transposed (keys as rows) so both accumulate in registers. q_t is the
    query tile transposed [BLOCK_D, BLOCK_N]; lse2 the rows' log-sum-exp in log2 units."""
    p_t = _probabilities(tl.dot(k, q_t, input_precision=INPUT_PRECISION) * qk_scale, lse2[None, :])
    dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=INPUT_PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk = tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), dk, input_precision=INPUT_PRECISION)
    return dk, dv


@triton.jit
def _key_block_split_and_head(N, M, rows_per_split, BLOCK_M: tl.constexpr):
    """(key block, query split, batch*head) of a dK/dV program. 1-D grid, key blocks
    fastest: the programs sharing a split's query rows run together."""
    pid = tl.program_id(0)
    key_blocks = tl.cdiv(M, BLOCK_M)
    splits = tl.cdiv(N, rows_per_split)
    return pid % key_blocks, (pid // key_blocks) % splits, pid // (key_blocks * splits)


@triton.jit
def _store_key_partials(DK, DV, dk, dv, split, batch, head, stride_ds, stride_db, stride_dm, stride_dh, stride_dd,
                        keys, M, dims, HEAD_DIM: tl.constexpr):
    """A dK/dV program's tiles into its split's slice of the [split, B, M, h, d] buffers."""
    split_offset = split.to(tl.int64) * stride_ds
    dk_base = _head_base(DK + split_offset, batch, head, stride_db, stride_dh)
    dv_base = _head_base(DV + split_offset, batch, head, stride_db, stride_dh)
    _store_tile(dk_base, dk, keys, M, stride_dm, dims, HEAD_DIM, stride_dd)
    _store_tile(dv_base, dv, keys, M, stride_dm, dims, HEAD_DIM, stride_dd)


@triton.jit
def _attention_forward_kernel(
    Q, K, V, O, LSE,
    stride_qb, stride_qn, stride_qh, stride_qd,
    stride_kb, stride_km, stride_kh, stride_kd,
    stride_vb, stride_vm, stride_vh, stride_vd,
    stride_ob, stride_on, stride_oh, stride_od,
    N, M, heads, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, ALIGN: tl.constexpr, CONTIGUOUS_D: tl.constexpr,
):
    """One program per (query block, batch*head); qk_scale = scale * log2(e)."""
    stride_qb, stride_qn, stride_qh, stride_qd = _layout(
        stride_qb, stride_qn, stride_qh, stride_qd, ALIGN, CONTIGUOUS_D
    )
    stride_kb, stride_km, stride_kh, stride_kd = _layout(
        stride_kb, stride_km, stride_kh, stride_kd, ALIGN, CONTIGUOUS_D
    )
    stride_vb, stride_vm, stride_vh, stride_vd = _layout(
        stride_vb, stride_vm, stride_vh, stride_vd, ALIGN, CONTIGUOUS_D
    )
    stride_ob, stride_on, stride_oh, stride_od = _layout(
        stride_ob, stride_on, stride_oh, stride_od, ALIGN, CONTIGUOUS_D
    )
    pid_n, pid_bh = _query_block_and_head(N, BLOCK_N)
    batch = pid_bh // heads
    head = pid_bh % heads
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)

    q = _load_tile(_head_base(Q, batch, head, stride_qb, stride_qh), rows, N, stride_qn, dims, HEAD_DIM, stride_qd)
    k_base = _head_base(K, batch, head, stride_kb, stride_kh)
    v_base = _head_base(V, batch, head, stride_vb, stride_vh)

    out, lse = _attend(q, k_base, v_base, stride_km, stride_kd, stride_vm, stride_vd, M, qk_scale, dims,
                       HEAD_DIM, BLOCK_M, INPUT_PRECISION)
    _store_tile(_head_base(O, batch, head, stride_ob, stride_oh), out, rows, N, stride_on, dims, HEAD_DIM, stride_od)
    tl.store(LSE + pid_bh.to(tl.int64) * N + rows, lse, mask=rows < N)


@triton.jit
def _attention_backward_dq_kernel(
    Q, K, V, O, DO, DQ, LSE, DELTA,
    stride_qb, stride_qn, stride_qh, stride_qd,
    stride_kb, stride_km, stride_kh, stride_kd,
    stride_vb, stride_vm, stride_vh, stride_vd,
    stride_ob, stride_on, stride_oh, stride_od,
    stride_dob, stride_don, stride_doh, stride_dod,
    stride_dqb, stride_dqn, stride_dqh, stride_dqd,
    N, M, heads, scale, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, ALIGN: tl.constexpr, CONTIGUOUS_D: tl.constexpr,
):
    """One program per (query block, batch*head): delta = rowsum(dO * O), then
    dQ = scale * sum_j dS_j K_j with dS = P * (dO V^T - delta)."""
    stride_qb, stride_qn, stride_qh, stride_qd = _layout(
        stride_qb, stride_qn, stride_qh, stride_qd, ALIGN, CONTIGUOUS_D
    )
    stride_kb, stride_km, stride_kh, stride_kd = _layout(
        stride_kb, stride_km, stride_kh, stride_kd, ALIGN, CONTIGUOUS_D
    )
    stride_vb, stride_vm, stride_vh, stride_vd = _layout(
        stride_vb, stride_vm, stride_vh, stride_vd, ALIGN, CONTIGUOUS_D
    )
    stride_ob, stride_on, stride_oh, stride_od = _layout(
        stride_ob, stride_on, stride_oh, stride_od, ALIGN, CONTIGUOUS_D
    )
    stride_dob, stride_don, stride_doh, stride_dod = _layout(
        stride_dob, stride_don, stride_doh, stride_dod, ALIGN, CONTIGUOUS_D
    )
    stride_dqb, stride_dqn, stride_dqh, stride_dqd = _layout(
        stride_dqb, stride_dqn, stride_dqh, stride_dqd, ALIGN, CONTIGUOUS_D
    )
    pid_n, pid_bh = _query_block_and_head(N, BLOCK_N)
    batch = pid_bh // heads
    head = pid_bh % heads
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)

    q = _load_tile(_head_base(Q, batch, head, stride_qb, stride_qh), rows, N, stride_qn, dims, HEAD_DIM, stride_qd)
    do_base = _head_base(DO, batch, head, stride_dob, stride_doh)
    do = _load_tile(do_base, rows, N, stride_don, dims, HEAD_DIM, stride_dod)
    o = _load_tile(_head_base(O, batch, head, stride_ob, stride_oh), rows, N, stride_on, dims, HEAD_DIM, stride_od)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    row_stats = pid_bh.to(tl.int64) * N + rows
    tl.store(DELTA + row_stats, delta, mask=rows < N)
    lse2 = tl.load(LSE + row_stats, mask=rows < N, other=0.0) * _LOG2E

    k_base = _head_base(K, batch, head, stride_kb, stride_kh)
    v_base = _head_base(V, batch, head, stride_vb, stride_vh)
    dq = _attention_dq(q, do, delta, lse2, k_base, v_base, stride_km, stride_kd, stride_vm, stride_vd, M,
                       qk_scale, dims, HEAD_DIM, BLOCK_M, INPUT_PRECISION)

    dq_base = _head_base(DQ, batch, head, stride_dqb, stride_dqh)
    _store_tile(dq_base, dq * scale, rows, N, stride_dqn, dims, HEAD_DIM, stride_dqd)


@triton.jit
def _attention_backward_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    stride_qb, stride_qn, stride_qh, stride_qd,
    stride_kb, stride_km, stride_kh, stride_kd,
    stride_vb, stride_vm, stride_vh, stride_vd,
    stride_dob, stride_don, stride_doh, stride_dod,
    stride_ds, stride_db, stride_dm, stride_dh, stride_dd,
    N, M, heads, rows_per_split, scale, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, ALIGN: tl.constexpr, CONTIGUOUS_D: tl.constexpr,
):
    """One program per (key block, query split, batch*head): the split's share of
    dV = P^T dO and dK = scale * dS^T Q for that key block, computed transposed
    (keys as rows) so both accumulate in registers. DK/DV are [split, B, M, h, d]
    buffers (fp32 partials, or the gradients themselves when there is one split)."""
    stride_qb, stride_qn, stride_qh, stride_qd = _layout(
        stride_qb, stride_qn, stride_qh, stride_qd, ALIGN, CONTIGUOUS_D
    )
    stride_kb, stride_km, stride_kh, stride_kd = _layout(
        stride_kb, stride_km, stride_kh, stride_kd, ALIGN, CONTIGUOUS_D
    )
    stride_vb, stride_vm, stride_vh, stride_vd = _layout(
        stride_vb, stride_vm, stride_vh, stride_vd, ALIGN, CONTIGUOUS_D
    )
    stride_dob, stride_don, stride_doh, stride_dod = _layout(
        stride_dob, stride_don, stride_doh, stride_dod, ALIGN, CONTIGUOUS_D
    )
    stride_ds = multiple_of(stride_ds, ALIGN)
    stride_db, stride_dm, stride_dh, stride_dd = _layout(
        stride_db, stride_dm, stride_dh, stride_dd, ALIGN, CONTIGUOUS_D
    )
    pid_m, split, pid_bh = _key_block_split_and_head(N, M, rows_per_split, BLOCK_M)
    batch = pid_bh // heads
    head = pid_bh % heads
    keys = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_range = tl.arange(0, BLOCK_N)

    k = _load_tile(_head_base(K, batch, head, stride_kb, stride_kh), keys, M, stride_km, dims, HEAD_DIM, stride_kd)
    v = _load_tile(_head_base(V, batch, head, stride_vb, stride_vh), keys, M, stride_vm, dims, HEAD_DIM, stride_vd)
    q_base = _head_base(Q, batch, head, stride_qb, stride_qh)
    do_base = _head_base(DO, batch, head, stride_dob, stride_doh)
    stats_base = pid_bh.to(tl.int64) * N

    dk = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    row_start = split * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, N)
    # Query rows past N load as zero q and dO rows with zero lse and delta: their
    # probabilities are finite and their dO and dS columns are exactly zero, so they add
    # nothing. rows_per_split is a multiple of BLOCK_N, so blocks never straddle splits.
    for start_n in range(row_start, row_end, BLOCK_N):
        rows = start_n + row_range
        q_t = _load_tile(q_base, dims, HEAD_DIM, stride_qd, rows, N, stride_qn)  # [BLOCK_D, BLOCK_N]
        do = _load_tile(do_base, rows, N, stride_don, dims, HEAD_DIM, stride_dod)
        lse2 = tl.load(LSE + stats_base + rows, mask=rows < N, other=0.0) * _LOG2E
        delta = tl.load(DELTA + stats_base + rows, mask=rows < N, other=0.0)
        dk, dv = _accumulate_dkdv(k, v, q_t, do, lse2, delta, dk, dv, qk_scale, INPUT_PRECISION)

    _store_key_partials(DK, DV, dk * scale, dv, split, batch, head, stride_ds, stride_db, stride_dm, stride_dh,
                        stride_dd, keys, M, dims, HEAD_DIM)


# --------------------------------------------------------------------------- launch configurations


@dataclass(frozen=True)
class Tile:
    """One launch configuration: query rows and key rows per tile, warps, pipeline stages."""

    block_n: int
    block_m: int
    num_warps: int
    num_stages: int

    def triton_config(self) -> triton.Config:
        return triton.Config(
            {"BLOCK_N": self.block_n, "BLOCK_M": self.block_m}, num_warps=self.num_warps, num_stages=self.num_stages
        )


KERNELS = {
    "forward": _attention_forward_kernel,
    "backward_dq": _attention_backward_dq_kernel,
    "backward_dkdv": _attention_backward_dkdv_kernel,
}

# The interpreter runs one config unless SK_INTERPRET_AUTOTUNE=1. Blocks of 32 keep the
# tiny test shapes multi-block in both N and M.
INTERPRETER_TILE = Tile(block_n=32, block_m=32, num_warps=4, num_stages=1)


# Autotune candidates: 16-bit inputs by head dim (up to 64, up to 128); fp32 with tf32
# dots one set for every head dim (fp32 is the accuracy path, not the fast one); exact
# fp32 ("ieee") dots run on the FMA units, need far more registers and are for tests, so
# they get one small config. Every one compiles with zero spills for sm_80 and sm_90 at
# d = 16, 32, 64, 128 under triton 3.6 (the GPU image's) and 3.9 (compile_targets()
# lists them for `python -m segformer_kernels.compile_check`) and fits sm_80's shared
# memory. ptxas's allocation is not monotonic in the tile size and differs between the
# two ptxas versions: the small dK/dV tiles spill a few predicate registers at some
# warp/stage counts, and the 16-bit 64 x 64 dK/dV tile sits at 255 registers on sm_80,
# spilling with 1 or 2 stages but not 3. So each set is what passed, not a rule. The
# 16-bit sets keep 64 rows per warpgroup where sm_80 allows it, the size of Hopper's
# wgmma tile. Tile(query rows, key rows, warps, stages).
HALF_TILES = {
    "forward": {
        64: (Tile(128, 32, 4, 3), Tile(64, 64, 4, 3), Tile(128, 64, 8, 3)),
        128: (Tile(64, 64, 4, 3), Tile(128, 64, 8, 2), Tile(64, 32, 4, 3)),
    },
    "backward_dq": {
        64: (Tile(64, 32, 4, 2), Tile(128, 32, 8, 2), Tile(64, 32, 4, 3)),
        128: (Tile(64, 32, 4, 2), Tile(64, 64, 8, 2), Tile(64, 32, 8, 2)),
    },
    "backward_dkdv": {
        64: (Tile(32, 64, 4, 2), Tile(64, 64, 8, 3), Tile(32, 128, 8, 2)),
        128: (Tile(64, 64, 8, 2), Tile(32, 64, 8, 2)),
    },
}
TF32_TILES = {
    "forward": (Tile(64, 32, 4, 2),),
    "backward_dq": (Tile(64, 32, 8, 2), Tile(32, 32, 4, 2)),
    "backward_dkdv": (Tile(32, 32, 8, 2), Tile(16, 32, 4, 2)),
}
IEEE_TILES = {
    "forward": (Tile(32, 16, 8, 2),),
    "backward_dq": (Tile(32, 16, 4, 2),),
    "backward_dkdv": (Tile(16, 16, 4, 2),),
}
# Inputs whose strides give no alignment or whose head dim is not contiguous (rare: a
# head-dim slice, d not a multiple of 16) run without layout hints: every element is its
# own scalar load with its own address, so they get small tiles at every dtype.
GENERIC_TILES = {
    "forward": (Tile(32, 32, 8, 2),),
    "backward_dq": (Tile(32, 16, 4, 2),),
    "backward_dkdv": (Tile(16, 16, 4, 1),),
}


@dataclass(frozen=True)
class Layout:
    """What the kernels may assume about the strides (their ALIGN and CONTIGUOUS_D)."""

    align: int
    contiguous_d: bool

    def constexprs(self) -> dict[str, object]:
        return {"ALIGN": self.align, "CONTIGUOUS_D": self.contiguous_d}


# Two layouts are compiled: the usual one (every token, head and batch stride a multiple
# of 16 elements, head dim contiguous: projection outputs with 16 | d) and no hints.
ALIGNED = Layout(align=16, contiguous_d=True)
UNALIGNED = Layout(align=1, contiguous_d=False)


def _layout_of(*tensors: Tensor) -> Layout:
    contiguous_d = all(t.stride(-1) == 1 for t in tensors)
    return ALIGNED if contiguous_d and alignment(*(s for t in tensors for s in t.stride()[:-1])) == 16 else UNALIGNED


def tiles(kernel: str, head_dim: int, dtype: torch.dtype, input_precision: str, layout: Layout) -> tuple[Tile, ...]:
    """The configs the launcher autotunes over on a GPU. compile_targets() lists exactly
    these for head dims 16-128, so every one is checked for spills; larger head dims run
    on the d = 128 sets (correct, but they may spill)."""
    if layout != ALIGNED:
        return GENERIC_TILES[kernel]
    if dtype == torch.float32:
        return (IEEE_TILES if input_precision == "ieee" else TF32_TILES)[kernel]
    return HALF_TILES[kernel][64 if head_dim <= 64 else 128]


def launch_configs(configs: tuple[Tile, ...]) -> tuple[Tile, ...]:
    """The configs a launch may use here: ``configs`` on a GPU and when the interpreter
    autotunes (SK_INTERPRET_AUTOTUNE=1), INTERPRETER_TILE in the plain interpreter."""
    return (INTERPRETER_TILE,) if INTERPRET and not INTERPRET_AUTOTUNE else configs


def launch_tiled(kernel, grid, args, constexprs: dict, configs: tuple[Tile, ...], key: tuple[str, ...], m: int,
                 reset_to_zero: tuple[str, ...] = ()) -> None:
    """Launch a kernel taking BLOCK_N/BLOCK_M tiles over ``configs`` (from launch_configs),
    autotuned on ``key`` and the bucket of the key count ``m`` (it changes with the image's
    aspect ratio; see launch.launch_autotuned)."""
    launch_autotuned(kernel, grid, args, constexprs, [t.triton_config() for t in configs], key, m, reset_to_zero)


def _launch(kernel: str, grid, args, tensors, head_dim: int, m: int, input_precision: str) -> None:
    """Launch ``kernel`` over ``grid``; ``tensors`` are the [.., d] tensors it reads and
    writes through strides (they decide the layout hints). Every output is fully written
    by every config (dK/dV partials are per key block and query split, whose rows do not
    depend on the tile), so the autotuner's benchmark runs leave nothing behind."""
    layout = _layout_of(*tensors)
    constexprs = {
        "HEAD_DIM": head_dim, "BLOCK_D": block_d(head_dim), "INPUT_PRECISION": input_precision, **layout.constexprs()
    }
    configs = launch_configs(tiles(kernel, head_dim, tensors[0].dtype, input_precision, layout))
    launch_tiled(KERNELS[kernel], grid, args, constexprs, configs, tuple(constexprs), m)


def block_d(head_dim: int) -> int:
    # tl.dot needs every tile side >= 16.
    return max(16, triton.next_power_of_2(head_dim))


# Query splits of the dK/dV kernel. Each split writes one fp32 [M, d] partial of dK and
# of dV per (batch, head), which the sum then reads back: 16 * M * d bytes per split,
# against the 4 * rows * d bytes of 16-bit q and dO the split reads. A split therefore
# covers at least 8 * M rows, which keeps the partials under half the q + dO traffic
# (stage 1 at 512^2, N = 16384, M = 256: at most 8 splits, 1 MB of partials per
# (image, head) at d = 64). Within that bound, enough splits for ~512 programs (several
# waves on a 132-SM GPU). SPLIT_ALIGN is a multiple of every BLOCK_N, so query blocks
# never straddle splits.
SPLIT_ALIGN = 128
DKDV_TARGET_PROGRAMS = 512
DKDV_ESTIMATE_BLOCK_M = 64


def _query_split_rows(batch_heads: int, n: int, m: int) -> int:
    """Query rows per split of the dK/dV kernel (a multiple of SPLIT_ALIGN); depends on
    the shape only, so the reduction order does too."""
    min_rows = triton.cdiv(8 * m, SPLIT_ALIGN) * SPLIT_ALIGN
    most_splits = triton.cdiv(n, min_rows)
    wanted = triton.cdiv(DKDV_TARGET_PROGRAMS, triton.cdiv(m, DKDV_ESTIMATE_BLOCK_M) * batch_heads)
    splits = max(1, min(wanted, most_splits))
    # at least SPLIT_ALIGN: no query rows (n = 0) means no splits, not a division by zero
    return max(SPLIT_ALIGN, triton.cdiv(triton.cdiv(n, splits), SPLIT_ALIGN) * SPLIT_ALIGN)


def key_gradient_partials(k: Tensor, n: int) -> tuple[int, Tensor, Tensor]:
    """(query rows per split, dK buffer, dV buffer) for a dK/dV kernel over n query rows:
    [split, *k.shape] buffers, in k's dtype when there is one split (the gradients
    themselves), fp32 partials otherwise."""
    batch, m, heads, _ = k.shape
    rows_per_split = _query_split_rows(batch * heads, n, m)
    splits = triton.cdiv(n, rows_per_split)
    partial_dtype = k.dtype if splits == 1 else torch.float32
    partial_k = torch.empty((splits, *k.shape), dtype=partial_dtype, device=k.device)
    return rows_per_split, partial_k, torch.empty_like(partial_k)


def sum_key_partials(partial_k: Tensor, partial_v: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """dK and dV from the buffers of key_gradient_partials: the splits summed in fp32, in a
    fixed order (deterministic)."""
    if partial_k.shape[0] == 1:
        return partial_k[0], partial_v[0]
    return partial_k.sum(0).to(dtype), partial_v.sum(0).to(dtype)


# --------------------------------------------------------------------------- launchers


def _forward(q: Tensor, k: Tensor, v: Tensor, scale: float, input_precision: str) -> tuple[Tensor, Tensor]:
    batch, n, heads, head_dim = q.shape
    m = k.shape[1]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, n), dtype=torch.float32, device=q.device)

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]) * batch * heads,)

    args = (q, k, v, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(), n, m, heads, scale * LOG2E)
    _launch("forward", grid, args, (q, k, v, out), head_dim, m, input_precision)
    return out, lse


def _backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float, input_precision: str
) -> tuple[Tensor, Tensor, Tensor]:
    batch, n, heads, head_dim = q.shape
    m = k.shape[1]
    grad_q = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    delta = torch.empty((batch, heads, n), dtype=torch.float32, device=q.device)
    qkv_strides = (*q.stride(), *k.stride(), *v.stride())

    def dq_grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]) * batch * heads,)

    dq_args = (
        q, k, v, out, grad_out, grad_q, lse, delta,
        *qkv_strides, *out.stride(), *grad_out.stride(), *grad_q.stride(),
        n, m, heads, scale, scale * LOG2E,
    )
    _launch("backward_dq", dq_grid, dq_args, (q, k, v, out, grad_out, grad_q), head_dim, m, input_precision)

    rows_per_split, partial_k, partial_v = key_gradient_partials(k, n)
    splits = partial_k.shape[0]

    def dkdv_grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * splits * batch * heads,)

    dkdv_args = (
        q, k, v, grad_out, lse, delta, partial_k, partial_v,
        *qkv_strides, *grad_out.stride(), *partial_k.stride(),
        n, m, heads, rows_per_split, scale, scale * LOG2E,
    )
    _launch("backward_dkdv", dkdv_grid, dkdv_args, (q, k, v, grad_out, partial_k), head_dim, m, input_precision)
    return (grad_q, *sum_key_partials(partial_k, partial_v, k.dtype))


# --------------------------------------------------------------------------- autograd op


@torch.library.custom_op("segformer::efficient_attention", mutates_args=())
@kernel_launcher
def _attention_op(q: Tensor, k: Tensor, v: Tensor, scale: float, input_precision: str) -> tuple[Tensor, Tensor]:
    """Returns (o [B, N, h, d], row log-sum-exp fp32 [B, h, N]); the second is kept for
    the backward and is not differentiable."""
    return _forward(q, k, v, scale, input_precision)


@_attention_op.register_fake
def _attention_op_fake(q, k, v, scale, input_precision):
    batch, n, heads, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, heads, n), dtype=torch.float32)


@torch.library.custom_op("segformer::efficient_attention_backward", mutates_args=())
@kernel_launcher
def _attention_backward_op(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float, input_precision: str
) -> tuple[Tensor, Tensor, Tensor]:
    return _backward(grad_out, q, k, v, out, lse, scale, input_precision)


@_attention_backward_op.register_fake
def _attention_backward_op_fake(grad_out, q, k, v, out, lse, scale, input_precision):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, scale, input_precision = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale = scale
    ctx.input_precision = input_precision
    ctx.mark_non_differentiable(lse)


def _attention_op_backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    grad_q, grad_k, grad_v = _attention_backward_op(grad_out, q, k, v, out, lse, ctx.scale, ctx.input_precision)
    return grad_q, grad_k, grad_v, None, None


_attention_op.register_autograd(_attention_op_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- public function


def efficient_attention(
    q: Tensor, k: Tensor, v: Tensor, scale: float | None = None, *, input_precision: str | None = None
) -> Tensor:
    """softmax(q k^T * scale) v per head on the Triton kernels. q [B, N, h, d], k and v
    [B, M, h, d] (any strides) -> [B, N, h, d]; ``scale`` defaults to d**-0.5.

    Inputs are assumed checked (``segformer_kernels.efficient_attention`` checks them).
    ``input_precision`` sets how fp32 inputs meet the tensor cores: "tf32" or "ieee", or
    None to follow torch's fp32 matmul setting (see launch.resolve_input_precision).
    """
    input_precision = resolve_input_precision(q.dtype, input_precision)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    out, _ = _attention_op(q, k, v, scale, input_precision)
    return out


# --------------------------------------------------------------------------- compile targets

_TENSOR_POINTERS = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"}
_STAT_POINTERS = {"LSE", "DELTA"}  # fp32 [B, h, N] statistics
SCALE_ARGUMENTS = {"scale", "qk_scale"}
HEAD_DIMS = (16, 32, 64, 128)


def _signature(kernel, dtype: torch.dtype, split_partials: bool) -> dict[str, str]:
    """Statistics fp32, dK/dV fp32 when they are split partials, other tensors in the input dtype."""
    fp32_pointers = _STAT_POINTERS | ({"DK", "DV"} if split_partials else set())
    return kernel_signature(kernel, dtype, pointers=_TENSOR_POINTERS, fp32_pointers=fp32_pointers,
                            floats=SCALE_ARGUMENTS)


def compile_targets() -> list[CompileTarget]:
    """Every (kernel, config, dtype, head dim, dot precision, layout) the launcher can
    launch on a GPU; dK/dV also with fp32 partial buffers for 16-bit inputs."""
    targets = []
    for (dtype, element), head_dim, layout in itertools.product(TRITON_DTYPES.items(), HEAD_DIMS, (ALIGNED, UNALIGNED)):
        precisions = INPUT_PRECISIONS if dtype == torch.float32 else ("tf32",)
        for (kernel_name, kernel), precision in itertools.product(KERNELS.items(), precisions):
            split_variants = (False, True) if kernel_name == "backward_dkdv" and dtype != torch.float32 else (False,)
            for tile, split_partials in itertools.product(
                tiles(kernel_name, head_dim, dtype, precision, layout), split_variants
            ):
                targets.append(CompileTarget(
                    name=f"attention_{kernel_name}",
                    kernel=kernel,
                    signature=_signature(kernel, dtype, split_partials),
                    constexprs={
                        "HEAD_DIM": head_dim, "BLOCK_D": block_d(head_dim), "BLOCK_N": tile.block_n,
                        "BLOCK_M": tile.block_m, "INPUT_PRECISION": precision, **layout.constexprs(),
                    },
                    num_warps=tile.num_warps,
                    num_stages=tile.num_stages,
                    config=f"{element} d={head_dim} N{tile.block_n} M{tile.block_m} w{tile.num_warps} "
                    f"s{tile.num_stages} {precision} align{layout.align}" + (" partials" if split_partials else ""),
                ))
    return targets
