"""model.segment: every input kind, labels at each image's own size, preprocessing from the
checkpoint, and pixel-for-pixel agreement with segformer predict."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from segformer import SegFormer
from segformer.cli import main
from segformer.inference import Preprocessing, preprocessing_for
from segformer.transforms import IMAGENET_MEAN, IMAGENET_STD
from tests.helpers import tiny_segformer


@pytest.fixture(scope="module")
def model():
    return tiny_segformer().eval()


def pictures(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size, dtype=np.uint8) for size in ((40, 52, 3), (33, 33, 3), (40, 52, 3))]


def test_every_input_kind_gives_labels_at_the_image_size(model, tmp_path):
    arrays = pictures()
    paths = []
    for i, array in enumerate(arrays):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(array).save(paths[-1])
    from_arrays = model.segment(arrays)
    from_pil = model.segment([Image.fromarray(a) for a in arrays])
    from_paths = model.segment([str(p) for p in paths])
    for labels, array, pil, path in zip(from_arrays, arrays, from_pil, from_paths):
        assert labels.shape == array.shape[:2] and labels.dtype == torch.int64
        assert torch.equal(labels, pil) and torch.equal(labels, path)
    single = model.segment(arrays[1])
    assert torch.equal(single, from_arrays[1])
    labels, probabilities = model.segment(arrays[0], probabilities=True)
    assert probabilities.shape == (4, 40, 52) and torch.allclose(probabilities.sum(0), torch.ones(40, 52), atol=1e-5)
    assert torch.equal(probabilities.argmax(0), labels)
    batch = torch.stack([Preprocessing()(arrays[0]), Preprocessing()(arrays[2])])
    from_tensor = model.segment(batch)
    assert len(from_tensor) == 2 and torch.equal(from_tensor[0], from_arrays[0])


def test_bad_inputs(model):
    with pytest.raises(TypeError, match="images"):
        model.segment(42)
    with pytest.raises(ValueError, match="uint8"):
        model.segment(np.zeros((8, 8), dtype=np.uint8))


def test_preprocessing_from_the_checkpoint(model, tmp_path):
    assert preprocessing_for(None) == Preprocessing(mean=IMAGENET_MEAN, std=IMAGENET_STD)
    hf = tmp_path / "hf"
    model.save_pretrained(hf)
    assert SegFormer.from_pretrained(hf).preprocessing == Preprocessing()  # no preprocessor config: ImageNet
    (hf / "preprocessor_config.json").write_text(json.dumps({
        "do_resize": True, "size": {"height": 64, "width": 48}, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25],
    }))
    loaded = SegFormer.from_pretrained(hf)
    assert loaded.preprocessing == Preprocessing(mean=(0.5,) * 3, std=(0.25,) * 3, rescale=1 / 255, size=(64, 48))
    image = np.full((10, 20, 3), 255, dtype=np.uint8)
    prepared = loaded.preprocessing(image)
    assert prepared.shape == (3, 64, 48) and torch.allclose(prepared, torch.full_like(prepared, 2.0))
    run = tmp_path / "run"
    model.save_pretrained(run)
    (run / "run.json").write_text(json.dumps({"crop_size": [32, 32]}))
    assert SegFormer.from_pretrained(run).preprocessing.scale == (128, 32)


def test_predict_agrees_with_segment_pixel_for_pixel(model, tmp_path):
    run = tmp_path / "run"
    model.save_pretrained(run)
    (run / "run.json").write_text(json.dumps({"crop_size": [36, 36]}))  # resized: the preprocessing matters
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i, array in enumerate(pictures(1)):
        Image.fromarray(array).save(inputs / f"{i}.png")
    assert main(["predict", "--checkpoint", str(run), "--out", str(tmp_path / "out"), "--kernels", "torch",
                 "--no-progress", str(inputs)]) == 0
    loaded = SegFormer.from_pretrained(run, kernels="torch")
    for i, labels in enumerate(loaded.segment(sorted(str(p) for p in inputs.iterdir()))):
        written = np.asarray(Image.open(tmp_path / "out" / f"{i}_label.png"))
        assert np.array_equal(written, labels.numpy())
