"""Triton kernels for SegFormer's hot paths, with a plain-PyTorch reference (the oracle) and a
fast PyTorch path for each.

    import segformer_kernels as sk
    o = sk.efficient_attention(q, k, v)            # q [B,N,h,d], k/v [B,M,h,d]
    y = sk.fused_attention(x, q_w, q_b, k, v, o_w, o_b)  # o_proj(attention(q_proj(x), k, v))
    r = sk.spatial_reduction(x, (H, W), w, b, ln_w, ln_b, eps)
    y = sk.dwconv_gelu(x, (H, W), w, b)
    y = sk.mix_ffn(x, (H, W), fc1_w, fc1_b, dw_w, dw_b, fc2_w, fc2_b)
    y = sk.layer_norm(x, w, b, eps)
    logits = sk.decode_head(maps, hws, (H1, W1), scale, shift, cls_w, cls_b)
    sk.patch_transformers(hf_model)                # a transformers SegFormer on these ops, in place

Every op takes ``kernels="auto" | "triton" | "torch"``: "auto" runs the Triton kernel
wherever Triton can run (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1) and
the PyTorch path (``segformer_kernels.torch_ops``) elsewhere; ``"torch"`` always
runs the PyTorch path. ``segformer_kernels.reference`` is the plain formula the tests
compare both against.
"""

from . import reference, torch_ops
from ._backend import KERNEL_CHOICES, load_kernels, triton_runs_on

from .ops import (
    decode_head,
    dwconv_gelu,
    efficient_attention,
    fused_attention,
    layer_norm,
    mix_ffn,
    spatial_reduction,
)
from .transformers_patch import PatchReport, patch_transformers

# Registers every custom op before anything (torch.compile in particular) traces a call.
load_kernels()

__all__ = [
    "KERNEL_CHOICES",
    "decode_head",
    "dwconv_gelu",
    "efficient_attention",
    "fused_attention",
    "layer_norm",
    "mix_ffn",
    "patch_transformers",
    "PatchReport",
    "reference",
    "spatial_reduction",
    "torch_ops",
    "triton_runs_on",
]
__version__ = "0.1.0"
