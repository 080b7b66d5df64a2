"""What the two attention modules share: the Triton helpers their kernels are made of
(strided tile loads and stores, the online-softmax pass over the keys, the dQ and dK/dV
loop bodies, the per-split dK/dV partial stores) and the host side of those partials.
``attention.py`` runs them on q, k, v as given; ``fused_attention.py`` runs them with
the q and output projections fused around them.

Names: BLOCK_N query rows and BLOCK_M key rows per tile; N query tokens, M key tokens.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .launch import Tile, multiple_of

LOG2E = 1.4426950408889634
# Globals a kernel reads must be constexpr.
LOG2E_IN_KERNEL = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(0.6931471805599453)


# --------------------------------------------------------------------------- kernel helpers


@triton.jit
def head_base(ptr, batch, head, stride_batch, stride_head):
    """Pointer to element [batch, 0, head, 0]; int64 so huge batches cannot overflow.
    (tl.cast, not .to: a loop index is a plain int under the interpreter.)"""
    return ptr + tl.cast(batch, tl.int64) * stride_batch + tl.cast(head, tl.int64) * stride_head


@triton.jit
def head_view(ptr, batch, head, stride_batch, stride_token, stride_head, stride_dim,
              ALIGN: tl.constexpr, CONTIGUOUS_D: tl.constexpr):
    """One head of a [B, tokens, heads, d] tensor: the pointer to its element
    [batch, 0, head, 0], and its token and head-dim strides as the compiler should see
    them: the launcher checked that the batch, token and head strides are multiples of
    ALIGN and, with CONTIGUOUS_D, that the head-dim stride is 1, so rows load as wide
    vectors. A launch specialises such integer arguments by itself; the compile check
    does not, so without these hints it would compile other code than a launch runs."""
    if CONTIGUOUS_D:
        stride_dim = 1
    base = head_base(ptr, batch, head, multiple_of(stride_batch, ALIGN), multiple_of(stride_head, ALIGN))
    return base, multiple_of(stride_token, ALIGN), stride_dim


@triton.jit
def _tile_pointers(base, offs_a, stride_a, offs_b, stride_b):
    """Pointers of an [A, B] tile whose element (i, j) is base[offs_a[i]*stride_a + offs_b[j]*stride_b]."""
    return base + offs_a[:, None] * stride_a + offs_b[None, :] * stride_b


@triton.jit
def _tile_mask(offs_a, size_a, offs_b, size_b):
    return (offs_a[:, None] < size_a) & (offs_b[None, :] < size_b)


@triton.jit
def load_tile(base, offs_a, size_a, stride_a, offs_b, size_b, stride_b):
    """[A, B] tile, zero outside [size_a, size_b]. Loading with (rows, cols) gives the
    tile, loading with (cols, rows) gives its transpose straight from memory."""
    return tl.load(
        _tile_pointers(base, offs_a, stride_a, offs_b, stride_b),
        mask=_tile_mask(offs_a, size_a, offs_b, size_b),
        other=0.0,
    )


@triton.jit
def store_tile(base, value, offs_a, size_a, stride_a, offs_b, size_b, stride_b):
    tl.store(
        _tile_pointers(base, offs_a, stride_a, offs_b, stride_b),
        value.to(base.dtype.element_ty),
        mask=_tile_mask(offs_a, size_a, offs_b, size_b),
    )


@triton.jit
def load_head_rows(ptr, batch, head, stride_batch, stride_token, stride_head, stride_dim, rows, num_rows, dims,
                   HEAD_DIM: tl.constexpr, ALIGN: tl.constexpr, CONTIGUOUS_D: tl.constexpr):
    """Rows ``rows`` of one head of a [B, num_rows, heads, d] tensor as a [rows, BLOCK_D]
    tile, zero outside (see head_view)."""
    base, stride_token, stride_dim = head_view(ptr, batch, head, stride_batch, stride_token, stride_head, stride_dim,
                                               ALIGN, CONTIGUOUS_D)
    return load_tile(base, rows, num_rows, stride_token, dims, HEAD_DIM, stride_dim)


@triton.jit
def store_head_rows(ptr, value, batch, head, stride_batch, stride_token, stride_head, stride_dim, rows, num_rows,
                    dims, HEAD_DIM: tl.constexpr, ALIGN: tl.constexpr, CONTIGUOUS_D: tl.constexpr):
    """``value`` into rows ``rows`` of one head of a [B, num_rows, heads, d] tensor."""
    base, stride_token, stride_dim = head_view(ptr, batch, head, stride_batch, stride_token, stride_head, stride_dim,
                                               ALIGN, CONTIGUOUS_D)
    store_tile(base, value, rows, num_rows, stride_token, dims, HEAD_DIM, stride_dim)


@triton.jit
def query_block_and_head(N, BLOCK_N: tl.constexpr):
    """(query block, batch*head) of this program. The grid is 1-D (batch*heads may pass
    the 65535 limit of the other grid axes) with query blocks fastest, so the programs
    of one head run together and share its K and V in L2."""
    pid = tl.program_id(0)
    query_blocks = tl.cdiv(N, BLOCK_N)
    return pid % query_blocks, pid // query_blocks


@triton.jit
def query_program(N, heads, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """A per-(query block, batch*head) program's batch*head, batch, head, query rows and
    head-dim range."""
    pid_n, pid_bh = query_block_and_head(N, BLOCK_N)
    return pid_bh, pid_bh // heads, pid_bh % heads, pid_n * BLOCK_N + tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_D)


@triton.jit
def key_program(N, M, heads, rows_per_split, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """A dK/dV program's query split, batch*head, batch, head, key rows and head-dim range.
    1-D grid, key blocks fastest: the programs sharing a split's query rows run together."""
    pid = tl.program_id(0)
    key_blocks = tl.cdiv(M, BLOCK_M)
    splits = tl.cdiv(N, rows_per_split)
    pid_bh = pid // (key_blocks * splits)
    keys = (pid % key_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    return (pid // key_blocks) % splits, pid_bh, pid_bh // heads, pid_bh % heads, keys, tl.arange(0, BLOCK_D)


@triton.jit
def split_rows(split, rows_per_split, N):
    """The query rows [start, end) a dK/dV program of query split ``split`` walks."""
    start = split * rows_per_split
    return start, tl.minimum(start + rows_per_split, N)


@triton.jit
def attend(q, k_base, v_base, stride_km, stride_kd, stride_vm, stride_vd, M, qk_scale, dims,
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
        k_t = load_tile(k_base, dims, HEAD_DIM, stride_kd, keys, M, stride_km)  # [BLOCK_D, BLOCK_M]
        v = load_tile(v_base, keys, M, stride_vm, dims, HEAD_DIM, stride_vd)
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
def attention_dq(q, do, delta, lse2, k_base, v_base, stride_km, stride_kd, stride_vm, stride_vd, M, qk_scale,
                  dims, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """sum_j dS_j K_j over all M keys of one head for one query tile, dS = P * (dO V^T - delta),
    P recomputed from q and lse2 (the row log-sum-exp in log2 units). Returns fp32, not yet
    multiplied by the softmax scale."""
    key_range = tl.arange(0, BLOCK_M)
    dq = tl.zeros([q.shape[0], q.shape[1]], tl.float32)
    for start_m in range(0, M, BLOCK_M):
        keys = start_m + key_range
        k_t = load_tile(k_base, dims, HEAD_DIM, stride_kd, keys, M, stride_km)  # [BLOCK_D, BLOCK_M]
        v_t = load_tile(v_base, dims, HEAD_DIM, stride_vd, keys, M, stride_vm)
        p = _probabilities(tl.dot(q, k_t, input_precision=INPUT_PRECISION) * qk_scale, lse2[:, None])
        dp = tl.dot(do, v_t, input_precision=INPUT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k_t.dtype), tl.trans(k_t), dq, input_precision=INPUT_PRECISION)
    return dq


@triton.jit
def accumulate_dkdv(k, v, q_t, do, lse2, delta, dk, dv, qk_scale, INPUT_PRECISION: tl.constexpr):
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
def store_key_partials(DK, DV, dk, dv, split, batch, head, stride_ds, stride_db, stride_dm, stride_dh, stride_dd,
                       keys, M, dims, HEAD_DIM: tl.constexpr, ALIGN: tl.constexpr, CONTIGUOUS_D: tl.constexpr):
    """A dK/dV program's tiles into its split's slice of the [split, B, M, h, d] buffers."""
    split_offset = split.to(tl.int64) * multiple_of(stride_ds, ALIGN)
    dk_base, stride_dm, stride_dd = head_view(DK + split_offset, batch, head, stride_db, stride_dm, stride_dh,
                                              stride_dd, ALIGN, CONTIGUOUS_D)
    dv_base = head_base(DV + split_offset, batch, head, multiple_of(stride_db, ALIGN), multiple_of(stride_dh, ALIGN))
    store_tile(dk_base, dk, keys, M, stride_dm, dims, HEAD_DIM, stride_dd)
    store_tile(dv_base, dv, keys, M, stride_dm, dims, HEAD_DIM, stride_dd)


# --------------------------------------------------------------------------- launch configurations


def tile(query_rows: int, key_rows: int, num_warps: int, num_stages: int) -> Tile:
    """An attention kernel's launch config: BLOCK_N query rows and BLOCK_M key rows a tile."""
    return Tile.of(BLOCK_N=query_rows, BLOCK_M=key_rows, num_warps=num_warps, num_stages=num_stages)


def block_d(head_dim: int) -> int:
    # tl.dot needs every tile side >= 16.
    return max(16, triton.next_power_of_2(head_dim))


# --------------------------------------------------------------------------- dK/dV partials


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


def query_split_rows(batch_heads: int, n: int, m: int) -> int:
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
    rows_per_split = query_split_rows(batch * heads, n, m)
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
