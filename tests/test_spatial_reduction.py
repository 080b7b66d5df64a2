"""Triton spatial_reduction (sr x sr patch gather + GEMM + bias + LayerNorm, and its
hand-written backward) against the fp64 reference.

fp32 pins input_precision="ieee" so that, compiled on a GPU, tf32 does not eat the
1e-5 tolerance; under the interpreter fp32 dots are exact either way.
"""


import itertools

import pytest
import torch
from helpers import assert_close, grads

import segformer_kernels as sk
from segformer_kernels import reference
from segformer_kernels.triton import spatial_reduction as module

# The module by its import path: the package attribute of the same name is the public op.

DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]
NAMES = ("output", "dx", "dweight", "dbias", "dln_weight", "dln_bias")

# (batch, (H, W), C, C_out, sr): the variants' stages scaled down, then odd ones.
CASES = [
    (2, (16, 16), 32, 32, 8),  # stage 1 of B0 (C 32, sr 8)
    (3, (8, 12), 64, 64, 4),  # stage 2 of B0 (C 64, sr 4)
    (1, (6, 4), 160, 160, 2),  # stage 3 of B0 (C 160, sr 2): C_out rows past 128
    (3, (17, 11), 16, 24, 4),  # H, W not multiples of sr: a row and columns dropped; C_out != C
    (1, (9, 8), 8, 8, 8),  # M = 1, a dropped row
    (2, (10, 7), 5, 12, 3),  # sr 3, C not a multiple of anything
]


def _params(channels, out_channels, sr, dtype, device):
    """weight, bias, ln_weight, ln_bias as leaf tensors, scaled so z is O(1)."""
    weight = torch.randn(out_channels, channels, sr, sr, device=device) / (channels * sr * sr) ** 0.5
    bias = torch.randn(out_channels, device=device) / 2
    ln_weight = 1 + torch.randn(out_channels, device=device) / 2
    ln_bias = torch.randn(out_channels, device=device) / 2
    return [t.to(dtype).requires_grad_() for t in (weight, bias, ln_weight, ln_bias)]


def _tokens(batch, hw, channels, dtype, device):
    return torch.randn(batch, hw[0] * hw[1], channels, device=device).to(dtype).requires_grad_()


def _ieee(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"


def _check_against_fp64(x, hw, params, dtype, eps=1e-5, function=None):
    """Output and the grads of x and every parameter under a random upstream gradient."""
    if function is None:
        def function(*args):
            return module.spatial_reduction(*args, input_precision=_ieee(dtype))
    out = function(x, hw, *params, eps)
    assert out.dtype == dtype
    got, upstream = grads(out, [x, *params])

    x64 = x.detach().double().requires_grad_()
    params64 = [p.detach().double().requires_grad_() for p in params]
    ref = reference.spatial_reduction(x64, hw, *params64, eps)
    want, _ = grads(ref, [x64, *params64], upstream.double())
    for name, a, b in zip(NAMES, (out, *got), (ref, *want)):
        assert_close(a, b, dtype, name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch, hw, channels, out_channels, sr", CASES)
def test_output_and_every_gradient_match_fp64(batch, hw, channels, out_channels, sr, dtype, device,
                                              poisoned_allocations):
    x = _tokens(batch, hw, channels, dtype, device)
    _check_against_fp64(x, hw, _params(channels, out_channels, sr, dtype, device), dtype, eps=1e-6)


def test_dropped_tokens_get_exactly_zero_gradient(device, poisoned_allocations):
    hw, sr = (10, 7), 3
    x = _tokens(2, hw, 8, torch.float32, device)
    out = module.spatial_reduction(x, hw, *_params(8, 8, sr, torch.float32, device), 1e-5)
    (dx,), _ = grads(out, [x])
    dx = dx.reshape(2, *hw, 8)
    assert torch.equal(dx[:, 9:], torch.zeros_like(dx[:, 9:]))  # row 9 is past 3*3
    assert torch.equal(dx[:, :, 6:], torch.zeros_like(dx[:, :, 6:]))  # column 6 is past 2*3
    assert dx[:, :9, :6].abs().amin(dim=-1).gt(0).all()  # every kept token has a gradient


@pytest.mark.parametrize("layout", ["slice of a wider tensor", "transposed NCHW map"])
def test_strided_x(layout, device, poisoned_allocations):
    """A slice at an odd offset of wider rows (read in place, unaligned) and a
    channels-strided view (copied once by the launcher)."""
    batch, hw, channels, sr = 3, (9, 13), 16, 4
    tokens = hw[0] * hw[1]
    if layout == "slice of a wider tensor":
        base = torch.randn(batch, tokens, 2 * channels + 5, device=device, requires_grad=True)
        x = base[:, :, 3:3 + channels]
    else:
        base = torch.randn(batch, channels, *hw, device=device, requires_grad=True)
        x = base.flatten(2).transpose(1, 2)
    assert not x.is_contiguous()
    _check_against_fp64(x, hw, _params(channels, 24, sr, torch.float32, device), torch.float32)


def test_partial_sums_over_several_row_blocks_and_splits(device, monkeypatch, poisoned_allocations):
    """Few programs for the LayerNorm backward (several row blocks each) and several
    weight-gradient splits: the partial-buffer paths the big shapes take."""
    monkeypatch.setattr(module, "LAYER_NORM_BACKWARD_PROGRAMS", 2)
    monkeypatch.setattr(module, "SPLIT_ROWS_PER_OUT_CHANNEL", 1)
    batch, hw, channels, sr = 3, (16, 24), 16, 2
    rows = batch * (hw[0] // sr) * (hw[1] // sr)
    def tile(kernel):
        return module.tile(kernel, channels, channels, torch.float32, "ieee")

    programs, blocks_per_program = module.layer_norm_backward_grid(rows, tile("backward_layer_norm")["BLOCK_M"])
    splits, _ = module.weight_grad_split(rows, sr * sr, tile("backward_weight")["BLOCK_M"], channels)
    assert programs == 2 and blocks_per_program > 1 and splits > 1
    x = _tokens(batch, hw, channels, torch.float32, device)
    _check_against_fp64(x, hw, _params(channels, channels, sr, torch.float32, device), torch.float32)


def test_public_op_runs_the_triton_kernel(device):
    # fp16: the public op runs fp32 dots as tf32 on a GPU; fp16 has one tolerance everywhere.
    dtype, hw = torch.float16, (9, 10)
    x = _tokens(3, hw, 16, dtype, device)
    params = _params(16, 16, 2, dtype, device)
    out = sk.spatial_reduction(x, hw, *params, 1e-5, kernels="triton")
    # The autograd node is our custom op's, so the kernel (not the reference) ran.
    assert "segformer_spatial_reduction" in type(out.grad_fn).__name__
    _check_against_fp64(x, hw, params, dtype, function=lambda *args: sk.spatial_reduction(*args, kernels="triton"))


def test_fullgraph_compile_traces_forward_and_backward(device):
    hw = (9, 10)
    x = _tokens(2, hw, 16, torch.float32, device)
    params = _params(16, 16, 2, torch.float32, device)

    def run(x, *params):  # the public op: its argument checks must trace too
        return sk.spatial_reduction(x, hw, *params, 1e-5, kernels="triton")

    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")
    out = compiled(x, *params)
    got, upstream = grads(out, [x, *params])
    eager = run(x, *params)
    want, _ = grads(eager, [x, *params], upstream)
    for name, a, b in zip(NAMES, (out, *got), (eager, *want)):
        assert_close(a, b, torch.float32, name)


def test_gradients_are_deterministic(device):
    hw = (16, 24)
    x = _tokens(3, hw, 16, torch.float32, device)
    params = _params(16, 16, 2, torch.float32, device)
    upstream = torch.randn(3, (hw[0] // 2) * (hw[1] // 2), 16, device=device)
    first, second = (
        torch.autograd.grad(module.spatial_reduction(x, hw, *params, 1e-5), [x, *params], upstream)
        for _ in range(2)
    )
    for name, a, b in zip(NAMES[1:], first, second):
        assert torch.equal(a, b), f"{name} differs between two identical backward passes"


def test_unknown_input_precision_is_refused(device):
    x = _tokens(1, (4, 4), 8, torch.float32, device)
    with pytest.raises(ValueError, match="input_precision"):
        module.spatial_reduction(x, (4, 4), *_params(8, 8, 2, torch.float32, device), 1e-5, input_precision="tf64")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels", sorted(module.VARIANT_CHANNELS))
def test_every_variant_stage_at_full_width(channels, dtype, device, poisoned_allocations):
    sr = module.VARIANT_CHANNELS[channels]
    hw = (13 * sr + 3, 11 * sr + 1)
    x = _tokens(2, hw, channels, dtype, device)
    _check_against_fp64(x, hw, _params(channels, channels, sr, dtype, device), dtype)


def test_compile_targets_cover_the_launcher_configs():
    """Every (kernel, constexprs, dtype, warps, stages) a launch at the variants' SR
    stages compiles is a compile target."""
    def element_type(signature):
        return next(v for k, v in signature.items() if k.endswith("_ptr") and k not in module._FP32_BUFFERS)

    compiled = {
        (t.kernel, element_type(t.signature), tuple(sorted(t.constexprs.items())), t.num_warps, t.num_stages)
        for t in module.compile_targets()
    }
    for dtype, triton_type in ((torch.float32, "*fp32"), (torch.float16, "*fp16"), (torch.bfloat16, "*bf16")):
        precisions = ("tf32", "ieee") if dtype == torch.float32 else ("tf32",)
        for channels, precision, (name, kernel) in itertools.product(
            module.VARIANT_CHANNELS, precisions, module.KERNELS.items()
        ):
            tile = module.tile(name, channels, channels, dtype, precision)
            constexprs = {**tile.constexprs(), "ALIGN": module.alignment(channels)}
            if "INPUT_PRECISION" in kernel.arg_names:
                constexprs["INPUT_PRECISION"] = precision
            key = (kernel, triton_type, tuple(sorted(constexprs.items())), tile.num_warps, tile.num_stages)
            assert key in compiled, f"{kernel.__name__} at C={channels} {dtype} {precision} has no compile target"
