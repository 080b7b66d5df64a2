"""SegFormer architecture: the six MiT presets and any architecture an HF config.json describes.

Two LayerNorm eps values, because the two checkpoint sources differ (docs/design.md, "Two LayerNorm eps"):
``block_norm_eps`` is used by the pre-norms inside every block and by each stage's final
norm; ``embed_norm_eps`` by the patch-embedding norms and the sequence-reduction norms.
transformers builds every LayerNorm with PyTorch's default 1e-5 (it ignores its own
``layer_norm_eps`` field); NVlabs/SegFormer uses 1e-6 for the block and stage norms.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

HF_EPS = 1e-5  # what transformers' nn.LayerNorm(hidden) gets: PyTorch's default
NVLABS_BLOCK_EPS = 1e-6  # NVlabs: partial(nn.LayerNorm, eps=1e-6) in blocks and stage norms

# hidden sizes, depths, heads and decoder width of MiT-B0..B5 (identical in HF and NVlabs)
_SMALL = (32, 64, 160, 256)
_LARGE = (64, 128, 320, 512)
_PRESET_SHAPES = {
    "b0": (_SMALL, (2, 2, 2, 2), 256),
    "b1": (_LARGE, (2, 2, 2, 2), 256),
    "b2": (_LARGE, (3, 4, 6, 3), 768),
    "b3": (_LARGE, (3, 4, 18, 3), 768),
    "b4": (_LARGE, (3, 8, 27, 3), 768),
    "b5": (_LARGE, (3, 6, 40, 3), 768),
}

# the HF config.json fields this config reads and writes under the same names
_HF_FIELDS = (
    "num_channels", "hidden_sizes", "depths", "num_attention_heads", "sr_ratios", "patch_sizes",
    "strides", "mlp_ratios", "decoder_hidden_size", "drop_path_rate", "classifier_dropout_prob",
    "semantic_loss_ignore_index",
)


@dataclass
class SegFormerConfig:
    """One SegFormer architecture. Per-stage lists all have one entry per encoder stage."""

    hidden_sizes: tuple[int, ...] = _SMALL
    depths: tuple[int, ...] = (2, 2, 2, 2)
    num_attention_heads: tuple[int, ...] = (1, 2, 5, 8)
    sr_ratios: tuple[int, ...] = (8, 4, 2, 1)
    patch_sizes: tuple[int, ...] = (7, 3, 3, 3)
    strides: tuple[int, ...] = (4, 2, 2, 2)
    mlp_ratios: tuple[int, ...] = (4, 4, 4, 4)
    decoder_hidden_size: int = 256
    num_labels: int = 150
    num_channels: int = 3
    drop_path_rate: float = 0.1
    classifier_dropout_prob: float = 0.1
    block_norm_eps: float = HF_EPS
    embed_norm_eps: float = HF_EPS
    semantic_loss_ignore_index: int = 255
    id2label: dict[int, str] | None = field(default=None, compare=False)

    def __post_init__(self):
        for name in ("hidden_sizes", "depths", "num_attention_heads", "sr_ratios", "patch_sizes", "strides", "mlp_ratios"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
                raise TypeError(f"config.{name} must be a list of ints (one per stage), got {value!r}")
            setattr(self, name, tuple(int(v) for v in value))
        stages = len(self.hidden_sizes)
        if stages == 0:
            raise ValueError("config.hidden_sizes must list at least one stage")
        for name in ("depths", "num_attention_heads", "sr_ratios", "patch_sizes", "strides", "mlp_ratios"):
            if len(getattr(self, name)) != stages:
                raise ValueError(
                    f"config.{name} has {len(getattr(self, name))} entries but hidden_sizes has {stages}: "
                    "every per-stage list needs one entry per stage"
                )
        for name in ("hidden_sizes", "num_attention_heads", "sr_ratios", "patch_sizes", "strides", "mlp_ratios"):
            if min(getattr(self, name)) < 1:
                raise ValueError(f"config.{name} must be positive, got {getattr(self, name)}")
        if min(self.depths) < 0:
            raise ValueError(f"config.depths must be >= 0, got {self.depths}")
        for size, heads in zip(self.hidden_sizes, self.num_attention_heads):
            if size % heads:
                raise ValueError(f"hidden size {size} is not divisible by its {heads} attention heads")
        for name in ("decoder_hidden_size", "num_labels", "num_channels"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"config.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("drop_path_rate", "classifier_dropout_prob"):
            if not 0.0 <= float(getattr(self, name)) < 1.0:
                raise ValueError(f"config.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.id2label is not None:
            self.id2label = {int(k): str(v) for k, v in self.id2label.items()}

    # ---- presets -------------------------------------------------------------------------

    @classmethod
    def preset(cls, name: str, **overrides) -> "SegFormerConfig":
        """MiT-B0..B5 ("b0", "mit-b0", "mit_b0", "segformer-b0" all work), HF eps semantics."""
        key = preset_key(name)
        hidden_sizes, depths, decoder = _PRESET_SHAPES[key]
        values = {"hidden_sizes": hidden_sizes, "depths": depths, "decoder_hidden_size": decoder}
        return cls(**{**values, **overrides})

    @property
    def num_stages(self) -> int:
        return len(self.hidden_sizes)

    def preset_name(self) -> str | None:
        """The preset with these hidden sizes and depths, if any."""
        for key, (hidden_sizes, depths, _) in _PRESET_SHAPES.items():
            if self.hidden_sizes == hidden_sizes and self.depths == depths:
                return key
        return None

    def stage_grid(self, height: int, width: int) -> list[tuple[int, int]]:
        """The token grid (h, w) of every stage for an image of this size (the strided
        patch-embedding convs with padding patch // 2)."""
        grids = []
        for patch, stride in zip(self.patch_sizes, self.strides):
            pad = patch // 2
            height = (height + 2 * pad - patch) // stride + 1
            width = (width + 2 * pad - patch) // stride + 1
            grids.append((height, width))
        return grids

    def min_image_size(self) -> int:
        """The smallest side length every stage can take: each patch-embedding conv needs
        an output, and each reduction needs at least one sr x sr patch."""
        size = 1
        while not all(min(g) >= max(sr, 1) for g, sr in zip(self.stage_grid(size, size), self.sr_ratios)):
            size += 1
        return size

    # ---- HF config.json ----------------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, data: dict) -> "SegFormerConfig":
        """Read an HF SegformerConfig dict (config.json). Eps: transformers builds every
        LayerNorm with 1e-5 whatever ``layer_norm_eps`` says, so both eps are 1e-5 unless
        the file carries this library's ``block_norm_eps`` / ``embed_norm_eps``."""
        if not isinstance(data, dict):
            raise ValueError(f"config.json must hold a JSON object, got {type(data).__name__}")
        model_type = data.get("model_type")
        if model_type not in (None, "segformer"):
            raise ValueError(f"config.json describes a {model_type!r} model, not model_type 'segformer'")
        if data.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"only hidden_act 'gelu' (exact erf form) is supported, config.json has {data['hidden_act']!r}")
        values = {name: data[name] for name in _HF_FIELDS if name in data}
        id2label = data.get("id2label")
        if id2label:
            values["id2label"] = {int(k): v for k, v in id2label.items()}
        if "num_labels" in data:
            values["num_labels"] = int(data["num_labels"])
        elif id2label:
            values["num_labels"] = len(id2label)
        values["block_norm_eps"] = float(data.get("block_norm_eps", HF_EPS))
        values["embed_norm_eps"] = float(data.get("embed_norm_eps", HF_EPS))
        if "num_encoder_blocks" in data and "hidden_sizes" in data and data["num_encoder_blocks"] != len(data["hidden_sizes"]):
            raise ValueError(
                f"config.json: num_encoder_blocks={data['num_encoder_blocks']} but hidden_sizes has "
                f"{len(data['hidden_sizes'])} entries"
            )
        return cls(**values)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "SegFormerConfig":
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from None
        except UnicodeDecodeError:
            raise ValueError(f"{path} is not a text (JSON) file") from None
        try:
            return cls.from_hf_dict(data)
        except (TypeError, ValueError, KeyError, AttributeError) as error:
            message = str(error).removeprefix("config.json: ")
            raise ValueError(f"{path}: bad field: {message}") from None

    def to_hf_dict(self) -> dict:
        """An HF SegformerConfig-compatible dict (transformers reads it; the two eps fields
        are extra keys transformers keeps but does not use)."""
        id2label = self.id2label or {i: f"LABEL_{i}" for i in range(self.num_labels)}
        data = {
            "architectures": ["SegformerForSemanticSegmentation"],
            "model_type": "segformer",
            "num_encoder_blocks": self.num_stages,
            **{name: _plain(getattr(self, name)) for name in _HF_FIELDS},
            "hidden_act": "gelu",
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
            "initializer_range": 0.02,
            "layer_norm_eps": self.block_norm_eps,
            "reshape_last_stage": True,
            "id2label": {str(i): label for i, label in id2label.items()},
            "label2id": {label: i for i, label in id2label.items()},
            "block_norm_eps": self.block_norm_eps,
            "embed_norm_eps": self.embed_norm_eps,
        }
        return data

    def with_overrides(
        self, num_classes: int | None = None, drop_path_rate: float | None = None, classifier_dropout: float | None = None
    ) -> "SegFormerConfig":
        """This config with the options of ``SegFormer.from_config`` / ``from_pretrained``
        applied; None keeps the config's value."""
        changes = {}
        if num_classes is not None:
            if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
                raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
            changes["num_labels"] = num_classes
        if drop_path_rate is not None:
            changes["drop_path_rate"] = drop_path_rate
        if classifier_dropout is not None:
            changes["classifier_dropout_prob"] = classifier_dropout
        return self.replace(**changes) if changes else self

    def replace(self, **changes) -> "SegFormerConfig":
        if "num_labels" in changes and changes["num_labels"] != self.num_labels and "id2label" not in changes:
            changes["id2label"] = None  # the old class names no longer apply
        return dataclasses.replace(self, **changes)


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def preset_key(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"a preset name must be a string like 'b0', got {type(name).__name__}")
    key = name.strip().lower()
    for prefix in ("nvidia/", "segformer-", "segformer_", "mit-", "mit_"):
        key = key.removeprefix(prefix)
    if key not in _PRESET_SHAPES:
        raise ValueError(f"unknown SegFormer preset {name!r}; expected one of {', '.join(_PRESET_SHAPES)}")
    return key


PRESETS = tuple(_PRESET_SHAPES)
