"""Triton dwconv_gelu (depthwise 3x3 + bias + exact GELU in token layout) against the fp64 reference."""


import pytest
import torch
from helpers import ODD_GRIDS, assert_close, grads

import segformer_kernels as sk
from segformer_kernels import reference
from segformer_kernels.triton import dwconv_gelu as module

# The module by its import path: the package attribute of the same name is the public op.
dwconv_gelu = module.dwconv_gelu

DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]

# (grid, channels, batch): every odd grid; widths below, at and above one 64-channel
# block, not powers of two (40, 70: a partial channel block), batch 1 and 3.
CASES = [
    (ODD_GRIDS[0], 8, 3),
    (ODD_GRIDS[1], 40, 1),
    (ODD_GRIDS[2], 128, 3),
    (ODD_GRIDS[3], 70, 1),
]


def _inputs(hw, channels, batch, dtype, device):
    """x, weight, bias as leaf tensors; the conv output spans GELU's curved region."""
    x = torch.randn(batch, hw[0] * hw[1], channels, device=device)
    weight = torch.randn(channels, 1, 3, 3, device=device) / 3
    bias = torch.randn(channels, device=device) / 2
    return [t.to(dtype).requires_grad_() for t in (x, weight, bias)]


def _check_against_fp64(hw, channels, batch, dtype, device, function=dwconv_gelu):
    inputs = _inputs(hw, channels, batch, dtype, device)
    out = function(inputs[0], hw, *inputs[1:])
    assert out.dtype == dtype
    (dx, dweight, dbias), upstream = grads(out, inputs)

    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    ref = reference.dwconv_gelu(inputs64[0], hw, *inputs64[1:])
    ref_grads, _ = grads(ref, inputs64, upstream.double())

    assert_close(out, ref, dtype, "output")
    for name, got, want in zip(("dx", "dweight", "dbias"), (dx, dweight, dbias), ref_grads):
        assert_close(got, want, dtype, name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hw, channels, batch", CASES)
def test_output_and_every_gradient_match_fp64(hw, channels, batch, dtype, device, poisoned_allocations):
    _check_against_fp64(hw, channels, batch, dtype, device)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels", module.HIDDEN_WIDTHS)
def test_every_model_hidden_width(channels, dtype, device, poisoned_allocations):
    _check_against_fp64((13, 29), channels, 2, dtype, device)


def test_programs_that_walk_several_token_tiles(monkeypatch, device, poisoned_allocations):
    """The backward's programs each walk tiles pid, pid + P, ...: with P = 3 and 6 tiles
    of 64 tokens (C = 32), each program reduces two tiles, the last one partial."""
    monkeypatch.setattr(module, "MAX_TOKEN_PROGRAMS", 3)
    _check_against_fp64(ODD_GRIDS[3], 32, 1, torch.float32, device)


def test_public_op_runs_the_triton_kernel(device):
    x, weight, bias = _inputs((7, 5), 24, 3, torch.float32, device)
    out = sk.dwconv_gelu(x, (7, 5), weight, bias, kernels="triton")
    # The autograd node is our custom op's, so the kernel (not the reference) ran.
    assert "segformer_dwconv_gelu" in type(out.grad_fn).__name__
    _check_against_fp64((7, 5), 24, 3, torch.float32, device,
                        function=lambda *args: sk.dwconv_gelu(*args, kernels="triton"))


def test_weight_gradients_are_deterministic(device):
    x, weight, bias = _inputs((7, 5), 40, 3, torch.float32, device)
    upstream = torch.randn_like(x)
    first, second = (torch.autograd.grad(dwconv_gelu(x, (7, 5), weight, bias), (x, weight, bias), upstream)
                     for _ in range(2))
    for name, a, b in zip(("dx", "dweight", "dbias"), first, second):
        assert torch.equal(a, b), f"{name} differs between two identical backward passes"


def test_fullgraph_compile_traces_forward_and_backward(device):
    x, weight, bias = _inputs((7, 5), 16, 3, torch.float32, device)
    compiled = torch.compile(lambda x, w, b: sk.dwconv_gelu(x, (7, 5), w, b, kernels="triton"),
                             fullgraph=True, backend="aot_eager")
    out = compiled(x, weight, bias)
    got, upstream = grads(out, (x, weight, bias))
    eager = dwconv_gelu(x, (7, 5), weight, bias)
    want, _ = grads(eager, (x, weight, bias), upstream)
    for name, a, b in zip(("out", "dx", "dweight", "dbias"), (out, *got), (eager, *want)):
        assert_close(a, b, torch.float32, name)


def test_compile_targets_cover_the_launcher_configs():
    """Every (kernel, constexprs, dtype, warps, stages) a launch at the model's widths compiles is a compile target."""
    compiled = {
        (t.kernel, tuple(sorted(t.constexprs.items())), next(iter(t.signature.values())), t.num_warps, t.num_stages)
        for t in module.compile_targets()
    }
    for width in module.HIDDEN_WIDTHS:
        tile = module.stencil_tile(width)
        constexprs = {**tile.constexprs(), "ALIGN": module.alignment(width)}
        for kernel in module.KERNELS.values():
            for dtype in ("*fp32", "*fp16", "*bf16"):
                key = (kernel, tuple(sorted(constexprs.items())), dtype, tile.num_warps, tile.num_stages)
                assert key in compiled, f"{kernel.__name__} at C={width} {dtype} ({tile}) has no compile target"
