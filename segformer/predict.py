"""Predict label maps for image files: a label PNG and a colour overlay per image, batched.

    written = predict(model, ["photos/", "x.jpg"], "out/", palette=palette_for(150))

Images of the same (resized) size are batched together; each image's logits are resized
back to its own size before the argmax. The label PNG is a palette PNG whose pixel values
are the class ids (so it opens as a colour picture and reads back as ids); with more than
256 classes it is a 16-bit greyscale PNG.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from .data import IMAGE_SUFFIXES, DataError, image_size, read_image
from .evaluate import model_logits, out_of_memory_error
from .palette import colourise
from .runtime import progress_bar
from .inference import Preprocessing, batches_by_size, labels_from_logits


def collect_images(inputs: Iterable[str | os.PathLike], skip: str | os.PathLike | None = None) -> list[tuple[Path, str]]:
    """(image path, output name) for every file given and every image under every folder
    given, except those under ``skip`` (the output folder: earlier outputs are not inputs);
    the output name is the stem, or the path inside the folder without suffix. A name
    taken twice gets -2, -3, ... appended, skipping any name an input already has."""
    skipped = Path(skip).resolve() if skip is not None else None
    found: list[tuple[Path, str]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            images = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if skipped is not None:
                images = [p for p in images if not p.resolve().is_relative_to(skipped)]
            if not images:
                raise DataError(f"{path}: no images found (looked for {', '.join(IMAGE_SUFFIXES)}"
                                + ("; the output folder is not read)" if skipped is not None else ")"))
            found += [(p, p.relative_to(path).with_suffix("").as_posix()) for p in images]
        elif path.is_file():
            found.append((path, path.stem))
        else:
            raise DataError(f"{path}: no such file or folder")
    taken = {name for _, name in found}
    used: set[str] = set()
    named = []
    for path, name in found:
        unique, count = name, 1
        while unique in used or (unique != name and unique in taken):
            count += 1
            unique = f"{name}-{count}"
        used.add(unique)
        named.append((path, unique))
    return named


def save_label_png(labels: np.ndarray, palette: np.ndarray, path: Path) -> None:
    from PIL import Image

    if labels.max(initial=0) < 256:
        height, width = labels.shape
        picture = Image.frombytes("P", (width, height), np.ascontiguousarray(labels, dtype=np.uint8).tobytes())
        flat = np.zeros((256, 3), dtype=np.uint8)
        flat[: min(256, len(palette))] = palette[:256]
        picture.putpalette(flat.reshape(-1).tolist())
    else:
        picture = Image.fromarray(labels.astype(np.uint16))
    picture.save(path)


def save_overlay_png(image: np.ndarray, labels: np.ndarray, palette: np.ndarray, path: Path, alpha: float = 0.5) -> None:
    from PIL import Image

    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * colourise(labels, palette).astype(np.float32)
    Image.fromarray(np.clip(blended + 0.5, 0, 255).astype(np.uint8)).save(path)


def predict(model, inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike, *, palette: np.ndarray,
            preprocessing: Preprocessing | None = None, batch_size: int = 8, precision: str = "fp32",
            progress: bool = False) -> list[dict]:
    """Write OUT/NAME_label.png and OUT/NAME_overlay.png for every input image; returns one
    {"image", "label", "overlay", "size"} record per image in input order. ``preprocessing``
    (default: the model's, see ``segformer.inference``) prepares the images; the labels are
    those ``model.segment`` gives for the same files. Earlier outputs under ``out_dir`` are
    not read as inputs."""
    images = collect_images(inputs, skip=out_dir)
    out_dir = Path(out_dir)
    preprocessing = preprocessing or getattr(model, "preprocessing", None) or Preprocessing()
    device = next(model.parameters()).device
    model.eval()
    sizes = [preprocessing.model_size(*image_size(path)) for path, _ in images]
    records: list[dict | None] = [None] * len(images)
    bar = progress_bar(total=len(images), desc="predict", unit="img", leave=False) if progress else None
    for batch in batches_by_size(sizes, batch_size):
        try:
            pictures = [read_image(images[p][0]) for p in batch]
            inputs_t = torch.stack([preprocessing(picture) for picture in pictures]).to(device)
            logits = model_logits(model, inputs_t, precision)
        except (MemoryError, torch.OutOfMemoryError) as error:
            raise out_of_memory_error(images[batch[0]][0], image_size(images[batch[0]][0]), error) from None
        for position, picture, image_logits in zip(batch, pictures, logits):
            path, name = images[position]
            size = picture.shape[:2]
            try:
                labels = labels_from_logits(image_logits, size, probabilities=False).cpu().numpy()
            except (MemoryError, torch.OutOfMemoryError) as error:
                raise out_of_memory_error(path, size, error) from None
            label_path, overlay_path = out_dir / f"{name}_label.png", out_dir / f"{name}_overlay.png"
            label_path.parent.mkdir(parents=True, exist_ok=True)
            save_label_png(labels, palette, label_path)
            save_overlay_png(picture, labels, palette, overlay_path)
            records[position] = {"image": str(path), "label": str(label_path), "overlay": str(overlay_path),
                                 "size": [int(size[0]), int(size[1])]}
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    return records
