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
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

IGNORE_INDEX = 255
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
CHECK_PROGRESS_FROM = 2000  # pairs; checking fewer headers takes about a second


class DataError(Exception):
    """Bad input: data, a checkpoint or an option. The message names the file (or folder,
    or option) and what is wrong with it; the CLI prints it as one line and exits with 2."""


# ---- reading files --------------------------------------------------------------------------


# mask modes that hold one channel of class ids (RGB masks are accepted when the channels agree)
MASK_MODES = ("L", "P", "I", "I;16", "I;16B", "I;16L", "1")
# one-channel images deeper than 8 bits: scaled to 8 bits when read as a picture
WIDE_IMAGE_MODES = {"I;16": 65535, "I;16B": 65535, "I;16L": 65535, "I;16N": 65535, "I": 65535}
# EXIF orientations that swap width and height (transposed or rotated by 90 degrees)
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)
_EXIF_ORIENTATION = 0x0112


def _cannot_read(path: Path, error: Exception) -> DataError:
    reason = str(error).replace(f" {str(path)!r}", "").replace(str(path), "").strip() or type(error).__name__
    return DataError(f"{path}: cannot read image ({reason})")


def _open_image(path: Path, decode: bool = True):
    """The PIL image (decoded now unless ``decode`` is False: then only the header is read)."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(path)
        if decode:
            image.load()  # decode now: a truncated file fails here, not later
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except Image.DecompressionBombError as error:
        raise DataError(f"{path}: image too large to read safely ({error})") from None
    except MemoryError:
        raise DataError(f"{path}: out of memory decoding this image; resize it") from None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as error:
        raise _cannot_read(path, error) from None
    return image


def _orientation(image) -> int:
    try:
        return int(image.getexif().get(_EXIF_ORIENTATION, 1))
    except (OSError, ValueError, SyntaxError, TypeError):  # a broken EXIF block: keep the stored view
        return 1


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) of an image as it is displayed (EXIF orientation applied), from its header."""
    path = Path(path)
    with _open_image(path, decode=False) as image:
        width, height = image.size
        if _orientation(image) in _TRANSPOSING_ORIENTATIONS:
            width, height = height, width
    return height, width


def read_image(path: str | os.PathLike) -> np.ndarray:
    """An RGB image as uint8 [H, W, 3] as it is displayed: the EXIF orientation is applied;
    grey, palette and RGBA images are converted; 16-bit grey is scaled to 8 bits."""
    from PIL import ImageOps

    path = Path(path)
    image = _open_image(path)
    if _orientation(image) != 1:
        try:
            image = ImageOps.exif_transpose(image)
        except (OSError, ValueError, SyntaxError, TypeError) as error:
            raise _cannot_read(path, error) from None
    if image.mode in WIDE_IMAGE_MODES:
        # shown once per process (the text does not change), not once per image
        warnings.warn("note: 16-bit images are scaled to 8 bits (value * 255 / 65535)", stacklevel=2)
        full_scale = WIDE_IMAGE_MODES[image.mode]
        grey = np.rint(np.asarray(image).astype(np.float64).clip(0, full_scale) * (255 / full_scale)).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    return np.array(image if image.mode == "RGB" else image.convert("RGB"))


def _check_mask_mode(image, path: Path) -> None:
    if image.mode not in MASK_MODES + ("RGB", "RGBA"):
        raise DataError(f"{path}: mask has image mode {image.mode}; expected one channel of class ids")


def read_label_file(path: str | os.PathLike) -> np.ndarray:
    """A label map as stored ([H, W] in the file's integer type: uint8 for 8-bit masks; no
    EXIF orientation): one channel of class ids, a palette PNG's indices, or an RGB image
    whose three channels are equal. A colour-coded mask is refused."""
    path = Path(path)
    image = _open_image(path)
    _check_mask_mode(image, path)
    if image.mode in ("RGB", "RGBA"):
        values = np.asarray(image)[..., :3]
        if not ((values[..., 0] == values[..., 1]).all() and (values[..., 1] == values[..., 2]).all()):
            raise DataError(
                f"{path}: mask is a colour image (mode {image.mode}); expected one channel of class ids "
                "(a greyscale or palette PNG)"
            )
        return np.array(values[..., 0])
    return np.array(image)


def _size_mismatch(image_path: Path, image_hw, mask_path: Path, mask_hw) -> DataError:
    return DataError(f"{mask_path}: mask is {mask_hw[1]}x{mask_hw[0]} (WxH) but its image {image_path} is "
                     f"{image_hw[1]}x{image_hw[0]} (as displayed, EXIF orientation applied)")


def problems_error(problems: Sequence[str], where: str, shown: int = 10) -> DataError:
    """One DataError listing several problems (the first ``shown`` of them) on one line."""
    if len(problems) == 1:
        return DataError(problems[0])
    listed = "; ".join(problems[:shown]) + (f"; and {len(problems) - shown} more" if len(problems) > shown else "")
    return DataError(f"{len(problems)} problems in {where}: {listed}")


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
        """Class ids, uint8 where the stored map is uint8 and the ids fit (fewer than 255
        classes), else int64."""
        if stored.dtype == np.uint8 and self.num_classes < IGNORE_INDEX:
            # uint8 passes only: a range check (the largest valid stored value is the last class),
            # then the shift by one of reduce_zero_label (0 wraps to 255, the ignore value)
            last = self.num_classes if self.reduce_zero_label else self.num_classes - 1
            if stored.max() > last:
                invalid = (stored > last) & (stored != IGNORE_INDEX)
                self._check(invalid, stored, path)
            if not self.reduce_zero_label:
                return stored
            return np.where(stored == IGNORE_INDEX, stored, stored - np.uint8(1))
        # one table lookup once the range is known (an out-of-range value cannot index the table)
        if stored.size and 0 <= stored.min() and stored.max() < len(self.table):
            mapped = np.take(self.table, stored)
        else:
            in_table = (stored >= 0) & (stored < len(self.table))
            mapped = np.where(in_table, self.table[np.clip(stored, 0, len(self.table) - 1)], -1)
        self._check(mapped < 0, stored, path)
        return mapped

    def _check(self, invalid: np.ndarray, values: np.ndarray, path: Path) -> None:
        """Raise naming the stored ``values`` where ``invalid`` holds."""
        if invalid.any():
            bad = np.unique(values[invalid])
            shown = ", ".join(str(v) for v in bad[:8]) + (", ..." if len(bad) > 8 else "")
            raise DataError(
                f"{path}: label value(s) {shown} outside the class list "
                f"({self.num_classes} classes: valid values are {self.describe_valid()})"
            )


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
            raise _size_mismatch(image_path, image.shape[:2], mask_path, label.shape)
        return image, label

    def check_pair(self, index: int) -> str | None:
        """What is wrong with pair ``index`` that the file headers show (unreadable image or
        mask, a mask mode without class ids, sizes that differ), or None; nothing is decoded."""
        image_path, mask_path = self.pairs[index]
        try:
            image_hw = image_size(image_path)
            with _open_image(mask_path, decode=False) as mask:
                _check_mask_mode(mask, mask_path)
                mask_hw = mask.size[1], mask.size[0]
            if image_hw != mask_hw:
                raise _size_mismatch(image_path, image_hw, mask_path, mask_hw)
        except DataError as error:
            return str(error)
        return None


def check_datasets(datasets: Sequence[SegmentationDataset], rank: int = 0, world_size: int = 1,
                   progress: bool = False) -> list[str]:
    """The problems of every image/mask pair of ``datasets`` that the headers show (this
    process's share: every world_size-th pair from ``rank``), in dataset order."""
    work = [(dataset, index) for dataset in datasets if isinstance(dataset, FileDataset)
            for index in range(len(dataset))][rank::world_size]
    bar = None
    if progress and len(work) >= CHECK_PROGRESS_FROM:
        from .runtime import progress_bar

        bar = progress_bar(total=len(work), desc="checking data", unit="pair", leave=False)
    problems = []
    for dataset, index in work:
        problem = dataset.check_pair(index)
        if problem is not None:
            problems.append(problem)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return problems


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _require_images(folder: Path, what: str) -> list[Path]:
    images = _images_in(folder)
    if not images:
        raise DataError(f"{folder}: no {what} images found (looked for {', '.join(IMAGE_SUFFIXES)})")
    return images


def _pair_up(images: Sequence[Path], mask_candidates, hint: str = "") -> list[tuple[Path, Path]]:
    """(image, mask) pairs, the mask being the first existing one of ``mask_candidates(image)``;
    images without a mask are all reported at once."""
    pairs, missing = [], []
    for image_path in images:
        candidates = mask_candidates(image_path)
        mask_path = next((c for c in candidates if c.is_file()), None)
        if mask_path is None:
            missing.append(f"{image_path}: missing mask (expected {candidates[0]}{hint})")
        else:
            pairs.append((image_path, mask_path))
    if missing:
        raise problems_error(missing, "the dataset")
    return pairs


def _ade20k(root: Path, split: str) -> FileDataset:
    from .palette import ADE20K_CLASSES

    image_root = _split_images_folder(root, "ade20k", split)
    masks_root = root / "annotations" / image_root.name
    pairs = _pair_up(_require_images(image_root, "ADE20K"),
                     lambda image: [(masks_root / image.relative_to(image_root)).with_suffix(".png")])
    return FileDataset("ade20k", split, pairs, ADE20K_CLASSES, reduce_zero_label=True, default_crop_size=(512, 512))


def _cityscapes(root: Path, split: str) -> FileDataset:
    from .palette import CITYSCAPES_CLASSES

    image_root = _split_images_folder(root, "cityscapes", split)

    def mask_candidates(image_path: Path) -> list[Path]:
        stem = image_path.name.removesuffix(image_path.suffix).removesuffix("_leftImg8bit")
        return [root / "gtFine" / split / image_path.relative_to(image_root).parent / f"{stem}_gtFine_labelTrainIds.png"]

    pairs = _pair_up(_require_images(image_root, "Cityscapes leftImg8bit"), mask_candidates,
                     "; the *_labelTrainIds.png files are made by cityscapesscripts' createTrainIdLabelImgs")
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

    def mask_candidates(image_path: Path) -> list[Path]:
        relative = image_path.relative_to(split_root / "images").with_suffix("")
        return [masks_root / relative.with_suffix(".png")] + [
            masks_root / relative.with_suffix(s) for s in IMAGE_SUFFIXES if s != ".png"
        ]

    pairs = _pair_up(_require_images(split_root / "images", "training" if split == "train" else split), mask_candidates)
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


def _dataset_root(spec: str | os.PathLike) -> Path:
    root = Path(spec)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found")
    if (root / "ADEChallengeData2016").is_dir():
        root = root / "ADEChallengeData2016"
    return root


def _split_images_folder(root: Path, layout: str, split: str) -> Path:
    if layout == "ade20k":
        return root / "images" / {"train": "training", "val": "validation"}.get(split, split)
    if layout == "cityscapes":
        return root / "leftImg8bit" / split
    return root / split / "images"


def open_dataset(spec: str | os.PathLike, split: str = "train", num_classes: int | None = None,
                 synthetic_size: int = 128) -> SegmentationDataset:
    """The dataset ``spec`` names: "synthetic" or a folder (layout detected). ``num_classes``
    is needed only by a folder without classes.txt (else it is read from the masks) and is
    checked against the dataset's class count otherwise."""
    if str(spec) == "synthetic":
        dataset = SyntheticShapes(split, size=synthetic_size)
    else:
        root = _dataset_root(spec)
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
    """Whether the dataset has images for ``split`` (a missing val split is allowed; a split
    that is there but broken is not: open_dataset reports it)."""
    if str(spec) == "synthetic":
        return split in _SPLIT_CODES
    try:
        root = _dataset_root(spec)
        folder = _split_images_folder(root, detect_layout(root), split)
    except DataError:
        return False
    return folder.is_dir() and bool(_images_in(folder))


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
