"""Segmentation datasets: ADE20K, Cityscapes, image/mask folders, and procedural shapes.

Every dataset returns raw samples: an RGB image as a uint8 array [H, W, 3] and a label
map as an int64 array [H, W] of class ids in [0, num_classes) or 255 (ignore). Files are
checked as they are read; anything wrong (unreadable image, missing mask, a label value
outside the class list, an image and mask of different sizes) raises DataError naming the
file and the problem, so training stops instead of learning from garbage.

    dataset = open_dataset("path/to/ADEChallengeData2016", "train")
    dataset = open_dataset("synthetic", "val")
    image, label = dataset[0]
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np

IGNORE_INDEX = 255
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class DataError(Exception):
    """Bad input: data, a checkpoint or an option. The message names the file (or folder,
    or option) and what is wrong with it; the CLI prints it as one line and exits with 2."""


# ---- reading files --------------------------------------------------------------------------


def _open_image(path: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(path)
        image.load()  # decode now: a truncated file fails here, not later
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as error:
        reason = str(error).replace(f" {str(path)!r}", "").replace(str(path), "").strip() or type(error).__name__
        raise DataError(f"{path}: cannot read image ({reason})") from None
    return image


def read_image(path: str | os.PathLike) -> np.ndarray:
    """An RGB image as uint8 [H, W, 3] (grey, palette and RGBA images are converted)."""
    return np.array(_open_image(Path(path)).convert("RGB"))


def read_label_file(path: str | os.PathLike) -> np.ndarray:
    """A label map as stored (int64 [H, W]): one channel of class ids, a palette PNG's indices,
    or an RGB image whose three channels are equal. A colour-coded mask is refused."""
    path = Path(path)
    image = _open_image(path)
    if image.mode in ("RGB", "RGBA"):
        values = np.asarray(image)[..., :3]
        if not ((values[..., 0] == values[..., 1]).all() and (values[..., 1] == values[..., 2]).all()):
            raise DataError(
                f"{path}: mask is a colour image (mode {image.mode}); expected one channel of class ids "
                "(a greyscale or palette PNG)"
            )
        return values[..., 0].astype(np.int64)
    if image.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L", "1"):
        raise DataError(f"{path}: mask has image mode {image.mode}; expected one channel of class ids")
    return np.asarray(image).astype(np.int64)


class LabelMap:
    """Maps stored label values to class ids and rejects values outside the class list."""

    def __init__(self, num_classes: int, reduce_zero_label: bool = False):
        self.num_classes = num_classes
        self.reduce_zero_label = reduce_zero_label
        # stored value -> class id, -1 for values that name no class
        table = np.full(max(256, num_classes + 2), -1, dtype=np.int64)
        if reduce_zero_label:  # ADE20K: 0 is "other" (ignored), 1..K are the classes
            table[0] = IGNORE_INDEX
            table[1 : num_classes + 1] = np.arange(num_classes)
        else:
            table[:num_classes] = np.arange(num_classes)
        table[IGNORE_INDEX] = IGNORE_INDEX
        self.table = table

    def describe_valid(self) -> str:
        if self.reduce_zero_label:
            return f"0 (ignored), 1..{self.num_classes} or {IGNORE_INDEX}"
        return f"0..{self.num_classes - 1} or {IGNORE_INDEX} (ignore)"

    def __call__(self, stored: np.ndarray, path: Path) -> np.ndarray:
        # one table lookup once the range is known (an out-of-range value cannot index the table)
        if stored.size and 0 <= stored.min() and stored.max() < len(self.table):
            mapped = np.take(self.table, stored)
        else:
            in_table = (stored >= 0) & (stored < len(self.table))
            mapped = np.where(in_table, self.table[np.clip(stored, 0, len(self.table) - 1)], -1)
        if (mapped < 0).any():
            bad = np.unique(stored[mapped < 0])
            shown = ", ".join(str(v) for v in bad[:8]) + (", ..." if len(bad) > 8 else "")
            raise DataError(
                f"{path}: label value(s) {shown} outside the class list "
                f"({self.num_classes} classes: valid values are {self.describe_valid()})"
            )
        return mapped


# ---- datasets -----------------------------------------------------------------------------


class SegmentationDataset:
    """A sequence of (image uint8 [H, W, 3], label int64 [H, W]) samples.

    Attributes: ``kind`` ("ade20k", "cityscapes", "folder", "synthetic"), ``split``,
    ``class_names`` (one per class id), ``num_classes``, ``default_crop_size`` (h, w).
    """

    kind = "dataset"
    default_crop_size = (512, 512)
    class_names: tuple[str, ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def name(self, index: int) -> str:
        """A short name for the sample (its file stem), for messages and output files."""
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.kind} {self.split}: {len(self)} images, {self.num_classes} classes"


class FileDataset(SegmentationDataset):
    """Image/mask file pairs with a label mapping."""

    def __init__(self, kind: str, split: str, pairs: Sequence[tuple[Path, Path]], class_names: Sequence[str],
                 reduce_zero_label: bool = False, default_crop_size=(512, 512)):
        self.kind = kind
        self.split = split
        self.pairs = list(pairs)
        self.class_names = tuple(class_names)
        self.label_map = LabelMap(len(self.class_names), reduce_zero_label)
        self.default_crop_size = tuple(default_crop_size)

    def __len__(self) -> int:
        return len(self.pairs)

    def name(self, index: int) -> str:
        return self.pairs[index][0].stem

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image_path, mask_path = self.pairs[index]
        image = read_image(image_path)
        label = self.label_map(read_label_file(mask_path), mask_path)
        if image.shape[:2] != label.shape:
            raise DataError(
                f"{mask_path}: mask is {label.shape[1]}x{label.shape[0]} (WxH) but its image {image_path} "
                f"is {image.shape[1]}x{image.shape[0]}"
            )
        return image, label


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _require_images(folder: Path, what: str) -> list[Path]:
    images = _images_in(folder)
    if not images:
        raise DataError(f"{folder}: no {what} images found (looked for {', '.join(IMAGE_SUFFIXES)})")
    return images


def _ade20k(root: Path, split: str) -> FileDataset:
    from .palette import ADE20K_CLASSES

    folder = {"train": "training", "val": "validation"}.get(split, split)
    pairs = []
    for image_path in _require_images(root / "images" / folder, "ADE20K"):
        relative = image_path.relative_to(root / "images" / folder)
        mask_path = (root / "annotations" / folder / relative).with_suffix(".png")
        if not mask_path.is_file():
            raise DataError(f"{image_path}: missing mask (expected {mask_path})")
        pairs.append((image_path, mask_path))
    return FileDataset("ade20k", split, pairs, ADE20K_CLASSES, reduce_zero_label=True, default_crop_size=(512, 512))


def _cityscapes(root: Path, split: str) -> FileDataset:
    from .palette import CITYSCAPES_CLASSES

    pairs = []
    image_root = root / "leftImg8bit" / split
    for image_path in _require_images(image_root, "Cityscapes leftImg8bit"):
        relative = image_path.relative_to(image_root)
        stem = image_path.name.removesuffix(image_path.suffix).removesuffix("_leftImg8bit")
        mask_path = root / "gtFine" / split / relative.parent / f"{stem}_gtFine_labelTrainIds.png"
        if not mask_path.is_file():
            raise DataError(
                f"{image_path}: missing mask (expected {mask_path}; the *_labelTrainIds.png files are made by "
                "cityscapesscripts' createTrainIdLabelImgs)"
            )
        pairs.append((image_path, mask_path))
    return FileDataset("cityscapes", split, pairs, CITYSCAPES_CLASSES, default_crop_size=(1024, 1024))


def read_class_names(path: Path) -> list[str]:
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not names:
        raise DataError(f"{path}: no class names (expected one name a line)")
    if len(names) > IGNORE_INDEX:
        raise DataError(f"{path}: {len(names)} classes; at most {IGNORE_INDEX} fit next to the ignore value 255")
    return names


def _folder(root: Path, split: str, num_classes: int | None) -> FileDataset:
    split_root = root / split
    if not (split_root / "images").is_dir():
        raise DataError(f"{split_root / 'images'}: folder not found (layout: DIR/{{train,val}}/{{images,masks}})")
    masks_root = split_root / "masks"
    pairs = []
    for image_path in _require_images(split_root / "images", "training" if split == "train" else split):
        relative = image_path.relative_to(split_root / "images").with_suffix("")
        candidates = [masks_root / relative.with_suffix(".png")] + [
            masks_root / relative.with_suffix(s) for s in IMAGE_SUFFIXES if s != ".png"
        ]
        mask_path = next((c for c in candidates if c.is_file()), None)
        if mask_path is None:
            raise DataError(f"{image_path}: missing mask (expected {candidates[0]})")
        pairs.append((image_path, mask_path))
    classes_file = root / "classes.txt"
    if classes_file.is_file():
        names = read_class_names(classes_file)
        if num_classes is not None and num_classes != len(names):
            raise DataError(f"{classes_file}: lists {len(names)} classes but {num_classes} were asked for")
    else:
        if num_classes is None:
            num_classes = _count_classes(root / "train" / "masks" if (root / "train" / "masks").is_dir() else masks_root)
        names = [f"class {k}" for k in range(num_classes)]
    return FileDataset("folder", split, pairs, names)


def _count_classes(masks_root: Path) -> int:
    """Without classes.txt or --num-classes: 1 + the largest class id in the masks."""
    largest = -1
    for mask_path in _require_images(masks_root, "mask"):
        values = np.unique(read_label_file(mask_path))
        values = values[values != IGNORE_INDEX]
        if len(values):
            largest = max(largest, int(values.max()))
    if largest < 0:
        raise DataError(f"{masks_root}: every mask is entirely 255 (ignore); cannot tell the number of classes")
    if largest >= IGNORE_INDEX:
        raise DataError(f"{masks_root}: label value {largest} is beyond the 255 ignore value; give --num-classes or classes.txt")
    return largest + 1


def detect_layout(root: Path) -> str:
    """"ade20k", "cityscapes" or "folder", from the folder structure."""
    if (root / "images" / "training").is_dir() and (root / "annotations" / "training").is_dir():
        return "ade20k"
    if (root / "leftImg8bit").is_dir() and (root / "gtFine").is_dir():
        return "cityscapes"
    if (root / "train" / "images").is_dir() or (root / "val" / "images").is_dir():
        return "folder"
    raise DataError(
        f"{root}: unknown dataset layout; expected ADE20K (images/training, annotations/training), Cityscapes "
        "(leftImg8bit, gtFine with *_labelTrainIds.png) or DIR/{train,val}/{images,masks}"
    )


def open_dataset(spec: str | os.PathLike, split: str = "train", num_classes: int | None = None,
                 synthetic_size: int = 128) -> SegmentationDataset:
    """The dataset ``spec`` names: "synthetic" or a folder (layout detected). ``num_classes``
    is needed only by a folder without classes.txt (else it is read from the masks) and is
    checked against the dataset's class count otherwise."""
    if str(spec) == "synthetic":
        dataset = SyntheticShapes(split, size=synthetic_size)
    else:
        root = Path(spec)
        if not root.is_dir():
            raise DataError(f"{root}: dataset folder not found")
        if (root / "ADEChallengeData2016").is_dir():
            root = root / "ADEChallengeData2016"
        layout = detect_layout(root)
        if layout == "ade20k":
            dataset = _ade20k(root, split)
        elif layout == "cityscapes":
            dataset = _cityscapes(root, split)
        else:
            dataset = _folder(root, split, num_classes)
    if num_classes is not None and num_classes != dataset.num_classes:
        raise DataError(f"{spec}: the {dataset.kind} dataset has {dataset.num_classes} classes, not {num_classes}")
    return dataset


def has_split(spec: str | os.PathLike, split: str) -> bool:
    """Whether ``open_dataset(spec, split)`` finds any images (a missing val split is allowed)."""
    try:
        open_dataset(spec, split)
    except DataError:
        return False
    return True


# ---- procedural shapes ---------------------------------------------------------------------

SYNTHETIC_CLASSES = ("background", "circle", "rectangle", "triangle")
# a distinct base colour per shape class (the background is low-saturation texture)
_SHAPE_COLOURS = np.array([[0, 0, 0], [215, 60, 50], [60, 185, 75], [55, 95, 225]], dtype=np.float32)
_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


class SyntheticShapes(SegmentationDataset):
    """Circles, rotated rectangles and triangles in class-specific colours (with jitter and
    noise) on a textured background, with their exact label maps. Sample ``i`` of a split
    depends only on (seed, split, i): the same on every machine and every run."""

    kind = "synthetic"
    class_names = SYNTHETIC_CLASSES

    def __init__(self, split: str = "train", size: int | tuple[int, int] = 128, length: int | None = None, seed: int = 0):
        if split not in _SPLIT_CODES:
            raise DataError(f"synthetic: unknown split {split!r} (train, val or test)")
        self.split = split
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.length = length if length is not None else (1000 if split == "train" else 32)
        self.seed = seed
        self.default_crop_size = self.size

    def __len__(self) -> int:
        return self.length

    def name(self, index: int) -> str:
        return f"synthetic_{self.split}_{index:05d}"

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= index < self.length:
            raise IndexError(f"synthetic {self.split} has {self.length} samples, index {index}")
        rng = np.random.default_rng([self.seed, _SPLIT_CODES[self.split], index])
        height, width = self.size
        y, x = np.mgrid[0:height, 0:width].astype(np.float32)
        image = _texture(rng, x, y)
        label = np.zeros((height, width), dtype=np.int64)
        scale = min(height, width)
        for _ in range(rng.integers(3, 7)):
            cls = int(rng.integers(1, len(SYNTHETIC_CLASSES)))
            centre = rng.uniform([0.1 * width, 0.1 * height], [0.9 * width, 0.9 * height])
            radius = rng.uniform(0.1, 0.25) * scale
            mask = _shape_mask(cls, rng, x - centre[0], y - centre[1], radius)
            colour = _SHAPE_COLOURS[cls] + rng.uniform(-25, 25, size=3)
            shading = 1.0 + 0.15 * ((x - centre[0]) * rng.uniform(-1, 1) + (y - centre[1]) * rng.uniform(-1, 1)) / scale
            image[mask] = colour * shading[mask][:, None]
            label[mask] = cls
        image += rng.normal(0.0, 6.0, size=image.shape)
        return np.clip(image, 0, 255).astype(np.uint8), label


def _texture(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """A low-saturation background: a grey-brown base plus two random sinusoid gratings."""
    base = rng.uniform(70, 170) + rng.uniform(-12, 12, size=3)
    value = np.zeros_like(x)
    for _ in range(2):
        angle, period, phase = rng.uniform(0, math.pi), rng.uniform(8, 40), rng.uniform(0, 2 * math.pi)
        value += rng.uniform(8, 22) * np.sin((x * math.cos(angle) + y * math.sin(angle)) * 2 * math.pi / period + phase)
    return (base[None, None, :] + value[..., None]).astype(np.float32)


def _shape_mask(cls: int, rng: np.random.Generator, dx: np.ndarray, dy: np.ndarray, radius: float) -> np.ndarray:
    angle = rng.uniform(0, 2 * math.pi)
    if cls == 1:  # circle
        return dx * dx + dy * dy <= radius * radius
    if cls == 2:  # rectangle, rotated
        u = dx * math.cos(angle) + dy * math.sin(angle)
        v = -dx * math.sin(angle) + dy * math.cos(angle)
        aspect = rng.uniform(0.45, 1.0)
        return (np.abs(u) <= radius) & (np.abs(v) <= radius * aspect)
    # triangle: inside when on the same side of all three edges
    angles = [angle + k * 2 * math.pi / 3 for k in range(3)]
    corners = [(radius * math.cos(a), radius * math.sin(a)) for a in angles]
    inside = np.ones(dx.shape, dtype=bool)
    for (ax, ay), (bx, by) in zip(corners, corners[1:] + corners[:1]):
        inside &= (bx - ax) * (dy - ay) - (by - ay) * (dx - ax) >= 0
    return inside


def write_sample_files(dataset: SegmentationDataset, indices: Sequence[int], folder: str | os.PathLike) -> list[Path]:
    """Write samples as DIR/images/NAME.png and DIR/masks/NAME.png (e.g. synthetic images to
    run predict on); returns the image paths."""
    from PIL import Image

    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    paths = []
    for index in indices:
        image, label = dataset[index]
        path = folder / "images" / f"{dataset.name(index)}.png"
        Image.fromarray(image).save(path)
        Image.fromarray(label.astype(np.uint8)).save(folder / "masks" / path.name)
        paths.append(path)
    return paths
