"""Triton mix_ffn (fc1 -> fc2 with the dwconv + GELU computed in its prologue) against the fp64 reference."""


import pytest
import torch
from helpers import ODD_GRIDS, assert_close, grads

import segformer_kernels as sk
from segformer_kernels import reference
from segformer_kernels.triton import dwconv_gelu
from segformer_kernels.triton import mix_ffn as module

mix_ffn = module.mix_ffn

DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]
NAMES = ("dx", "d fc1_weight", "d fc1_bias", "d dw_weight", "d dw_bias", "d fc2_weight", "d fc2_bias")

# (grid, C, hidden 4C, C_out, batch): every odd grid, batch 1 and 3; hidden widths of
# the variants scaled down for the interpreter; 160 is not a multiple of the 64-wide
# tiles; C_out = 300 needs two output tiles of the fc2 GEMM and of its weight gradient.
CASES = [
    (ODD_GRIDS[0], 8, 32, 8, 3),
    (ODD_GRIDS[1], 8, 48, 300, 1),  # 48: a partial 32-wide K block in the fc2 GEMM
    (ODD_GRIDS[2], 32, 128, 32, 3),  # B0 stage 1 widths
    (ODD_GRIDS[3], 40, 160, 40, 1),  # B0 stage 3 (C = 160, 4C = 640) scaled by 1/4
]


def _inputs(batch, hw, channels, hidden, out_channels, dtype, device):
    """x and the six weights as leaf tensors, scaled so that activations stay O(1)."""
    tensors = [
        torch.randn(batch, hw[0] * hw[1], channels, device=device),
        torch.randn(hidden, channels, device=device) / channels**0.5,
        torch.randn(hidden, device=device) / 2,
        torch.randn(hidden, 1, 3, 3, device=device) / 3,
        torch.randn(hidden, device=device) / 2,
        torch.randn(out_channels, hidden, device=device) / hidden**0.5,
        torch.randn(out_channels, device=device) / 2,
    ]
    return [t.to(dtype).requires_grad_() for t in tensors]


def _check_against_fp64(hw, channels, hidden, out_channels, batch, dtype, device, function=None):
    if function is None:
        def function(x, hw, *weights):
            return mix_ffn(x, hw, *weights, input_precision="ieee")
    inputs = _inputs(batch, hw, channels, hidden, out_channels, dtype, device)
    out = function(inputs[0], hw, *inputs[1:])
    assert out.dtype == dtype
    got, upstream = grads(out, inputs)

    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    ref = reference.mix_ffn(inputs64[0], hw, *inputs64[1:])
    want, _ = grads(ref, inputs64, upstream.double())

    assert_close(out, ref, dtype, "output")
    for name, a, b in zip(NAMES, got, want):
        assert_close(a, b, dtype, name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hw, channels, hidden, out_channels, batch", CASES)
def test_output_and_every_gradient_match_fp64(hw, channels, hidden, out_channels, batch, dtype, device,
                                              poisoned_allocations):
    _check_against_fp64(hw, channels, hidden, out_channels, batch, dtype, device)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels", module.OUTPUT_WIDTHS)
def test_every_model_width(channels, dtype, device, poisoned_allocations):
    _check_against_fp64((13, 29), channels, 4 * channels, channels, 2, dtype, device)


def test_split_reductions_over_tokens(monkeypatch, device, poisoned_allocations):
    """Small shapes make one program per reduction; force several, with uneven last
    ones: fc2's weight gradient over 3 token splits (the last one shorter), and the
    conv's weight gradient with programs that walk 2 token tiles each."""
    monkeypatch.setattr(module, "MIN_SPLIT_TOKENS", 100)
    monkeypatch.setattr(dwconv_gelu, "MAX_TOKEN_PROGRAMS", 4)
    _check_against_fp64(ODD_GRIDS[3], 8, 32, 8, 1, torch.float32, device)


def test_public_op_runs_the_triton_kernel(device):
    def public(x, hw, *weights):
        out = sk.mix_ffn(x, hw, *weights, kernels="triton")
        # The autograd node is our custom op's, so the kernels (not the reference) ran.
        assert "segformer_mix_ffn" in type(out.grad_fn).__name__
        return out

    # fp16: the public op's fp32 default is tf32 on a GPU, which fp32's tolerance excludes.
    _check_against_fp64((7, 5), 8, 32, 8, 3, torch.float16, device, function=public)


def _saved_bytes(run) -> int:
    """Bytes of the distinct storages autograd saves while ``run()`` builds the graph."""
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage._cdata] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(storages.values())


def _budget(inputs, hidden_bytes) -> int:
    """What autograd may keep for one call: x, the weights and h."""
    return sum(t.untyped_storage().nbytes() for t in inputs) + hidden_bytes


def test_autograd_keeps_only_inputs_weights_and_h(device):
    hw, batch, channels, hidden, out_channels = (7, 5), 3, 8, 32, 8
    inputs = _inputs(batch, hw, channels, hidden, out_channels, torch.float32, device)
    saved = _saved_bytes(lambda: mix_ffn(inputs[0], hw, *inputs[1:]))
    hidden_bytes = batch * hw[0] * hw[1] * hidden * 4
    print(f"saved by autograd for one mix_ffn call (fp32, {hw}, batch {batch}, 4C={hidden}): {saved} B, "
          f"budget {_budget(inputs, hidden_bytes)} B")
    assert saved <= _budget(inputs, hidden_bytes)
    # ... and h is among it: the backward does not recompute fc1.
    assert saved >= hidden_bytes


def test_saved_bytes_of_a_b0_stage1_block_against_eager():
    """B0 stage 1 at 512x512, batch 1, bf16, measured on meta tensors (shapes only):
    ours keeps x, the weights and h; eager keeps h, the conv output and a contiguous
    copy of the GELU output (three 4C-wide tensors)."""
    hw, channels = (128, 128), 32
    hidden = 4 * channels
    inputs = _inputs(1, hw, channels, hidden, channels, torch.bfloat16, "meta")
    ours = _saved_bytes(lambda: mix_ffn(inputs[0], hw, *inputs[1:]))
    eager = _saved_bytes(lambda: reference.mix_ffn(inputs[0], hw, *inputs[1:]))
    hidden_bytes = hw[0] * hw[1] * hidden * 2
    print(f"B0 stage-1 Mix-FFN, 512x512, batch 1, bf16: autograd saves {ours / 2**20:.2f} MiB (ours) vs "
          f"{eager / 2**20:.2f} MiB (eager reference); one 4C-wide tensor is {hidden_bytes / 2**20:.2f} MiB")
    assert ours <= _budget(inputs, hidden_bytes)
    assert eager >= inputs[0].untyped_storage().nbytes() + 3 * hidden_bytes


def test_weight_gradients_are_deterministic(device):
    hw = (7, 5)
    inputs = _inputs(3, hw, 8, 32, 16, torch.float32, device)
    upstream = torch.randn(3, hw[0] * hw[1], 16, device=device)
    first, second = (torch.autograd.grad(mix_ffn(inputs[0], hw, *inputs[1:]), inputs, upstream) for _ in range(2))
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), f"{name} differs between two identical backward passes"


def test_fullgraph_compile_traces_forward_and_backward(device):
    hw = (7, 5)
    inputs = _inputs(3, hw, 8, 32, 8, torch.float32, device)
    compiled = torch.compile(lambda x, *w: sk.mix_ffn(x, hw, *w, kernels="triton"), fullgraph=True, backend="aot_eager")
    out = compiled(*inputs)
    got, upstream = grads(out, inputs)
    eager = mix_ffn(inputs[0], hw, *inputs[1:])
    want, _ = grads(eager, inputs, upstream)
    for name, a, b in zip(("output", *NAMES), (out, *got), (eager, *want)):
        assert_close(a, b, torch.float32, name)


def test_unknown_input_precision_is_refused():
    inputs = _inputs(1, (1, 1), 8, 32, 8, torch.float32, "cpu")
    with pytest.raises(ValueError, match="input_precision"):
        mix_ffn(inputs[0], (1, 1), *inputs[1:], input_precision="fp64")


def test_compile_targets_cover_the_launcher_configs():
    """Every (kernel, constexprs, dtype, warps, stages) a launch at the model's widths compiles is a compile target."""
    compiled = {
        (t.kernel, tuple(sorted(t.constexprs.items())), t.signature["h_ptr"], t.num_warps, t.num_stages)
        for t in module.compile_targets()
    }
    variants = [("*fp32", "tf32"), ("*fp32", "ieee"), ("*fp16", "tf32"), ("*bf16", "tf32")]
    for out_channels in module.OUTPUT_WIDTHS:
        align = module.alignment(out_channels, *module.HIDDEN_WIDTHS)
        for name, kernel in module.KERNELS.items():
            tile = module.tile(name, out_channels)
            for dtype, precision in variants:
                constexprs = {**tile.constexprs(), "ALIGN": align, "INPUT_PRECISION": precision}
                key = (kernel, tuple(sorted(constexprs.items())), dtype, tile.num_warps, tile.num_stages)
                assert key in compiled, f"{kernel.__name__} at C_out={out_channels} {dtype} {precision}: no target"
