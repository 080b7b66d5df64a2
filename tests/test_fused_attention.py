"""Attention with fused projections (segformer_kernels/triton/fused_attention.py) against the fp64 reference.

On CPU these run the Triton interpreter (fp32, fp16); on a GPU the same tests run the
compiled kernels and add bf16. fp32 pins input_precision="ieee" so tf32 does not eat
the 1e-5 tolerance.
"""

from __future__ import annotations

import pytest
import torch

import segformer_kernels as sk
from helpers import TOLERANCE, assert_close, grads, kernel_dtypes
from segformer_kernels import reference, torch_ops
from segformer_kernels.triton import attention_core, launch
from segformer_kernels.triton import fused_attention as fused


# (batch, N, M, heads, head_dim): stages 1-2 of the variants scaled down (sr 8 and 4 on
# small grids), then odd ones.
STAGE_SHAPES = {
    "b0_stage1_C32": (2, 16 * 24, 2 * 3, 1, 32),
    "b0_stage2_C64_h2": (1, 12 * 8, 3 * 2, 2, 32),
    "b1_stage1_C64": (1, 9 * 13, 1 * 1, 1, 64),
    "b1_stage2_C128_h2": (3, 7 * 11, 5, 2, 64),
}
ODD_SHAPES = {
    "N_prime_M1": (3, 37, 1, 1, 32),
    "M70_three_key_blocks": (1, 41, 70, 2, 16),
    "C24_not_pow2": (2, 23, 9, 1, 24),
    "h3_d16": (1, 29, 4, 3, 16),
    "split_partials": (1, 300, 5, 1, 32),  # several dK/dV query splits
    "C160_cublas_projections": (1, 19, 5, 5, 32),  # past MAX_FUSED_CHANNELS
}
NAMES = ("x", "q_weight", "q_bias", "k", "v", "out_weight", "out_bias")


def _inputs(shape, dtype, device, requires_grad=True):
    """x, q_weight, q_bias, k, v, out_weight, out_bias, with k and v strided views of one
    [B, M, 2C] kv projection output, as the model and the benchmark make them."""
    batch, n, m, heads, head_dim = shape
    channels = heads * head_dim

    def make(*size, scale=1.0):
        return (torch.randn(*size, device=device) * scale).to(dtype).requires_grad_(requires_grad)

    kv = make(batch, m, 2 * channels)
    k, v = kv.unflatten(-1, (2, heads, head_dim)).unbind(2)
    weight_scale = channels**-0.5
    return (
        make(batch, n, channels), make(channels, channels, scale=weight_scale), make(channels, scale=0.5),
        k, v, make(channels, channels, scale=weight_scale), make(channels, scale=0.5),
    ), kv


def _check(shape, dtype, device, scale=None):
    inputs, kv = _inputs(shape, dtype, device)
    leaves = (*inputs[:3], kv, *inputs[5:])
    out = fused.fused_attention(*inputs, scale, input_precision="ieee")
    assert out.dtype == dtype
    leaf_grads, upstream = grads(out, leaves)

    leaves64 = [leaf.detach().double().requires_grad_() for leaf in leaves]
    heads, head_dim = shape[3:]
    k64, v64 = leaves64[3].unflatten(-1, (2, heads, head_dim)).unbind(2)
    ref = reference.fused_attention(*leaves64[:3], k64, v64, *leaves64[4:], scale)
    ref_grads = torch.autograd.grad(ref, leaves64, upstream.double())
    assert_close(out, ref, dtype, "output")
    for name, grad, ref_grad in zip(("x", "q_weight", "q_bias", "kv", "out_weight", "out_bias"), leaf_grads, ref_grads):
        if shape[2] == 1 and name in ("x", "q_weight", "q_bias"):
            # M = 1: softmax over one key is constant, so the output does not depend on q
            # and these gradients are exactly zero; the kernel's are rounding noise, which
            # dQ noise (relative to the upstream gradient) times a row of x bounds.
            assert ref_grad.count_nonzero() == 0
            assert torch.isfinite(grad).all()
            bound = TOLERANCE[dtype] * upstream.norm() * shape[3] ** 0.5
            assert grad.norm() <= bound, f"gradient of {name} is not ~0"
        else:
            assert_close(grad, ref_grad, dtype, f"gradient of {name}")


@pytest.mark.parametrize("dtype", kernel_dtypes(), ids=str)
@pytest.mark.parametrize("shape", [*STAGE_SHAPES.values(), *ODD_SHAPES.values()], ids=[*STAGE_SHAPES, *ODD_SHAPES])
def test_matches_reference(shape, dtype, device, poisoned_allocations):
    _check(shape, dtype, device)


@pytest.mark.parametrize("winner", ["largest", "smallest", "1"])
def test_every_gradient_whichever_autotune_candidate_wins(winner, device, monkeypatch):
    """The autotuner benchmarks every candidate on the live buffers before the winner's
    run; the backward's per-program bias-gradient partials must hold only what the
    winner wrote. "largest" is a 128-row query tile: fewer programs than the buffer has
    rows, the rest filled by the 64-row candidates' benchmark runs unless reset."""
    monkeypatch.setattr(launch, "INTERPRET_AUTOTUNE", True)
    monkeypatch.setenv("SK_AUTOTUNE_WINNER", winner)
    _check(STAGE_SHAPES["b0_stage1_C32"], torch.float16, device)


def test_shapes_cover_the_paths():
    """split_partials must really split the dK/dV query rows; C24 (d not a multiple of
    16) and C160 (past the fused width) take the cuBLAS-projection path, every other
    shape the fused kernels (in fp32 only up to C = 64)."""
    batch, n, m, heads, _ = ODD_SHAPES["split_partials"]
    assert attention_core.query_split_rows(batch * heads, n, m) < n
    for name, (_, _, _, heads, head_dim) in {**STAGE_SHAPES, **ODD_SHAPES}.items():
        fused_path = not name.startswith(("C24", "C160"))
        channels = heads * head_dim
        assert fused.fused_kernels_run(channels, head_dim, torch.float16) == fused_path
        assert fused.fused_kernels_run(channels, head_dim, torch.float32) == (fused_path and channels <= 64)


def test_unaligned_key_values_are_copied_for_the_kernels(device, poisoned_allocations):
    """k and v slices of a [B, M, 2C + 8] tensor (token stride not a multiple of 16)."""
    batch, n, m, heads, head_dim = 2, 37, 6, 2, 16
    channels = heads * head_dim
    inputs, _ = _inputs((batch, n, m, heads, head_dim), torch.float32, device, requires_grad=False)
    wide = torch.randn(batch, m, 2 * channels + 8, device=device, requires_grad=True)
    k, v = wide[..., : 2 * channels].unflatten(-1, (2, heads, head_dim)).unbind(2)
    assert not fused._aligned(k)
    out = fused.fused_attention(*inputs[:3], k, v, *inputs[5:], input_precision="ieee")
    (grad,), upstream = grads(out, (wide,))
    wide64 = wide.detach().double().requires_grad_()
    k64, v64 = wide64[..., : 2 * channels].unflatten(-1, (2, heads, head_dim)).unbind(2)
    ref = reference.fused_attention(*(t.double() for t in inputs[:3]), k64, v64, *(t.double() for t in inputs[5:]))
    assert_close(out, ref, torch.float32)
    assert_close(grad, torch.autograd.grad(ref, wide64, upstream.double())[0], torch.float32, "gradient of k/v")


@pytest.mark.parametrize("dtype", kernel_dtypes(), ids=str)
def test_explicit_scale(dtype, device):
    """In fp32 a scale of 4 puts scores near 50-100, where exp overflows unless the online
    softmax subtracts its max. In 16-bit, q itself is rounded (as q_proj rounds it), and
    a large scale multiplies that rounding into the scores beyond the tolerance, so a
    small scale checks that the scale reaches the kernels."""
    _check((2, 29, 11, 2, 32), dtype, device, scale=4.0 if dtype == torch.float32 else 0.37)


def test_saved_outputs_are_the_attention_output_and_log_sum_exp(device):
    """What the forward keeps for the backward: o [B, N, h, d] and the row log-sum-exp;
    without save_for_backward both are empty and y is the same bits."""
    shape = (2, 33, 9, 2, 32)
    inputs, _ = _inputs(shape, torch.float32, device, requires_grad=False)
    x, q_weight, q_bias, k, v, out_weight, out_bias = inputs
    scale = 0.3
    y, out, lse = torch.ops.segformer.fused_attention(*inputs, scale, "ieee", True)
    q64 = torch.nn.functional.linear(x.double(), q_weight.double(), q_bias.double()).unflatten(-1, shape[3:])
    scores = torch.einsum("bnhd,bmhd->bhnm", q64, k.double()) * scale
    assert out.shape == (2, 33, 2, 32) and lse.shape == (2, 2, 33) and lse.dtype == torch.float32
    assert_close(lse, torch.logsumexp(scores, dim=-1), torch.float32, "log-sum-exp")
    assert_close(out, reference.efficient_attention(q64, k.double(), v.double(), scale), torch.float32, "o")
    assert_close(y, reference.fused_attention(*(t.double() for t in inputs), scale), torch.float32, "y")

    y_inference, out_inference, lse_inference = torch.ops.segformer.fused_attention(*inputs, scale, "ieee", False)
    assert out_inference.numel() == 0 and lse_inference.numel() == 0
    assert torch.equal(y_inference, y)


def test_inference_saves_nothing(device, monkeypatch):
    """Under no_grad (or with no input requiring grad) the op is called without saving."""
    calls = []
    original = fused._fused_attention_op

    def spy(*args):
        calls.append(args[-1])
        return original(*args)

    monkeypatch.setattr(fused, "_fused_attention_op", spy)
    inputs, _ = _inputs((1, 21, 4, 1, 32), torch.float32, device)
    with torch.no_grad():
        fused.fused_attention(*inputs)
    fused.fused_attention(*(t.detach() for t in inputs))
    fused.fused_attention(*inputs)
    assert calls == [False, False, True]


def test_backward_is_deterministic(device):
    inputs, kv = _inputs(ODD_SHAPES["split_partials"], torch.float32, device)
    leaves = (*inputs[:3], kv, *inputs[5:])
    out = fused.fused_attention(*inputs)
    upstream = torch.randn_like(out)
    first = torch.autograd.grad(out, leaves, upstream, retain_graph=True)
    second = torch.autograd.grad(out, leaves, upstream)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_public_op_runs_the_kernel(device):
    """sk.fused_attention(kernels="triton") is this kernel (same bits), scale included;
    kernels="torch" is the PyTorch path (torch_ops)."""
    inputs, _ = _inputs((3, 31, 6, 2, 16), torch.float16, device, requires_grad=False)
    public = sk.fused_attention(*inputs, 0.5, kernels="triton")
    assert torch.equal(public, fused.fused_attention(*inputs, 0.5))
    assert torch.equal(sk.fused_attention(*inputs, 0.5, kernels="torch"), torch_ops.fused_attention(*inputs, 0.5))
    assert_close(public, reference.fused_attention(*(t.double() for t in inputs), 0.5), torch.float16)


def test_public_op_under_autocast(device):
    """Under fp16 autocast the public op casts fp32 inputs and returns fp16."""
    inputs, _ = _inputs((1, 21, 4, 1, 32), torch.float32, device, requires_grad=False)
    with torch.autocast(device.type, dtype=torch.float16):
        out = sk.fused_attention(*inputs, kernels="triton")
    assert out.dtype == torch.float16
    assert_close(out, reference.fused_attention(*(t.double() for t in inputs)), torch.float16)


def _replace(inputs, name, value):
    return tuple(value if n == name else t for n, t in zip(NAMES, inputs))


@pytest.mark.parametrize(
    "name, change, error, match",
    [
        ("x", lambda t: t[0], ValueError, "x must be 3-D"),
        ("x", lambda t: t[:, :0], ValueError, "x must be a non-empty"),  # N = 0 tokens
        ("k", lambda t: t[..., :8], ValueError, "heads \\* head_dim = C = 32"),
        ("k", lambda t: t[:1], ValueError, "k must have shape"),
        ("k", lambda t: t[:, :0], ValueError, "non-empty"),
        ("v", lambda t: t[:, :2], ValueError, "v must have shape"),
        ("q_weight", lambda t: t[:, :16], ValueError, "q_weight must have shape \\[32, 32\\]"),
        ("out_bias", lambda t: t[:5], ValueError, "out_bias must have shape \\[32\\]"),
        ("out_weight", lambda t: t.half(), TypeError, "out_weight is torch.float16 but x is torch.float32"),
        ("q_bias", lambda t: t.int(), TypeError, "q_bias must be float32"),
        ("v", lambda t: t.tolist(), TypeError, "v must be a torch.Tensor"),
    ],
)
def test_bad_inputs_raise(name, change, error, match, device):
    inputs, _ = _inputs((2, 8, 4, 2, 16), torch.float32, device, requires_grad=False)
    changed = _replace(inputs, name, change(dict(zip(NAMES, inputs))[name]))
    with pytest.raises(error, match=match):
        sk.fused_attention(*changed, kernels="triton")


def test_float64_takes_the_pytorch_path(device):
    inputs, _ = _inputs((1, 8, 4, 2, 16), torch.float64, device, requires_grad=False)
    assert torch.equal(sk.fused_attention(*inputs), torch_ops.fused_attention(*inputs))
    with pytest.raises(TypeError, match="float64"):
        sk.fused_attention(*inputs, kernels="triton")


def test_torch_compile_traces_without_graph_break(device):
    def block(x, q_weight, q_bias, k, v, out_weight, out_bias):
        return sk.fused_attention(x * 2, q_weight, q_bias, k, v, out_weight, out_bias, kernels="triton").square().sum()

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    inputs, kv = _inputs((2, 27, 6, 2, 32), torch.float32, device)
    leaves = (*inputs[:3], kv, *inputs[5:])
    expected = torch.autograd.grad(block(*inputs), leaves)
    got = torch.autograd.grad(compiled(*inputs), leaves)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
