"""The SegFormer (mmsegmentation) data pipeline on torch tensors.

Training: random resize (ratio 0.5-2.0 of the base scale, aspect kept), random crop whose
most frequent class covers at most 75% of it (up to 10 tries), horizontal flip,
photometric distortion (brightness, contrast, saturation, hue), ImageNet normalisation,
padding to the crop size (image 0, label 255). Every random choice is drawn from the
``numpy.random.Generator`` passed in, so a sample's augmentation depends only on how that
generator was seeded (the trainer seeds it from (seed, epoch, index)).

Evaluation: resize to the base scale times a ratio (aspect kept), normalise.

The base scale follows the SegFormer configs: (long, short) = (4 * max(crop), min(crop)),
i.e. (2048, 512) for ADE20K's 512 crop; an image is resized so that its long side is at
most ``long * ratio`` and its short side at most ``short * ratio``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


def base_scale(crop_size: tuple[int, int]) -> tuple[int, int]:
    """(long side, short side) limits the images are resized to at ratio 1."""
    return 4 * max(crop_size), min(crop_size)


def rescaled_size(height: int, width: int, scale: tuple[int, int], ratio: float = 1.0) -> tuple[int, int]:
    """The largest (h, w) with the image's aspect ratio whose long side fits ``scale[0] * ratio``
    and short side fits ``scale[1] * ratio``."""
    long_side, short_side = scale[0] * ratio, scale[1] * ratio
    factor = min(long_side / max(height, width), short_side / min(height, width))
    return max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> float32 [3, H, W] in 0..255."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()


def normalize(image: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, dtype=image.dtype, device=image.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=image.dtype, device=image.device).view(3, 1, 1)
    return (image - mean) / std


def resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[3, H, W] float, bilinear (align_corners=False)."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]


def resize_label(label: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[H, W] int64, nearest neighbour (labels are never blended)."""
    if tuple(label.shape) == tuple(size):
        return label
    return F.interpolate(label[None, None].float(), size=size, mode="nearest")[0, 0].long()


def eval_image(image: np.ndarray, scale: tuple[int, int] | None, ratio: float = 1.0) -> torch.Tensor:
    """uint8 [H, W, 3] -> normalised float32 [3, h, w], resized to ``scale * ratio`` (no
    resize when ``scale`` is None and ratio is 1)."""
    tensor = image_to_tensor(image)
    height, width = tensor.shape[-2:]
    if scale is not None:
        tensor = resize_image(tensor, rescaled_size(height, width, scale, ratio))
    elif ratio != 1.0:
        tensor = resize_image(tensor, (max(1, int(height * ratio + 0.5)), max(1, int(width * ratio + 0.5))))
    return normalize(tensor)


# ---- photometric distortion -------------------------------------------------------------------


def rgb_to_hsv(image: torch.Tensor) -> torch.Tensor:
    """[3, H, W] RGB in 0..255 -> (hue in [0, 1), saturation in [0, 1], value in 0..255)."""
    r, g, b = image
    value, _ = image.max(dim=0)
    chroma = value - image.min(dim=0).values
    saturation = torch.where(value > 0, chroma / value.clamp(min=1e-12), torch.zeros_like(value))
    safe = chroma.clamp(min=1e-12)
    hue = torch.where(
        value == r, (g - b) / safe, torch.where(value == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe)
    )
    hue = torch.where(chroma > 0, (hue / 6.0) % 1.0, torch.zeros_like(hue))
    return torch.stack([hue, saturation, value])


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    hue, saturation, value = hsv
    sector = torch.floor(hue * 6.0)
    fraction = hue * 6.0 - sector
    p = value * (1.0 - saturation)
    q = value * (1.0 - saturation * fraction)
    t = value * (1.0 - saturation * (1.0 - fraction))
    sector = sector.long() % 6
    # (r, g, b) per hue sector 0..5
    choices = [(value, t, p), (q, value, p), (p, value, t), (p, q, value), (t, p, value), (value, p, q)]
    rgb = torch.zeros_like(hsv)
    for index, channels in enumerate(choices):
        selected = sector == index
        for c in range(3):
            rgb[c] = torch.where(selected, channels[c], rgb[c])
    return rgb


def photometric_distortion(image: torch.Tensor, rng: np.random.Generator, brightness_delta: float = 32.0,
                           contrast_range=(0.5, 1.5), saturation_range=(0.5, 1.5), hue_delta: int = 18) -> torch.Tensor:
    """Each distortion applied with probability 1/2; contrast before or after the colour
    changes (chosen at random). Hue delta is in OpenCV's 0..180 hue units."""

    def clip(x):
        return x.clamp(0.0, 255.0)

    if rng.integers(2):
        image = clip(image + rng.uniform(-brightness_delta, brightness_delta))
    contrast_first = bool(rng.integers(2))
    if contrast_first and rng.integers(2):
        image = clip(image * rng.uniform(*contrast_range))
    change_saturation, saturation = bool(rng.integers(2)), rng.uniform(*saturation_range)
    change_hue, hue_shift = bool(rng.integers(2)), int(rng.integers(-hue_delta, hue_delta + 1))
    if change_saturation or change_hue:
        hsv = rgb_to_hsv(image)
        if change_saturation:
            hsv[1] = (hsv[1] * saturation).clamp(0.0, 1.0)
        if change_hue:
            hsv[0] = (hsv[0] + hue_shift / 180.0) % 1.0
        image = clip(hsv_to_rgb(hsv))
    if not contrast_first and rng.integers(2):
        image = clip(image * rng.uniform(*contrast_range))
    return image


# ---- training pipeline -------------------------------------------------------------------------


def random_crop_box(label: torch.Tensor, crop_size: tuple[int, int], rng: np.random.Generator,
                    cat_max_ratio: float = 0.75, tries: int = 10) -> tuple[int, int, int, int]:
    """(top, left, height, width): a random crop; re-drawn (up to ``tries`` times) while one
    class covers more than ``cat_max_ratio`` of its labelled pixels."""
    height, width = label.shape
    crop_h, crop_w = min(crop_size[0], height), min(crop_size[1], width)
    for _ in range(tries):
        top = int(rng.integers(0, height - crop_h + 1))
        left = int(rng.integers(0, width - crop_w + 1))
        if cat_max_ratio >= 1.0:
            break
        window = label[top : top + crop_h, left : left + crop_w]
        counts = torch.bincount(window[window != IGNORE_INDEX].reshape(-1))
        counts = counts[counts > 0]
        if len(counts) > 1 and counts.max().item() / counts.sum().item() < cat_max_ratio:
            break
    return top, left, crop_h, crop_w


class TrainTransform:
    """Raw sample -> (normalised image [3, crop_h, crop_w], label [crop_h, crop_w]) with the
    SegFormer training augmentation."""

    def __init__(self, crop_size: tuple[int, int], scale: tuple[int, int] | None = None, ratio_range=(0.5, 2.0),
                 cat_max_ratio: float = 0.75, flip_prob: float = 0.5, photometric: bool = True):
        self.crop_size = tuple(crop_size)
        self.scale = tuple(scale) if scale is not None else base_scale(self.crop_size)
        self.ratio_range = ratio_range
        self.cat_max_ratio = cat_max_ratio
        self.flip_prob = flip_prob
        self.photometric = photometric

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        image_t = image_to_tensor(image)
        label_t = torch.from_numpy(np.ascontiguousarray(label)).long()
        ratio = rng.uniform(*self.ratio_range)
        size = rescaled_size(*label_t.shape, self.scale, ratio)
        image_t, label_t = resize_image(image_t, size), resize_label(label_t, size)
        top, left, crop_h, crop_w = random_crop_box(label_t, self.crop_size, rng, self.cat_max_ratio)
        image_t = image_t[:, top : top + crop_h, left : left + crop_w]
        label_t = label_t[top : top + crop_h, left : left + crop_w]
        if rng.random() < self.flip_prob:
            image_t, label_t = image_t.flip(-1), label_t.flip(-1)
        if self.photometric:
            image_t = photometric_distortion(image_t, rng)
        image_t = normalize(image_t)
        pad_h, pad_w = self.crop_size[0] - crop_h, self.crop_size[1] - crop_w
        if pad_h or pad_w:  # bottom/right padding; padded pixels are ignored by the loss
            image_t = F.pad(image_t, (0, pad_w, 0, pad_h), value=0.0)
            label_t = F.pad(label_t, (0, pad_w, 0, pad_h), value=IGNORE_INDEX)
        return image_t.contiguous(), label_t.contiguous()
