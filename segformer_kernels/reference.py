"""Plain-PyTorch reference of every op, written to read like the math.

This is the oracle every Triton kernel and the production PyTorch path
(``torch_ops``, what ``kernels="torch"`` runs) are tested against. Tokens are in row-major grid order: token
``i * W + j`` is grid cell (i, j) of an (H, W) grid, the layout of
``x.flatten(2).transpose(1, 2)`` on an NCHW map.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def efficient_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    """softmax(q k^T * scale) v per head. q [B, N, h, d], k and v [B, M, h, d] -> [B, N, h, d]."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    scores = torch.einsum("bnhd,bmhd->bhnm", q, k) * scale
    probabilities = scores.softmax(dim=-1)
    return torch.einsum("bhnm,bmhd->bnhd", probabilities, v)


def fused_attention(
    x: Tensor, q_weight: Tensor, q_bias: Tensor, k: Tensor, v: Tensor, out_weight: Tensor, out_bias: Tensor,
    scale: float | None = None,
) -> Tensor:
    """Attention with its projections: o_proj(attention(q_proj(x), k, v)).

    x [B, N, C], k and v [B, M, h, d] with h * d = C, weights [C, C], biases [C] -> [B, N, C].
    """
    return projected_attention(x, q_weight, q_bias, k, v, out_weight, out_bias, scale, efficient_attention)


def projected_attention(x, q_weight, q_bias, k, v, out_weight, out_bias, scale, attention) -> Tensor:
    """fused_attention around a given core, ``attention(q, k, v, scale)``."""
    q = F.linear(x, q_weight, q_bias).unflatten(-1, k.shape[2:])
    return F.linear(attention(q, k, v, scale).flatten(2), out_weight, out_bias)

def spatial_reduction(
    x: Tensor,
    hw: tuple[int, int],
    weight: Tensor,
    bias: Tensor,
    ln_weight: Tensor,
    ln_bias: Tensor,
    eps: float,
) -> Tensor:
    """The paper's sequence reduction: each non-overlapping sr x sr patch of tokens
    becomes one C*sr^2 vector, mapped to C_out by Linear, then LayerNorm.

    x [B, H*W, C], weight [C_out, C, sr, sr] (the Conv2d kernel=stride=sr weight),
    -> [B, (H//sr)*(W//sr), C_out]. Rows and columns past (H//sr)*sr are dropped,
    as the strided convolution drops them.
    """
    height, width = hw
    sr = weight.shape[-1]
    # a patch's C*sr*sr vector times the Linear is the kernel=stride=sr convolution; written
    # as one, no step depends on whether sr divides the grid (sizes stay symbolic in export)
    image = x.unflatten(1, (height, width)).permute(0, 3, 1, 2)  # a channels-last view, no copy
    reduced = F.conv2d(image, weight, bias, stride=sr).flatten(2).transpose(1, 2)
    return F.layer_norm(reduced, (weight.shape[0],), ln_weight, ln_bias, eps)


def dwconv_gelu(x: Tensor, hw: tuple[int, int], weight: Tensor, bias: Tensor) -> Tensor:
    """GELU(depthwise 3x3 conv with zero padding 1 + bias), tokens in and out.

    x [B, H*W, C], weight [C, 1, 3, 3], bias [C] -> [B, H*W, C]. GELU is the exact erf form.
    """
    batch, _, channels = x.shape
    height, width = hw
    image = x.transpose(1, 2).reshape(batch, channels, height, width)
    conv = F.conv2d(image, weight, bias, padding=1, groups=channels)
    return F.gelu(conv.flatten(2).transpose(1, 2))


def mix_ffn(
    x: Tensor,
    hw: tuple[int, int],
    fc1_weight: Tensor,
    fc1_bias: Tensor,
    dw_weight: Tensor,
    dw_bias: Tensor,
    fc2_weight: Tensor,
    fc2_bias: Tensor,
) -> Tensor:
    """Mix-FFN: fc2(GELU(dwconv3x3(fc1(x)))). x [B, H*W, C] -> [B, H*W, C_out]."""
    hidden = F.linear(x, fc1_weight, fc1_bias)
    return F.linear(dwconv_gelu(hidden, hw, dw_weight, dw_bias), fc2_weight, fc2_bias)


def layer_norm(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    eps: float,
    residual: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """LayerNorm over the last dimension with statistics in fp32.

    With ``residual``, normalise ``s = x + residual`` and return ``(LN(s), s)``: the
    pre-norm block needs both the normalised tensor and the new residual stream.
    """
    summed = x if residual is None else x + residual
    stats_dtype = torch.promote_types(x.dtype, torch.float32)
    normed = F.layer_norm(
        summed.to(stats_dtype), (x.shape[-1],), weight.to(stats_dtype), bias.to(stats_dtype), eps
    ).to(x.dtype)
    return normed if residual is None else (normed, summed)


def decode_head(
    maps: Sequence[Tensor],
    hws: Sequence[tuple[int, int]],
    out_hw: tuple[int, int],
    scale: Tensor,
    shift: Tensor,
    cls_weight: Tensor,
    cls_bias: Tensor,
) -> Tensor:
    """The SegFormer decoder's inference tail once the projections are folded:
    ``classifier(ReLU(scale * sum_i up(z_i) + shift))``.

    maps: stage maps z_i [B, h_i*w_i, D] in token layout on their own (h_i, w_i) grids
    (``hws``); up = bilinear resize to ``out_hw`` = (H, W) with align_corners=False
    (the identity for a map already at that size); scale, shift [D] (BatchNorm in
    eval, folded); cls_weight [K, D], cls_bias [K] (the 1x1 classifier).
    Returns logits [B, K, H, W].
    """
    batch, _, channels = maps[0].shape
    fused = sum(
        F.interpolate(
            z.transpose(1, 2).reshape(batch, channels, h, w), size=tuple(out_hw), mode="bilinear", align_corners=False
        )
        for z, (h, w) in zip(maps, hws)
    )
    # scale and shift may be fp32 with 16-bit maps (autocast): the affine then runs in fp32
    activated = torch.relu(fused * scale[:, None, None] + shift[:, None, None]).to(cls_weight.dtype)
    # contiguous NCHW whatever layout the resize picked, as the kernel writes it
    return F.conv2d(activated, cls_weight[:, :, None, None], cls_bias).contiguous()
