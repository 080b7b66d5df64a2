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
    atomics); see ``attention_core.query_split_rows`` for how many splits there are.
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

from ..compile_check import CompileTarget, Launch, build_targets
from . import attention_core as core
from .launch import (
    DTYPE_PRECISIONS, Tile, alignment, kernel_launcher, launch_configs, launch_tiled, resolve_input_precision,
)

# --------------------------------------------------------------------------- kernels


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
    pid_bh, batch, head, rows, dims = core.query_program(N, heads, BLOCK_N, BLOCK_D)
    k_base, stride_km, stride_kd = core.head_view(K, batch, head, stride_kb, stride_km, stride_kh, stride_kd,
                                                  ALIGN, CONTIGUOUS_D)
    v_base, stride_vm, stride_vd = core.head_view(V, batch, head, stride_vb, stride_vm, stride_vh, stride_vd,
                                                  ALIGN, CONTIGUOUS_D)
    q = core.load_head_rows(Q, batch, head, stride_qb, stride_qn, stride_qh, stride_qd, rows, N, dims,
                            HEAD_DIM, ALIGN, CONTIGUOUS_D)

    out, lse = core.attend(q, k_base, v_base, stride_km, stride_kd, stride_vm, stride_vd, M, qk_scale, dims,
                           HEAD_DIM, BLOCK_M, INPUT_PRECISION)
    core.store_head_rows(O, out, batch, head, stride_ob, stride_on, stride_oh, stride_od, rows, N, dims,
                         HEAD_DIM, ALIGN, CONTIGUOUS_D)
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
    pid_bh, batch, head, rows, dims = core.query_program(N, heads, BLOCK_N, BLOCK_D)
    do = core.load_head_rows(DO, batch, head, stride_dob, stride_don, stride_doh, stride_dod, rows, N, dims,
                             HEAD_DIM, ALIGN, CONTIGUOUS_D)
    o = core.load_head_rows(O, batch, head, stride_ob, stride_on, stride_oh, stride_od, rows, N, dims,
                            HEAD_DIM, ALIGN, CONTIGUOUS_D)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    row_stats = pid_bh.to(tl.int64) * N + rows
    tl.store(DELTA + row_stats, delta, mask=rows < N)
    lse2 = tl.load(LSE + row_stats, mask=rows < N, other=0.0) * core.LOG2E_IN_KERNEL

    q = core.load_head_rows(Q, batch, head, stride_qb, stride_qn, stride_qh, stride_qd, rows, N, dims,
                            HEAD_DIM, ALIGN, CONTIGUOUS_D)
    k_base, stride_km, stride_kd = core.head_view(K, batch, head, stride_kb, stride_km, stride_kh, stride_kd,
                                                  ALIGN, CONTIGUOUS_D)
    v_base, stride_vm, stride_vd = core.head_view(V, batch, head, stride_vb, stride_vm, stride_vh, stride_vd,
                                                  ALIGN, CONTIGUOUS_D)
    dq = core.attention_dq(q, do, delta, lse2, k_base, v_base, stride_km, stride_kd, stride_vm, stride_vd, M,
                           qk_scale, dims, HEAD_DIM, BLOCK_M, INPUT_PRECISION)

    core.store_head_rows(DQ, dq * scale, batch, head, stride_dqb, stride_dqn, stride_dqh, stride_dqd, rows, N, dims,
                         HEAD_DIM, ALIGN, CONTIGUOUS_D)


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
    split, pid_bh, batch, head, keys, dims = core.key_program(N, M, heads, rows_per_split, BLOCK_M, BLOCK_D)
    k = core.load_head_rows(K, batch, head, stride_kb, stride_km, stride_kh, stride_kd, keys, M, dims,
                            HEAD_DIM, ALIGN, CONTIGUOUS_D)
    v = core.load_head_rows(V, batch, head, stride_vb, stride_vm, stride_vh, stride_vd, keys, M, dims,
                            HEAD_DIM, ALIGN, CONTIGUOUS_D)
    stats_base = pid_bh.to(tl.int64) * N
    row_range = tl.arange(0, BLOCK_N)
    q_base, stride_qn, stride_qd = core.head_view(Q, batch, head, stride_qb, stride_qn, stride_qh, stride_qd,
                                                  ALIGN, CONTIGUOUS_D)
    do_base, stride_don, stride_dod = core.head_view(DO, batch, head, stride_dob, stride_don, stride_doh, stride_dod,
                                                     ALIGN, CONTIGUOUS_D)

    dk = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    row_start, row_end = core.split_rows(split, rows_per_split, N)
    # Query rows past N load as zero q and dO rows with zero lse and delta: their
    # probabilities are finite and their dO and dS columns are exactly zero, so they add
    # nothing. rows_per_split is a multiple of BLOCK_N, so blocks never straddle splits.
    for start_n in range(row_start, row_end, BLOCK_N):
        rows = start_n + row_range
        q_t = core.load_tile(q_base, dims, HEAD_DIM, stride_qd, rows, N, stride_qn)  # [BLOCK_D, BLOCK_N]
        do = core.load_tile(do_base, rows, N, stride_don, dims, HEAD_DIM, stride_dod)
        lse2 = tl.load(LSE + stats_base + rows, mask=rows < N, other=0.0) * core.LOG2E_IN_KERNEL
        delta = tl.load(DELTA + stats_base + rows, mask=rows < N, other=0.0)
        dk, dv = core.accumulate_dkdv(k, v, q_t, do, lse2, delta, dk, dv, qk_scale, INPUT_PRECISION)

    core.store_key_partials(DK, DV, dk * scale, dv, split, batch, head, stride_ds, stride_db, stride_dm, stride_dh,
                            stride_dd, keys, M, dims, HEAD_DIM, ALIGN, CONTIGUOUS_D)


KERNELS = {"forward": _attention_forward_kernel, "backward_dq": _attention_backward_dq_kernel,
           "backward_dkdv": _attention_backward_dkdv_kernel}


# --------------------------------------------------------------------------- launch configurations


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
    """ALIGNED when every tensor's head dim is contiguous and its other strides are
    multiples of 16 elements, else UNALIGNED."""
    contiguous_d = all(t.stride(-1) == 1 for t in tensors)
    return ALIGNED if contiguous_d and alignment(*(s for t in tensors for s in t.stride()[:-1])) == 16 else UNALIGNED


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
# wgmma tile. core.tile(query rows, key rows, warps, stages).
HALF_TILES = {
    "forward": {
        64: (core.tile(128, 32, 4, 3), core.tile(64, 64, 4, 3), core.tile(128, 64, 8, 3)),
        128: (core.tile(64, 64, 4, 3), core.tile(128, 64, 8, 2), core.tile(64, 32, 4, 3)),
    },
    "backward_dq": {
        64: (core.tile(64, 32, 4, 2), core.tile(128, 32, 8, 2), core.tile(64, 32, 4, 3)),
        128: (core.tile(64, 32, 4, 2), core.tile(64, 64, 8, 2), core.tile(64, 32, 8, 2)),
    },
    "backward_dkdv": {
        64: (core.tile(32, 64, 4, 2), core.tile(64, 64, 8, 3), core.tile(32, 128, 8, 2)),
        128: (core.tile(64, 64, 8, 2), core.tile(32, 64, 8, 2)),
    },
}
TF32_TILES = {
    "forward": (core.tile(64, 32, 4, 2),),
    "backward_dq": (core.tile(64, 32, 8, 2), core.tile(32, 32, 4, 2)),
    "backward_dkdv": (core.tile(32, 32, 8, 2), core.tile(16, 32, 4, 2)),
}
IEEE_TILES = {
    "forward": (core.tile(32, 16, 8, 2),),
    "backward_dq": (core.tile(32, 16, 4, 2),),
    "backward_dkdv": (core.tile(16, 16, 4, 2),),
}
# Inputs whose strides give no alignment or whose head dim is not contiguous (rare: a
# head-dim slice, d not a multiple of 16) run without layout hints: every element is its
# own scalar load with its own address, so they get small tiles at every dtype.
GENERIC_TILES = {
    "forward": (core.tile(32, 32, 8, 2),),
    "backward_dq": (core.tile(32, 16, 4, 2),),
    "backward_dkdv": (core.tile(16, 16, 4, 1),),
}


def tiles(kernel: str, head_dim: int, dtype: torch.dtype, input_precision: str, layout: Layout) -> tuple[Tile, ...]:
    """The configs the launcher autotunes over on a GPU. compile_targets() lists exactly
    these for head dims 16-128, so every one is checked for spills; larger head dims run
    on the d = 128 sets (correct, but they may spill)."""
    if layout != ALIGNED:
        return GENERIC_TILES[kernel]
    if dtype == torch.float32:
        return (IEEE_TILES if input_precision == "ieee" else TF32_TILES)[kernel]
    return HALF_TILES[kernel][64 if head_dim <= 64 else 128]


# --------------------------------------------------------------------------- launchers


def _launch(kernel: str, grid, args, tensors, head_dim: int, m: int, input_precision: str) -> None:
    """Launch ``kernel`` over ``grid``; ``tensors`` are the [.., d] tensors it reads and
    writes through strides (they decide the layout hints). Every output is fully written
    by every config (dK/dV partials are per key block and query split, whose rows do not
    depend on the tile), so the autotuner's benchmark runs leave nothing behind."""
    layout = _layout_of(*tensors)
    constexprs = {
        "HEAD_DIM": head_dim, "BLOCK_D": core.block_d(head_dim), "INPUT_PRECISION": input_precision,
        **layout.constexprs(),
    }
    configs = launch_configs(tiles(kernel, head_dim, tensors[0].dtype, input_precision, layout))
    launch_tiled(KERNELS[kernel], grid, args, constexprs, configs, tuple(constexprs), m)


def launch_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, input_precision: str) -> tuple[Tensor, Tensor]:
    batch, n, heads, head_dim = q.shape
    m = k.shape[1]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, n), dtype=torch.float32, device=q.device)

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]) * batch * heads,)

    args = (q, k, v, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(), n, m, heads, scale * core.LOG2E)
    _launch("forward", grid, args, (q, k, v, out), head_dim, m, input_precision)
    return out, lse


def launch_backward(
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
        n, m, heads, scale, scale * core.LOG2E,
    )
    _launch("backward_dq", dq_grid, dq_args, (q, k, v, out, grad_out, grad_q), head_dim, m, input_precision)

    rows_per_split, partial_k, partial_v = core.key_gradient_partials(k, n)
    splits = partial_k.shape[0]

    def dkdv_grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * splits * batch * heads,)

    dkdv_args = (
        q, k, v, grad_out, lse, delta, partial_k, partial_v,
        *qkv_strides, *grad_out.stride(), *partial_k.stride(),
        n, m, heads, rows_per_split, scale, scale * core.LOG2E,
    )
    _launch("backward_dkdv", dkdv_grid, dkdv_args, (q, k, v, grad_out, partial_k), head_dim, m, input_precision)
    return (grad_q, *core.sum_key_partials(partial_k, partial_v, k.dtype))


# --------------------------------------------------------------------------- autograd op


@torch.library.custom_op("segformer::efficient_attention", mutates_args=())
@kernel_launcher
def _attention_op(q: Tensor, k: Tensor, v: Tensor, scale: float, input_precision: str) -> tuple[Tensor, Tensor]:
    """Returns (o [B, N, h, d], row log-sum-exp fp32 [B, h, N]); the second is kept for
    the backward and is not differentiable."""
    return launch_forward(q, k, v, scale, input_precision)


@_attention_op.register_fake
def _attention_op_fake(q, k, v, scale, input_precision):
    batch, n, heads, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, heads, n), dtype=torch.float32)


@torch.library.custom_op("segformer::efficient_attention_backward", mutates_args=())
@kernel_launcher
def _attention_backward_op(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float, input_precision: str
) -> tuple[Tensor, Tensor, Tensor]:
    return launch_backward(grad_out, q, k, v, out, lse, scale, input_precision)


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


def _backward_formula(ctx, grad_out, _grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    grad_q, grad_k, grad_v = _attention_backward_op(grad_out, q, k, v, out, lse, ctx.scale, ctx.input_precision)
    return grad_q, grad_k, grad_v, None, None


_attention_op.register_autograd(_backward_formula, setup_context=_setup_context)


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


def _launches():
    """Every (kernel, config, dtype, head dim, dot precision, layout) the launchers can
    launch on a GPU; dK/dV also with fp32 partial buffers (several query splits) for
    16-bit inputs, whose single-split buffers are in the input dtype."""
    for (dtype, precision), head_dim, layout, kernel in itertools.product(
        DTYPE_PRECISIONS, HEAD_DIMS, (ALIGNED, UNALIGNED), KERNELS
    ):
        constexprs = {"HEAD_DIM": head_dim, "BLOCK_D": core.block_d(head_dim), "INPUT_PRECISION": precision,
                      **layout.constexprs()}
        split_partials = (False, True) if kernel == "backward_dkdv" and dtype != torch.float32 else (False,)
        for tile, partials in itertools.product(tiles(kernel, head_dim, dtype, precision, layout), split_partials):
            yield Launch(kernel, dtype, tile, constexprs, shape=f"d={head_dim}" + (" partials" if partials else ""),
                         fp32_pointers=frozenset({"DK", "DV"} if partials else ()))


def compile_targets() -> list[CompileTarget]:
    return build_targets("attention", KERNELS, _launches(), pointers=_TENSOR_POINTERS, fp32_pointers=_STAT_POINTERS,
                         floats=SCALE_ARGUMENTS)
