"""The training curve and evaluation summary as one PNG (matplotlib, Agg backend).

matplotlib is optional (the ``train`` extra): without it the functions return None and
the caller says the plot was skipped.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def read_log(path: str | os.PathLike) -> list[dict]:
    records = []
    path = Path(path)
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def plot_run(log_path: str | os.PathLike, out_path: str | os.PathLike, metrics: dict | None = None) -> Path | None:
    """Loss and learning rate against step, validation mIoU against step, and (when
    ``metrics`` is given) the per-class IoU of the final evaluation. Returns the PNG path,
    or None when matplotlib is not installed."""
    plt = _pyplot()
    if plt is None:
        return None
    records = read_log(log_path)
    train = [r for r in records if r.get("event") == "train" and _finite(r.get("loss"))]
    val = [r for r in records if r.get("event") == "val" and _finite(r.get("mIoU"))]
    panels = 2 + (metrics is not None)
    figure, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.0))

    loss_axis = axes[0]
    loss_axis.plot([r["step"] for r in train], [r["loss"] for r in train], color="tab:blue", label="loss")
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("training loss", color="tab:blue")
    loss_axis.set_title("training curve")
    loss_axis.grid(alpha=0.3)
    if train:
        lr_axis = loss_axis.twinx()
        lr_axis.plot([r["step"] for r in train], [r["lr"] for r in train], color="tab:orange", alpha=0.7)
        lr_axis.set_ylabel("learning rate", color="tab:orange")
        lr_axis.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))

    val_axis = axes[1]
    val_axis.plot([r["step"] for r in val], [100 * r["mIoU"] for r in val], marker="o", color="tab:green", label="mIoU")
    if val and all(_finite(r.get("aAcc")) for r in val):
        val_axis.plot([r["step"] for r in val], [100 * r["aAcc"] for r in val], marker=".", color="tab:gray", label="aAcc")
    val_axis.set_xlabel("step")
    val_axis.set_ylabel("%")
    val_axis.set_title("validation" if val else "validation (none logged)")
    val_axis.grid(alpha=0.3)
    if val:
        val_axis.legend()

    if metrics is not None:
        _per_class_bars(axes[2], metrics)
    return _save(plt, figure, out_path)


def _per_class_bars(axis, metrics: dict, most: int = 40) -> None:
    """Per-class IoU bars (the ``most`` classes with the most pixels when there are many)."""
    classes = [c for c in metrics["per_class"] if _finite(c.get("IoU"))]
    if len(classes) > most:
        classes = sorted(classes, key=lambda c: -c["pixels"])[:most]
    axis.bar(range(len(classes)), [100 * c["IoU"] for c in classes], color="tab:purple")
    axis.set_xticks(range(len(classes)))
    crowded = len(classes) > 6
    axis.set_xticklabels([c["name"] for c in classes], rotation=60 if crowded else 0, ha="right" if crowded else "center",
                         fontsize=8)
    axis.set_ylim(0, 100)
    axis.set_ylabel("IoU %")
    axis.set_title(f"eval: mIoU {100 * metrics['mIoU']:.1f}  mAcc {100 * metrics['mAcc']:.1f}  aAcc {100 * metrics['aAcc']:.1f}"
                   if all(_finite(metrics.get(k)) for k in ("mIoU", "mAcc", "aAcc")) else "eval")
    axis.grid(alpha=0.3, axis="y")


def plot_eval(metrics: dict, out_path: str | os.PathLike) -> Path | None:
    """Only the per-class IoU summary (for ``segformer eval --plot``)."""
    plt = _pyplot()
    if plt is None:
        return None
    figure, axis = plt.subplots(figsize=(max(5.0, 0.3 * min(40, len(metrics["per_class"]))), 4.0))
    _per_class_bars(axis, metrics)
    return _save(plt, figure, out_path)


def _save(plt, figure, out_path: str | os.PathLike) -> Path:
    """Lay out, write the PNG (creating its folder) and free the figure."""
    figure.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_path, dpi=100)
    plt.close(figure)
    return out_path
