"""The public ops: argument checks, autocast, then the Triton kernel or the PyTorch path.

Every op takes a keyword-only ``kernels="auto" | "triton" | "torch"`` (see
``_backend``). Each checks its arguments up front and raises a ValueError or
TypeError that names the argument and what was expected, so a mistake never
surfaces as an indexing error deep inside a kernel.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from . import torch_ops
from ._backend import autocast_inputs, triton_implementation, use_triton

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_tensor(name: str, t, ndim: int | None = None) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16 (float64 on the PyTorch path), got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")


def _check_shape(name: str, t: Tensor, expected: Sequence[int | None], meaning: str) -> None:
    """``expected`` lists each dimension's size, None where any size is fine."""
    ok = t.dim() == len(expected) and all(e is None or e == s for e, s in zip(expected, t.shape))
    if not ok:
        shown = ", ".join("*" if e is None else str(e) for e in expected)
        raise ValueError(f"{name} must have shape [{shown}] ({meaning}), got {tuple(t.shape)}")


def _check_same(names: Sequence[str], tensors: Sequence[Tensor], dtype: bool = True) -> None:
    first_name, first = names[0], tensors[0]
    for name, t in zip(names[1:], tensors[1:]):
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; all must be on one device")
        if dtype and t.dtype != first.dtype:
            raise TypeError(f"{name} is {t.dtype} but {first_name} is {first.dtype}; all must have one dtype")


def _is_size(value) -> bool:
    """An int, or a symbolic one (torch.SymInt) while torch.export / torch.compile trace
    with dynamic sizes."""
    return isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool)


def _check_hw(hw, tokens: int) -> tuple[int, int]:
    if (
        not isinstance(hw, (tuple, list))
        or len(hw) != 2
        or not all(_is_size(s) for s in hw)
    ):
        raise TypeError(f"hw must be a (H, W) tuple of two ints, got {hw!r}")
    height, width = hw
    if height < 1 or width < 1:
        raise ValueError(f"hw must be positive, got {tuple(hw)}")
    if height * width != tokens:
        raise ValueError(f"hw={tuple(hw)} gives {height * width} tokens but x has {tokens} (x must be [B, H*W, C])")
    return height, width


def _check_tokens(x: Tensor) -> None:
    _check_tensor("x", x, ndim=3)
    if 0 in x.shape:
        raise ValueError(f"x must be a non-empty [B, H*W, C] token tensor, got {tuple(x.shape)}")


def _dispatch(op: str, kernels: str, device: torch.device, dtype: torch.dtype):
    """The function to call: the op's Triton implementation or its PyTorch path (``torch_ops``)."""
    if dtype == torch.float64:
        if kernels == "triton":
            raise TypeError(f"{op}: the Triton kernels take float32, float16 or bfloat16, got float64")
        kernels = "torch"
    if kernels == "auto" and dtype == torch.bfloat16 and device.type == "cpu":
        # CPU tensors reach Triton only through its interpreter, whose bf16 arithmetic
        # is wrong: "auto" takes the PyTorch path ("triton" still insists, for debugging)
        kernels = "torch"
    if use_triton(op, kernels, device):
        return triton_implementation(op)
    return getattr(torch_ops, op)


def efficient_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None, *, kernels: str = "auto") -> Tensor:
    """softmax(q k^T * scale) v for every head, without the N x M score matrix on the Triton path.

    q [B, N, heads, d]; k, v [B, M, heads, d] -> [B, N, heads, d]. ``scale`` defaults to d**-0.5.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t, ndim=4)
    batch, _, heads, head_dim = q.shape
    _check_shape("k", k, (batch, None, heads, head_dim), "[B, M, heads, head_dim] matching q")
    _check_shape("v", v, tuple(k.shape), "the same shape as k")
    if min(q.shape) == 0 or k.shape[1] == 0:
        raise ValueError(f"q and k must be non-empty, got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    q, k, v = autocast_inputs(q.device, q, k, v)
    _check_same(("q", "k", "v"), (q, k, v))
    return _dispatch("efficient_attention", kernels, q.device, q.dtype)(q, k, v, scale)


def fused_attention(
    x: Tensor,
    q_weight: Tensor,
    q_bias: Tensor,
    k: Tensor,
    v: Tensor,
    out_weight: Tensor,
    out_bias: Tensor,
    scale: float | None = None,
    *,
    kernels: str = "auto",
) -> Tensor:
    """Attention with its projections, o_proj(attention(q_proj(x), k, v)); on the Triton
    path q and the attention output never reach memory (for C <= 128; wider C runs the
    projections through cuBLAS around the attention kernel).

    x [B, N, C]; k, v [B, M, heads, d] with heads * d = C; q_weight, out_weight [C, C]
    (nn.Linear layout); q_bias, out_bias [C] -> [B, N, C]. ``scale`` defaults to d**-0.5.
    """
    _check_tokens(x)
    tensors = {"q_weight": q_weight, "q_bias": q_bias, "k": k, "v": v, "out_weight": out_weight, "out_bias": out_bias}
    for name, t in tensors.items():
        _check_tensor(name, t, ndim=4 if name in ("k", "v") else None)
    batch, tokens, channels = x.shape
    _check_shape("k", k, (batch, None, None, None), "[B, M, heads, head_dim] with x's batch")
    if k.shape[1] == 0 or k.shape[2] == 0 or k.shape[2] * k.shape[3] != channels:
        raise ValueError(
            f"k must be a non-empty [B, M, heads, head_dim] tensor with heads * head_dim = C = {channels}, "
            f"got {tuple(k.shape)}"
        )
    _check_shape("v", v, tuple(k.shape), "the same shape as k")
    for name in ("q_weight", "out_weight"):
        _check_shape(name, tensors[name], (channels, channels), "[C, C], an nn.Linear weight")
    for name in ("q_bias", "out_bias"):
        _check_shape(name, tensors[name], (channels,), "[C]")
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    args = autocast_inputs(x.device, x, *tensors.values())
    _check_same(("x", *tensors), args)
    return _dispatch("fused_attention", kernels, x.device, x.dtype)(*args, scale)

def spatial_reduction(
    x: Tensor,
    hw: tuple[int, int],
    weight: Tensor,
    bias: Tensor,
    ln_weight: Tensor,
    ln_bias: Tensor,
    eps: float = 1e-5,
    *,
    kernels: str = "auto",
) -> Tensor:
    """Sequence reduction: sr x sr patches -> Linear(C*sr^2, C_out) + bias -> LayerNorm.

    x [B, H*W, C], weight [C_out, C, sr, sr] -> [B, (H//sr)*(W//sr), C_out].
    """
    _check_tokens(x)
    height, width = _check_hw(hw, x.shape[1])
    for name, t in (("weight", weight), ("bias", bias), ("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        _check_tensor(name, t)
    sr = weight.shape[-1] if weight.dim() == 4 else 0
    out_channels = weight.shape[0]
    _check_shape("weight", weight, (None, x.shape[2], sr, sr), "[C_out, C, sr, sr], a square Conv2d kernel over C channels")
    if sr < 1:
        raise ValueError(f"weight must have a reduction ratio sr >= 1, got shape {tuple(weight.shape)}")
    for name, t in (("bias", bias), ("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        _check_shape(name, t, (out_channels,), "[C_out]")
    if height < sr or width < sr:
        raise ValueError(f"hw={(height, width)} is smaller than the reduction ratio sr={sr}: nothing to reduce")
    x, weight, bias, ln_weight, ln_bias = autocast_inputs(x.device, x, weight, bias, ln_weight, ln_bias)
    _check_same(("x", "weight", "bias", "ln_weight", "ln_bias"), (x, weight, bias, ln_weight, ln_bias))
    return _dispatch("spatial_reduction", kernels, x.device, x.dtype)(
        x, (height, width), weight, bias, ln_weight, ln_bias, float(eps)
    )


def dwconv_gelu(x: Tensor, hw: tuple[int, int], weight: Tensor, bias: Tensor, *, kernels: str = "auto") -> Tensor:
    """GELU(depthwise 3x3 conv, zero padding 1, + bias) in token layout. x [B, H*W, C] -> [B, H*W, C]."""
    _check_tokens(x)
    height, width = _check_hw(hw, x.shape[1])
    _check_tensor("weight", weight)
    _check_tensor("bias", bias)
    channels = x.shape[2]
    _check_shape("weight", weight, (channels, 1, 3, 3), "[C, 1, 3, 3], a depthwise 3x3 kernel")
    _check_shape("bias", bias, (channels,), "[C]")
    x, weight, bias = autocast_inputs(x.device, x, weight, bias)
    _check_same(("x", "weight", "bias"), (x, weight, bias))
    return _dispatch("dwconv_gelu", kernels, x.device, x.dtype)(x, (height, width), weight, bias)


def mix_ffn(
    x: Tensor,
    hw: tuple[int, int],
    fc1_weight: Tensor,
    fc1_bias: Tensor,
    dw_weight: Tensor,
    dw_bias: Tensor,
    fc2_weight: Tensor,
    fc2_bias: Tensor,
    *,
    kernels: str = "auto",
) -> Tensor:
    """Mix-FFN: fc2(GELU(dwconv3x3(fc1(x)))). x [B, H*W, C] -> [B, H*W, C_out]."""
    _check_tokens(x)
    height, width = _check_hw(hw, x.shape[1])
    tensors = {
        "fc1_weight": fc1_weight, "fc1_bias": fc1_bias, "dw_weight": dw_weight,
        "dw_bias": dw_bias, "fc2_weight": fc2_weight, "fc2_bias": fc2_bias,
    }
    for name, t in tensors.items():
        _check_tensor(name, t)
    hidden = fc1_weight.shape[0]
    out_channels = fc2_weight.shape[0]
    _check_shape("fc1_weight", fc1_weight, (None, x.shape[2]), "[C_hidden, C]")
    _check_shape("fc1_bias", fc1_bias, (hidden,), "[C_hidden]")
    _check_shape("dw_weight", dw_weight, (hidden, 1, 3, 3), "[C_hidden, 1, 3, 3]")
    _check_shape("dw_bias", dw_bias, (hidden,), "[C_hidden]")
    _check_shape("fc2_weight", fc2_weight, (None, hidden), "[C_out, C_hidden]")
    _check_shape("fc2_bias", fc2_bias, (out_channels,), "[C_out]")
    args = autocast_inputs(x.device, x, *tensors.values())
    _check_same(("x", *tensors), args)
    x, *weights = args
    return _dispatch("mix_ffn", kernels, x.device, x.dtype)(x, (height, width), *weights)


def layer_norm(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    eps: float = 1e-5,
    residual: Tensor | None = None,
    *,
    kernels: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """LayerNorm over the last dimension, fp32 statistics, output in x's dtype.

    With ``residual`` (same shape as x), normalise ``s = x + residual`` in the same
    pass and return ``(LN(s), s)``. The weights may be fp32 while x is fp16/bf16.
    """
    _check_tensor("x", x)
    if x.dim() == 0 or x.numel() == 0:
        raise ValueError(f"x must be a non-empty tensor [..., C], got shape {tuple(x.shape)}")
    channels = x.shape[-1]
    _check_tensor("weight", weight)
    _check_tensor("bias", bias)
    _check_shape("weight", weight, (channels,), "[C], C the last dimension of x")
    _check_shape("bias", bias, (channels,), "[C]")
    checked = [("x", x), ("weight", weight), ("bias", bias)]
    if residual is not None:
        _check_tensor("residual", residual)
        _check_shape("residual", residual, tuple(x.shape), "the shape of x")
        if residual.dtype != x.dtype:
            raise TypeError(f"residual is {residual.dtype} but x is {x.dtype}; they must match")
        checked.append(("residual", residual))
    names, tensors = zip(*checked)
    _check_same(names, tensors, dtype=False)
    return _dispatch("layer_norm", kernels, x.device, x.dtype)(x, weight, bias, float(eps), residual)


def _check_size_pair(name: str, value) -> tuple[int, int]:
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(_is_size(s) for s in value)
    ):
        raise TypeError(f"{name} must be a (H, W) tuple of two ints, got {value!r}")
    if value[0] < 1 or value[1] < 1:
        raise ValueError(f"{name} must be positive, got {tuple(value)}")
    return value[0], value[1]


def decode_head(
    maps: Sequence[Tensor],
    hws: Sequence[tuple[int, int]],
    out_hw: tuple[int, int],
    scale: Tensor,
    shift: Tensor,
    cls_weight: Tensor,
    cls_bias: Tensor,
    *,
    kernels: str = "auto",
) -> Tensor:
    """The folded SegFormer decoder's tail: classifier(ReLU(scale * sum_i up(z_i) + shift)).

    maps: the stage maps z_i [B, h_i*w_i, D] (token layout; four in every SegFormer
    variant, any number here) on the grids ``hws`` (one (h_i, w_i) each); up = bilinear resize to ``out_hw`` (align_corners=False);
    scale, shift [D]: BatchNorm folded; cls_weight [K, D], cls_bias [K]: the 1x1
    classifier. Returns logits [B, K, H, W]. Pass stage 1 first: a first map already
    at ``out_hw`` is read without resizing (the kernel's fast path).

    The Triton kernel is inference-only (no backward): when a gradient is needed,
    ``kernels="auto"`` runs the differentiable PyTorch path and ``"triton"`` refuses.
    """
    if not isinstance(maps, (tuple, list)):
        raise TypeError(f"maps must be a list of tensors (one per stage), got {type(maps).__name__}")
    if not maps:
        raise ValueError("maps must hold at least one tensor (one per stage), got none")
    names = [f"maps[{i}]" for i in range(len(maps))]
    for name, z in zip(names, maps):
        _check_tensor(name, z, ndim=3)
    batch, _, channels = maps[0].shape
    if batch == 0 or channels == 0:
        raise ValueError(f"maps[0] must be a non-empty [B, h*w, D] token tensor, got {tuple(maps[0].shape)}")
    for name, z in zip(names[1:], maps[1:]):
        _check_shape(name, z, (batch, None, channels), "[B, h_i*w_i, D] with the B and D of maps[0]")
    if not isinstance(hws, (tuple, list)) or len(hws) != len(maps):
        raise TypeError(f"hws must be a list of {len(maps)} (h, w) pairs, one per map, got {hws!r}")
    hws = tuple(_check_size_pair(f"hws[{i}]", hw) for i, hw in enumerate(hws))
    for name, z, (height, width) in zip(names, maps, hws):
        if height * width != z.shape[1]:
            raise ValueError(f"{name} has {z.shape[1]} tokens but its grid {(height, width)} has {height * width}")
    out_hw = _check_size_pair("out_hw", out_hw)
    for name, t in (("scale", scale), ("shift", shift), ("cls_weight", cls_weight), ("cls_bias", cls_bias)):
        _check_tensor(name, t)
    _check_shape("scale", scale, (channels,), "[D], the BatchNorm scale folded per channel")
    _check_shape("shift", shift, (channels,), "[D], the BatchNorm shift folded per channel")
    _check_shape("cls_weight", cls_weight, (None, channels), "[K, D], the 1x1 classifier weight")
    if cls_weight.shape[0] == 0:
        raise ValueError("cls_weight must have at least one class (shape [K, D] with K >= 1)")
    _check_shape("cls_bias", cls_bias, (cls_weight.shape[0],), "[K]")
    # The folded BatchNorm scale and shift are not cast: under autocast they stay fp32,
    # as BatchNorm itself runs (its shift can be far from the features' size).
    *maps, cls_weight, cls_bias = autocast_inputs(maps[0].device, *maps, cls_weight, cls_bias)
    _check_same((*names, "cls_weight", "cls_bias"), (*maps, cls_weight, cls_bias))
    _check_same((names[0], "scale", "shift"), (maps[0], scale, shift), dtype=False)
    for name, t in (("scale", scale), ("shift", shift)):
        if t.dtype not in (maps[0].dtype, torch.float32):
            raise TypeError(f"{name} is {t.dtype} but maps[0] is {maps[0].dtype}; it must be {maps[0].dtype} or float32")
    if kernels == "auto" and torch.is_grad_enabled() and any(
        t.requires_grad for t in (*maps, scale, shift, cls_weight, cls_bias)
    ):
        kernels = "torch"
    return _dispatch("decode_head", kernels, maps[0].device, maps[0].dtype)(
        maps, hws, out_hw, scale, shift, cls_weight, cls_bias
    )
