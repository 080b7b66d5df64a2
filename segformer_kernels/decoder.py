"""The all-MLP decoder on the fused ops, for any module holding its parameters.

SegFormer's decoder projects each stage's tokens to D channels (linear_c / linear
projections), upsamples them to the stage-1 grid, concatenates, mixes with a 1x1 conv
(linear_fuse), then BatchNorm, ReLU, dropout and a 1x1 classifier. ``fold_projections``
composes each projection with its block of linear_fuse; ``decoder_tail`` runs the rest,
as one ``decode_head`` op in inference. Used by our model and by ``patch_transformers``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ops import decode_head
from .torch_ops import grid_view


def tokens_as_image(tokens: Tensor, hw: tuple[int, int]) -> Tensor:
    """[B, H*W, C] tokens as a [B, C, H, W] map: a channels-last view, no copy (see
    ``torch_ops.grid_view``: canonical strides keep convolutions and resizes on their fast
    channels-last kernels)."""
    return grid_view(tokens, hw)


def image_as_tokens(image: Tensor) -> Tensor:
    """[B, C, H, W] -> [B, H*W, C]; a view when the map is channels-last."""
    return image.flatten(2).transpose(1, 2)


def fold_projections(fuse_weight: Tensor, projections: Sequence[nn.Linear]) -> tuple[list[Tensor], Tensor]:
    """The decoder fold: linear_fuse applied to the concat of the upsampled projections
    equals sum_i up((W_i L_i) F_i) + sum_i W_i b_i, because bilinear resizing commutes with
    per-pixel linear maps and keeps constants. ``fuse_weight`` is linear_fuse's [D, n*D]
    (or [D, n*D, 1, 1]) weight, whose column blocks are in order c_n .. c_1; returns the
    composed [D, C_i] weights in stage order and the summed [D] bias. Autograd reaches the
    projections and linear_fuse through the composition."""
    fuse = fuse_weight.flatten(1)
    width, stages = fuse.shape[0], len(projections)
    weights, bias = [], None
    with torch.autocast(fuse.device.type, enabled=False):
        for i, projection in enumerate(projections):
            block = fuse[:, (stages - 1 - i) * width : (stages - i) * width]
            weights.append(block @ projection.weight)
            stage_bias = block @ projection.bias
            bias = stage_bias if bias is None else bias + stage_bias
    return weights, bias


def decoder_tail(
    maps: list[Tensor], grids: list[tuple[int, int]], bias: Tensor, batch_norm: nn.Module, dropout: nn.Module,
    classifier: nn.Conv2d, kernels: str = "auto",
) -> Tensor:
    """Logits [B, K, *grids[0]] from the folded stage maps [B, N_i, D]: upsample to the
    stage-1 grid, sum, add ``bias``, BatchNorm, ReLU, dropout, 1x1 classifier. With the
    BatchNorm in eval mode and no gradient wanted this is one op (``decode_head``):
    BatchNorm with its running statistics is a per-channel scale and shift, into which the
    folded bias goes too, and dropout is the identity."""
    if not batch_norm.training and not torch.is_grad_enabled():
        scale = batch_norm.weight * torch.rsqrt(batch_norm.running_var + batch_norm.eps)
        shift = batch_norm.bias + scale * (bias - batch_norm.running_mean)
        return decode_head(maps, grids, grids[0], scale, shift, classifier.weight.flatten(1), classifier.bias,
                           kernels=kernels)
    size = grids[0]
    fused = tokens_as_image(maps[0], size)
    for tokens, grid in zip(maps[1:], grids[1:]):
        fused = fused + F.interpolate(tokens_as_image(tokens, grid), size=size, mode="bilinear", align_corners=False)
    fused = fused + bias.to(fused.dtype)[:, None, None]
    hidden = dropout(F.relu(batch_norm(fused)))
    # the 1x1 classifier as bias + [K, D] @ [B, D, N]: the logits come out contiguous
    # NCHW (as transformers returns them, and as the loss's softmax over channels
    # wants them) from the channels-last map, with no copy
    weight = classifier.weight.flatten(1).expand(hidden.shape[0], -1, -1)
    logits = torch.baddbmm(classifier.bias[:, None], weight, image_as_tokens(hidden).transpose(1, 2))
    return logits.unflatten(2, size)
