"""Run an existing transformers SegFormer on the fused ops, in place.

    from transformers import SegformerForSemanticSegmentation
    import segformer_kernels as sk

    model = SegformerForSemanticSegmentation.from_pretrained("nvidia/mit-b0", num_labels=150)
    sk.patch_transformers(model)          # same object, same weights, same outputs
    model.segformer_kernels_patch         # what was patched and what was left alone

Each recognised submodule gets an instance ``forward`` that calls the fused op on the
module's own parameters; its class, parameters, hooks and state dict are untouched, so
outputs, the loss, ``output_hidden_states``, gradient checkpointing, saving and the HF
Trainer behave as before. Modules are recognised by their parts, not their class names,
in both layouts found in the wild:

    role                transformers 4.x                         transformers 5.x
    attention           attention.self.{query,key,value,sr,      attention.{q,k,v,o}_proj,
                        layer_norm} + attention.output.dense     attention.sequence_reduction
    sequence reduction  (inside attention.self)                  sequence_reduction.{sequence_reduction,layer_norm}
    Mix-FFN             mlp.{dense1,dwconv.dwconv,dense2}        mlp.{fc1,dwconv.dwconv,fc2}
    decode head         decode_head.linear_c.{i}.proj            decode_head.linear_projections.{i}.proj
    LayerNorm           every nn.LayerNorm over the last dimension

A patched module falls back to its own forward for what the fused op does not compute:
attention weights (``output_attentions``), an attention mask, dropout inside the fused
part while training, a decoder fed [B, N, C] tokens. transformers is never imported here.
"""

from __future__ import annotations

import logging
import types
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import decoder, ops
from ._backend import check_kernels

logger = logging.getLogger(__name__)

REPORT_ATTRIBUTE = "segformer_kernels_patch"
_PATCHED = "_segformer_kernels_patched"  # instance flag: its forward is ours
_KERNELS = "_segformer_kernels_kernels"  # instance setting read at every call


@dataclass
class PatchReport:
    """``patched``: (module name, role) of every module running a fused op; ``left_alone``:
    (module name, why) of every module holding parameters that still runs its own forward."""

    patched: list[tuple[str, str]] = field(default_factory=list)
    left_alone: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        roles: dict[str, int] = {}
        for _, role in self.patched:
            roles[role] = roles.get(role, 0) + 1
        done = ", ".join(f"{count} {role}" for role, count in roles.items()) or "nothing"
        return f"patched {done}; {len(self.left_alone)} module(s) with parameters left alone"


# ---- recognising modules -----------------------------------------------------------------------


def _linear(module, name: str) -> nn.Linear | None:
    child = getattr(module, name, None)
    return child if isinstance(child, nn.Linear) and child.bias is not None else None


def _is_reduction_conv(conv) -> bool:
    return (
        isinstance(conv, nn.Conv2d) and conv.bias is not None and conv.groups == 1
        and conv.kernel_size[0] == conv.kernel_size[1] == conv.stride[0] == conv.stride[1]
        and conv.padding in ((0, 0), "valid") and conv.dilation == (1, 1) and conv.in_channels == conv.out_channels
    )


def _is_depthwise_3x3(conv) -> bool:
    return (
        isinstance(conv, nn.Conv2d) and conv.bias is not None and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1) and conv.padding == (1, 1) and conv.dilation == (1, 1)
        and conv.groups == conv.in_channels == conv.out_channels and conv.padding_mode == "zeros"
    )


def _is_layer_norm(module) -> bool:
    return (
        isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1
        and module.weight is not None and module.bias is not None
    )


def _is_exact_gelu(activation) -> bool:
    """The fused Mix-FFN computes the erf GELU: accept any activation that is numerically it
    (transformers' ``ACT2FN["gelu"]``, nn.GELU(), F.gelu), not tanh or quick approximations."""
    if not callable(activation):
        return False
    probe = torch.linspace(-6.0, 6.0, 97, dtype=torch.float64)
    try:
        with torch.no_grad():
            value = activation(probe)
    except Exception:  # noqa: BLE001 - an activation that cannot run on a tensor is not GELU
        return False
    return isinstance(value, torch.Tensor) and torch.allclose(value, F.gelu(probe), rtol=0, atol=1e-12)


def _dropout_p(module) -> float:
    return float(module.p) if isinstance(module, nn.Dropout) else 0.0


def _sequence_reduction_parts(owner, conv_name: str, norm_name: str):
    """(conv, LayerNorm) of a sequence reduction, or a reason it is not one."""
    conv, norm = getattr(owner, conv_name, None), getattr(owner, norm_name, None)
    if not _is_reduction_conv(conv):
        return f"{conv_name} is not a square strided Conv2d with bias and no padding"
    if not _is_layer_norm(norm):
        return f"{norm_name} is not an affine LayerNorm"
    return conv, norm


# ---- the patched forwards (bound to the module; `self` is the transformers module) ---------------


def _kernels(module) -> str:
    return getattr(module, _KERNELS)


def _original(module) -> Callable:
    """The class's own forward, bound to the module."""
    return types.MethodType(type(module).forward, module)


def _reduce(x, height, width, conv: nn.Conv2d, norm: nn.LayerNorm, kernels: str):
    return ops.spatial_reduction(x, (height, width), conv.weight, conv.bias, norm.weight, norm.bias, norm.eps,
                                 kernels=kernels)


def _projected_attention(x, reduced, query, key, value, out, heads: int, scale, kernels: str):
    batch, _, channels = x.shape
    kv_shape = (batch, reduced.shape[1], heads, channels // heads)
    k = F.linear(reduced, key.weight, key.bias).view(kv_shape)
    v = F.linear(reduced, value.weight, value.bias).view(kv_shape)
    return ops.fused_attention(x, query.weight, query.bias, k, v, out.weight, out.bias, scale, kernels=kernels)


def _attentions_requested() -> bool:
    """transformers 5.x records attention weights with hooks while a collector is active;
    the fused op has none to give, so the module's own forward runs then."""
    import sys

    capturing = sys.modules.get("transformers.utils.output_capturing")
    collector = getattr(capturing, "_active_collector", None)
    if collector is None:
        return False
    active = collector.get()
    return bool(active) and "attentions" in active


def _sequence_reduction_forward(self, hidden_states, height, width):
    return _reduce(hidden_states, height, width, self.sequence_reduction, self.layer_norm, _kernels(self))


def _attention_forward_v5(self, hidden_states, height, width, attention_mask=None, **kwargs):
    if (
        attention_mask is not None or _attentions_requested()
        or (self.training and getattr(self, "attention_dropout", 0.0) > 0)
    ):
        return _original(self)(hidden_states, height, width, attention_mask, **kwargs)
    reduced = hidden_states
    if self.sequence_reduction_ratio > 1:
        reduced = self.sequence_reduction(hidden_states, height, width)
    out = _projected_attention(hidden_states, reduced, self.q_proj, self.k_proj, self.v_proj, self.o_proj,
                               self.num_attention_heads, getattr(self, "scaling", None), _kernels(self))
    return out, None


def _attention_forward_v4(self, hidden_states, height, width, output_attentions=False):
    inner = self.self
    if output_attentions or (self.training and _dropout_p(inner.dropout) > 0):
        return _original(self)(hidden_states, height, width, output_attentions)
    kernels = _kernels(self)
    reduced = hidden_states
    if inner.sr_ratio > 1:
        reduced = _reduce(hidden_states, height, width, inner.sr, inner.layer_norm, kernels)
    out = _projected_attention(hidden_states, reduced, inner.query, inner.key, inner.value, self.output.dense,
                               inner.num_attention_heads, None, kernels)
    return (self.output.dropout(out),)


def _mix_ffn_parts(self):
    if hasattr(self, "fc1"):
        return self.fc1, self.fc2
    return self.dense1, self.dense2


def _mix_ffn_forward(self, hidden_states, height, width):
    if self.training and _dropout_p(self.dropout) > 0:
        # the dropout between the activation and fc2 is inside the fused op
        return _original(self)(hidden_states, height, width)
    first, second = _mix_ffn_parts(self)
    dw = self.dwconv.dwconv
    out = ops.mix_ffn(hidden_states, (height, width), first.weight, first.bias, dw.weight, dw.bias, second.weight,
                      second.bias, kernels=_kernels(self))
    return self.dropout(out)


def _decode_head_projections(self) -> list[nn.Linear]:
    stages = self.linear_projections if hasattr(self, "linear_projections") else self.linear_c
    return [stage.proj for stage in stages]


def _decode_head_forward(self, encoder_hidden_states, **kwargs):
    if any(state.dim() != 4 for state in encoder_hidden_states):
        # reshape_last_stage=False hands the last stage over as tokens of a guessed square grid
        return _original(self)(encoder_hidden_states, **kwargs)
    projections = _decode_head_projections(self)
    weights, bias = decoder.fold_projections(self.linear_fuse.weight, projections)
    grids = [(state.shape[2], state.shape[3]) for state in encoder_hidden_states]
    maps = [F.linear(decoder.image_as_tokens(state), weight) for state, weight in zip(encoder_hidden_states, weights)]
    return decoder.decoder_tail(maps, grids, bias, self.batch_norm, self.dropout, self.classifier, _kernels(self))


def _layer_norm_forward(self, x):
    return ops.layer_norm(x, self.weight, self.bias, self.eps, kernels=_kernels(self))


# ---- matching: each role says whether a module is one, and whether it can be patched -------------


def _match_attention_v5(module):
    if not all(_linear(module, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj")):
        return None
    if not isinstance(getattr(module, "num_attention_heads", None), int) or not hasattr(module, "head_dim"):
        return "attention without num_attention_heads / head_dim"
    ratio = getattr(module, "sequence_reduction_ratio", None)
    if not isinstance(ratio, int):
        return "attention without an integer sequence_reduction_ratio"
    if ratio > 1:
        parts = _sequence_reduction_parts(getattr(module, "sequence_reduction", None), "sequence_reduction", "layer_norm")
        if isinstance(parts, str):
            return f"sequence_reduction: {parts}"
    return _attention_forward_v5


def _match_attention_v4(module):
    inner, output = getattr(module, "self", None), getattr(module, "output", None)
    if not isinstance(inner, nn.Module) or not isinstance(output, nn.Module):
        return None
    if not all(_linear(inner, name) for name in ("query", "key", "value")) or not _linear(output, "dense"):
        return None
    if not isinstance(getattr(inner, "num_attention_heads", None), int) or not isinstance(getattr(inner, "sr_ratio", None), int):
        return "attention without integer num_attention_heads / sr_ratio"
    if getattr(module, "pruned_heads", None):
        return "attention with pruned heads"
    if inner.sr_ratio > 1:
        parts = _sequence_reduction_parts(inner, "sr", "layer_norm")
        if isinstance(parts, str):
            return parts
    return _attention_forward_v4


def _match_sequence_reduction(module):
    if not isinstance(getattr(module, "sequence_reduction", None), nn.Conv2d):
        return None
    parts = _sequence_reduction_parts(module, "sequence_reduction", "layer_norm")
    return parts if isinstance(parts, str) else _sequence_reduction_forward


def _match_mix_ffn(module):
    names = ("fc1", "fc2", "activation_fn") if hasattr(module, "fc1") else ("dense1", "dense2", "intermediate_act_fn")
    first, second, activation = (getattr(module, name, None) for name in names)
    dwconv = getattr(getattr(module, "dwconv", None), "dwconv", None)
    if not (_linear(module, names[0]) and _linear(module, names[1]) and isinstance(dwconv, nn.Conv2d)):
        return None
    if not _is_depthwise_3x3(dwconv):
        return "dwconv is not a depthwise 3x3 Conv2d with bias and padding 1"
    if not _is_exact_gelu(activation):
        return f"activation {type(activation).__name__} is not the exact (erf) GELU of the fused op"
    if not isinstance(getattr(module, "dropout", None), nn.Module):
        return "Mix-FFN without a dropout module"
    return _mix_ffn_forward


def _match_decode_head(module):
    if not all(isinstance(getattr(module, name, None), nn.Module) for name in ("linear_fuse", "batch_norm", "classifier")):
        return None
    stages = getattr(module, "linear_projections", getattr(module, "linear_c", None))
    if not isinstance(stages, nn.ModuleList):
        return None
    if not stages or not all(_linear(stage, "proj") for stage in stages):
        return "decode head without linear projections with bias"
    fuse, norm, classifier = module.linear_fuse, module.batch_norm, module.classifier
    if not (isinstance(fuse, nn.Conv2d) and fuse.kernel_size == (1, 1) and fuse.bias is None):
        return "linear_fuse is not a 1x1 Conv2d without bias"
    if not (isinstance(norm, nn.modules.batchnorm._BatchNorm) and norm.affine and norm.track_running_stats):
        return "batch_norm is not an affine BatchNorm with running statistics"
    if not (isinstance(classifier, nn.Conv2d) and classifier.kernel_size == (1, 1) and classifier.bias is not None):
        return "classifier is not a 1x1 Conv2d with bias"
    if not isinstance(getattr(module, "activation", nn.ReLU()), nn.ReLU):
        return f"activation {type(module.activation).__name__} is not ReLU"
    if not isinstance(getattr(module, "dropout", None), nn.Module):
        return "decode head without a dropout module"
    return _decode_head_forward


def _match_layer_norm(module):
    if not isinstance(module, nn.LayerNorm):
        return None
    return _layer_norm_forward if _is_layer_norm(module) else "LayerNorm over more than one dimension or without affine"


# most specific first: an attention holds a sequence reduction, a Mix-FFN holds linears
ROLES: tuple[tuple[str, Callable], ...] = (
    ("attention", _match_attention_v5),
    ("attention", _match_attention_v4),
    ("sequence reduction", _match_sequence_reduction),
    ("Mix-FFN", _match_mix_ffn),
    ("decode head", _match_decode_head),
    ("LayerNorm", _match_layer_norm),
)


def _match(module) -> tuple[str, Callable | str] | None:
    for role, match in ROLES:
        found = match(module)
        if found is not None:
            return role, found
    return None


def patch_transformers(model: nn.Module, kernels: str = "auto") -> nn.Module:
    """Patch a transformers ``SegformerForSemanticSegmentation``, ``SegformerModel`` or
    ``SegformerForImageClassification`` (4.x or 5.x) in place to run the fused ops, and
    return it. Weights are shared, not copied; patching again only updates ``kernels``.
    ``model.segformer_kernels_patch`` holds a PatchReport: what runs fused and which
    modules with parameters still run their own forward, and why (also logged)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a transformers SegFormer (an nn.Module), got {type(model).__name__}")
    check_kernels(kernels)
    report = PatchReport()
    listed: set[str] = set()
    covered: list[str] = []  # prefixes of the modules accounted for with their whole subtree
    for name, module in model.named_modules():
        found = _match(module)
        if found is not None:
            role, forward = found
            if isinstance(forward, str):
                report.left_alone.append((name, f"{role}: {forward}"))
                listed.add(name)
                covered.append(name + ".")
                continue
            setattr(module, _KERNELS, kernels)
            if not module.__dict__.get(_PATCHED, False):
                module.forward = types.MethodType(forward, module)
                setattr(module, _PATCHED, True)
            report.patched.append((name, role))
            covered.append(name + ".")
    listed.update(name for name, _ in report.patched)
    for name, module in model.named_modules():
        if name in listed or any(name.startswith(prefix) for prefix in covered):
            continue
        if any(True for _ in module.parameters(recurse=False)):
            report.left_alone.append((name, f"{type(module).__name__}: no fused op for it"))
    object.__setattr__(model, REPORT_ATTRIBUTE, report)
    if not report.patched:
        logger.warning("patch_transformers: no SegFormer module recognised in %s; nothing patched", type(model).__name__)
    logger.info("patch_transformers(%s): %s", type(model).__name__, report.summary())
    for name, why in report.left_alone:
        logger.info("  left alone: %s (%s)", name or "<model>", why)
    return model
