"""Triton kernels for SegFormer's hot paths, with a plain-PyTorch reference for each.

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
the reference (``segformer_kernels.reference``) elsewhere.
"""

from . import reference
from ._backend import KERNEL_CHOICES, load_kernels, triton_runs_on

# Before the public names: importing a kernel module (segformer_kernels.layer_norm,
# ...) binds the module to the package attribute of the same name, which would
# hide the public function imported from ops if it came first.
load_kernels()

from .ops import (  # noqa: E402
    decode_head,
    dwconv_gelu,
    efficient_attention,
    fused_attention,
    layer_norm,
    mix_ffn,
    spatial_reduction,
)
from .transformers_patch import PatchReport, patch_transformers  # noqa: E402

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
    "triton_runs_on",
]
__version__ = "0.1.0"
