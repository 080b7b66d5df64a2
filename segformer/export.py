"""Export a model for deployment: ONNX (onnxruntime, TensorRT) or a torch.export program,
with dynamic batch, height and width.

    segformer export --checkpoint runs/ade-b0 --format onnx --out model.onnx
    program = export_program(model)                  # torch.export.ExportedProgram
    export_onnx(model, "model.onnx")                 # opset 18: LayerNorm is one node

Both trace the PyTorch reference path (kernels="torch"): the Triton kernels are for
running the model in PyTorch, not part of what an exported graph can carry. The example
traced is EXAMPLE_SHAPE, whose sizes divide by nothing in particular, so no size gets
specialised; the graph is valid for batch >= 1 and H, W >= MIN_EXPORT_SIZE.
"""

from __future__ import annotations

import importlib.util
import os
from contextlib import contextmanager
from pathlib import Path

import torch

EXAMPLE_SHAPE = (2, 150, 170)  # batch, height, width of the traced example
MIN_EXPORT_SIZE = 64  # smallest H, W the graph takes: every stage's reduced grid is then wider than one cell
ONNX_OPSET = 18
EXPORT_PACKAGES = ("onnx", "onnxscript", "onnxruntime")


def missing_export_packages() -> list[str]:
    return [name for name in EXPORT_PACKAGES if importlib.util.find_spec(name) is None]


@contextmanager
def _reference_path(model):
    """The model in eval mode on the reference path for the trace; restored afterwards."""
    kernels, training = model.kernels, model.training
    model.kernels = "torch"
    model.eval()
    try:
        yield model
    finally:
        model.kernels = kernels
        model.train(training)


def _example(model) -> tuple[torch.Tensor]:
    batch, height, width = EXAMPLE_SHAPE
    weight = next(model.parameters())
    return (torch.randn(batch, model.config.num_channels, height, width, device=weight.device, dtype=weight.dtype),)


def _dynamic_shapes():
    dynamic = torch.export.Dim.DYNAMIC
    return {"images": {0: dynamic, 2: dynamic, 3: dynamic}}


def export_program(model) -> "torch.export.ExportedProgram":
    """torch.export of ``model`` (a SegFormer) with dynamic batch, height and width."""
    with _reference_path(model):
        return torch.export.export(model, _example(model), dynamic_shapes=_dynamic_shapes())


def export_onnx(model, path: str | os.PathLike, opset: int = ONNX_OPSET) -> Path:
    """Write ``model`` as ONNX: input "images" [B, 3, H, W] float, output "logits"
    [B, K, ceil(H/4), ceil(W/4)], B, H and W dynamic. Needs the ``export`` extra."""
    missing = missing_export_packages()
    if missing:
        raise ImportError(f"ONNX export needs {', '.join(missing)}: pip install 'segformer-kernels[export]'")
    if opset < 17:
        raise ValueError(f"opset must be >= 17 (LayerNormalization is an op from 17 on), got {opset}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _reference_path(model):
        torch.onnx.export(
            model, _example(model), str(path), dynamo=True, opset_version=opset, dynamic_shapes=_dynamic_shapes(),
            input_names=["images"], output_names=["logits"], external_data=False,
        )
    return path
