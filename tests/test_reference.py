"""The reference ops are the oracle, so they are checked against independent
formulations of the same math (in fp64): a wrong oracle would pass every kernel test."""

import pytest
import torch
import torch.nn.functional as F

from segformer_kernels import reference


def test_attention_matches_sdpa():
    q = torch.randn(3, 37, 5, 32, dtype=torch.float64)
    k = torch.randn(3, 11, 5, 32, dtype=torch.float64)
    v = torch.randn(3, 11, 5, 32, dtype=torch.float64)
    expected = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(reference.efficient_attention(q, k, v), expected)
    scaled = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=0.3
    ).transpose(1, 2)
    torch.testing.assert_close(reference.efficient_attention(q, k, v, scale=0.3), scaled)


def test_fused_attention_is_multi_head_attention_with_projections():
    """nn.MultiheadAttention with separate q/k/v projections (k and v given as identity
    maps, since fused_attention takes them projected) and the output projection."""
    batch, n, m, heads, head_dim = 2, 29, 7, 3, 8
    channels = heads * head_dim
    mha = torch.nn.MultiheadAttention(channels, heads, batch_first=True).double()
    with torch.no_grad():  # the packed [3C, C] in_proj: rows q, k, v
        mha.in_proj_weight[channels:] = torch.eye(channels).repeat(2, 1)
        mha.in_proj_bias[channels:].zero_()
        mha.in_proj_bias[:channels].normal_()
        mha.out_proj.bias.normal_()
    x = torch.randn(batch, n, channels, dtype=torch.float64)
    k = torch.randn(batch, m, channels, dtype=torch.float64)
    v = torch.randn(batch, m, channels, dtype=torch.float64)
    expected, _ = mha(x, k, v, need_weights=False)
    out = reference.fused_attention(
        x, mha.in_proj_weight[:channels], mha.in_proj_bias[:channels], k.unflatten(-1, (heads, head_dim)),
        v.unflatten(-1, (heads, head_dim)), mha.out_proj.weight, mha.out_proj.bias,
    )
    torch.testing.assert_close(out, expected)

@pytest.mark.parametrize("hw,sr", [((16, 16), 8), ((17, 11), 4), ((9, 8), 8), ((7, 5), 2), ((6, 9), 3)])
def test_spatial_reduction_matches_strided_conv(hw, sr):
    height, width = hw
    channels, out_channels = 6, 10
    x = torch.randn(2, height * width, channels, dtype=torch.float64)
    conv = torch.nn.Conv2d(channels, out_channels, sr, stride=sr).double()
    norm = torch.nn.LayerNorm(out_channels, eps=1e-6).double()
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    image = x.transpose(1, 2).reshape(2, channels, height, width)
    expected = norm(conv(image).flatten(2).transpose(1, 2))
    out = reference.spatial_reduction(x, hw, conv.weight, conv.bias, norm.weight, norm.bias, 1e-6)
    assert out.shape == (2, (height // sr) * (width // sr), out_channels)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("hw", [(1, 1), (1, 17), (7, 5), (13, 29)])
def test_dwconv_gelu_matches_shifted_sum(hw):
    """A depthwise 3x3 conv is the sum of nine shifted, per-channel-scaled copies of the zero-padded grid."""
    height, width = hw
    channels = 5
    x = torch.randn(3, height * width, channels, dtype=torch.float64)
    weight = torch.randn(channels, 1, 3, 3, dtype=torch.float64)
    bias = torch.randn(channels, dtype=torch.float64)
    padded = F.pad(x.reshape(3, height, width, channels), (0, 0, 1, 1, 1, 1))
    pre = bias.expand(3, height, width, channels).clone()
    for dy in range(3):
        for dx in range(3):
            pre += padded[:, dy : dy + height, dx : dx + width] * weight[:, 0, dy, dx]
    expected = 0.5 * pre * (1 + torch.erf(pre / 2**0.5))
    torch.testing.assert_close(reference.dwconv_gelu(x, hw, weight, bias), expected.reshape(3, height * width, channels))


def test_mix_ffn_is_the_composition():
    hw, channels, hidden = (5, 7), 4, 16
    x = torch.randn(2, 35, channels, dtype=torch.float64)
    fc1 = torch.nn.Linear(channels, hidden).double()
    dw = torch.nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden).double()
    fc2 = torch.nn.Linear(hidden, 3).double()
    image = fc1(x).transpose(1, 2).reshape(2, hidden, *hw)
    expected = fc2(F.gelu(dw(image)).flatten(2).transpose(1, 2))
    out = reference.mix_ffn(x, hw, fc1.weight, fc1.bias, dw.weight, dw.bias, fc2.weight, fc2.bias)
    torch.testing.assert_close(out, expected)


def test_layer_norm_matches_formula_and_keeps_fp64():
    x = torch.randn(4, 9, 20, dtype=torch.float64)
    residual = torch.randn_like(x)
    weight, bias = torch.randn(20, dtype=torch.float64), torch.randn(20, dtype=torch.float64)
    summed = x + residual
    mean = summed.mean(-1, keepdim=True)
    var = summed.var(-1, unbiased=False, keepdim=True)
    expected = (summed - mean) / torch.sqrt(var + 1e-6) * weight + bias
    normed, stream = reference.layer_norm(x, weight, bias, 1e-6, residual)
    assert normed.dtype == torch.float64
    torch.testing.assert_close(normed, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stream, summed)
    torch.testing.assert_close(reference.layer_norm(summed, weight, bias, 1e-6), expected, rtol=1e-12, atol=1e-12)


def test_layer_norm_half_input_uses_fp32_statistics():
    x = (torch.randn(8, 64) * 100 + 1000).half()
    weight, bias = torch.ones(64), torch.zeros(64)
    out = reference.layer_norm(x, weight, bias, 1e-5)
    assert out.dtype == torch.float16
    expected = F.layer_norm(x.double(), (64,), eps=1e-5)
    assert (out.double() - expected).abs().max() < 1e-2
