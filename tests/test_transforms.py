"""The training transform (crop before resize, uint8 in and out) against the plain
pipeline it replaces, written out here as the oracle: resize the whole image in float,
crop, flip, photometric distortion through an explicit HSV round trip, normalise.

The new pipeline reads the generator in the old order, so for one seed both make the
same choices; the outputs then differ only by resampling (the crop window starts on a
whole source pixel; upsampling, the colours change before the resize), by rounding to
uint8, and by the padding (the mean colour, which normalises to within 0.01 of 0).
"""

from __future__ import annotations

import colorsys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segformer.data import IGNORE_INDEX, SyntheticShapes
from segformer.transforms import (
    PAD_PIXEL, SHARE_GRID, Photometric, TrainTransform, distort, nearest_indices, normalize,
    finish_batch, random_crop_box, rescaled_size, saturate_and_rotate_hue, source_window,
)

# ---- the oracle: the previous pipeline, in float on the whole image -----------------------------


def rgb_to_hsv(image: torch.Tensor) -> torch.Tensor:
    """[3, H, W] RGB in 0..255 -> (hue in [0, 1), saturation in [0, 1], value in 0..255)."""
    r, g, b = image
    value = image.max(dim=0).values
    chroma = value - image.min(dim=0).values
    saturation = torch.where(value > 0, chroma / value.clamp(min=1e-12), torch.zeros_like(value))
    safe = chroma.clamp(min=1e-12)
    hue = torch.where(value == r, (g - b) / safe, torch.where(value == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    hue = torch.where(chroma > 0, (hue / 6.0) % 1.0, torch.zeros_like(hue))
    return torch.stack([hue, saturation, value])


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    hue, saturation, value = hsv
    sector = torch.floor(hue * 6.0)
    fraction = hue * 6.0 - sector
    p, q, t = value * (1.0 - saturation), value * (1.0 - saturation * fraction), value * (1.0 - saturation * (1.0 - fraction))
    choices = [(value, t, p), (q, value, p), (p, value, t), (p, q, value), (t, p, value), (value, p, q)]
    sector = sector.long() % 6
    rgb = torch.zeros_like(hsv)
    for index, channels in enumerate(choices):
        for c in range(3):
            rgb[c] = torch.where(sector == index, channels[c], rgb[c])
    return rgb


def photometric_oracle(image: torch.Tensor, p: Photometric) -> torch.Tensor:
    def clip(x):
        return x.clamp(0.0, 255.0)

    if p.brightness is not None:
        image = clip(image + p.brightness)
    if p.contrast_first and p.contrast is not None:
        image = clip(image * p.contrast)
    if p.saturation is not None or p.hue is not None:
        hsv = rgb_to_hsv(image)
        if p.saturation is not None:
            hsv[1] = (hsv[1] * p.saturation).clamp(0.0, 1.0)
        if p.hue is not None:
            hsv[0] = (hsv[0] + p.hue / 180.0) % 1.0
        image = clip(hsv_to_rgb(hsv))
    if not p.contrast_first and p.contrast is not None:
        image = clip(image * p.contrast)
    return image


def oracle(transform: TrainTransform, image: np.ndarray, label: np.ndarray, augmentation):
    size, (top, left, h, w), flip, photometric = augmentation
    image_t = torch.from_numpy(image).permute(2, 0, 1).double()
    image_t = F.interpolate(image_t[None], size=size, mode="bilinear", align_corners=False)[0]
    label_t = F.interpolate(torch.from_numpy(label)[None, None].double(), size=size, mode="nearest")[0, 0].long()
    image_t, label_t = image_t[:, top : top + h, left : left + w], label_t[top : top + h, left : left + w]
    if flip:
        image_t, label_t = image_t.flip(-1), label_t.flip(-1)
    image_t = normalize(photometric_oracle(image_t, photometric))
    pad_h, pad_w = transform.crop_size[0] - h, transform.crop_size[1] - w
    image_t = F.pad(image_t, (0, pad_w, 0, pad_h), value=0.0)
    label_t = F.pad(label_t, (0, pad_w, 0, pad_h), value=IGNORE_INDEX)
    return image_t.float(), label_t


def smooth_scene(seed: int, size=(120, 160)) -> tuple[np.ndarray, np.ndarray]:
    """A low-frequency picture (resampling offsets change it little) and a label with
    several classes in large regions, some pixels ignored."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.uniform(0, 255, (1, 3, 6, 8)))
    picture = F.interpolate(coarse, size=size, mode="bicubic", align_corners=False)[0].clamp(0, 255)
    picture = picture.round().byte().permute(1, 2, 0).numpy().copy()
    classes = torch.from_numpy(rng.integers(0, 5, (1, 1, 5, 7)).astype(np.float64))
    label = F.interpolate(classes, size=size, mode="nearest")[0, 0].long().numpy().copy()
    label[rng.random(size) < 0.02] = IGNORE_INDEX
    return picture, label


# ---- the same choices ------------------------------------------------------------------------


def test_crop_box_is_the_one_chosen_on_the_fully_resized_label(fresh_seed):
    """Index maps give the crop search the same windows as resizing the label first."""
    _, label = smooth_scene(fresh_seed)
    for ratio in (0.37, 1.0, 1.6, 2.0):
        size = rescaled_size(*label.shape, (480, 120), ratio)
        resized = F.interpolate(torch.from_numpy(label)[None, None].double(), size=size, mode="nearest")[0, 0].long()
        rows, cols = nearest_indices(label.shape[0], size[0]), nearest_indices(label.shape[1], size[1])
        assert torch.equal(torch.from_numpy(label[rows[:, None], cols[None]]), resized)
        for seed in range(5):
            box = random_crop_box(label, (64, 64), np.random.default_rng([fresh_seed, seed]), rows=rows, cols=cols)
            assert box == random_crop_box(resized.numpy(), (64, 64), np.random.default_rng([fresh_seed, seed]))


def test_crop_search_grid_counts_shares_within_a_percent():
    """The crop search counts class shares on a grid of about 128 x 128 points: on region
    label maps the largest class's share on the grid is within a percent of the full count's."""
    def largest_share(window):
        counts = np.bincount(window.reshape(-1), minlength=IGNORE_INDEX + 1)
        counts[IGNORE_INDEX] = 0
        return counts.max() / counts.sum()

    rng = np.random.default_rng(0)
    for _, label in SyntheticShapes("train", size=(600, 800), length=6, seed=3):
        for _ in range(10):
            top, left = rng.integers(0, 600 - 512 + 1), rng.integers(0, 800 - 512 + 1)
            window = label[top : top + 512, left : left + 512]
            step = 512 // SHARE_GRID
            assert abs(largest_share(window) - largest_share(window[::step, ::step])) < 0.01


def test_crop_respects_cat_max_ratio():
    """Left half class 0, right half class 1: only crops straddling the border with at least
    25% of each pass; without the rule about a third of the crops would."""
    label = np.zeros((100, 100), dtype=np.int64)
    label[:, 50:] = 1

    def balanced(ratio, seed):
        top, left, h, w = random_crop_box(label, (40, 40), np.random.default_rng(seed), cat_max_ratio=ratio)
        share = (label[top : top + h, left : left + w] == 1).mean()
        return 0.25 < share < 0.75

    with_rule = sum(balanced(0.75, s) for s in range(200))
    without = sum(balanced(1.0, s) for s in range(200))
    assert with_rule >= 180 and without <= 100


@pytest.mark.parametrize("sample", range(12))
def test_output_matches_the_float_pipeline(sample, fresh_seed):
    """Same seed, same choices: at resize ratio 1 (no resampling) labels are identical and
    images differ only by rounding to uint8."""
    picture, label = smooth_scene(fresh_seed + sample)
    transform = TrainTransform((64, 64), scale=(480, 120), ratio_range=(1.0, 1.0))
    augmentation = transform.draw(label, np.random.default_rng([fresh_seed, sample]))
    pixels, label_t = transform(picture, label, np.random.default_rng([fresh_seed, sample]))
    want_image, want_label = oracle(transform, picture, label, augmentation)
    assert pixels.shape == (3, 64, 64) and pixels.dtype == torch.uint8 and label_t.dtype == torch.uint8
    assert torch.equal(label_t.long(), want_label)
    image_t = finish_batch(pixels[None])[0]
    difference = ((image_t - want_image) * torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)).abs()  # 0..255 units
    # rounding to uint8 at the end: half a level
    assert difference.max() < 0.51, augmentation


@pytest.mark.parametrize("ratio", [1.3, 2.0])
def test_colour_change_before_upsampling_differs_from_after_only_at_edges(ratio, fresh_seed):
    """Upsampling, the transform changes the colours of the (smaller) source window and then
    resizes it; the other order, which the transform takes when downsampling, gives the same
    pixels but where bilinear blends two colours (and by double rounding to uint8)."""
    for sample in range(4):
        picture, label = smooth_scene(fresh_seed + sample)
        transform = TrainTransform((64, 64), scale=(480, 120), ratio_range=(ratio, ratio))
        augmentation = transform.draw(label, np.random.default_rng([fresh_seed, sample]))
        photometric = Photometric(brightness=20.0, contrast=1.4, contrast_first=bool(sample % 2), saturation=1.5, hue=15)
        window, resize = source_window(picture, augmentation.size, augmentation.box)
        assert window.shape[1] * window.shape[2] < 64 * 64
        before = resize(distort(window, photometric)).float()
        after = distort(resize(window), photometric).float()
        difference = (before - after).abs()
        assert difference.mean() < 1.5 and torch.quantile(difference.flatten(), 0.99) <= 8.0, augmentation


@pytest.mark.parametrize("ratio", [0.8, 1.0, 1.37, 2.0])
def test_crop_is_the_full_resize_shifted_by_under_one_source_pixel(ratio, fresh_seed):
    """On a ramp picture (red = 2 x column, green = 2 x row) bilinear resizing reproduces the
    source coordinate: every output pixel reads the full resize's source coordinate
    minus one constant offset in [0, 1) source pixels per axis, the scale is exact, and
    labels (nearest) are the full resize's crop exactly."""
    height, width = 100, 120
    y, x = np.mgrid[0:height, 0:width]
    picture = np.stack([2 * x, 2 * y, np.full_like(x, 128)], axis=-1).astype(np.uint8)
    label = (x // 37 + 10 * (y // 23)).astype(np.int64)
    transform = TrainTransform((64, 64), scale=(400, 100), ratio_range=(ratio, ratio), photometric=False, flip_prob=0.0)
    augmentation = transform.draw(label, np.random.default_rng(fresh_seed))
    (h, w), (top, left, crop_h, crop_w) = augmentation.size, augmentation.box
    pixels, label_t = transform.apply(picture, label, augmentation)
    _, want_label = oracle(transform, picture, label, augmentation)
    assert torch.equal(label_t, want_label)
    pixels = pixels[:, :crop_h, :crop_w].double()
    for axis, channel, unit, start, size_in, size_out in ((1, 0, 2.0, left, width, w), (0, 1, 2.0, top, height, h)):
        step = size_in / size_out
        index = torch.arange(start, start + (crop_w if axis else crop_h), dtype=torch.float64)
        full = (index + 0.5) * step - 0.5
        # away from the clamped borders of the picture and the crop's first row/column (which may clamp)
        inside = (full > 1.0) & (full < size_in - 2.0) & (index > start)
        got = pixels[channel].mean(dim=0 if axis else 1) / unit
        offset = (full - got)[inside]
        # uint8 rounding moves each value by up to half a level: 0.25 source pixels here
        assert -0.27 <= offset.min() and offset.max() < 1.27, (offset.min(), offset.max())
        assert offset.max() - offset.min() < 0.52  # one constant shift


def test_padding_is_ignore_index_and_normalises_to_zero():
    picture, label = smooth_scene(0, size=(40, 50))
    transform = TrainTransform((64, 64), scale=(480, 120), ratio_range=(0.5, 0.5))
    pixels, label_t = transform(picture, label, np.random.default_rng(1))
    h, w = rescaled_size(40, 50, (480, 120), 0.5)
    assert (label_t[h:] == IGNORE_INDEX).all() and (label_t[:, w:] == IGNORE_INDEX).all()
    assert (pixels[:, h:] == PAD_PIXEL).all() and (pixels[:, :, w:] == PAD_PIXEL).all()
    padding = torch.ones(64, 64, dtype=torch.bool)
    padding[:h, :w] = False
    assert padding.any()
    assert finish_batch(pixels[None])[0][:, padding].abs().max() < 0.01
    assert (label_t[:h, :w] != IGNORE_INDEX).float().mean() > 0.9


def test_labels_are_never_blended():
    picture, label = smooth_scene(3)
    transform = TrainTransform((64, 64), scale=(480, 120))
    for seed in range(20):
        _, label_t = transform(picture, label, np.random.default_rng(seed))
        assert set(label_t.unique().tolist()) <= set(np.unique(label).tolist()) | {IGNORE_INDEX}


def test_uint8_labels_give_the_same_sample():
    """The transform reads and returns int64 labels as uint8 where they fit; labels that do
    not fit (more than 255 classes) take the same path in int64."""
    picture, label = smooth_scene(5)
    transform = TrainTransform((64, 64), scale=(480, 120))
    for seed in range(6):
        wide = transform(picture, label, np.random.default_rng(seed))
        narrow = transform(picture, label.astype(np.uint8), np.random.default_rng(seed))
        assert torch.equal(wide[0], narrow[0]) and torch.equal(wide[1], narrow[1]) and wide[1].dtype == torch.uint8
        many = np.where(label == IGNORE_INDEX, IGNORE_INDEX, label + 300)  # class ids above 255
        shifted = transform(picture, many, np.random.default_rng(seed))
        assert torch.equal(shifted[0], wide[0]) and shifted[1].dtype == torch.int64
        wide_label = wide[1].long()
        assert torch.equal(shifted[1], torch.where(wide_label == IGNORE_INDEX, IGNORE_INDEX, wide_label + 300))


def test_deterministic_per_key():
    picture, label = SyntheticShapes("train", size=64)[0]
    transform = TrainTransform((48, 48))
    a = transform(picture, label, np.random.default_rng([1, 2, 3]))
    b = transform(picture, label, np.random.default_rng([1, 2, 3]))
    c = transform(picture, label, np.random.default_rng([1, 2, 4]))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


# ---- the statistics of the choices ---------------------------------------------------------------


def test_choice_statistics():
    """Scale ratio uniform on [0.5, 2], flip half the time, each photometric distortion half
    the time within its range (4000 draws: binomial standard deviation 0.008)."""
    transform = TrainTransform((64, 64), scale=(480, 120))
    label = np.zeros((120, 160), dtype=np.int64)
    label[:, 80:] = 1
    draws = [transform.draw(label, np.random.default_rng([7, i])) for i in range(4000)]
    scales = np.array([d.size[0] / 120 for d in draws])
    assert 0.49 <= scales.min() < 0.52 and 1.98 < scales.max() <= 2.01
    assert abs(scales.mean() - 1.25) < 0.03 and abs(np.median(scales) - 1.25) < 0.04
    assert abs(np.mean([d.flip for d in draws]) - 0.5) < 0.04
    p = [d.photometric for d in draws]
    for name, low, high in (("brightness", -32, 32), ("saturation", 0.5, 1.5), ("hue", -18, 18), ("contrast", 0.5, 1.5)):
        values = np.array([getattr(x, name) for x in p if getattr(x, name) is not None])
        assert abs(len(values) / len(p) - 0.5) < 0.04, name
        assert low <= values.min() < low + 0.1 * (high - low) and high - 0.1 * (high - low) < values.max() <= high, name
    assert abs(np.mean([x.contrast_first for x in p]) - 0.5) < 0.04


# ---- the colour step ---------------------------------------------------------------------------


def test_hsv_oracle_round_trip(fresh_seed):
    rgb = torch.rand(3, 7, 5, generator=torch.Generator().manual_seed(fresh_seed)) * 255
    hsv = rgb_to_hsv(rgb)
    assert torch.allclose(hsv_to_rgb(hsv), rgb, atol=1e-3)
    h, s, v = colorsys.rgb_to_hsv(*(rgb[:, 2, 3] / 255).tolist())
    assert hsv[:, 2, 3].tolist() == pytest.approx([h, s, v * 255], abs=1e-5)


@pytest.mark.parametrize("saturation, hue", [(None, 7), (1.4, None), (0.6, -18), (1.5, 18), (None, -29), (1.2, 45), (0.7, -90), (None, None)])
def test_saturation_and_hue_match_the_hsv_round_trip(saturation, hue, fresh_seed):
    rgb = torch.rand(3, 40, 30, generator=torch.Generator().manual_seed(fresh_seed)).double() * 255
    rgb[:, :5] = rgb[:1, :5]  # grey pixels: no hue
    rgb[:, 5:8] = 0.0
    for row, (r, g, b) in enumerate([(200, 200, 50), (50, 200, 200), (200, 50, 200), (90, 90, 90)]):
        rgb[:, 8 + row, ::2] = torch.tensor([r, g, b], dtype=rgb.dtype).view(3, 1)  # two (or three) largest tie
    got = saturate_and_rotate_hue(rgb, saturation, hue)
    want = photometric_oracle(rgb, Photometric(saturation=saturation, hue=hue))
    if saturation is None and hue is None:
        want = rgb
    assert torch.allclose(got, want, atol=1e-6)


# ---- the photometric distortion on the training device --------------------------------------------


@pytest.mark.parametrize("ratio_range", [(0.5, 2.0), (1.0, 1.0)], ids=["resized", "ratio-1"])
def test_colour_on_the_device_matches_the_worker_path(ratio_range, fresh_seed):
    """With colour_on_device the worker leaves the photometric distortion to finish_batch,
    batched: the same draws give the same samples (labels and padding exactly; pixels up to
    rounding, and, where the worker changed colours before upsampling, at colour edges), so
    the batch statistics match the worker path's."""
    on_worker = TrainTransform((64, 64), scale=(480, 120), ratio_range=ratio_range)
    on_device = TrainTransform((64, 64), scale=(480, 120), ratio_range=ratio_range, colour_on_device=True)
    worker, device, differences = [], [], []
    for sample in range(8):
        picture, label = smooth_scene(fresh_seed + sample)
        rng = [fresh_seed, sample]
        pixels, labels = on_worker(picture, label, np.random.default_rng(rng))
        raw, device_labels, photometric = on_device(picture, label, np.random.default_rng(rng))
        assert torch.equal(device_labels, labels) and photometric.shape == (7,)
        want, got = finish_batch(pixels[None])[0], finish_batch(raw[None], photometric[None])[0]
        worker.append(want)
        device.append(got)
        inside = torch.zeros(64, 64, dtype=torch.bool)
        inside[: int(photometric[5]), : int(photometric[6])] = True
        assert (got[:, ~inside].abs() < 0.01).all()  # the padding
        difference = ((got - want) * torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)).abs()[:, inside]
        if ratio_range == (1.0, 1.0):
            assert difference.max() < 0.51  # the worker's rounding to uint8
        differences.append(difference.mean())
    assert max(differences) < 1.5, differences
    # one batch through finish_batch: per-sample parameters, and the statistics of the two paths
    batch = torch.stack([on_device(*smooth_scene(fresh_seed + s), np.random.default_rng([fresh_seed, s]))[0]
                         for s in range(8)])
    parameters = torch.stack([on_device(*smooth_scene(fresh_seed + s), np.random.default_rng([fresh_seed, s]))[2]
                              for s in range(8)])
    assert torch.allclose(finish_batch(batch, parameters), torch.stack(device), atol=1e-5)
    worker, device = torch.stack(worker), torch.stack(device)
    assert torch.allclose(device.mean(dim=(0, 2, 3)), worker.mean(dim=(0, 2, 3)), atol=0.01)
    assert torch.allclose(device.std(dim=(0, 2, 3)), worker.std(dim=(0, 2, 3)), rtol=0.01)


def test_colour_on_the_device_with_every_distortion_off_is_the_identity():
    pixels = torch.randint(0, 256, (2, 3, 16, 24), dtype=torch.uint8)
    identity = torch.stack([Photometric().as_tensor((16, 24)), Photometric().as_tensor((10, 7))])
    assert torch.allclose(finish_batch(pixels, identity), finish_batch(pixels), atol=1e-4)
