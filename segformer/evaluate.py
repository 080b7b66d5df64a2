"""Inference (whole image or sliding window, multi-scale, flip) and dataset evaluation.

    model, info = load_model("runs/demo")
    metrics = evaluate(model, open_dataset("synthetic", "val"), mode="slide", crop_size=(128, 128))
    metrics["mIoU"], metrics["per_class"]

Logits always end at the size of the label they are scored against (bilinear, as the
loss does). With several scales or flip, the softmax probabilities are averaged.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from .data import DataError, SegmentationDataset
from .metrics import confusion_matrix, metrics_from_confusion
from .runtime import ProcessGroup, autocast, progress_bar
from .transforms import base_scale, eval_image

RUN_INFO = "run.json"  # written by training beside the model: dataset, classes, crop size


def read_run_info(checkpoint: str | os.PathLike) -> dict:
    """The training run's run.json next to a saved model, or {} for other checkpoints."""
    path = Path(checkpoint)
    path = path / RUN_INFO if path.is_dir() else path.parent / RUN_INFO
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def load_model(checkpoint: str | os.PathLike, kernels: str = "auto", device: torch.device | str = "cpu"):
    """(model in eval mode on ``device``, run info dict) for any checkpoint from_pretrained reads."""
    from . import SegFormer

    try:
        model = SegFormer.from_pretrained(checkpoint, kernels=kernels)
    except (OSError, ValueError, ImportError) as error:
        raise DataError(f"{checkpoint}: cannot load the model: {error}") from None
    return model.to(device).eval(), read_run_info(checkpoint)


def out_of_memory_error(path, size: tuple[int, int], error: BaseException) -> DataError:
    """What to do about an image too large to run the model on at the size it was given."""
    return DataError(f"{path}: out of memory running the model on this {size[1]}x{size[0]} (WxH) image "
                     f"({type(error).__name__}); run it smaller: give --crop-size (the test scale it is resized to) "
                     "instead of --no-resize, or resize the image")


def model_logits(model, images: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
    """fp32 logits [B, K, ceil(H/4), ceil(W/4)] of normalised images. Images smaller than the
    model's minimum (29 px for the MiT presets) are zero-padded (the mean colour) at the
    bottom/right and the padded logits cropped off."""
    height, width = images.shape[-2:]
    smallest = model.config.min_image_size()
    if min(height, width) < smallest:
        images = F.pad(images, (0, max(0, smallest - width), 0, max(0, smallest - height)))
    with torch.no_grad(), autocast(images.device, precision):
        logits = model(images).float()
    return logits[..., : -(-height // 4), : -(-width // 4)]


def whole_inference(model, image: torch.Tensor, out_size: tuple[int, int], precision: str = "fp32") -> torch.Tensor:
    """[1, 3, h, w] -> logits [1, K, *out_size]."""
    logits = model_logits(model, image, precision)
    return F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)


def window_origins(length: int, crop: int, stride: int) -> list[int]:
    """Window starts covering [0, length): every ``stride``, the last one flush with the end."""
    crop = min(crop, length)
    count = max(length - crop + stride - 1, 0) // stride + 1
    return sorted({max(min(i * stride + crop, length) - crop, 0) for i in range(count)})


def slide_inference(model, image: torch.Tensor, crop_size: tuple[int, int], stride: tuple[int, int],
                    out_size: tuple[int, int], precision: str = "fp32", batch_size: int = 8) -> torch.Tensor:
    """Overlapping crop_size windows every stride; each window's logits are resized to the
    window, summed where windows overlap and divided by the overlap count, then resized
    to ``out_size``. [1, 3, h, w] -> logits [1, K, *out_size]."""
    height, width = image.shape[-2:]
    crop_h, crop_w = min(crop_size[0], height), min(crop_size[1], width)
    lefts = window_origins(width, crop_w, stride[1])
    boxes = [(top, left) for top in window_origins(height, crop_h, stride[0]) for left in lefts]
    total = count = None
    for start in range(0, len(boxes), batch_size):
        chunk = boxes[start : start + batch_size]
        windows = torch.cat([image[..., t : t + crop_h, l : l + crop_w] for t, l in chunk])
        logits = model_logits(model, windows, precision)
        logits = F.interpolate(logits, size=(crop_h, crop_w), mode="bilinear", align_corners=False)
        if total is None:
            total = logits.new_zeros(1, logits.shape[1], height, width)
            count = logits.new_zeros(1, 1, height, width)
        for (top, left), window_logits in zip(chunk, logits):
            total[0, :, top : top + crop_h, left : left + crop_w] += window_logits
            count[0, :, top : top + crop_h, left : left + crop_w] += 1
    logits = total / count
    if tuple(logits.shape[-2:]) != tuple(out_size):
        logits = F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)
    return logits


def segment(model, image, out_size: tuple[int, int] | None = None, *, mode: str = "whole",
            crop_size: tuple[int, int] | None = None, stride: tuple[int, int] | None = None,
            scale: tuple[int, int] | None = None, scales: Sequence[float] = (1.0,), flip: bool = False,
            precision: str = "fp32") -> torch.Tensor:
    """Class probabilities [K, *out_size] for one uint8 [H, W, 3] image (out_size defaults to
    the image's size), averaged over ``scales`` (ratios of ``scale``, or of the image's own
    size when ``scale`` is None) and, with ``flip``, horizontal flips."""
    if mode not in ("whole", "slide"):
        raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}")
    if mode == "slide" and crop_size is None:
        raise ValueError("mode 'slide' needs crop_size")
    check_scales(scales)
    out_size = tuple(out_size or image.shape[:2])
    device = next(model.parameters()).device
    probabilities = None
    views = 0
    for ratio in scales:
        resized = eval_image(image, scale, ratio).to(device)[None]
        for flipped in (False, True) if flip else (False,):
            view = resized.flip(-1) if flipped else resized
            if mode == "whole":
                logits = whole_inference(model, view, out_size, precision)
            else:
                window_stride = stride or default_stride(crop_size)
                logits = slide_inference(model, view, crop_size, window_stride, out_size, precision)
            if flipped:
                logits = logits.flip(-1)
            p = logits[0].softmax(dim=0)
            probabilities = p if probabilities is None else probabilities + p
            views += 1
    return probabilities / views


def check_scales(scales: Sequence[float]) -> None:
    """Test-scale ratios must be positive finite numbers (a ratio of 0 would shrink every image to 1x1)."""
    bad = [ratio for ratio in scales if not (isinstance(ratio, (int, float)) and 0 < ratio < float("inf"))]
    if bad or not len(scales):
        raise ValueError(f"scales must be positive ratios such as 0.5 1.0 1.5, got {' '.join(map(str, scales)) or 'none'}")


def default_stride(crop_size: tuple[int, int]) -> tuple[int, int]:
    """Two thirds of the crop (ADE20K's 512 crop gets stride 341, as in the SegFormer configs)."""
    return tuple(max(1, (2 * c) // 3) for c in crop_size)


def evaluate(model, dataset: SegmentationDataset, *, mode: str = "whole", crop_size: tuple[int, int] | None = None,
             stride: tuple[int, int] | None = None, scales: Sequence[float] = (1.0,), flip: bool = False,
             precision: str = "fp32", resize: bool = True, group: ProcessGroup | None = None,
             progress: bool = False) -> dict:
    """mIoU, mAcc, aAcc and per-class IoU/Acc of ``model`` on ``dataset`` (see metrics.py).

    Images are resized to the base scale of ``crop_size`` (the training pipeline's ratio-1
    size) unless ``resize`` is False; logits are resized back to each label's size. Under
    torchrun each rank takes every world_size-th image and the confusion matrices are summed.
    """
    group = group or ProcessGroup()
    check_scales(scales)
    crop_size = tuple(crop_size or dataset.default_crop_size)
    scale = base_scale(crop_size) if resize else None
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    num_classes = model.config.num_labels
    if num_classes != dataset.num_classes:
        raise ValueError(f"the model predicts {num_classes} classes but the dataset has {dataset.num_classes}")
    matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    indices = range(group.rank, len(dataset), group.world_size)
    bar = progress_bar(indices, desc="eval", leave=False) if progress and group.is_main else None
    try:
        for index in bar if bar is not None else indices:
            image, label = dataset[index]
            label = torch.from_numpy(label).to(device)
            try:
                probabilities = segment(model, image, tuple(label.shape), mode=mode, crop_size=crop_size,
                                        stride=stride, scale=scale, scales=scales, flip=flip, precision=precision)
            except (MemoryError, torch.OutOfMemoryError) as error:
                raise out_of_memory_error(dataset.name(index), image.shape[:2], error) from None
            matrix += confusion_matrix(probabilities.argmax(dim=0), label, num_classes)
    finally:
        model.train(was_training)
    group.all_reduce_sum(matrix)
    return metrics_from_confusion(matrix, dataset.class_names)

