"""The providers compared side by side, as tables of the public ops they run.

eager    the reference path (segformer_kernels.reference): explicit scores and softmax,
         NCHW round trips for the depthwise conv, as Hugging Face's eager SegFormer does;
sdpa     the reference with the attention core (of efficient_attention and of
         fused_attention, whose projections stay as they are) through
         F.scaled_dot_product_attention;
compile  torch.compile of the reference (max-autotune on a GPU);
fused    segformer_kernels' public ops with kernels="triton": every op on its Triton kernel;
transformers  SegformerForSemanticSegmentation (end-to-end only; see e2e.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Callable

import torch
import torch.nn.functional as F

import segformer_kernels as sk
from segformer_kernels import reference
from segformer_kernels._backend import INTERPRET, triton_runs_on

from .core import CompileSpec, Skip

PUBLIC_OPS = (
    "layer_norm", "spatial_reduction", "efficient_attention", "fused_attention", "dwconv_gelu", "mix_ffn", "decode_head",
)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """reference.efficient_attention through SDPA: [B, N, h, d] in and out (transposed views)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2)


def sdpa_fused_attention(x, q_weight, q_bias, k, v, out_weight, out_bias, scale=None) -> torch.Tensor:
    """reference.fused_attention with SDPA as its core: the projections stay the reference's."""
    return reference.projected_attention(x, q_weight, q_bias, k, v, out_weight, out_bias, scale, sdpa_attention)


@dataclasses.dataclass(frozen=True)
class OpTable:
    """The public ops as one provider runs them, and which of them are Triton kernels."""

    layer_norm: Callable
    spatial_reduction: Callable
    efficient_attention: Callable
    fused_attention: Callable
    dwconv_gelu: Callable
    mix_ffn: Callable
    decode_head: Callable


EAGER = OpTable(**{op: getattr(reference, op) for op in PUBLIC_OPS})
SDPA = dataclasses.replace(EAGER, efficient_attention=sdpa_attention, fused_attention=sdpa_fused_attention)


def check_triton_runs(device: torch.device) -> None:
    if not triton_runs_on(device):
        why = ("TRITON_INTERPRET=1 was not set before triton was imported" if device.type == "cpu" and not INTERPRET
               else "triton is not importable")
        raise Skip(f"fused: Triton kernels cannot run on {device.type} here ({why})")


def fused_table(needed: tuple[str, ...], device: torch.device) -> tuple[OpTable, str]:
    """The fused provider's table (every op on its Triton kernel) and a note naming the
    ops this item runs; Skip where Triton cannot run."""
    check_triton_runs(device)
    table = OpTable(**{op: functools.partial(getattr(sk, op), kernels="triton") for op in PUBLIC_OPS})
    return table, "Triton: " + ", ".join(needed)


def compiled(fn: Callable, spec: CompileSpec, device: torch.device, fullgraph: bool) -> Callable:
    """torch.compile(fn) for one static shape. The caller resets dynamo between items,
    so every case compiles afresh instead of hitting the recompile limit and silently
    falling back to eager. On CUDA, every call starts a new CUDA-graph step, as a
    training loop does, so replays never wait on a backward that is not coming."""
    kwargs = {"backend": spec.backend, "fullgraph": fullgraph, "dynamic": False}
    if spec.mode:
        kwargs["mode"] = spec.mode
    compiled_fn = torch.compile(fn, **kwargs)
    if device.type != "cuda":
        return compiled_fn

    def call(*args, **kwargs):
        torch.compiler.cudagraph_mark_step_begin()
        return compiled_fn(*args, **kwargs)

    return call


@contextlib.contextmanager
def sdpa_everywhere():
    """Route every reference attention call (reference.fused_attention looks its core up
    in the module at call time) to SDPA for the duration; yields a one-element call
    counter so the caller can check the model really went through it (it does not: the
    model's kernels="torch" path is segformer_kernels.torch_ops, which uses SDPA itself)."""
    calls = [0]
    original = reference.efficient_attention

    def counted(*args, **kwargs):
        calls[0] += 1
        return sdpa_attention(*args, **kwargs)

    reference.efficient_attention = counted
    try:
        yield calls
    finally:
        reference.efficient_attention = original


def reset_compiled_state() -> None:
    """Forget every compiled graph (and its CUDA-graph memory pool) between items."""
    import torch._dynamo

    torch._dynamo.reset()
