"""SegFormer: the MiT encoder and the all-MLP decoder, built on the segformer_kernels ops.

Tokens stay [B, N, C] from the first patch embedding to the decoder. The patch-embedding
convolutions read them through a channels-last NCHW view (no copy), q, k and v are views
of their projection outputs, and each residual add is fused into the LayerNorm that
follows it (``sk.layer_norm(..., residual=...)`` returns the sum too).

Every parameter is an ordinary nn.Linear / nn.Conv2d / nn.LayerNorm / nn.BatchNorm2d;
the forward passes their weights to the functional ops with ``kernels=self.kernels``,
so kernels speed the model up without changing it.
"""

from __future__ import annotations

import math
import os
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import segformer_kernels as sk
from segformer_kernels._backend import check_kernels
from segformer_kernels.torch_ops import grid_view

from .config import SegFormerConfig


def drop_path(x: Tensor, rate: float, training: bool) -> Tensor:
    """Stochastic depth: zero a whole sample's branch with probability ``rate`` and scale
    the kept ones by 1 / (1 - rate). Identity outside training."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device).bernoulli_(keep)
    return x * mask.div_(keep)


def tokens_as_image(tokens: Tensor, hw: tuple[int, int]) -> Tensor:
    """[B, H*W, C] tokens as a [B, C, H, W] map: a channels-last view, no copy (see
    ``segformer_kernels.torch_ops.grid_view``: canonical strides keep convolutions and
    resizes on their fast channels-last kernels)."""
    return grid_view(tokens, hw)


def image_as_tokens(image: Tensor) -> Tensor:
    """[B, C, H, W] -> [B, H*W, C]; a view when the map is channels-last."""
    return image.flatten(2).transpose(1, 2)


class PatchEmbedding(nn.Module):
    """Overlapping patch embedding: Conv2d(k, stride s, padding k // 2), then LayerNorm."""

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int, stride: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(hidden_size)


class EfficientSelfAttention(nn.Module):
    """Multi-head attention whose keys and values come from a sequence reduced by sr x sr
    patches (a strided conv + LayerNorm) when sr > 1."""

    def __init__(self, hidden_size: int, heads: int, sr_ratio: int):
        super().__init__()
        self.heads = heads
        self.sr_ratio = sr_ratio
        self.q = nn.Linear(hidden_size, hidden_size)
        self.k = nn.Linear(hidden_size, hidden_size)
        self.v = nn.Linear(hidden_size, hidden_size)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(hidden_size, hidden_size, sr_ratio, stride=sr_ratio)
            self.sr_norm = nn.LayerNorm(hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)


class MixFFN(nn.Module):
    """fc1 -> depthwise 3x3 conv -> GELU -> fc2."""

    def __init__(self, hidden_size: int, mlp_ratio: int):
        super().__init__()
        inner = hidden_size * mlp_ratio
        self.fc1 = nn.Linear(hidden_size, inner)
        self.dwconv = nn.Conv2d(inner, inner, 3, padding=1, groups=inner)
        self.fc2 = nn.Linear(inner, hidden_size)


class Block(nn.Module):
    def __init__(self, hidden_size: int, heads: int, sr_ratio: int, mlp_ratio: int, drop_path_rate: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size)
        self.attn = EfficientSelfAttention(hidden_size, heads, sr_ratio)
        self.norm2 = nn.LayerNorm(hidden_size)
        self.mlp = MixFFN(hidden_size, mlp_ratio)
        self.drop_path_rate = drop_path_rate


class Stage(nn.Module):
    def __init__(self, config: SegFormerConfig, index: int, drop_path_rates: list[float]):
        super().__init__()
        in_channels = config.num_channels if index == 0 else config.hidden_sizes[index - 1]
        hidden = config.hidden_sizes[index]
        self.patch_embed = PatchEmbedding(in_channels, hidden, config.patch_sizes[index], config.strides[index])
        self.blocks = nn.ModuleList(
            Block(hidden, config.num_attention_heads[index], config.sr_ratios[index], config.mlp_ratios[index], rate)
            for rate in drop_path_rates
        )
        self.norm = nn.LayerNorm(hidden)


class Encoder(nn.Module):
    """The Mix Transformer: stages of patch embedding, blocks and a final norm."""

    def __init__(self, config: SegFormerConfig):
        super().__init__()
        # stochastic depth grows linearly from 0 at the first block to the rate at the last
        total = sum(config.depths)
        rates = [config.drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        starts = [sum(config.depths[:i]) for i in range(config.num_stages)]
        self.stages = nn.ModuleList(
            Stage(config, i, rates[start : start + depth]) for i, (start, depth) in enumerate(zip(starts, config.depths))
        )


class DecodeHead(nn.Module):
    """All-MLP decoder. Parameters are the HF ones: linear_c.{i}.proj (C_i -> D),
    linear_fuse (1x1 conv over the concat [c_n .. c_1], no bias), batch_norm, classifier."""

    def __init__(self, config: SegFormerConfig):
        super().__init__()
        width = config.decoder_hidden_size
        self.linear_c = nn.ModuleList(_Projection(c, width) for c in config.hidden_sizes)
        self.linear_fuse = nn.Conv2d(width * config.num_stages, width, 1, bias=False)
        self.batch_norm = nn.BatchNorm2d(width)
        self.dropout = nn.Dropout(config.classifier_dropout_prob)
        self.classifier = nn.Conv2d(width, config.num_labels, 1)

    def folded_projections(self) -> tuple[list[Tensor], Tensor]:
        """The decoder fold (DESIGN.md section 4). linear_fuse applied to the concat of the
        upsampled projections equals sum_i up((W_i L_i) F_i) + sum_i W_i b_i, because
        bilinear resizing commutes with per-pixel linear maps and keeps constants. Returns
        the composed [D, C_i] weights, stage order, and the summed [D] bias; autograd
        reaches linear_c and linear_fuse through the composition."""
        width = self.batch_norm.num_features
        stages = len(self.linear_c)
        fuse = self.linear_fuse.weight.flatten(1)  # [D, n*D], column blocks in order c_n .. c_1
        weights, bias = [], None
        with torch.autocast(fuse.device.type, enabled=False):
            for i, projection in enumerate(self.linear_c):
                block = fuse[:, (stages - 1 - i) * width : (stages - i) * width]
                weights.append(block @ projection.proj.weight)
                stage_bias = block @ projection.proj.bias
                bias = stage_bias if bias is None else bias + stage_bias
        return weights, bias

    def forward(self, features: list[Tensor], grids: list[tuple[int, int]], kernels: str = "auto") -> Tensor:
        """features[i]: stage i's tokens [B, N_i, C_i] on grid grids[i] -> logits at grids[0]."""
        weights, bias = self.folded_projections()
        maps = [F.linear(tokens, weight) for tokens, weight in zip(features, weights)]
        if not self.training and not torch.is_grad_enabled():
            return self.fused_inference_tail(maps, grids, bias, kernels)
        return self.fuse_and_classify(maps, grids, bias)

    def fused_inference_tail(self, maps: list[Tensor], grids: list[tuple[int, int]], bias: Tensor, kernels: str) -> Tensor:
        """fuse_and_classify for inference, as one op (``sk.decode_head``): BatchNorm with
        its running statistics is a per-channel scale and shift, into which the folded
        bias goes too, and dropout is the identity."""
        norm = self.batch_norm
        scale = norm.weight * torch.rsqrt(norm.running_var + norm.eps)
        shift = norm.bias + scale * (bias - norm.running_mean)
        return sk.decode_head(
            maps, grids, grids[0], scale, shift, self.classifier.weight.flatten(1), self.classifier.bias, kernels=kernels
        )

    def fuse_and_classify(self, maps: list[Tensor], grids: list[tuple[int, int]], bias: Tensor) -> Tensor:
        """The part after the fold: upsample every stage's [B, N_i, D] map to stage-1 size
        (bilinear, align_corners=False), sum, add the folded bias, BatchNorm, ReLU, dropout,
        classifier. In eval mode this is one pass for a fused kernel (BatchNorm folds to a
        per-channel scale and shift): the seam for ``decode_head``."""
        size = grids[0]
        fused = tokens_as_image(maps[0], size)
        for tokens, grid in zip(maps[1:], grids[1:]):
            fused = fused + F.interpolate(tokens_as_image(tokens, grid), size=size, mode="bilinear", align_corners=False)
        fused = fused + bias.to(fused.dtype)[:, None, None]
        hidden = self.dropout(F.relu(self.batch_norm(fused)))
        # the 1x1 classifier as bias + [K, D] @ [B, D, N]: the logits come out contiguous
        # NCHW (as transformers returns them, and as the loss's softmax over channels
        # wants them) from the channels-last map, with no copy
        weight = self.classifier.weight.flatten(1).expand(hidden.shape[0], -1, -1)
        logits = torch.baddbmm(self.classifier.bias[:, None], weight, image_as_tokens(hidden).transpose(1, 2))
        return logits.unflatten(2, size)


class _Projection(nn.Module):
    """Holds linear_c.{i}.proj, the name HF and NVlabs checkpoints give it."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.proj = nn.Linear(in_features, out_features)


class SegFormer(nn.Module):
    """SegFormer for semantic segmentation.

        model = SegFormer.from_config("b0", num_classes=150)
        model = SegFormer.from_pretrained("path/to/hf_folder_or_checkpoint")
        logits = model(images)          # [B, 3, H, W] -> [B, K, ceil(H/4), ceil(W/4)]
        loss = model.loss(logits, labels)
        model.save_pretrained("out/")   # HF on-disk format

    ``kernels``: "auto" (Triton where it can run, else the PyTorch reference), "triton"
    or "torch"; it may be changed at any time.
    """

    def __init__(self, config: SegFormerConfig, kernels: str = "auto"):
        super().__init__()
        if not isinstance(config, SegFormerConfig):
            raise TypeError(f"config must be a SegFormerConfig, got {type(config).__name__}")
        self.config = config
        self.kernels = kernels
        self.encoder = Encoder(config)
        self.decode_head = DecodeHead(config)
        self._min_image_size = config.min_image_size()
        self.reset_parameters()

    @property
    def kernels(self) -> str:
        return self._kernels

    @kernels.setter
    def kernels(self, value: str) -> None:
        self._kernels = check_kernels(value)

    # ---- construction ------------------------------------------------------------------

    @classmethod
    def from_config(
        cls,
        name_or_config: str | SegFormerConfig,
        num_classes: int | None = None,
        kernels: str = "auto",
        drop_path_rate: float | None = None,
        classifier_dropout: float | None = None,
    ) -> "SegFormer":
        """A freshly initialised model: a preset name ("b0".."b5") or a SegFormerConfig.
        ``num_classes`` is required with a preset name. ``drop_path_rate`` and
        ``classifier_dropout`` default to the config's (0.1 for the presets)."""
        if isinstance(name_or_config, SegFormerConfig):
            config = name_or_config
        elif isinstance(name_or_config, str):
            if num_classes is None:
                raise ValueError(f"from_config({name_or_config!r}) needs num_classes (the number of segmentation classes)")
            config = SegFormerConfig.preset(name_or_config)
        else:
            got = type(name_or_config).__name__
            raise TypeError(f"name_or_config must be a preset name like 'b0' or a SegFormerConfig, got {got}")
        config = _override(config, num_classes, drop_path_rate, classifier_dropout)
        return cls(config, kernels=kernels)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike | Mapping[str, Tensor],
        num_classes: int | None = None,
        kernels: str = "auto",
        drop_path_rate: float | None = None,
        classifier_dropout: float | None = None,
        config: SegFormerConfig | str | None = None,
        strict: bool = True,
    ) -> "SegFormer":
        """Load an HF folder or file, an NVlabs .pth (segmentation or ImageNet backbone) or
        a state dict; see ``segformer.checkpoint.load_pretrained``."""
        from .checkpoint import load_pretrained

        return load_pretrained(
            cls, path, num_classes=num_classes, kernels=kernels, drop_path_rate=drop_path_rate,
            classifier_dropout=classifier_dropout, config=config, strict=strict,
        )

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write config.json and model.safetensors (pytorch_model.bin without safetensors)
        in the HF on-disk format, loadable by transformers too."""
        from .checkpoint import save_pretrained

        save_pretrained(self, directory)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """NVlabs' initialisation: normal(0, 0.02) for Linear (NVlabs truncates at +-2,
        100 standard deviations out, which never happens), He normal over fan-out for
        Conv2d, zero biases, unit norms; and normal(0, 0.01) for the classifier, as
        mmseg initialises its segmentation conv: He init there would give a fresh head
        logits of std ~8 and a first loss far above ln(num_classes)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, 0.02)
            elif isinstance(module, nn.Conv2d):
                fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
                module.weight.normal_(0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
                module.reset_parameters()
                continue
            else:
                continue
            if module.bias is not None:
                module.bias.zero_()
        self.decode_head.classifier.weight.normal_(0.0, 0.01)

    # ---- forward -----------------------------------------------------------------------

    def forward(self, images: Tensor) -> Tensor:
        """images [B, C, H, W] float -> logits [B, num_labels, ceil(H/4), ceil(W/4)]
        (the stage-1 grid)."""
        self._check_images(images)
        features, grids = self.encode(images)
        return self.decode_head(features, grids, self.kernels)

    def encode(self, images: Tensor) -> tuple[list[Tensor], list[tuple[int, int]]]:
        """Every stage's normalised output tokens [B, N_i, C_i] and its (h_i, w_i) grid."""
        config, kernels = self.config, self.kernels
        # channels-last input makes the first conv write tokens in [B, N, C] order
        x = images.contiguous(memory_format=torch.channels_last)
        features, grids = [], []
        for stage in self.encoder.stages:
            embed = stage.patch_embed
            image = embed.proj(x)
            grid = (image.shape[2], image.shape[3])
            tokens = sk.layer_norm(
                image_as_tokens(image), embed.norm.weight, embed.norm.bias, config.embed_norm_eps, kernels=kernels
            )
            # the residual add of each branch is fused into the LayerNorm after it
            norms = [block.norm1 for block in stage.blocks] + [stage.norm]
            normed = sk.layer_norm(tokens, norms[0].weight, norms[0].bias, config.block_norm_eps, kernels=kernels)
            for block, next_norm in zip(stage.blocks, norms[1:]):
                branch = drop_path(self._attention(block.attn, normed, grid), block.drop_path_rate, self.training)
                normed, tokens = sk.layer_norm(
                    branch, block.norm2.weight, block.norm2.bias, config.block_norm_eps, residual=tokens, kernels=kernels
                )
                branch = drop_path(self._mix_ffn(block.mlp, normed, grid), block.drop_path_rate, self.training)
                normed, tokens = sk.layer_norm(
                    branch, next_norm.weight, next_norm.bias, config.block_norm_eps, residual=tokens, kernels=kernels
                )
            features.append(normed)
            grids.append(grid)
            x = tokens_as_image(normed, grid)
        return features, grids

    def _attention(self, attn: EfficientSelfAttention, x: Tensor, grid: tuple[int, int]) -> Tensor:
        """proj(attention(q(x), k(r), v(r))), r = SR(x) (or x when sr = 1); q, the attention
        output and proj run as one op (``sk.fused_attention``)."""
        batch, _, channels = x.shape
        reduced = x
        if attn.sr_ratio > 1:
            reduced = sk.spatial_reduction(
                x, grid, attn.sr.weight, attn.sr.bias, attn.sr_norm.weight, attn.sr_norm.bias,
                self.config.embed_norm_eps, kernels=self.kernels,
            )
        heads_shape = (reduced.shape[1], attn.heads, channels // attn.heads)
        k = F.linear(reduced, attn.k.weight, attn.k.bias).view(batch, *heads_shape)
        v = F.linear(reduced, attn.v.weight, attn.v.bias).view(batch, *heads_shape)
        return sk.fused_attention(
            x, attn.q.weight, attn.q.bias, k, v, attn.proj.weight, attn.proj.bias, kernels=self.kernels
        )

    def _mix_ffn(self, mlp: MixFFN, x: Tensor, grid: tuple[int, int]) -> Tensor:
        return sk.mix_ffn(
            x, grid, mlp.fc1.weight, mlp.fc1.bias, mlp.dwconv.weight, mlp.dwconv.bias,
            mlp.fc2.weight, mlp.fc2.bias, kernels=self.kernels,
        )

    def _check_images(self, images) -> None:
        channels = self.config.num_channels
        expected = f"a float tensor [B, {channels}, H, W] with H, W >= {self._min_image_size}"
        if not isinstance(images, Tensor):
            raise TypeError(f"images must be {expected}, got {type(images).__name__}")
        if not images.is_floating_point():
            raise TypeError(f"images must be {expected}, got dtype {images.dtype} (convert and normalise first)")
        if images.dim() != 4:
            raise ValueError(f"images must be {expected}, got a {images.dim()}-D tensor of shape {tuple(images.shape)}")
        if images.shape[1] != channels:
            raise ValueError(f"images must be {expected}, got {images.shape[1]} channels (shape {tuple(images.shape)})")
        if images.shape[0] == 0:
            raise ValueError(f"images must be {expected}, got an empty batch (shape {tuple(images.shape)})")
        if min(images.shape[2], images.shape[3]) < self._min_image_size:
            raise ValueError(
                f"images must be {expected}: {images.shape[2]}x{images.shape[3]} is too small for the "
                f"stage reductions (minimum {self._min_image_size}x{self._min_image_size})"
            )
        weight = self.encoder.stages[0].patch_embed.proj.weight
        if images.device != weight.device:
            raise ValueError(f"images are on {images.device} but the model is on {weight.device}; move one of them")
        if images.dtype != weight.dtype and not torch.is_autocast_enabled(images.device.type):
            raise TypeError(
                f"images are {images.dtype} but the model's weights are {weight.dtype}; convert the images "
                "or run under torch.autocast"
            )

    # ---- loss --------------------------------------------------------------------------

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Cross entropy of the logits resized bilinearly (align_corners=False) to the label
        size, ignoring ``config.semantic_loss_ignore_index`` (255), averaged over valid
        pixels. No valid pixel gives 0 (with a grad_fn), not NaN."""
        if not isinstance(labels, Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            got = type(labels).__name__ if not isinstance(labels, Tensor) else labels.dtype
            raise TypeError(f"labels must be an integer tensor [B, H, W] of class indices, got {got}")
        if not isinstance(logits, Tensor) or logits.dim() != 4 or logits.shape[1] != self.config.num_labels:
            got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(f"logits must be [B, {self.config.num_labels}, h, w] as the model returns them, got {got}")
        if labels.dim() != 3 or labels.shape[0] != logits.shape[0]:
            raise ValueError(
                f"labels must be [B, H, W] with B={logits.shape[0]} (the logits' batch), got {tuple(labels.shape)}"
            )
        ignore = self.config.semantic_loss_ignore_index
        resized = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        total = F.cross_entropy(resized, labels.long(), ignore_index=ignore, reduction="sum")
        valid = (labels != ignore).sum().clamp(min=1)
        return total / valid


def _override(config: SegFormerConfig, num_classes, drop_path_rate, classifier_dropout) -> SegFormerConfig:
    changes = {}
    if num_classes is not None:
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        changes["num_labels"] = num_classes
    if drop_path_rate is not None:
        changes["drop_path_rate"] = drop_path_rate
    if classifier_dropout is not None:
        changes["classifier_dropout_prob"] = classifier_dropout
    return config.replace(**changes) if changes else config
