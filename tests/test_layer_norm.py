"""The fused LayerNorm (optionally with the residual add) against the fp64 reference:
outputs and the gradients of x, residual, weight and bias."""

import pytest
import torch

import segformer_kernels as sk
from helpers import assert_close, grads, kernel_dtypes
from segformer_kernels import reference

EPS = 1e-5

# (leading shape, C): prime row counts, C not a power of two (20, 160) or above
# the model's 512 (1000 -> a 1024-wide block), batch 1 and 3, 2-D and 4-D inputs.
CASES = [
    ((3, 37), 160),
    ((1, 13), 20),
    ((2, 7), 512),
    ((1, 1), 32),
    ((5,), 1000),
    ((3, 2, 5), 64),
]


def _inputs(leading, channels, dtype, device, with_residual, weight_dtype=torch.float32):
    x = torch.randn(*leading, channels, dtype=dtype, device=device, requires_grad=True)
    residual = torch.randn_like(x, requires_grad=True) if with_residual else None
    # Weights far from (1, 0) so that a swapped or missing affine term shows.
    weight = (1 + 0.5 * torch.randn(channels, device=device)).to(weight_dtype).requires_grad_()
    bias = (0.5 * torch.randn(channels, device=device)).to(weight_dtype).requires_grad_()
    return x, residual, weight, bias


def _fp64_leaves(*tensors):
    return [None if t is None else t.detach().double().requires_grad_() for t in tensors]


def _check_against_fp64(x, residual, weight, bias, dtype, upstream=None):
    """Run the Triton op, then compare its outputs and every gradient with the fp64
    reference under the same random upstream gradients."""
    out = sk.layer_norm(x, weight, bias, EPS, residual, kernels="triton")
    outputs = out if residual is not None else (out,)
    inputs = [t for t in (x, residual, weight, bias) if t is not None]
    for output in outputs:
        assert output.dtype == x.dtype and output.shape == x.shape
    if upstream is None:
        upstream = [torch.randn_like(o) for o in outputs]
    got = torch.autograd.grad(outputs, inputs, upstream)

    x64, residual64, weight64, bias64 = _fp64_leaves(x, residual, weight, bias)
    ref = reference.layer_norm(x64, weight64, bias64, EPS, residual64)
    ref_outputs = ref if residual is not None else (ref,)
    ref_inputs = [t for t in (x64, residual64, weight64, bias64) if t is not None]
    expected = torch.autograd.grad(ref_outputs, ref_inputs, [u.double() for u in upstream])

    names = ["normed", "summed"][: len(outputs)]
    for name, output, ref_output in zip(names, outputs, ref_outputs):
        assert_close(output, ref_output, dtype, name)
    grad_names = ["grad x", "grad residual", "grad weight", "grad bias"]
    if residual is None:
        grad_names.remove("grad residual")
    for name, g, e, leaf in zip(grad_names, got, expected, inputs):
        assert g.dtype == leaf.dtype, f"{name}: dtype {g.dtype} != input dtype {leaf.dtype}"
        assert_close(g, e, dtype, name)


@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("leading, channels", CASES, ids=[f"{'x'.join(map(str, s))}x{c}" for s, c in CASES])
@pytest.mark.parametrize("dtype", kernel_dtypes(), ids=str)
def test_matches_fp64_reference_with_every_gradient(dtype, leading, channels, with_residual, device, poisoned_allocations):
    _check_against_fp64(*_inputs(leading, channels, dtype, device, with_residual), dtype)


@pytest.mark.parametrize("dtype", kernel_dtypes(), ids=str)
def test_weights_in_the_input_dtype(dtype, device, poisoned_allocations):
    """Weights need not be fp32: the half-precision model keeps them in its dtype."""
    _check_against_fp64(*_inputs((2, 11), 160, dtype, device, True, weight_dtype=dtype), dtype)


@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_strided_inputs_and_upstream_gradients(with_residual, device, poisoned_allocations):
    """Rows with a stride other than C (a channel slice), a transposed view that has no
    single row stride, and non-contiguous upstream gradients."""
    channels = 48
    wide = torch.randn(3, 19, channels + 16, device=device)
    x = wide[..., :channels].requires_grad_()
    _, _, weight, bias = _inputs((1,), channels, torch.float32, device, False)
    residual = None
    if with_residual:
        residual = torch.randn(19, 3, channels, device=device).transpose(0, 1).requires_grad_()
    count = 2 if with_residual else 1
    upstream = [torch.randn(19, 3, channels, device=device).transpose(0, 1) for _ in range(count)]
    assert not upstream[0].is_contiguous()
    _check_against_fp64(x, residual, weight, bias, torch.float32, upstream)


def test_only_the_residual_stream_used(device):
    """When LN(s) is unused, the gradient of s passes straight to x and residual and
    the affine parameters get none."""
    x, residual, weight, bias = _inputs((2, 7), 32, torch.float32, device, True)
    _, summed = sk.layer_norm(x, weight, bias, EPS, residual, kernels="triton")
    upstream = torch.randn_like(summed)
    grad_x, grad_residual, grad_weight = torch.autograd.grad(summed, (x, residual, weight), upstream, allow_unused=True)
    torch.testing.assert_close(grad_x, upstream, rtol=0, atol=0)
    torch.testing.assert_close(grad_residual, upstream, rtol=0, atol=0)
    assert grad_weight is None


def test_weight_gradients_are_deterministic_and_cover_every_program(device, poisoned_allocations):
    """Enough rows that the backward splits them over several programs (and the last
    gets a partial range): the summed partials must be right and bitwise repeatable."""
    x, residual, weight, bias = _inputs((5, 61), 32, torch.float32, device, True)
    normed, summed = sk.layer_norm(x, weight, bias, EPS, residual, kernels="triton")
    upstream = torch.randn_like(normed)
    first, _ = grads(normed, (weight, bias), upstream)
    second, _ = grads(sk.layer_norm(x, weight, bias, EPS, residual, kernels="triton")[0], (weight, bias), upstream)
    for a, b in zip(first, second):
        assert torch.equal(a, b), "weight gradients differ between two identical backward passes"
    x64, residual64, weight64, bias64 = _fp64_leaves(x, residual, weight, bias)
    expected, _ = grads(reference.layer_norm(x64, weight64, bias64, EPS, residual64)[0], (weight64, bias64), upstream.double())
    for name, g, e in zip(("grad weight", "grad bias"), first, expected):
        assert_close(g, e, torch.float32, name)


def test_traces_under_torch_compile_without_graph_breaks(device):
    x, residual, weight, bias = _inputs((2, 9), 64, torch.float32, device, True)

    def block_norm(x, residual, weight, bias):
        normed, summed = sk.layer_norm(x, weight, bias, EPS, residual, kernels="triton")
        plain = sk.layer_norm(summed, weight, bias, EPS, kernels="triton")
        return (normed * plain).sum() + summed.square().sum()

    compiled = torch.compile(block_norm, fullgraph=True, backend="aot_eager")
    inputs = (x, residual, weight, bias)
    eager_loss = block_norm(*inputs)
    eager_grads = torch.autograd.grad(eager_loss, inputs)
    compiled_loss = compiled(*inputs)
    compiled_grads = torch.autograd.grad(compiled_loss, inputs)
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-6, atol=1e-6)
    for eager_grad, compiled_grad in zip(eager_grads, compiled_grads):
        torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("channels", [64, 320, 512])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_model_sized_rows_on_gpu(dtype, channels, poisoned_allocations):
    """Stage-sized token counts (too slow for the interpreter): thousands of rows, so
    the backward runs its full complement of programs."""
    _check_against_fp64(*_inputs((3, 4099), channels, dtype, torch.device("cuda"), True), dtype)
