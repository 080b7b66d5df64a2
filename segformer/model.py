"""SegFormer: the MiT encoder and the all-MLP decoder, built on the segformer_kernels ops.

The modules follow Figure 2 of the paper (docs/design.md, "The model"):

    SegFormer
      Encoder          stages 1..4, each:
        Stage            PatchEmbedding -> Block x depth -> LayerNorm   ([B, N_i, C_i] on grid h_i x w_i)
          Block            x + Attention(LN(x)), then x + MixFFN(LN(x))
            EfficientSelfAttention(x, grid)   keys and values from an sr x sr reduced sequence
            MixFFN(x, grid)                   fc1 -> 3x3 depthwise conv -> GELU -> fc2
      DecodeHead       per-stage linear -> upsample to stage 1 -> concat -> fuse -> classify

Tokens stay [B, N, C] from the first patch embedding to the decoder. The patch-embedding
convolutions read them through a channels-last NCHW view (no copy), q, k and v are views
of their projection outputs, and each residual add is fused into the LayerNorm that
follows it (``sk.layer_norm(..., residual=...)`` returns the sum too). That is why a
Block takes and returns the pair (branch, residual) rather than x: the add of its last
branch happens in the next block's first LayerNorm, or in the stage's final one.

Every parameter is an ordinary nn.Linear / nn.Conv2d / nn.LayerNorm / nn.BatchNorm2d;
the forwards pass their weights to the functional ops with the module's ``kernels``
(which ``SegFormer.kernels`` sets on every submodule), so kernels speed the model up
without changing it.
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
from segformer_kernels.decoder import decoder_tail, fold_projections, image_as_tokens, tokens_as_image

from . import checkpoint
from .config import HF_EPS, SegFormerConfig

Grid = tuple[int, int]


def drop_path(x: Tensor, rate: float, training: bool) -> Tensor:
    """Stochastic depth: zero a whole sample's branch with probability ``rate`` and scale
    the kept ones by 1 / (1 - rate). Identity outside training."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device).bernoulli_(keep)
    return x * mask.div_(keep)


def add_norm(branch: Tensor, residual: Tensor | None, norm: nn.LayerNorm, kernels: str) -> tuple[Tensor, Tensor]:
    """(norm(residual + branch), residual + branch) as one op; with no residual yet (a
    stage's first block) the branch is the residual stream itself."""
    if residual is None:
        return sk.layer_norm(branch, norm.weight, norm.bias, norm.eps, kernels=kernels), branch
    return sk.layer_norm(branch, norm.weight, norm.bias, norm.eps, residual=residual, kernels=kernels)


class KernelModule(nn.Module):
    """A module whose forward calls the sk ops. ``kernels`` ("auto", "triton" or "torch")
    picks their backend; SegFormer sets it on all of its submodules."""

    kernels: str = "auto"


class PatchEmbedding(KernelModule):
    """Overlapping patch embedding: Conv2d(k, stride s, padding k // 2), then LayerNorm."""

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int, stride: int, norm_eps: float = HF_EPS):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(hidden_size, eps=norm_eps)

    def forward(self, image: Tensor) -> tuple[Tensor, Grid]:
        """[B, C_in, H, W] (channels-last, so the conv writes tokens in [B, N, C] order) ->
        (normalised tokens [B, h*w, C], grid (h, w))."""
        image = self.proj(image)
        norm = self.norm
        tokens = sk.layer_norm(image_as_tokens(image), norm.weight, norm.bias, norm.eps, kernels=self.kernels)
        return tokens, (image.shape[2], image.shape[3])


class EfficientSelfAttention(KernelModule):
    """Multi-head attention whose keys and values come from a sequence reduced by sr x sr
    patches (a strided conv + LayerNorm) when sr > 1."""

    def __init__(self, hidden_size: int, heads: int, sr_ratio: int, sr_norm_eps: float = HF_EPS):
        super().__init__()
        self.heads = heads
        self.sr_ratio = sr_ratio
        self.q = nn.Linear(hidden_size, hidden_size)
        self.k = nn.Linear(hidden_size, hidden_size)
        self.v = nn.Linear(hidden_size, hidden_size)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(hidden_size, hidden_size, sr_ratio, stride=sr_ratio)
            self.sr_norm = nn.LayerNorm(hidden_size, eps=sr_norm_eps)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: Tensor, grid: Grid) -> Tensor:
        """x [B, N, C] on grid (h, w) -> proj(attention(q(x), k(r), v(r))) [B, N, C], where
        r = SR(x) (or x when sr = 1); q, the attention and proj run as one op
        (``sk.fused_attention``)."""
        batch, _, channels = x.shape
        reduced = x
        if self.sr_ratio > 1:
            reduced = sk.spatial_reduction(
                x, grid, self.sr.weight, self.sr.bias, self.sr_norm.weight, self.sr_norm.bias, self.sr_norm.eps,
                kernels=self.kernels,
            )
        heads_shape = (reduced.shape[1], self.heads, channels // self.heads)
        k = F.linear(reduced, self.k.weight, self.k.bias).view(batch, *heads_shape)
        v = F.linear(reduced, self.v.weight, self.v.bias).view(batch, *heads_shape)
        return sk.fused_attention(
            x, self.q.weight, self.q.bias, k, v, self.proj.weight, self.proj.bias, kernels=self.kernels
        )


class MixFFN(KernelModule):
    """fc1 -> depthwise 3x3 conv -> GELU -> fc2."""

    def __init__(self, hidden_size: int, mlp_ratio: int):
        super().__init__()
        inner = hidden_size * mlp_ratio
        self.fc1 = nn.Linear(hidden_size, inner)
        self.dwconv = nn.Conv2d(inner, inner, 3, padding=1, groups=inner)
        self.fc2 = nn.Linear(inner, hidden_size)

    def forward(self, x: Tensor, grid: Grid) -> Tensor:
        """x [B, N, C] on grid (h, w) -> [B, N, C], as one op (``sk.mix_ffn``)."""
        return sk.mix_ffn(
            x, grid, self.fc1.weight, self.fc1.bias, self.dwconv.weight, self.dwconv.bias,
            self.fc2.weight, self.fc2.bias, kernels=self.kernels,
        )


class Block(KernelModule):
    """One transformer block, x -> x + attn(norm1(x)) -> x + mlp(norm2(x)), with each
    residual add fused into the LayerNorm after it.

    ``forward(branch, residual, grid) -> (branch, residual)``: the block's input x is
    ``residual + branch`` (for a stage's first block: ``branch`` with ``residual=None``)
    and so is its output; the caller adds the returned branch in the next LayerNorm (the
    next block's norm1 or the stage's norm). Drop path scales each branch per sample.
    """

    def __init__(
        self, hidden_size: int, heads: int, sr_ratio: int, mlp_ratio: int, drop_path_rate: float = 0.0,
        norm_eps: float = HF_EPS, sr_norm_eps: float = HF_EPS,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, eps=norm_eps)
        self.attn = EfficientSelfAttention(hidden_size, heads, sr_ratio, sr_norm_eps)
        self.norm2 = nn.LayerNorm(hidden_size, eps=norm_eps)
        self.mlp = MixFFN(hidden_size, mlp_ratio)
        self.drop_path_rate = drop_path_rate

    def forward(self, branch: Tensor, residual: Tensor | None, grid: Grid) -> tuple[Tensor, Tensor]:
        normed, residual = add_norm(branch, residual, self.norm1, self.kernels)
        branch = drop_path(self.attn(normed, grid), self.drop_path_rate, self.training)
        normed, residual = add_norm(branch, residual, self.norm2, self.kernels)
        branch = drop_path(self.mlp(normed, grid), self.drop_path_rate, self.training)
        return branch, residual


class Stage(KernelModule):
    """Patch embedding, ``depth`` blocks and a final LayerNorm at one resolution."""

    def __init__(self, config: SegFormerConfig, index: int, drop_path_rates: list[float]):
        super().__init__()
        in_channels = config.num_channels if index == 0 else config.hidden_sizes[index - 1]
        hidden = config.hidden_sizes[index]
        self.patch_embed = PatchEmbedding(
            in_channels, hidden, config.patch_sizes[index], config.strides[index], config.embed_norm_eps
        )
        self.blocks = nn.ModuleList(
            Block(hidden, config.num_attention_heads[index], config.sr_ratios[index], config.mlp_ratios[index], rate,
                  config.block_norm_eps, config.embed_norm_eps)
            for rate in drop_path_rates
        )
        self.norm = nn.LayerNorm(hidden, eps=config.block_norm_eps)

    def forward(self, image: Tensor) -> tuple[Tensor, Grid]:
        """[B, C_in, H, W] channels-last -> (normalised output tokens [B, h*w, C], (h, w))."""
        branch, grid = self.patch_embed(image)
        residual = None
        for block in self.blocks:
            branch, residual = block(branch, residual, grid)
        features, _ = add_norm(branch, residual, self.norm, self.kernels)
        return features, grid


class Encoder(nn.Module):
    """The Mix Transformer: each stage reads the previous stage's output as an image."""

    def __init__(self, config: SegFormerConfig):
        super().__init__()
        # stochastic depth grows linearly from 0 at the first block to the rate at the last
        total = sum(config.depths)
        rates = [config.drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        starts = [sum(config.depths[:i]) for i in range(config.num_stages)]
        self.stages = nn.ModuleList(
            Stage(config, i, rates[start : start + depth]) for i, (start, depth) in enumerate(zip(starts, config.depths))
        )

    def forward(self, images: Tensor) -> tuple[list[Tensor], list[Grid]]:
        """images [B, C, H, W] -> every stage's output tokens [B, N_i, C_i] and grid (h_i, w_i)."""
        # channels-last input makes the first conv write tokens in [B, N, C] order
        image = images.contiguous(memory_format=torch.channels_last)
        features, grids = [], []
        for stage in self.stages:
            tokens, grid = stage(image)
            features.append(tokens)
            grids.append(grid)
            image = tokens_as_image(tokens, grid)
        return features, grids


class DecodeHead(KernelModule):
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
        """The decoder fold (``segformer_kernels.decoder.fold_projections``): the composed
        [D, C_i] weights, stage order, and the summed [D] bias."""
        return fold_projections(self.linear_fuse.weight, [projection.proj for projection in self.linear_c])

    def forward(self, features: list[Tensor], grids: list[Grid]) -> Tensor:
        """features[i]: stage i's tokens [B, N_i, C_i] on grid grids[i] -> logits [B, K, *grids[0]]."""
        weights, bias = self.folded_projections()
        maps = [F.linear(tokens, weight) for tokens, weight in zip(features, weights)]
        return decoder_tail(maps, grids, bias, self.batch_norm, self.dropout, self.classifier, self.kernels)


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
    or "torch"; it may be changed at any time, and setting it sets every submodule's.
    """

    def __init__(self, config: SegFormerConfig, kernels: str = "auto"):
        super().__init__()
        if not isinstance(config, SegFormerConfig):
            raise TypeError(f"config must be a SegFormerConfig, got {type(config).__name__}")
        self.config = config
        self.encoder = Encoder(config)
        self.decode_head = DecodeHead(config)
        self.kernels = kernels
        self._min_image_size = config.min_image_size()
        self.preprocessing = None  # what segment() does to images; from_pretrained sets the checkpoint's
        self.reset_parameters()

    @property
    def kernels(self) -> str:
        return self._kernels

    @kernels.setter
    def kernels(self, value: str) -> None:
        self._kernels = check_kernels(value)
        for module in self.modules():
            if isinstance(module, KernelModule):
                module.kernels = self._kernels

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
        config = config.with_overrides(num_classes, drop_path_rate, classifier_dropout)
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
        from .inference import preprocessing_for

        model = checkpoint.load_pretrained(
            cls, path, num_classes=num_classes, kernels=kernels, drop_path_rate=drop_path_rate,
            classifier_dropout=classifier_dropout, config=config, strict=strict,
        )
        if isinstance(path, (str, os.PathLike)):
            model.preprocessing = preprocessing_for(path)
        return model

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write config.json and model.safetensors (pytorch_model.bin without safetensors)
        in the HF on-disk format, loadable by transformers too."""
        checkpoint.save_pretrained(self, directory)

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
        features, grids = self.encoder(images)
        return self.decode_head(features, grids)

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

    # ---- inference on images ---------------------------------------------------------------

    def segment(self, images, *, probabilities: bool = False, batch_size: int = 8, precision: str = "fp32"):
        """Label maps for one image or a list (PIL images, uint8 [H, W, 3] arrays, file paths)
        at each image's own size, preprocessed as the checkpoint says (``self.preprocessing``,
        see ``segformer.inference``); a float tensor [B, 3, H, W] is taken as preprocessed
        model input. Returns int64 [H, W] per image, or (labels, probabilities [K, H, W])."""
        from .inference import Preprocessing, segment_images

        return segment_images(self, images, self.preprocessing or Preprocessing(), probabilities=probabilities,
                              batch_size=batch_size, precision=precision)

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
        (height, width), (rows, cols) = labels.shape[-2:], logits.shape[-2:]
        # the scale factor s of the labels over the logits (each logit size rounded up, hence +-1) must be
        # the same in height and width: [H/(h+1), H/(h-1)] and [W/(w+1), W/(w-1)] overlap
        low = max(height / (rows + 1), width / (cols + 1))
        high = min(height / (rows - 1) if rows > 1 else math.inf, width / (cols - 1) if cols > 1 else math.inf)
        if low > high:
            raise ValueError(
                f"labels {height}x{width} (HxW) have another aspect ratio than the logits {rows}x{cols}: resizing "
                "would stretch them; labels must be of the input images' size"
            )
        ignore = self.config.semantic_loss_ignore_index
        num_classes = self.config.num_labels
        # one reduction and one host read in eager mode: a bad label must not reach cross_entropy (an
        # IndexError on the CPU, a device-side assert on a GPU); a compiled graph cannot branch on data
        outside = ((labels < 0) | (labels >= num_classes)) & (labels != ignore)
        if not torch.compiler.is_compiling() and bool(outside.any()):
            values = torch.unique(labels[outside])[:8].tolist()
            raise ValueError(
                f"labels hold value(s) {', '.join(map(str, values))} outside the classes: num_classes={num_classes}, "
                f"valid labels 0..{num_classes - 1} and the ignore index {ignore}"
            )
        resized = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        total = F.cross_entropy(resized, labels.long(), ignore_index=ignore, reduction="sum")
        valid = (labels != ignore).sum().clamp(min=1)
        return total / valid

