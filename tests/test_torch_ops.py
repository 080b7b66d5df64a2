"""The production PyTorch path (segformer_kernels/torch_ops.py, what kernels="torch" runs)
against the fp64 reference: every op's output and every gradient, in fp32 and fp64, on
odd grids and batch sizes, as the Triton kernels are tested."""

from __future__ import annotations

import pytest
import torch
from helpers import ODD_GRIDS, assert_close, grads

import segformer_kernels as sk
from segformer_kernels import reference, torch_ops

DTYPES = [torch.float32, torch.float64]
# fp64 against fp64: only the order of the sums differs
TOLERANCE_SCALE = {torch.float32: 1.0, torch.float64: 1e-5}


def _leaves(tensors, dtype):
    return [t.to(dtype).requires_grad_() for t in tensors]


def _check(op: str, tensors, dtype, call):
    """torch_ops.<op> and reference.<op> through ``call(function, *leaves)``: the output
    and the gradient of every leaf, the reference in fp64."""
    inputs = _leaves(tensors, dtype)
    out = call(getattr(torch_ops, op), *inputs)
    assert out.dtype == dtype
    got, upstream = grads(out, inputs)
    inputs64 = _leaves(tensors, torch.float64)
    ref = call(getattr(reference, op), *inputs64)
    want, _ = grads(ref, inputs64, upstream.double())
    scale = TOLERANCE_SCALE[dtype]
    assert_close(out, ref, torch.float32, "output", scale)
    for index, (g, w) in enumerate(zip(got, want)):
        assert_close(g, w, torch.float32, f"gradient of input {index}", scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n, m, heads, d, batch", [(1, 1, 1, 8, 1), (17, 5, 2, 16, 3), (91, 13, 5, 32, 2)])
def test_efficient_attention(n, m, heads, d, batch, dtype):
    tensors = [torch.randn(batch, n, heads, d), torch.randn(batch, m, heads, d), torch.randn(batch, m, heads, d)]
    _check("efficient_attention", tensors, dtype, lambda f, q, k, v: f(q, k, v, 0.3))
    _check("efficient_attention", tensors, dtype, lambda f, q, k, v: f(q, k, v))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n, m, heads, d, batch", [(1, 1, 1, 8, 2), (37, 11, 3, 8, 1)])
def test_fused_attention(n, m, heads, d, batch, dtype):
    channels = heads * d
    tensors = [
        torch.randn(batch, n, channels), torch.randn(channels, channels) / channels**0.5, torch.randn(channels),
        torch.randn(batch, m, heads, d), torch.randn(batch, m, heads, d),
        torch.randn(channels, channels) / channels**0.5, torch.randn(channels),
    ]
    _check("fused_attention", tensors, dtype, lambda f, *args: f(*args))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hw, sr, batch", [((8, 8), 8, 1), ((13, 29), 2, 2), ((7, 5), 4, 3), ((17, 9), 3, 1)])
def test_spatial_reduction(hw, sr, batch, dtype):
    channels, out_channels = 6, 10
    tensors = [
        torch.randn(batch, hw[0] * hw[1], channels), torch.randn(out_channels, channels, sr, sr) / sr,
        torch.randn(out_channels), 1 + 0.2 * torch.randn(out_channels), torch.randn(out_channels),
    ]
    _check("spatial_reduction", tensors, dtype, lambda f, x, *w: f(x, hw, *w, 1e-5))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hw", ODD_GRIDS)
@pytest.mark.parametrize("batch", [1, 2])
def test_dwconv_gelu_and_mix_ffn(hw, batch, dtype):
    channels, hidden = 5, 12
    x = torch.randn(batch, hw[0] * hw[1], channels)
    dw = [torch.randn(hidden, 1, 3, 3) / 3, torch.randn(hidden) / 2]
    _check("dwconv_gelu", [torch.randn(batch, hw[0] * hw[1], hidden), *dw], dtype, lambda f, x, *w: f(x, hw, *w))
    weights = [torch.randn(hidden, channels) / channels**0.5, torch.randn(hidden), *dw,
               torch.randn(7, hidden) / hidden**0.5, torch.randn(7)]
    _check("mix_ffn", [x, *weights], dtype, lambda f, x, *w: f(x, hw, *w))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layer_norm_with_and_without_residual(dtype):
    tensors = [torch.randn(2, 15, 9), 1 + 0.2 * torch.randn(9), torch.randn(9), torch.randn(2, 15, 9)]
    _check("layer_norm", tensors[:3], dtype, lambda f, x, w, b: f(x, w, b, 1e-5))
    _check("layer_norm", tensors, dtype, lambda f, x, w, b, r: torch.cat([t.flatten() for t in f(x, w, b, 1e-5, r)]))


# (batch, D, K, the four (h_i, w_i), output (H, W)), as in test_decode_head.py
DECODE_CASES = {
    "first-map-at-output": (2, 12, 7, [(21, 30), (11, 15), (6, 8), (3, 4)], (21, 30)),
    "no-map-at-output": (1, 8, 5, [(5, 9), (1, 1), (3, 2), (17, 4)], (13, 11)),
    "two-maps-at-output": (2, 8, 3, [(3, 5), (3, 5), (2, 3), (1, 1)], (3, 5)),
    "out-1x1": (1, 4, 3, [(1, 1), (1, 1), (1, 1), (1, 1)], (1, 1)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(DECODE_CASES))
def test_decode_head(case, dtype):
    batch, channels, classes, hws, out_hw = DECODE_CASES[case]
    tensors = [torch.randn(batch, h * w, channels) for h, w in hws] + [
        1 + 0.5 * torch.randn(channels), 0.5 * torch.randn(channels),
        torch.randn(classes, channels) / channels**0.5, torch.randn(classes),
    ]
    _check("decode_head", tensors, dtype, lambda f, *t: f(list(t[:4]), hws, out_hw, *t[4:]))
    out = torch_ops.decode_head([t.to(dtype) for t in tensors[:4]], hws, out_hw, *(t.to(dtype) for t in tensors[4:]))
    assert out.is_contiguous(), "logits must come back contiguous NCHW"


def test_inputs_are_not_modified():
    """The in-place updates stay inside the op's own buffers."""
    hws = [(4, 6), (2, 3), (1, 2), (1, 1)]
    maps = [torch.randn(2, h * w, 8) for h, w in hws]
    params = [torch.rand(8) + 0.5, torch.randn(8), torch.randn(3, 8), torch.randn(3)]
    before = [t.clone() for t in maps + params]
    torch_ops.decode_head(maps, hws, (4, 6), *params)
    for t, copy in zip(maps + params, before):
        assert torch.equal(t, copy)


def test_strided_token_inputs():
    """Tokens that are a view (not contiguous) give the same result as their copy."""
    x = torch.randn(2, 30, 16)[:, :, ::2]
    weight, bias = torch.randn(8, 1, 3, 3), torch.randn(8)
    assert torch.equal(torch_ops.dwconv_gelu(x, (5, 6), weight, bias), torch_ops.dwconv_gelu(x.contiguous(), (5, 6), weight, bias))


def test_kernels_torch_runs_this_path(monkeypatch):
    """kernels="torch" (and "auto" where Triton cannot run) dispatch to torch_ops, not the oracle."""
    calls = []
    original = torch_ops.dwconv_gelu
    monkeypatch.setattr(torch_ops, "dwconv_gelu", lambda *args: calls.append(1) or original(*args))
    x, weight, bias = torch.randn(1, 6, 4), torch.randn(4, 1, 3, 3), torch.randn(4)
    sk.dwconv_gelu(x, (2, 3), weight, bias, kernels="torch")
    sk.dwconv_gelu(x.double(), (2, 3), weight.double(), bias.double())
    assert len(calls) == 2


def test_grid_view_has_channels_last_strides():
    """Canonical channels-last strides (batch stride H*W*C even at B = 1): the layout
    oneDNN's NHWC kernels take without converting."""
    tokens = torch.randn(1, 12, 5)
    image = torch_ops.grid_view(tokens, (3, 4))
    assert image.shape == (1, 5, 3, 4) and image.stride() == (60, 1, 20, 5)
    assert image.data_ptr() == tokens.data_ptr()
    assert torch_ops.grid_tokens(image).data_ptr() == tokens.data_ptr()
