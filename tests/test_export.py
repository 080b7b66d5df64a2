"""segformer export and torch.export: dynamic batch, height and width; ONNX checked with
onnxruntime against PyTorch at sizes other than the traced one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segformer.cli import main
from segformer.export import EXAMPLE_SHAPE, export_program
from tests.helpers import rel_err, tiny_segformer

# other than the traced EXAMPLE_SHAPE, in batch, height and width
SIZES = [(1, 64, 64), (3, 97, 130)]


@pytest.fixture(scope="module")
def model():
    return tiny_segformer().eval()


def test_torch_export_with_dynamic_sizes(model):
    program = export_program(model)
    assert model.kernels == "torch" and not model.training
    for batch, height, width in SIZES:
        images = torch.randn(batch, 3, height, width)
        with torch.no_grad():
            expected = model(images)
        got = program.module()(images)
        assert got.shape == expected.shape and rel_err(got, expected) < 1e-5


def test_symbolic_sizes_pass_validation():
    import segformer_kernels as sk

    def reduce(x, weight, bias, ln_w, ln_b):
        side = int(x.shape[1] ** 0.5)  # a square grid
        return sk.spatial_reduction(x, (side, x.shape[1] // side), weight, bias, ln_w, ln_b, kernels="torch")

    x = torch.randn(2, 64, 8)
    args = (x, torch.randn(8, 8, 2, 2), torch.randn(8), torch.ones(8), torch.zeros(8))
    compiled = torch.compile(reduce, backend="eager", dynamic=True, fullgraph=True)
    assert rel_err(compiled(*args), reduce(*args)) < 1e-6


def test_onnx_export_runs_in_onnxruntime(model, tmp_path):
    pytest.importorskip("onnx", reason="the export extra is not installed")
    pytest.importorskip("onnxscript", reason="the export extra is not installed")
    ort = pytest.importorskip("onnxruntime", reason="the export extra is not installed")
    import onnx

    model.save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "model.onnx"
    assert main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--format", "onnx", "--out", str(out)]) == 0
    graph = onnx.load(str(out))
    assert graph.opset_import[0].version >= 17
    ops = {node.op_type for node in graph.graph.node}
    assert "LayerNormalization" in ops  # one node, not a decomposition
    session = ort.InferenceSession(str(out))
    for batch, height, width in SIZES + [EXAMPLE_SHAPE]:
        images = torch.randn(batch, 3, height, width)
        with torch.no_grad():
            expected = model(images).numpy()
        got = session.run(None, {"images": images.numpy()})[0]
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max())


def test_export_errors_are_one_line(tmp_path, capsys):
    assert main(["export", "--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "m.onnx")]) == 2
    assert "cannot load the model" in capsys.readouterr().err
