"""Label maps for images in Python: ``model.segment(images)``, and the preprocessing that
comes with a checkpoint. ``segformer predict`` runs the same code.

    model = SegFormer.from_pretrained("runs/ade-b0")      # or an HF folder
    labels = model.segment("photo.jpg")                   # int64 [H, W] at the photo's size
    labels, probabilities = model.segment([pil_image, array], probabilities=True)

Preprocessing, in order of precedence: an HF folder's ``preprocessor_config.json``
(do_resize + size, do_rescale + rescale_factor, do_normalize + image_mean / image_std); a
training run's run.json (resize to the base scale of its crop, ImageNet mean/std on 0..255
pixels, as in training); otherwise ImageNet mean/std and no resize.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .data import DataError, read_image
from .transforms import IMAGENET_MEAN, IMAGENET_STD, base_scale, image_to_tensor, rescaled_size, resize_image

HF_PREPROCESSOR = "preprocessor_config.json"


@dataclass(frozen=True)
class Preprocessing:
    """uint8 [H, W, 3] -> model input [3, h, w]: resize (to ``size`` (h, w) exactly, or into
    the (long, short) limits ``scale`` keeping the aspect), then (x * rescale - mean) / std."""

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    rescale: float = 1.0
    size: tuple[int, int] | None = None
    scale: tuple[int, int] | None = None

    def model_size(self, height: int, width: int) -> tuple[int, int]:
        if self.size is not None:
            return self.size
        if self.scale is not None:
            return rescaled_size(height, width, self.scale)
        return height, width

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        tensor = resize_image(image_to_tensor(image), self.model_size(*image.shape[:2]))
        mean = torch.tensor(self.mean, dtype=tensor.dtype).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=tensor.dtype).view(3, 1, 1)
        return (tensor * self.rescale - mean) / std

    def without_resize(self) -> "Preprocessing":
        return replace(self, size=None, scale=None)

    def at_crop(self, crop_size: tuple[int, int]) -> "Preprocessing":
        """Resize to the base scale of a training crop, as the run's evaluation does."""
        return replace(self, size=None, scale=base_scale(crop_size))


def _hf_preprocessing(path: Path) -> Preprocessing:
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise DataError(f"{path}: cannot read the preprocessor config ({error})") from None
    size = None
    if settings.get("do_resize", True) and settings.get("size") is not None:
        given = settings["size"]
        if isinstance(given, int):
            size = (given, given)
        elif isinstance(given, dict) and {"height", "width"} <= set(given):
            size = (int(given["height"]), int(given["width"]))
        else:
            raise DataError(f"{path}: size must be an int or {{'height', 'width'}}, got {given!r}")
    rescale = float(settings.get("rescale_factor", 1 / 255)) if settings.get("do_rescale", True) else 1.0
    if settings.get("do_normalize", True):
        mean = tuple(float(v) for v in settings.get("image_mean", [m / 255 for m in IMAGENET_MEAN]))
        std = tuple(float(v) for v in settings.get("image_std", [s / 255 for s in IMAGENET_STD]))
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return Preprocessing(mean=mean, std=std, rescale=rescale, size=size)


def preprocessing_for(checkpoint: str | os.PathLike | None, run_info: dict | None = None) -> Preprocessing:
    """The preprocessing a checkpoint was trained with (see the module docstring)."""
    if checkpoint is None:
        return Preprocessing()
    path = Path(checkpoint)
    folder = path if path.is_dir() else path.parent
    if (folder / HF_PREPROCESSOR).is_file():
        return _hf_preprocessing(folder / HF_PREPROCESSOR)
    if run_info is None:
        from .evaluate import read_run_info

        run_info = read_run_info(checkpoint)
    crop = run_info.get("crop_size")
    return Preprocessing().at_crop(tuple(crop)) if crop else Preprocessing()


def as_rgb_array(image) -> np.ndarray:
    """A PIL image, a uint8 [H, W, 3] array or an image file path -> uint8 [H, W, 3]."""
    if isinstance(image, (str, os.PathLike)):
        return read_image(image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"images: an array must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
        return image
    if type(image).__module__.startswith("PIL."):
        return np.array(image.convert("RGB"))  # writable: torch takes it without a copy or a warning
    raise TypeError(f"images: expected PIL images, uint8 [H, W, 3] arrays, file paths or a float tensor "
                    f"[B, 3, H, W], got {type(image).__name__}")


def labels_from_logits(logits: torch.Tensor, size: tuple[int, int], probabilities: bool):
    """One image's logits [K, h, w] -> int64 labels [H, W] (and probabilities [K, H, W])."""
    resized = F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0]
    labels = resized.argmax(dim=0)
    return (labels, resized.softmax(dim=0)) if probabilities else labels


def batches_by_size(sizes: Sequence[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Indices grouped by model input size, then cut into batches (input order within)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for index, size in enumerate(sizes):
        groups.setdefault(tuple(size), []).append(index)
    return [members[i : i + batch_size] for members in groups.values() for i in range(0, len(members), batch_size)]


def segment_images(model, images, preprocessing: Preprocessing | None = None, *, probabilities: bool = False,
                   batch_size: int = 8, precision: str = "fp32"):
    """``model.segment``: one image or a list -> one result or a list. A float tensor
    [B, 3, H, W] is taken as model input already preprocessed and gives a list of B results
    at H x W. A result is int64 labels [H, W] on the model's device, or (labels,
    probabilities [K, H, W]) with ``probabilities``."""
    from .evaluate import model_logits

    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        if isinstance(images, torch.Tensor):
            if not images.is_floating_point() or images.dim() != 4:
                raise TypeError(f"images: a tensor must be a float batch [B, 3, H, W], got {images.dtype} "
                                f"{tuple(images.shape)}")
            size = tuple(images.shape[-2:])
            results = []
            for start in range(0, images.shape[0], batch_size):
                logits = model_logits(model, images[start : start + batch_size].to(device), precision)
                results += [labels_from_logits(one, size, probabilities) for one in logits]
            return results
        single = not isinstance(images, (list, tuple))
        pictures = [as_rgb_array(image) for image in ([images] if single else images)]
        preprocessing = preprocessing or Preprocessing()
        sizes = [preprocessing.model_size(*picture.shape[:2]) for picture in pictures]
        results: list = [None] * len(pictures)
        for batch in batches_by_size(sizes, batch_size):
            inputs = torch.stack([preprocessing(pictures[i]) for i in batch]).to(device)
            for index, logits in zip(batch, model_logits(model, inputs, precision)):
                results[index] = labels_from_logits(logits, pictures[index].shape[:2], probabilities)
        return results[0] if single else results
    finally:
        model.train(was_training)
