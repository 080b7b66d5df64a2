"""Reading the SegFormer checkpoints users have, and writing the HF on-disk format.

Sources (docs/design.md, "Checkpoints"), told apart key by key:
- HF on disk (transformers 4 names, also what transformers 5 writes): ``segformer.encoder.*``
  and ``decode_head.linear_c.{i}.proj`` ...; classification checkpoints add ``classifier.*``.
- transformers 5 in-memory names: ``segformer.stages.{i}.blocks.{j}``, ``q_proj`` ...
- NVlabs/SegFormer (mmseg 0.x): ``backbone.`` / ``decode_head.`` prefixes, fused ``attn.kv``;
  ImageNet ``mit_b*.pth`` backbones are flat (no prefix) with ``head.*``.
- this model's own ``state_dict()``.
Every key is translated to this model's names through one table of templates
(``_NAME_TABLE``); saving runs the same table the other way.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor

from .config import HF_EPS, NVLABS_BLOCK_EPS, SegFormerConfig, _PRESET_SHAPES

logger = logging.getLogger(__name__)

SOURCES = ("ours", "hf", "hf5", "nvlabs")

# One row per parameter-holding module: its name here, in HF on disk (transformers 4),
# in transformers 5 memory, and in NVlabs. {i} is the 0-based stage, {n} the 1-based one,
# {j} the block in its stage. A key is a row's name plus ".weight", ".bias", ...
_NAME_TABLE = [
    ("encoder.stages.{i}.patch_embed.proj", "segformer.encoder.patch_embeddings.{i}.proj",
     "segformer.stages.{i}.patch_embeddings.proj", "backbone.patch_embed{n}.proj"),
    ("encoder.stages.{i}.patch_embed.norm", "segformer.encoder.patch_embeddings.{i}.layer_norm",
     "segformer.stages.{i}.patch_embeddings.layer_norm", "backbone.patch_embed{n}.norm"),
    ("encoder.stages.{i}.blocks.{j}.norm1", "segformer.encoder.block.{i}.{j}.layer_norm_1",
     "segformer.stages.{i}.blocks.{j}.layernorm_before", "backbone.block{n}.{j}.norm1"),
    ("encoder.stages.{i}.blocks.{j}.attn.q", "segformer.encoder.block.{i}.{j}.attention.self.query",
     "segformer.stages.{i}.blocks.{j}.attention.q_proj", "backbone.block{n}.{j}.attn.q"),
    # NVlabs fuses k and v into attn.kv; _split_fused_kv turns it into these two names first
    ("encoder.stages.{i}.blocks.{j}.attn.k", "segformer.encoder.block.{i}.{j}.attention.self.key",
     "segformer.stages.{i}.blocks.{j}.attention.k_proj", "backbone.block{n}.{j}.attn.k"),
    ("encoder.stages.{i}.blocks.{j}.attn.v", "segformer.encoder.block.{i}.{j}.attention.self.value",
     "segformer.stages.{i}.blocks.{j}.attention.v_proj", "backbone.block{n}.{j}.attn.v"),
    ("encoder.stages.{i}.blocks.{j}.attn.sr", "segformer.encoder.block.{i}.{j}.attention.self.sr",
     "segformer.stages.{i}.blocks.{j}.attention.sequence_reduction.sequence_reduction", "backbone.block{n}.{j}.attn.sr"),
    ("encoder.stages.{i}.blocks.{j}.attn.sr_norm", "segformer.encoder.block.{i}.{j}.attention.self.layer_norm",
     "segformer.stages.{i}.blocks.{j}.attention.sequence_reduction.layer_norm", "backbone.block{n}.{j}.attn.norm"),
    ("encoder.stages.{i}.blocks.{j}.attn.proj", "segformer.encoder.block.{i}.{j}.attention.output.dense",
     "segformer.stages.{i}.blocks.{j}.attention.o_proj", "backbone.block{n}.{j}.attn.proj"),
    ("encoder.stages.{i}.blocks.{j}.norm2", "segformer.encoder.block.{i}.{j}.layer_norm_2",
     "segformer.stages.{i}.blocks.{j}.layernorm_after", "backbone.block{n}.{j}.norm2"),
    ("encoder.stages.{i}.blocks.{j}.mlp.fc1", "segformer.encoder.block.{i}.{j}.mlp.dense1",
     "segformer.stages.{i}.blocks.{j}.mlp.fc1", "backbone.block{n}.{j}.mlp.fc1"),
    ("encoder.stages.{i}.blocks.{j}.mlp.dwconv", "segformer.encoder.block.{i}.{j}.mlp.dwconv.dwconv",
     "segformer.stages.{i}.blocks.{j}.mlp.dwconv.dwconv", "backbone.block{n}.{j}.mlp.dwconv.dwconv"),
    ("encoder.stages.{i}.blocks.{j}.mlp.fc2", "segformer.encoder.block.{i}.{j}.mlp.dense2",
     "segformer.stages.{i}.blocks.{j}.mlp.fc2", "backbone.block{n}.{j}.mlp.fc2"),
    ("encoder.stages.{i}.norm", "segformer.encoder.layer_norm.{i}",
     "segformer.stages.{i}.layer_norm", "backbone.norm{n}"),
    ("decode_head.linear_c.{i}.proj", "decode_head.linear_c.{i}.proj",
     "decode_head.linear_projections.{i}.proj", "decode_head.linear_c{n}.proj"),
    ("decode_head.linear_fuse", "decode_head.linear_fuse", "decode_head.linear_fuse", "decode_head.linear_fuse.conv"),
    ("decode_head.batch_norm", "decode_head.batch_norm", "decode_head.batch_norm", "decode_head.linear_fuse.bn"),
    ("decode_head.classifier", "decode_head.classifier", "decode_head.classifier", "decode_head.linear_pred"),
]

# keys that belong to a known checkpoint but not to this model: dropped, said in the log
_UNUSED_KEYS = {
    "hf": re.compile(r"^classifier\."),  # an ImageNet classification head (HF mit-b*)
    "nvlabs": re.compile(r"^(backbone\.head\.|decode_head\.conv_seg\.|auxiliary_head\.)"),
}


def _compile(template: str) -> re.Pattern:
    pattern = re.escape(template)
    for placeholder, group in (("{i}", r"(?P<i>\d+)"), ("{n}", r"(?P<n>\d+)"), ("{j}", r"(?P<j>\d+)")):
        pattern = pattern.replace(re.escape(placeholder), group)
    return re.compile(pattern + r"\.(?P<rest>[A-Za-z_]+)$")


_PATTERNS = {source: [(_compile(row[k]), row) for row in _NAME_TABLE] for k, source in enumerate(SOURCES)}


def translate_key(key: str, source: str, target: str) -> str | None:
    """The name of ``key`` (from ``source``) in ``target``; None when no row matches."""
    target_column = SOURCES.index(target)
    for pattern, row in _PATTERNS[source]:
        match = pattern.match(key)
        if match is None:
            continue
        groups = match.groupdict()
        if groups.get("n") is not None:
            stage = int(groups["n"]) - 1  # NVlabs counts stages from 1
            if stage < 0:
                return None
        else:
            stage = int(groups["i"]) if groups.get("i") is not None else None
        name = row[target_column]
        if stage is not None:
            name = name.replace("{i}", str(stage)).replace("{n}", str(stage + 1))
        if groups.get("j") is not None:
            name = name.replace("{j}", groups["j"])
        return f"{name}.{groups['rest']}"
    return None


# ---- reading files ------------------------------------------------------------------------


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, Tensor], SegFormerConfig | None]:
    """The tensors (and config.json, when there is one) of an HF folder, a .safetensors
    file, or a torch .bin/.pth/.pt file."""
    path = Path(path)
    _check_link(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    config = None
    if path.is_dir():
        config_path = path / "config.json"
        if config_path.exists():
            config = SegFormerConfig.from_json_file(config_path)
        for name in ("model.safetensors", "pytorch_model.bin"):
            _check_link(path / name)
            if (path / name).exists():
                return _read_file(path / name), config
        if (path / "model.safetensors.index.json").exists() or (path / "pytorch_model.bin.index.json").exists():
            return _read_sharded(path), config
        raise FileNotFoundError(f"{path} holds no model.safetensors or pytorch_model.bin")
    sibling_config = path.parent / "config.json"
    if path.suffix == ".safetensors" and sibling_config.exists():
        config = SegFormerConfig.from_json_file(sibling_config)
    return _read_file(path), config


def _check_link(path: Path) -> None:
    if path.is_symlink() and not path.exists():
        raise FileNotFoundError(f"{path} is a broken link (to {os.readlink(path)})")


def _check_readable(path: Path) -> None:
    """A clear reason when the weights file cannot be opened at all (not 'corrupt', not 'no such file')."""
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a weights file")
    try:
        with open(path, "rb"):
            pass
    except OSError as error:
        raise OSError(f"cannot open {path}: {error.strerror or error}") from None


def _read_file(path: Path) -> dict:
    _check_readable(path)
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ImportError(f"reading {path} needs the safetensors package (pip install safetensors)") from None
        try:
            return load_file(str(path))
        except Exception as error:  # safetensors raises its own error types for a bad header
            raise ValueError(f"could not read {path} as safetensors (corrupt or not a safetensors file): {error}") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. torch's note on the pickle protocol of a file it then refuses
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Weights only load failed" in str(error):  # torch's text advises unsafe loading: not repeated here
            raise ValueError(f"could not read {path}: it holds Python objects other than tensors, which are not "
                             "loaded (unpickling them could run arbitrary code); save a state dict of tensors") from None
        raise ValueError(f"could not read {path} as a torch checkpoint (corrupt or not a torch file)") from None
    except Exception as error:  # torch.load raises many types for a file that is not a checkpoint
        raise ValueError(f"could not read {path} as a torch checkpoint (corrupt, truncated or not a torch file: "
                         f"{type(error).__name__})") from None


def _read_sharded(folder: Path) -> dict:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_path = folder / index_name
        if index_path.exists():
            shards = sorted(set(json.loads(index_path.read_text())["weight_map"].values()))
            tensors = {}
            for shard in shards:
                tensors.update(_read_file(folder / shard))
            return tensors
    raise FileNotFoundError(f"{folder} has no shard index")


def unwrap_state_dict(data) -> dict[str, Tensor]:
    """The tensor dict inside a loaded checkpoint: mmseg/NVlabs keep it under
    "state_dict", training scripts often under "model"; DDP adds "module."."""
    if not isinstance(data, Mapping):
        raise ValueError(f"a checkpoint must hold a dict of tensors, got {type(data).__name__}")
    for container in ("state_dict", "model", "model_state_dict"):
        if container in data and isinstance(data[container], Mapping):
            data = data[container]
            break
    tensors = {}
    for key, value in data.items():
        if isinstance(value, Tensor):
            tensors[key.removeprefix("module.")] = value
    if not tensors:
        raise ValueError(f"the checkpoint holds no tensors (top-level keys: {_preview(data)})")
    return tensors


# ---- translating -----------------------------------------------------------------------------


def _split_fused_kv(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """NVlabs' attn.kv ([2C, C]: rows [:C] key, [C:] value) -> attn.k and attn.v."""
    out = {}
    for key, value in state.items():
        match = re.match(r"^(.*\.attn)\.kv\.(weight|bias)$", key)
        if match is None:
            out[key] = value
            continue
        half = value.shape[0] // 2
        out[f"{match[1]}.k.{match[2]}"] = value[:half]
        out[f"{match[1]}.v.{match[2]}"] = value[half:]
    return out


def _flat_backbone_prefix(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """NVlabs ImageNet backbones (mit_b*.pth) have no "backbone." prefix."""
    if not any(re.match(r"^(patch_embed\d+|block\d+|norm\d+|head)\.", key) for key in state):
        return state
    return {(key if key.startswith(("backbone.", "decode_head.")) else f"backbone.{key}"): v for key, v in state.items()}


def to_canonical(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], str, list[str], list[str]]:
    """Translate every key to this model's names. Returns (tensors, source, dropped keys,
    unknown keys); source is the checkpoint format ("hf", "hf5", "nvlabs", "ours")."""
    state = _split_fused_kv(_flat_backbone_prefix(dict(state)))
    tensors: dict[str, Tensor] = {}
    counts = dict.fromkeys(SOURCES, 0)
    dropped, unknown = [], []
    for key, value in state.items():
        for source in SOURCES:
            name = translate_key(key, source, "ours")
            if name is not None:
                counts[source] += 1
                tensors[name] = value
                break
        else:
            if any(pattern.match(key) for pattern in _UNUSED_KEYS.values()):
                dropped.append(key)
            else:
                unknown.append(key)
    source = max(counts, key=counts.get)
    return tensors, source, dropped, unknown


# ---- inferring the architecture --------------------------------------------------------------


def infer_config(state: Mapping[str, Tensor], source: str, num_classes: int | None) -> SegFormerConfig:
    """The architecture from the weights' names and shapes (canonical names): hidden sizes,
    depths, kernel sizes, sr ratios, mlp ratios, decoder width and classes. Strides follow
    the MiT rule (kernel 7 -> stride 4, kernel 3 -> stride 2); heads come from the preset
    with these hidden sizes (all six use 1, 2, 5, 8)."""
    stages = sorted({int(m[1]) for k in state if (m := re.match(r"^encoder\.stages\.(\d+)\.patch_embed\.proj\.weight$", k))})
    if stages != list(range(len(stages))) or not stages:
        raise ValueError(f"cannot infer the architecture: patch embeddings found for stages {stages}")
    hidden_sizes, depths, patch_sizes, sr_ratios, mlp_ratios = [], [], [], [], []
    for i in stages:
        proj = state[f"encoder.stages.{i}.patch_embed.proj.weight"]
        hidden_sizes.append(proj.shape[0])
        patch_sizes.append(proj.shape[-1])
        blocks = {int(m[1]) for k in state if (m := re.match(rf"^encoder\.stages\.{i}\.blocks\.(\d+)\.", k))}
        depths.append(len(blocks))
        sr = state.get(f"encoder.stages.{i}.blocks.0.attn.sr.weight")
        sr_ratios.append(1 if sr is None else sr.shape[-1])
        fc1 = state.get(f"encoder.stages.{i}.blocks.0.mlp.fc1.weight")
        mlp_ratios.append(4 if fc1 is None else fc1.shape[0] // proj.shape[0])
    hidden_sizes = tuple(hidden_sizes)
    preset = next((shape for shape in _PRESET_SHAPES.values() if shape[0] == hidden_sizes), None)
    default_heads = (1, 2, 5, 8)
    if len(stages) != 4 or any(c % h for c, h in zip(hidden_sizes, default_heads)):
        raise ValueError(
            f"cannot infer the attention heads for hidden sizes {hidden_sizes} (no MiT preset has them); "
            "pass config=SegFormerConfig(...) or use a folder with config.json"
        )
    if preset is None:
        warnings.warn(f"hidden sizes {hidden_sizes} match no MiT preset; assuming heads {default_heads}", stacklevel=3)
    decoder = state.get("decode_head.linear_c.0.proj.weight")
    classifier = state.get("decode_head.classifier.weight")
    block_eps = NVLABS_BLOCK_EPS if source == "nvlabs" else HF_EPS
    depths_tuple = tuple(depths)
    decoder_width = (
        decoder.shape[0] if decoder is not None
        else next((w for h, d, w in _PRESET_SHAPES.values() if h == hidden_sizes and d == depths_tuple), 256)
    )
    return SegFormerConfig(
        hidden_sizes=hidden_sizes,
        depths=depths_tuple,
        num_attention_heads=default_heads,
        sr_ratios=tuple(sr_ratios),
        patch_sizes=tuple(patch_sizes),
        strides=tuple(p // 2 + 1 for p in patch_sizes),
        mlp_ratios=tuple(mlp_ratios),
        decoder_hidden_size=decoder_width,
        num_labels=classifier.shape[0] if classifier is not None else num_classes,
        num_channels=state[f"encoder.stages.0.patch_embed.proj.weight"].shape[1],
        block_norm_eps=block_eps,
        embed_norm_eps=HF_EPS,
    )


# ---- loading ---------------------------------------------------------------------------------


def load_pretrained(model_class, path, *, num_classes: int | None = None, kernels: str = "auto",
                    config: SegFormerConfig | str | None = None, strict: bool = True, **overrides):
    """Build a model from a checkpoint (see the module docstring for the sources).

    ``num_classes`` different from the checkpoint's gives a fresh classifier (a warning
    says so); a backbone-only checkpoint gets a fresh decoder. With ``strict`` (default),
    missing or unexpected keys raise a ValueError naming them; otherwise they are warned
    about. A shape mismatch is always refused with the key and both shapes. ``overrides``:
    drop_path_rate and classifier_dropout, as ``SegFormerConfig.with_overrides`` takes them."""
    if isinstance(path, Mapping):
        raw, file_config, where = path, None, "the given state dict"
    elif isinstance(path, (str, os.PathLike)):
        raw, file_config = read_state_dict(path)
        where = str(path)
    else:
        raise TypeError(f"path must be a file or folder path or a state dict, got {type(path).__name__}")
    tensors, source, dropped, unknown = to_canonical(unwrap_state_dict(raw))
    if not any(key.startswith("encoder.stages.0.patch_embed.proj.") for key in tensors):
        raise ValueError(
            f"{where} is not a SegFormer checkpoint: expected keys like "
            "'segformer.encoder.patch_embeddings.0.proj.weight' (HF) or 'backbone.patch_embed1.proj.weight' "
            f"(NVlabs); found {_preview(unwrap_state_dict(raw))}"
        )
    if dropped:
        logger.info("%s: not used by the segmentation model: %s", where, ", ".join(dropped))

    has_head = any(key.startswith("decode_head.") for key in tensors)
    if not has_head and num_classes is None:
        raise ValueError(f"{where} has no segmentation head (an encoder only): pass num_classes= to add a fresh one")
    if isinstance(config, str):  # a preset name: the eps still follow the checkpoint's source
        config = SegFormerConfig.preset(config, block_norm_eps=NVLABS_BLOCK_EPS if source == "nvlabs" else HF_EPS)
    if config is None:
        config = file_config if file_config is not None else infer_config(tensors, source, num_classes)
    class_names = _nvlabs_class_names(raw)
    if config.id2label is None and class_names is not None and len(class_names) == config.num_labels:
        config = config.replace(id2label=dict(enumerate(class_names)))
    classifier = tensors.get("decode_head.classifier.weight")
    checkpoint_classes = classifier.shape[0] if classifier is not None else None
    if checkpoint_classes is not None and config.num_labels != checkpoint_classes:
        config = config.replace(num_labels=checkpoint_classes)
    fresh_prefixes = []
    if num_classes is not None and checkpoint_classes is not None and num_classes != checkpoint_classes:
        warnings.warn(
            f"{where} has {checkpoint_classes} classes, num_classes={num_classes}: the classifier "
            "(decode_head.classifier) is freshly initialised; fine-tune before use",
            stacklevel=3,
        )
        fresh_prefixes.append("decode_head.classifier.")
    if not has_head:
        warnings.warn(f"{where} holds only an encoder: the decode head is freshly initialised", stacklevel=3)
        fresh_prefixes.append("decode_head.")
    config = config.with_overrides(num_classes, **overrides)

    model = model_class(config, kernels=kernels)
    expected = model.state_dict()
    for key in [k for k in tensors if k.startswith(tuple(fresh_prefixes))]:
        del tensors[key]
    for key, value in tensors.items():
        if key in expected and expected[key].shape != value.shape:
            raise ValueError(
                f"{where}: shape mismatch at {key}: the checkpoint has {tuple(value.shape)}, "
                f"the model ({_describe(config)}) expects {tuple(expected[key].shape)}"
            )
    missing = [k for k in expected if k not in tensors and not k.startswith(tuple(fresh_prefixes))
               and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in tensors if k not in expected] + unknown
    _report(where, missing, unexpected, strict)
    model.load_state_dict({k: v for k, v in tensors.items() if k in expected}, strict=False)
    return model


def _nvlabs_class_names(raw) -> list[str] | None:
    """mmseg checkpoints keep the class names in meta["CLASSES"]."""
    meta = raw.get("meta") if isinstance(raw, Mapping) else None
    names = meta.get("CLASSES") if isinstance(meta, Mapping) else None
    return [str(n) for n in names] if isinstance(names, (list, tuple)) else None


def _report(where: str, missing: list[str], unexpected: list[str], strict: bool) -> None:
    problems = []
    if missing:
        problems.append(f"missing keys (left at their initial values): {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys (ignored): {', '.join(unexpected)}")
    if not problems:
        return
    message = f"{where}: " + "; ".join(problems)
    if strict:
        raise ValueError(message + " (pass strict=False to load anyway)")
    warnings.warn(message, stacklevel=4)


# ---- saving ------------------------------------------------------------------------------------


def hf_state_dict(model) -> dict[str, Tensor]:
    """The model's tensors under the HF on-disk (transformers 4) names."""
    out = {}
    for key, value in model.state_dict().items():
        name = translate_key(key, "ours", "hf")
        if name is None:
            raise AssertionError(f"no HF name for parameter {key}: _NAME_TABLE is incomplete")
        out[name] = value.detach().cpu().contiguous()
    return out


def save_pretrained(model, directory: str | os.PathLike) -> Path:
    """config.json + model.safetensors (pytorch_model.bin when safetensors is not installed)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(model.config.to_hf_dict(), indent=2) + "\n", encoding="utf-8")
    tensors = hf_state_dict(model)
    try:
        from safetensors.torch import save_file
    except ImportError:
        torch.save(tensors, directory / "pytorch_model.bin")
        return directory
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


def _describe(config: SegFormerConfig) -> str:
    name = config.preset_name()
    return f"{name or 'custom'}, hidden sizes {list(config.hidden_sizes)}, {config.num_labels} classes"


def _preview(mapping, limit: int = 5) -> str:
    keys = list(mapping)[:limit]
    more = f" and {len(mapping) - limit} more" if len(mapping) > limit else ""
    return ", ".join(repr(k) for k in keys) + more
