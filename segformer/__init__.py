"""SegFormer (MiT-B0..B5 encoder + all-MLP decoder) on the segformer_kernels ops.

    from segformer import SegFormer
    model = SegFormer.from_config("b0", num_classes=150)
    model = SegFormer.from_pretrained(path)      # HF folder/file, NVlabs .pth, state dict
    logits = model(images)                       # [B, 3, H, W] -> [B, K, ceil(H/4), ceil(W/4)]
    loss = model.loss(logits, labels)            # labels [B, H, W], 255 ignored
    model.save_pretrained(directory)             # HF on-disk format
"""

from .config import PRESETS, SegFormerConfig
from .model import SegFormer

__all__ = ["PRESETS", "SegFormer", "SegFormerConfig"]
