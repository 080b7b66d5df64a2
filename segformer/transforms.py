"""The SegFormer (mmsegmentation) data pipeline on torch tensors.

Training: random resize (ratio 0.5-2.0 of the base scale, aspect kept), random crop whose
most frequent class covers at most 75% of it (up to 10 tries), horizontal flip,
photometric distortion (brightness, contrast, saturation, hue), ImageNet normalisation,
padding to the crop size (image 0, label 255). Every random choice is drawn from the
``numpy.random.Generator`` passed in, so a sample's augmentation depends only on how that
generator was seeded (the trainer seeds it from (seed, epoch, index)).

The training pipeline draws every choice first (``TrainTransform.draw``), then applies
them cropping before resizing: the crop is chosen on the resized label through index
maps (nearest neighbour, the same pixels a full resize would give), and only the source
window under the crop is resized, in uint8 (bilinear, align_corners=False, the full
resize's scale; the window starts on a whole source pixel, so the crop sits less than
one source pixel off the full resize's grid, and its first row and column may clamp).
The photometric distortion is pointwise, so it runs on the smaller of the source window
and the resized crop: brightness, contrast and the colour changes (HSV saturation and
hue, elementwise over the channel planes) in float, only when drawn, rounded back to
uint8 once. A sample leaves the worker as uint8 pixels (padded with the mean colour) and
uint8 labels where the class ids fit; ``finish_batch`` is the last step, on the training
device, so a quarter of the bytes cross the worker queue and the host-to-device copy.
With ``colour_on_device`` (the trainer's default on GPUs) the photometric distortion
moves into that step as well, batched. The crop search and the label crop read the label
as uint8 when its values fit.

Evaluation: resize to the base scale times a ratio (aspect kept), normalise.

The base scale follows the SegFormer configs: (long, short) = (4 * max(crop), min(crop)),
i.e. (2048, 512) for ADE20K's 512 crop; an image is resized so that its long side is at
most ``long * ratio`` and its short side at most ``short * ratio``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
# the training crop's padding: the mean colour in uint8, which normalises to within 0.01 of 0 (the
# padding value of a normalised image)
PAD_PIXEL = torch.tensor([round(m) for m in IMAGENET_MEAN], dtype=torch.uint8).view(3, 1, 1)


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


# ---- training pipeline -------------------------------------------------------------------------


def nearest_indices(size_in: int, size_out: int) -> np.ndarray:
    """Source index of each output index of a nearest-neighbour resize, as F.interpolate's
    "nearest" computes it: floor(i * in / out) in float32, clamped."""
    if size_in == size_out:
        return np.arange(size_out)
    scale = np.float32(size_in / size_out)
    return np.minimum(np.floor(np.arange(size_out, dtype=np.float32) * scale).astype(np.int64), size_in - 1)


SHARE_GRID = 128  # points per side on which the crop search counts class shares


def random_crop_box(label: np.ndarray, crop_size: tuple[int, int], rng: np.random.Generator,
                    cat_max_ratio: float = 0.75, tries: int = 10, rows: np.ndarray | None = None,
                    cols: np.ndarray | None = None) -> tuple[int, int, int, int]:
    """(top, left, height, width): a random crop of the label resized by the index maps
    ``rows`` and ``cols`` (resized index -> source index; None: not resized); re-drawn (up
    to ``tries`` times) while one class covers more than ``cat_max_ratio`` of its labelled
    pixels. The class shares are counted on a grid of about 128 x 128 points of the crop
    (every pixel of crops up to 255 wide): label maps are made of regions, so the grid's
    shares stay within a percent of the full count's at a sixteenth of the reads at 512."""
    rows = np.arange(label.shape[0]) if rows is None else rows
    cols = np.arange(label.shape[1]) if cols is None else cols
    height, width = len(rows), len(cols)
    crop_h, crop_w = min(crop_size[0], height), min(crop_size[1], width)
    step_h, step_w = max(1, crop_h // SHARE_GRID), max(1, crop_w // SHARE_GRID)
    for _ in range(tries):
        top = int(rng.integers(0, height - crop_h + 1))
        left = int(rng.integers(0, width - crop_w + 1))
        if cat_max_ratio >= 1.0:
            break
        window = np.take(np.take(label, rows[top : top + crop_h : step_h], axis=0), cols[left : left + crop_w : step_w],
                         axis=1)
        counts = torch.bincount(torch.from_numpy(window.reshape(-1)), minlength=IGNORE_INDEX + 1).numpy()
        counts[IGNORE_INDEX] = 0
        counts = counts[counts > 0]
        if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
            break
    return top, left, crop_h, crop_w


@dataclass(frozen=True)
class Photometric:
    """One draw of the photometric distortion; None = that distortion is off. Contrast
    runs before the colour changes or after them (``contrast_first``); hue is in
    OpenCV's 0..180 units."""

    brightness: float | None = None
    contrast: float | None = None
    contrast_first: bool = False
    saturation: float | None = None
    hue: int | None = None

    @classmethod
    def draw(cls, rng: np.random.Generator, brightness_delta: float = 32.0, contrast_range=(0.5, 1.5),
             saturation_range=(0.5, 1.5), hue_delta: int = 18) -> "Photometric":
        """Each distortion with probability 1/2, contrast first or last at random (mmseg's
        PhotoMetricDistortion; the draws in this order keep old seeds' choices)."""
        brightness = float(rng.uniform(-brightness_delta, brightness_delta)) if rng.integers(2) else None
        contrast_first = bool(rng.integers(2))
        contrast = float(rng.uniform(*contrast_range)) if contrast_first and rng.integers(2) else None
        change_saturation, saturation = bool(rng.integers(2)), float(rng.uniform(*saturation_range))
        change_hue, hue = bool(rng.integers(2)), int(rng.integers(-hue_delta, hue_delta + 1))
        if not contrast_first and rng.integers(2):
            contrast = float(rng.uniform(*contrast_range))
        return cls(brightness, contrast, contrast_first, saturation if change_saturation else None,
                   hue if change_hue else None)

    def steps(self) -> tuple:
        """(brightness, first contrast, saturation, hue, last contrast), in the order they run;
        None where off."""
        first, last = (self.contrast, None) if self.contrast_first else (None, self.contrast)
        return self.brightness, first, self.saturation, self.hue, last

    def as_tensor(self, crop_hw: tuple[int, int]) -> torch.Tensor:
        """float32 [7]: the ``steps`` (one that is off as its identity: 0, 1, 1, 0, 1), then the
        crop's height and width, which ``distort_batch`` keeps the padding outside of."""
        values = [identity if value is None else value for value, identity in zip(self.steps(), (0.0, 1.0, 1.0, 0.0, 1.0))]
        return torch.tensor([*values, *crop_hw], dtype=torch.float32)


# the hue (in sixths of the circle) at which each of R, G, B is the smallest channel; in HSV -> RGB
# a channel is V - C * clamp(2 - its circular distance to that hue, 0, 1)
_LOWEST_AT_HUE = torch.tensor([3.0, 5.0, 1.0]).view(3, 1, 1)


def saturate_and_rotate_hue(rgb: torch.Tensor, saturation: float | torch.Tensor | None,
                            hue: int | torch.Tensor | None) -> torch.Tensor:
    """HSV saturation times ``saturation`` (clipped to 1) and hue plus ``hue`` (OpenCV units,
    180 a full turn) on float RGB [..., 3, H, W] in 0..255, without materialising HSV: hue in
    sixths from the largest channel, chroma C = V - min scaled and capped at V. Elementwise
    over the three channel planes only (no reductions or gathers across channels). The
    parameters are numbers, or per-sample tensors [B, 1, 1] for a batch [B, 3, H, W]."""
    red, green, blue = rgb.unbind(-3)
    value = torch.maximum(torch.maximum(red, green), blue)
    chroma = value - torch.minimum(torch.minimum(red, green), blue)
    if hue is None:
        if saturation is None:
            return rgb
        # same hue and value: each channel's distance below V scales with the chroma
        factor = torch.clamp_max_(value / chroma.clamp(min=1e-12), saturation).unsqueeze(-3)
        return torch.addcmul(value.unsqueeze(-3), value.unsqueeze(-3) - rgb, factor, value=-1.0)
    # hue in sixths times C: the channel after the largest minus the one before it (G - B when R
    # is largest) plus 2 C per channel index of the largest
    unless_red = torch.where(green == value, (blue - red).add_(chroma, alpha=2.0), (red - green).add_(chroma, alpha=4.0))
    sixths = torch.where(red == value, green - blue, unless_red).div_(chroma.clamp(min=1e-12)).add_(hue / 30.0)
    if isinstance(hue, torch.Tensor) or abs(hue) >= 30:  # within a sixth of a turn h stays in (-2, 6): no wrapping
        sixths = sixths.remainder_(6.0)
    if saturation is not None:
        chroma = torch.minimum(chroma * saturation, value)
    # circular distance d = 3 - ||h - lowest| - 3| for |h - lowest| < 6, so 2 - d = ||h - lowest| - 3| - 1;
    # from 6 to 7 (h down to -2, lowest 5) both sides clamp to 1. The channel V - C clamp(2 - d, 0, 1)
    # is (V + C) - C clamp(3 - d, 1, 2): one pass over the three planes fewer
    weight = (sixths.unsqueeze(-3) - _LOWEST_AT_HUE).abs_().sub_(3.0).abs_().clamp_(1.0, 2.0)
    return torch.addcmul((value + chroma).unsqueeze(-3), chroma.unsqueeze(-3), weight, value=-1.0)


class TrainTransform:
    """Raw sample -> (pixels uint8 [3, crop_h, crop_w], label [crop_h, crop_w]) with the
    SegFormer training augmentation; ``finish_batch`` is the last step, run on the training
    device (uint8 crosses the worker queue and the host-to-device copy). With
    ``colour_on_device`` the photometric distortion moves to that last step too: the sample
    gains a third item, its ``Photometric.as_tensor``, and the worker only decodes, crops,
    resizes and flips."""

    def __init__(self, crop_size: tuple[int, int], scale: tuple[int, int] | None = None, ratio_range=(0.5, 2.0),
                 cat_max_ratio: float = 0.75, flip_prob: float = 0.5, photometric: bool = True,
                 colour_on_device: bool = False):
        self.crop_size = tuple(crop_size)
        self.colour_on_device = colour_on_device
        self.scale = tuple(scale) if scale is not None else base_scale(self.crop_size)
        self.ratio_range = ratio_range
        self.cat_max_ratio = cat_max_ratio
        self.flip_prob = flip_prob
        self.photometric = photometric

    def draw(self, label: np.ndarray, rng: np.random.Generator) -> "Augmentation":
        """Every random choice for this sample, in the order the generator is read."""
        height, width = label.shape
        ratio = float(rng.uniform(*self.ratio_range))
        size = rescaled_size(height, width, self.scale, ratio)
        rows, cols = nearest_indices(height, size[0]), nearest_indices(width, size[1])
        box = random_crop_box(label, self.crop_size, rng, self.cat_max_ratio, rows=rows, cols=cols)
        flip = bool(rng.random() < self.flip_prob)
        photometric = Photometric.draw(rng) if self.photometric else Photometric()
        return Augmentation(size, box, flip, photometric)

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> tuple[torch.Tensor, ...]:
        label = compact_label(label)
        return self.apply(image, label, self.draw(label, rng))

    def apply(self, image: np.ndarray, label: np.ndarray, augmentation: "Augmentation") -> tuple[torch.Tensor, ...]:
        (size, (top, left, crop_h, crop_w), flip, photometric) = augmentation
        height, width = label.shape
        rows, cols = nearest_indices(height, size[0]), nearest_indices(width, size[1])
        cols = cols[left : left + crop_w]
        label_out = torch.full(self.crop_size, IGNORE_INDEX, dtype=torch.from_numpy(label[:0, :0]).dtype)
        label_rows = np.take(label, rows[top : top + crop_h], axis=0)  # one axis at a time: cheaper than a 2-D index
        label_out[:crop_h, :crop_w] = torch.from_numpy(np.take(label_rows, cols[::-1] if flip else cols, axis=1))
        # the photometric distortion is pointwise: it runs on whichever of the source window and
        # the resized crop has fewer pixels (they differ only where bilinear blends two colours)
        window, resize = source_window(image, size, (top, left, crop_h, crop_w))
        if self.colour_on_device:
            pixels = resize(window)
        elif window.shape[1] * window.shape[2] < crop_h * crop_w:
            pixels = resize(distort(window, photometric))
        else:
            pixels = distort(resize(window), photometric)
        # bottom/right padding: the mean colour (normalised: within 0.01 of 0), label ignored by the loss
        image_out = torch.empty(3, *self.crop_size, dtype=torch.uint8)
        image_out[:, crop_h:] = PAD_PIXEL
        image_out[:, :crop_h, crop_w:] = PAD_PIXEL
        image_out[:, :crop_h, :crop_w] = pixels.flip(-1) if flip else pixels
        if self.colour_on_device:
            return image_out, label_out, photometric.as_tensor((crop_h, crop_w))
        return image_out, label_out


class Augmentation(NamedTuple):
    """One sample's draw: the resized (h, w), the crop box (top, left, h, w) in resized
    coordinates, the flip and the photometric distortion."""

    size: tuple[int, int]
    box: tuple[int, int, int, int]
    flip: bool
    photometric: Photometric


def compact_label(label: np.ndarray) -> np.ndarray:
    """The label map as uint8 when its values fit (class ids below 255 and the ignore
    value): the crop search and the crop then move an eighth of int64's bytes."""
    if label.dtype != np.uint8 and label.size and 0 <= label.min() and label.max() <= 255:
        return label.astype(np.uint8)
    return label


def source_window(image: np.ndarray, size: tuple[int, int], box: tuple[int, int, int, int]):
    """(window, resize): the pixels of ``image`` (uint8 [H, W, 3]) under the ``box`` (top,
    left, h, w) of its bilinear resize to ``size`` (align_corners=False), plus the one
    neighbour bilinear reads, as uint8 [3, h', w'] (channels-last in memory); and the
    function that resizes such a window (or the window after a pointwise colour change) to
    the box, at the full resize's scale."""
    top, left, crop_h, crop_w = box
    if tuple(size) == image.shape[:2]:  # ratio 1: the crop itself
        return _channels_last(image[top : top + crop_h, left : left + crop_w]), _unchanged
    (y0, y1), (x0, x1) = (_source_window(image.shape[axis], size[axis], start, length)
                          for axis, start, length in ((0, top, crop_h), (1, left, crop_w)))
    scales = size[0] / image.shape[0], size[1] / image.shape[1]

    def resize(window: torch.Tensor) -> torch.Tensor:
        # torch's uint8 bilinear is fastest on channels-last input (and gives channels-last out)
        batch = window[None].contiguous(memory_format=torch.channels_last)
        return torch.ops.aten.upsample_bilinear2d(batch, [crop_h, crop_w], False, *scales)[0]

    return _channels_last(image[y0:y1, x0:x1]), resize


def _channels_last(pixels: np.ndarray) -> torch.Tensor:
    """uint8 [h, w, 3] (a view) -> uint8 [3, h, w] over a contiguous [h, w, 3] copy."""
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)


def _unchanged(pixels: torch.Tensor) -> torch.Tensor:
    return pixels


def distort(pixels: torch.Tensor, photometric: Photometric) -> torch.Tensor:
    """The photometric distortion of uint8 [3, h, w] pixels, uint8 out: in float over the
    channel planes in between (a few passes over float planes cost less than a uint8 lookup
    table, whose indices numpy widens to 64 bits), rounded back once."""
    steps = photometric.steps()
    if all(step is None for step in steps):
        return pixels
    rgb = _distort_float(pixels.contiguous().float(), *steps)  # planes (the uint8 transpose is the cheaper one)
    # + 0.5: the conversion truncates; numpy's float -> uint8 conversion is vectorised, torch's is not
    return torch.from_numpy(rgb.add_(0.5).numpy().astype(np.uint8))


def distort_batch(pixels: torch.Tensor, photometric: torch.Tensor) -> torch.Tensor:
    """The photometric distortion of a batch on the training device: uint8 [B, 3, H, W] ->
    float32 in 0..255, each sample by its row of ``photometric`` [B, 7]
    (``Photometric.as_tensor``); the padding outside each crop keeps its colour. The same
    steps as ``distort``, without its rounding to uint8."""
    per_sample = photometric.to(torch.float32).T[:, :, None, None]  # [7, B, 1, 1]: per plane
    brightness, first, saturation, hue, last, height, width = per_sample
    rgb = _distort_float(pixels.float(), brightness[:, None], first[:, None], saturation, hue, last[:, None])
    rows = torch.arange(pixels.shape[-2], device=pixels.device)[:, None]
    cols = torch.arange(pixels.shape[-1], device=pixels.device)
    inside = (rows < height) & (cols < width)  # [B, H, W]
    return torch.where(inside[:, None], rgb, pixels.float())


def _distort_float(rgb: torch.Tensor, brightness, first, saturation, hue, last) -> torch.Tensor:
    """``Photometric.steps`` on float RGB [..., 3, H, W] in 0..255, in place where it can be;
    each a number, a per-sample tensor, or None (skipped)."""
    if brightness is not None:
        rgb.add_(brightness).clamp_(0.0, 255.0)
    if first is not None:
        rgb.mul_(first).clamp_(0.0, 255.0)
    rgb = saturate_and_rotate_hue(rgb, saturation, hue)
    if last is not None:
        rgb.mul_(last).clamp_(0.0, 255.0)
    return rgb


def finish_batch(pixels: torch.Tensor, photometric: torch.Tensor | None = None) -> torch.Tensor:
    """The training pipeline's last step, on the training device: uint8 [B, 3, H, W] (and the
    photometric distortions still to apply, when the workers left them to the device) ->
    normalised float32."""
    return normalize(pixels.float() if photometric is None else distort_batch(pixels, photometric))


def _source_window(size_in: int, size_out: int, start: int, length: int) -> tuple[int, int]:
    """[first, last) source indices that output indices start..start+length-1 of a bilinear
    resize size_in -> size_out (align_corners=False) read."""
    step = size_in / size_out
    # the window starts at floor(start * step): every output index then reads the full
    # resize's source coordinate minus frac(start * step), under one source pixel (the
    # first output index may read past the window's start when upsampling: it clamps)
    first = min(int(np.floor(start * step)), size_in - 1)
    last = min(int(np.floor((start + length - 0.5) * step - 0.5)) + 2, size_in)
    return first, max(last, first + 1)
