"""The production PyTorch path of every op: what ``kernels="torch"`` runs, and ``"auto"``
where Triton cannot run (CPU without the interpreter).

Same math and signatures as ``reference`` (the fp64 oracle, kept as the plain formula),
arranged for speed on CPU:

- Token tensors [B, H*W, C] are read by convolutions and resizes through
  ``grid_view``: a channels-last [B, C, H, W] view with canonical strides, so oneDNN
  takes its NHWC kernels and writes channels-last outputs, which are token tensors
  again without a copy (``grid_tokens``). (A view built by transposing [B, N, C] has
  a degenerate batch stride at B = 1 that sends the convolution and the resize to
  their slow layout-converting paths.)
- Attention goes through ``F.scaled_dot_product_attention``, whose CPU kernel works
  on blocks of keys: memory grows with N, never N x M. It reads q, k, v as strided
  views and writes its output in [B, N, heads, d] order.
- The decoder tail sums the resized maps into one channels-last buffer and leaves the
  first map (already at the output size) unresized.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils import flop_counter

from .reference import layer_norm  # noqa: F401 - one F.layer_norm call; nothing to rearrange


def _count_cpu_attention_flops() -> None:
    """Give torch.utils.flop_counter formulas for SDPA's CPU kernels (it has them for the
    CUDA ones only), so FlopCounterMode counts this path's attention like the matmuls."""
    registry, aten = flop_counter.flop_registry, torch.ops.aten
    forward, backward = aten._scaled_dot_product_flash_attention_for_cpu, aten._scaled_dot_product_flash_attention_for_cpu_backward
    if forward not in registry:
        flop_counter.register_flop_formula(forward)(
            lambda query, key, value, *args, out_shape=None, **kwargs: flop_counter.sdpa_flop_count(query, key, value)
        )
    if backward not in registry:
        flop_counter.register_flop_formula(backward)(
            lambda grad_out, query, key, value, *args, out_shape=None, **kwargs:
            flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)
        )


_count_cpu_attention_flops()


def grid_view(tokens: Tensor, hw: tuple[int, int]) -> Tensor:
    """[B, H*W, C] tokens as a channels-last [B, C, H, W] map (a view when tokens are contiguous)."""
    return tokens.unflatten(1, tuple(hw)).permute(0, 3, 1, 2)


def grid_tokens(image: Tensor) -> Tensor:
    """[B, C, H, W] -> [B, H*W, C]; a view when the map is channels-last."""
    return image.permute(0, 2, 3, 1).flatten(1, 2)


def efficient_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    """softmax(q k^T * scale) v per head. q [B, N, h, d], k and v [B, M, h, d] -> [B, N, h, d]."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2)


def fused_attention(
    x: Tensor, q_weight: Tensor, q_bias: Tensor, k: Tensor, v: Tensor, out_weight: Tensor, out_bias: Tensor,
    scale: float | None = None,
) -> Tensor:
    """o_proj(attention(q_proj(x), k, v)). x [B, N, C], k and v [B, M, h, d] -> [B, N, C]."""
    q = F.linear(x, q_weight, q_bias).unflatten(-1, k.shape[2:])
    # reshape: a view when SDPA wrote [B, N, h, d] order, as its CPU kernel does
    return F.linear(efficient_attention(q, k, v, scale).reshape(x.shape), out_weight, out_bias)


def spatial_reduction(
    x: Tensor, hw: tuple[int, int], weight: Tensor, bias: Tensor, ln_weight: Tensor, ln_bias: Tensor, eps: float
) -> Tensor:
    """The sr x sr patch reduction as the strided convolution it is, on the channels-last view,
    then LayerNorm. x [B, H*W, C] -> [B, (H//sr)*(W//sr), C_out]."""
    sr = weight.shape[-1]
    reduced = grid_tokens(F.conv2d(grid_view(x.contiguous(), hw), weight, bias, stride=sr))
    return F.layer_norm(reduced, (weight.shape[0],), ln_weight, ln_bias, eps)


def dwconv_gelu(x: Tensor, hw: tuple[int, int], weight: Tensor, bias: Tensor) -> Tensor:
    """GELU(depthwise 3x3 conv, zero padding 1, + bias). x [B, H*W, C] -> [B, H*W, C]."""
    conv = F.conv2d(grid_view(x.contiguous(), hw), weight, bias, padding=1, groups=x.shape[2])
    return F.gelu(grid_tokens(conv))


def mix_ffn(
    x: Tensor, hw: tuple[int, int], fc1_weight: Tensor, fc1_bias: Tensor, dw_weight: Tensor, dw_bias: Tensor,
    fc2_weight: Tensor, fc2_bias: Tensor,
) -> Tensor:
    """fc2(GELU(dwconv3x3(fc1(x)))). x [B, H*W, C] -> [B, H*W, C_out]."""
    hidden = F.linear(x, fc1_weight, fc1_bias)
    return F.linear(dwconv_gelu(hidden, hw, dw_weight, dw_bias), fc2_weight, fc2_bias)


def decode_head(
    maps: Sequence[Tensor],
    hws: Sequence[tuple[int, int]],
    out_hw: tuple[int, int],
    scale: Tensor,
    shift: Tensor,
    cls_weight: Tensor,
    cls_bias: Tensor,
) -> Tensor:
    """classifier(ReLU(scale * sum_i up(z_i) + shift)) -> contiguous logits [B, K, H, W].

    The accumulator is written once and updated in place: it starts as scale * up(z_0) +
    shift (a map already at the output size is read, not resized), every other map is
    resized and added times scale, and ReLU runs in place (the classifier's backward needs
    only ReLU's output)."""
    out_hw = tuple(out_hw)

    def resized(z: Tensor, hw: tuple[int, int]) -> Tensor:
        image = grid_view(z.contiguous(), hw)
        if tuple(hw) == out_hw:
            return image
        return F.interpolate(image, size=out_hw, mode="bilinear", align_corners=False)

    # scale * sum_i up(z_i) + shift, one map at a time (one resized map alive at once)
    tokens = torch.addcmul(shift, grid_tokens(resized(maps[0], hws[0])), scale)
    for z, hw in zip(maps[1:], hws[1:]):
        tokens = tokens.addcmul_(grid_tokens(resized(z, hw)), scale)
    hidden = tokens.relu_()
    # the 1x1 classifier as bias + [K, D] @ [B, D, N]: contiguous NCHW logits, no layout copy
    weight = cls_weight.expand(hidden.shape[0], -1, -1)
    return torch.baddbmm(cls_bias[:, None], weight, hidden.transpose(1, 2)).unflatten(2, out_hw)
