"""Inputs chosen to break the numerics of the attention and LayerNorm kernels: rows whose
scores are all very negative or very large (|s| up to 60), a single key (M = 1), a
prime M that leaves padded keys in the last key tile, rows of identical keys or
constant values, and inputs near the fp16 limits. Outputs and every gradient must be
finite and within the dtype's tolerance of the fp64 reference on the same inputs."""

from __future__ import annotations

import pytest
import torch

import segformer_kernels as sk
from helpers import TOLERANCE, assert_close, kernel_dtypes
from segformer_kernels import reference
from segformer_kernels.triton import attention
from segformer_kernels.triton import fused_attention as fused


N, HEAD_DIM = 37, 32
# Score levels per query row: each row's scores are its level plus a spread of about
# one (so softmax is neither uniform nor one-hot).
SCORE_ROWS = {
    "very_negative": (-60.0, -25.0),
    "very_large": (25.0, 60.0),
    "mixed": (-60.0, 60.0),
}
KEY_COUNTS = {"M1": 1, "M7_prime": 7, "M37_prime_two_tiles": 37}
# Below 1 the key's level component shrinks and the query's grows by the same factor,
# leaving the scores alone: query elements near the fp16 limit (2e4 of 6.5e4).
FP16_LIMIT_FACTOR = 250.0
# Tolerance multiples. These inputs are ill-conditioned on purpose: scores of 60 make
# softmax ~60x more sensitive to the rounding of the score than the unit scores of the
# other tests, and constant rows or a mean 1000x the spread do the same to LayerNorm's
# centring; the fp64 reference sees none of that rounding. fp32's 1e-5 budget assumes
# well-conditioned inputs, so it gets 16x here; fp16's error is dominated by the 16-bit
# rounding of the operands and results, which conditioning does not change.
ILL_CONDITIONED = {torch.float32: 16, torch.float16: 2, torch.bfloat16: 2}


def _queries_and_keys(score_range, m, dtype, device, magnitude=1.0, identical_keys=False):
    """q [1, N, 1, d], k [1, m, 1, d] with scores scale * q_i.k_j = level_i + O(1): level
    and key along the first dimension, independent noise in the others."""
    scale = HEAD_DIM**-0.5
    key_level = 4.0 * magnitude
    levels = torch.linspace(*score_range, N, dtype=torch.float64)
    q = torch.randn(N, HEAD_DIM, dtype=torch.float64)
    k = torch.randn(m, HEAD_DIM, dtype=torch.float64)
    if identical_keys:
        k[:] = k[0]
    q[:, 0] = levels / (scale * key_level)
    k[:, 0] = key_level
    return (
        q.to(device, dtype)[None, :, None, :].requires_grad_(),
        k.to(device, dtype)[None, :, None, :].requires_grad_(),
    )


def _check_gradients(names, got, expected, upstream, dtype):
    for name, grad, ref_grad in zip(names, got, expected):
        assert torch.isfinite(grad).all(), f"gradient of {name}: {(~torch.isfinite(grad)).sum().item()} non-finite"
        if ref_grad.norm() <= 1e-9 * upstream.double().norm():
            # zero in exact arithmetic (a single key, identical keys): the kernel's is
            # rounding noise, bounded relative to the upstream gradient
            assert grad.double().norm() <= TOLERANCE[dtype] * upstream.double().norm() * HEAD_DIM, name
        else:
            assert_close(grad, ref_grad, dtype, f"gradient of {name}", scale=ILL_CONDITIONED[dtype])


def _cases() -> list:
    cases = [
        pytest.param(score_range, m, 1.0, False, id=f"{score_name}-{m_name}")
        for score_name, score_range in SCORE_ROWS.items()
        for m_name, m in KEY_COUNTS.items()
    ]
    cases.append(pytest.param(SCORE_ROWS["mixed"], 7, 1.0, True, id="identical_keys-M7"))
    cases.append(pytest.param(SCORE_ROWS["mixed"], 37, 1 / FP16_LIMIT_FACTOR, False, id="near_fp16_limit-M37"))
    return cases


@pytest.mark.parametrize("dtype", kernel_dtypes(), ids=str)
@pytest.mark.parametrize("score_range, m, magnitude, identical_keys", _cases())
def test_attention_extreme_scores(score_range, m, magnitude, identical_keys, dtype, device):
    q, k = _queries_and_keys(score_range, m, dtype, device, magnitude, identical_keys)
    v = torch.randn(1, m, 1, HEAD_DIM, device=device).to(dtype).requires_grad_()
    out = attention.efficient_attention(q, k, v, input_precision="ieee")
    upstream = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), upstream)

    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = reference.efficient_attention(*leaves64)
    expected = torch.autograd.grad(ref, leaves64, upstream.double())
    assert_close(out, ref, dtype, "output", scale=ILL_CONDITIONED[dtype])
    _check_gradients(("q", "k", "v"), got, expected, upstream, dtype)


@pytest.mark.parametrize("dtype", kernel_dtypes(), ids=str)
@pytest.mark.parametrize("score_range, m, magnitude, identical_keys", _cases())
def test_fused_attention_extreme_scores(score_range, m, magnitude, identical_keys, dtype, device):
    """q_proj is the identity, so x sets the scores exactly as q does above."""
    assert fused.fused_kernels_run(HEAD_DIM, HEAD_DIM, dtype)
    x, k = _queries_and_keys(score_range, m, dtype, device, magnitude, identical_keys)
    x = x.detach().flatten(2).requires_grad_()
    v = torch.randn(1, m, 1, HEAD_DIM, device=device).to(dtype).requires_grad_()
    q_weight = torch.eye(HEAD_DIM, device=device, dtype=dtype).requires_grad_()
    q_bias = torch.zeros(HEAD_DIM, device=device, dtype=dtype).requires_grad_()
    out_weight = (torch.randn(HEAD_DIM, HEAD_DIM, device=device) * HEAD_DIM**-0.5).to(dtype).requires_grad_()
    out_bias = torch.randn(HEAD_DIM, device=device).to(dtype).requires_grad_()
    leaves = (x, q_weight, q_bias, k, v, out_weight, out_bias)
    out = fused.fused_attention(*leaves, input_precision="ieee")
    # dWq = dQ^T x sums N rows of x: near the fp16 limit, a smaller upstream gradient
    # keeps the true gradient representable in fp16
    upstream = torch.randn_like(out) * (1 / 64 if magnitude < 1 else 1)
    got = torch.autograd.grad(out, leaves, upstream)

    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    ref = reference.fused_attention(*leaves64)
    expected = torch.autograd.grad(ref, leaves64, upstream.double())
    assert_close(out, ref, dtype, "output", scale=ILL_CONDITIONED[dtype])
    _check_gradients(("x", "q_weight", "q_bias", "k", "v", "out_weight", "out_bias"), got, expected, upstream, dtype)


def _layer_norm_rows(kind, rows, channels, dtype, device):
    if kind == "constant_rows":
        x = torch.randn(rows, 1).expand(rows, channels) * 3
    elif kind == "large_mean_small_spread":  # cancellation in the variance
        x = 1e4 + torch.randn(rows, channels) * 8
    elif kind == "near_fp16_limit":
        x = torch.randn(rows, channels).clamp(-2, 2) * 2e4
    else:
        raise AssertionError(kind)
    return x.to(device, dtype).contiguous().requires_grad_()


@pytest.mark.parametrize("dtype", kernel_dtypes(), ids=str)
@pytest.mark.parametrize("rows, channels", [(1, 64), (37, 20), (13, 1)], ids=["one_row", "rows37_C20", "C1"])
@pytest.mark.parametrize("kind", ["constant_rows", "large_mean_small_spread", "near_fp16_limit"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_layer_norm_extreme_rows(kind, rows, channels, with_residual, dtype, device):
    eps = 1e-5
    x = _layer_norm_rows(kind, rows, channels, dtype, device)
    # a residual of the same kind at half the size keeps x + residual in fp16 range
    residual = (x.detach() * -0.5).requires_grad_() if with_residual else None
    weight = (1 + 0.5 * torch.randn(channels, device=device)).requires_grad_()
    bias = (0.5 * torch.randn(channels, device=device)).requires_grad_()
    out = sk.layer_norm(x, weight, bias, eps, residual, kernels="triton")
    outputs = out if with_residual else (out,)
    inputs = [t for t in (x, residual, weight, bias) if t is not None]
    upstream = [torch.randn_like(o) for o in outputs]
    got = torch.autograd.grad(outputs, inputs, upstream)

    leaves64 = [None if t is None else t.detach().double().requires_grad_() for t in (x, residual, weight, bias)]
    ref = reference.layer_norm(leaves64[0], leaves64[2], leaves64[3], eps, leaves64[1])
    ref_outputs = ref if with_residual else (ref,)
    expected = torch.autograd.grad(ref_outputs, [t for t in leaves64 if t is not None], [u.double() for u in upstream])
    # A constant row's x - mean is zero; the kernel's is the rounding of its mean, ~|x| * eps
    # (fp32: on a GPU the division itself is approximate), which rstd = 1/sqrt(1e-5) makes
    # ~|x| times the tolerance in the output: relative to it, the error grows with |x|.
    scale = ILL_CONDITIONED[dtype] * (max(1.0, x.detach().abs().max().item()) if kind == "constant_rows" else 1.0)
    for output, ref_output in zip(outputs, ref_outputs):
        assert_close(output, ref_output, dtype, "output", scale=scale)
    names = ["x", "residual", "weight", "bias"] if with_residual else ["x", "weight", "bias"]
    for name, grad, ref_grad in zip(names, got, expected):
        assert torch.isfinite(grad).all(), f"gradient of {name} is not finite"
        if ref_grad.norm() <= 1e-9 * upstream[0].double().norm():
            # C = 1 and constant rows: x - mean is exactly zero, and with it the gradient of
            # x (C = 1) or of the weight (constant rows); the kernel's x - mean is the
            # rounding of the mean, |x| * eps, which rstd = eps**-0.5 then magnifies
            floor = ILL_CONDITIONED[dtype] * TOLERANCE[dtype] * x.detach().abs().max().double()
            assert grad.double().norm() <= floor * upstream[0].double().norm(), name
        else:
            assert_close(grad, ref_grad, dtype, f"gradient of {name}", scale=scale)
