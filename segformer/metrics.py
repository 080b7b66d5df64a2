"""Segmentation metrics from a confusion matrix: mIoU, mAcc, aAcc and per-class IoU/Acc.

The matrix is accumulated with one ``torch.bincount`` per batch (rows: ground truth,
columns: prediction), so it sums across batches and, with an all-reduce, across ranks.
A class that never occurs in the ground truth and is never predicted has no IoU (NaN,
left out of the means, ``null`` in JSON), as in the mmsegmentation convention.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .data import IGNORE_INDEX


def confusion_matrix(pred: torch.Tensor, label: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """[K, K] int64 counts, entry (t, p) = pixels of true class t predicted as p.

    ``pred`` and ``label`` are integer tensors of the same shape; pixels whose label is
    ``ignore_index`` are left out. Any other label outside [0, K) is an error (a dataset bug).
    """
    if pred.shape != label.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} != label shape {tuple(label.shape)}")
    label = label.reshape(-1).long()
    pred = pred.reshape(-1).long()
    valid = label != ignore_index
    label, pred = label[valid], pred[valid]
    if label.numel() and (label.min() < 0 or label.max() >= num_classes):
        raise ValueError(f"label values must be in [0, {num_classes}) or {ignore_index}; "
                         f"got {label.min().item()}..{label.max().item()}")
    if pred.numel() and (pred.min() < 0 or pred.max() >= num_classes):
        raise ValueError(f"predictions must be in [0, {num_classes})")
    counts = torch.bincount(label * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def metrics_from_confusion(matrix: torch.Tensor, class_names: Sequence[str] | None = None) -> dict:
    """``{"mIoU", "mAcc", "aAcc", "per_class": [{"class", "name", "IoU", "Acc", "pixels"}]}``,
    fractions in [0, 1]; NaN where a class has no pixels (IoU: not in truth nor prediction)."""
    matrix = matrix.double().cpu()
    num_classes = matrix.shape[0]
    if class_names is None:
        class_names = [str(k) for k in range(num_classes)]
    true_positive = matrix.diagonal()
    label_pixels = matrix.sum(dim=1)
    predicted_pixels = matrix.sum(dim=0)
    union = label_pixels + predicted_pixels - true_positive
    per_class = []
    for k in range(num_classes):
        iou = true_positive[k].item() / union[k].item() if union[k] > 0 else float("nan")
        acc = true_positive[k].item() / label_pixels[k].item() if label_pixels[k] > 0 else float("nan")
        per_class.append({"class": k, "name": class_names[k], "IoU": iou, "Acc": acc, "pixels": int(label_pixels[k].item())})
    total = matrix.sum().item()
    return {
        "mIoU": _nanmean([c["IoU"] for c in per_class]),
        "mAcc": _nanmean([c["Acc"] for c in per_class]),
        "aAcc": true_positive.sum().item() / total if total else float("nan"),
        "per_class": per_class,
    }


def json_safe(value):
    """Replace NaN/inf floats (not valid JSON) by None, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def format_table(metrics: dict) -> str:
    """The summary and per-class table as text (percentages)."""

    def pct(v):
        return "   n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:6.2f}"

    width = max([len("class")] + [len(c["name"]) for c in metrics["per_class"]])
    lines = [f"{'class':<{width}}    IoU    Acc   pixels"]
    for c in metrics["per_class"]:
        lines.append(f"{c['name']:<{width}} {pct(c['IoU'])} {pct(c['Acc'])} {c['pixels']:>8d}")
    lines.append(f"mIoU {pct(metrics['mIoU'])}   mAcc {pct(metrics['mAcc'])}   aAcc {pct(metrics['aAcc'])}")
    return "\n".join(lines)
