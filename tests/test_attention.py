"""The efficient attention core (segformer_kernels/triton/attention.py) against the fp64 reference.

On CPU these run the Triton interpreter (fp32, fp16); on a GPU the same tests run the
compiled kernels and add bf16. fp32 pins input_precision="ieee" so tf32 does not eat
the 1e-5 tolerance.
"""

from __future__ import annotations

import pytest
import torch

import segformer_kernels as sk
from helpers import TOLERANCE, assert_close, grads, kernel_dtypes
from segformer_kernels import reference
from segformer_kernels.triton import attention, attention_core

# (batch, N, M, heads, head_dim). The variants' stages scaled down: the grids keep
# each stage's sr (8, 4, 2, 1), so M = (h // sr) * (w // sr) of an h x w grid.
VARIANT_STAGES = {
    "b0_stage1_16x24_sr8": (2, 16 * 24, 2 * 3, 1, 32),
    "b0_stage2_12x8_sr4": (1, 12 * 8, 3 * 2, 2, 32),
    "b2_stage3_7x9_sr2": (1, 7 * 9, 3 * 4, 5, 64),
    "b2_stage4_5x5_sr1": (1, 5 * 5, 5 * 5, 8, 64),
}
ODD_SHAPES = {
    "N_prime_M1": (3, 37, 1, 2, 32),
    "M5_d16": (1, 97, 5, 1, 16),
    "M70_three_key_blocks": (1, 41, 70, 2, 32),
    "d128": (1, 19, 7, 1, 128),
    "d24_not_pow2": (3, 23, 9, 2, 24),
    "split_partials": (1, 300, 5, 1, 64),  # several dK/dV query splits (see test below)
}


def _inputs(shape, dtype, device):
    batch, n, m, heads, head_dim = shape
    q = torch.randn(batch, n, heads, head_dim, dtype=dtype, device=device, requires_grad=True)
    k = torch.randn(batch, m, heads, head_dim, dtype=dtype, device=device, requires_grad=True)
    v = torch.randn(batch, m, heads, head_dim, dtype=dtype, device=device, requires_grad=True)
    return q, k, v


def _reference_with_grads(leaves, make_qkv, upstream, scale=None):
    """Output and leaf gradients of the fp64 reference, with q, k, v built from fp64
    copies of the leaves by the same ``make_qkv`` the kernel run used."""
    leaves64 = [leaf.detach().double().requires_grad_() for leaf in leaves]
    out = reference.efficient_attention(*make_qkv(*leaves64), scale)
    return out, torch.autograd.grad(out, leaves64, upstream.double())


def _check(leaves, make_qkv, dtype, scale=None):
    out = attention.efficient_attention(*make_qkv(*leaves), scale, input_precision="ieee")
    leaf_grads, upstream = grads(out, leaves)
    ref, ref_grads = _reference_with_grads(leaves, make_qkv, upstream, scale)
    assert out.dtype == dtype
    assert_close(out, ref, dtype, "output")
    for index, (grad, ref_grad) in enumerate(zip(leaf_grads, ref_grads)):
        if ref_grad.count_nonzero() == 0:
            # M = 1: softmax over one key is constant, so dq and dk are exactly zero and
            # the kernel's are rounding noise; bound that noise by the upstream gradient.
            assert torch.isfinite(grad).all()
            assert grad.norm() <= TOLERANCE[dtype] * upstream.norm(), f"gradient of input {index} is not ~0"
        else:
            assert_close(grad, ref_grad, dtype, f"gradient of input {index}")


def _identity(*tensors):
    return tensors


@pytest.mark.parametrize("dtype", kernel_dtypes(), ids=str)
@pytest.mark.parametrize("shape", [*VARIANT_STAGES.values(), *ODD_SHAPES.values()], ids=[*VARIANT_STAGES, *ODD_SHAPES])
def test_matches_reference(shape, dtype, device, poisoned_allocations):
    _check(_inputs(shape, dtype, device), _identity, dtype)


def test_split_partials_case_really_splits():
    """The split_partials shape must exercise the fp32 partial sum of dK/dV (and the
    other shapes the direct single-split path)."""
    batch, n, m, heads, _ = ODD_SHAPES["split_partials"]
    assert attention_core.query_split_rows(batch * heads, n, m) < n
    batch, n, m, heads, _ = ODD_SHAPES["N_prime_M1"]
    assert attention_core.query_split_rows(batch * heads, n, m) >= n


@pytest.mark.parametrize("dtype", kernel_dtypes(), ids=str)
@pytest.mark.parametrize("scale", [0.37, 4.0])
def test_explicit_scale(scale, dtype, device):
    """scale = 4 puts the largest scores near 50-100, where exp overflows fp32 unless
    the online softmax subtracts its running max."""
    _check(_inputs((2, 29, 11, 2, 32), dtype, device), _identity, dtype, scale=scale)


def test_strided_views_of_projection_outputs(device, poisoned_allocations, monkeypatch):
    """q the first columns of a wider projection output, stored head-major, or every
    other element of its head dim; k and v the two halves of one fused [B, M, 2*h*d] kv
    projection. Read in place (no copies), under both layouts the kernels compile for."""
    dtype = torch.float32
    batch, n, m, heads, head_dim = 2, 45, 13, 2, 32
    width = heads * head_dim

    def kv_halves(kv):
        return kv.unflatten(-1, (2, heads, head_dim)).unbind(2)

    def sliced_q(projection, kv):  # token stride width + 8: not a multiple of 16
        return projection[..., :width].unflatten(-1, (heads, head_dim)), *kv_halves(kv)

    def head_major_q(q_heads_first, kv):  # every stride a multiple of 16, head dim contiguous
        return q_heads_first.transpose(1, 2), *kv_halves(kv)

    def head_dim_strided_q(doubled, kv):  # head-dim stride 2
        return doubled.unflatten(-1, (heads, head_dim, 2))[..., 0], *kv_halves(kv)

    kv = torch.randn(batch, m, 2 * width, device=device, requires_grad=True)
    cases = [
        (sliced_q, torch.randn(batch, n, width + 8, device=device, requires_grad=True), attention.UNALIGNED),
        (head_major_q, torch.randn(batch, heads, n, head_dim, device=device, requires_grad=True), attention.ALIGNED),
        (head_dim_strided_q, torch.randn(batch, n, 2 * width, device=device, requires_grad=True), attention.UNALIGNED),
    ]

    def no_copies(self, *args, **kwargs):
        raise AssertionError("the attention op must read strided views in place, not call .contiguous()")

    monkeypatch.setattr(torch.Tensor, "contiguous", no_copies)
    for make_qkv, q_source, layout in cases:
        q, k, v = make_qkv(q_source, kv)
        assert not any(t.is_contiguous() for t in (q, k, v))
        assert attention._layout_of(q, k, v) == layout
        _check((q_source, kv), make_qkv, dtype)


def test_row_log_sum_exp_is_stored(device):
    q, k, v = (t.detach() for t in _inputs((2, 33, 9, 3, 32), torch.float32, device))
    scale = 0.21
    out, lse = torch.ops.segformer.efficient_attention(q, k, v, scale, "ieee")
    scores = torch.einsum("bnhd,bmhd->bhnm", q.double(), k.double()) * scale
    assert lse.shape == (2, 3, 33) and lse.dtype == torch.float32
    assert_close(lse, torch.logsumexp(scores, dim=-1), torch.float32, "log-sum-exp")
    assert_close(out, reference.efficient_attention(q.double(), k.double(), v.double(), scale), torch.float32)


def test_backward_is_deterministic(device):
    q, k, v = _inputs(ODD_SHAPES["split_partials"], torch.float32, device)
    out = attention.efficient_attention(q, k, v)
    upstream = torch.randn_like(out)
    first = torch.autograd.grad(out, (q, k, v), upstream, retain_graph=True)
    second = torch.autograd.grad(out, (q, k, v), upstream)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_public_op_runs_the_kernel(device):
    """sk.efficient_attention(kernels="triton") is this kernel (same bits), scale included."""
    q, k, v = (t.detach() for t in _inputs((3, 31, 6, 2, 16), torch.float16, device))
    public = sk.efficient_attention(q, k, v, 0.5, kernels="triton")
    assert torch.equal(public, attention.efficient_attention(q, k, v, 0.5))
    assert_close(public, reference.efficient_attention(q.double(), k.double(), v.double(), 0.5), torch.float16)


def test_public_op_under_autocast(device):
    """Under fp16 autocast the public op casts fp32 inputs and returns fp16."""
    q, k, v = (t.detach() for t in _inputs((1, 21, 4, 1, 32), torch.float32, device))
    with torch.autocast(device.type, dtype=torch.float16):
        out = sk.efficient_attention(q, k, v, kernels="triton")
    assert out.dtype == torch.float16
    assert_close(out, reference.efficient_attention(q.double(), k.double(), v.double()), torch.float16)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda q, k, v: (q[0], k, v), ValueError, "q must be 4-D"),
        (lambda q, k, v: (q, k[:, :, :1], v), ValueError, "k must have shape"),
        (lambda q, k, v: (q, k, v[:, :2]), ValueError, "v must have shape"),
        (lambda q, k, v: (q, k.half(), v.half()), TypeError, "k is torch.float16 but q is torch.float32"),
        (lambda q, k, v: (q, k[:, :0], v[:, :0]), ValueError, "non-empty"),
        (lambda q, k, v: (q.int(), k, v), TypeError, "q must be float32"),
        (lambda q, k, v: (q.double(), k.double(), v.double()), TypeError, "float64"),
    ],
)
def test_bad_inputs_raise(change, error, match, device):
    q, k, v = (t.detach() for t in _inputs((1, 8, 4, 2, 16), torch.float32, device))
    with pytest.raises(error, match=match):
        sk.efficient_attention(*change(q, k, v), kernels="triton")


def test_bad_scale_and_precision_raise(device):
    q, k, v = (t.detach() for t in _inputs((1, 8, 4, 2, 16), torch.float32, device))
    with pytest.raises(TypeError, match="scale must be a float"):
        sk.efficient_attention(q, k, v, "0.5", kernels="triton")
    with pytest.raises(ValueError, match="input_precision"):
        attention.efficient_attention(q, k, v, input_precision="tf64")


def test_torch_compile_traces_without_graph_break(device):
    def block(q, k, v):
        return sk.efficient_attention(q * 2, k, v, kernels="triton").square().sum()

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    q, k, v = _inputs((2, 27, 6, 2, 32), torch.float32, device)
    eager_loss = block(q, k, v)
    eager_grads = torch.autograd.grad(eager_loss, (q, k, v))
    compiled_loss = compiled(q, k, v)
    compiled_grads = torch.autograd.grad(compiled_loss, (q, k, v))
    assert torch.equal(compiled_loss, eager_loss)
    for a, b in zip(compiled_grads, eager_grads):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_fp32_follows_torch_matmul_precision(device):
    """Without an explicit input_precision, fp32 follows torch's setting: "high" allows
    tf32 dots, accurate to tf32's ~1e-3."""
    q, k, v = _inputs(VARIANT_STAGES["b0_stage1_16x24_sr8"], torch.float32, device)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        out = attention.efficient_attention(q, k, v)
        (dq, dk, dv), upstream = grads(out, (q, k, v))
    finally:
        torch.set_float32_matmul_precision(previous)
    ref, ref_grads = _reference_with_grads((q, k, v), _identity, upstream)
    assert_close(out, ref, torch.float32, "output", scale=200)
    for index, (grad, ref_grad) in enumerate(zip((dq, dk, dv), ref_grads)):
        assert_close(grad, ref_grad, torch.float32, f"gradient of input {index}", scale=200)
