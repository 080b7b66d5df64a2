"""Inference and evaluation (whole / slide / scales / flip) and prediction files."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from segformer import SegFormer
from segformer.cli import main
from segformer.data import SyntheticShapes, open_dataset
from segformer.evaluate import evaluate, segment, window_origins
from segformer.palette import ADE20K_PALETTE, CITYSCAPES_PALETTE, generated_palette, palette_for
from segformer.predict import predict


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return SegFormer.from_config("b0", num_classes=4, kernels="torch").eval()


def save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


def test_window_origins_cover_and_end_flush():
    assert window_origins(100, 40, 30) == [0, 30, 60]
    assert window_origins(64, 64, 42) == [0]
    assert window_origins(50, 80, 20) == [0]  # a window larger than the image is clamped to it
    for length, crop, stride in [(97, 32, 21), (512, 512, 341), (1000, 300, 200)]:
        starts = window_origins(length, crop, stride)
        assert starts[0] == 0 and starts[-1] + crop == length
        assert all(b - a <= stride for a, b in zip(starts, starts[1:]))  # no gaps


def test_slide_equals_whole_when_one_window_covers_the_image(model):
    image, _ = SyntheticShapes("val", size=(64, 48))[0]
    whole = segment(model, image, mode="whole")
    for crop in [(64, 48), (96, 96)]:
        slide = segment(model, image, mode="slide", crop_size=crop, stride=(32, 32))
        assert slide.shape == (4, 64, 48)
        torch.testing.assert_close(slide, whole, rtol=0, atol=1e-6)
    # overlapping windows give a different (but still normalised) result
    tiled = segment(model, image, mode="slide", crop_size=(32, 32), stride=(16, 16))
    assert not torch.allclose(tiled, whole, atol=1e-3)
    torch.testing.assert_close(tiled.sum(dim=0), torch.ones(64, 48), rtol=0, atol=1e-5)


def test_evaluate_slide_equals_whole_and_scales_flip_run(model):
    dataset = SyntheticShapes("val", size=64, length=3)
    whole = evaluate(model, dataset, mode="whole", crop_size=(64, 64))
    slide = evaluate(model, dataset, mode="slide", crop_size=(64, 64))
    assert whole == slide
    augmented = evaluate(model, dataset, crop_size=(64, 64), scales=(0.75, 1.25), flip=True)
    assert 0.0 <= augmented["mIoU"] <= 1.0 and len(augmented["per_class"]) == 4


def test_evaluate_scores_against_each_labels_own_size(tmp_path):
    """A model that always predicts class 0, on images of different sizes: the metrics follow
    from the label counts alone."""
    masks = {"a": np.array([[0, 1, 255], [0, 0, 1]]).repeat(13, 0).repeat(16, 1),  # 26x48
             "b": np.pad(np.zeros((37, 41)), ((0, 0), (0, 12)), constant_values=2)}  # 37x53
    for name, mask in masks.items():
        save(tmp_path / "val" / "images" / f"{name}.png", np.random.default_rng(0).integers(0, 256, (*mask.shape, 3)))
        save(tmp_path / "val" / "masks" / f"{name}.png", mask)
    (tmp_path / "classes.txt").write_text("zero\none\ntwo\nthree\n")
    constant = SegFormer.from_config("b0", num_classes=4, kernels="torch")
    with torch.no_grad():
        constant.decode_head.classifier.weight.zero_()
        constant.decode_head.classifier.bias.copy_(torch.tensor([5.0, 0.0, 0.0, 0.0]))
    labels = np.concatenate([m.ravel() for m in masks.values()])
    counts = [(labels == k).sum() for k in range(3)]
    valid = sum(counts)
    metrics = evaluate(constant, open_dataset(tmp_path, "val"), crop_size=(32, 32))
    assert metrics["aAcc"] == pytest.approx(counts[0] / valid)
    ious = [c["IoU"] for c in metrics["per_class"]]
    assert ious[:3] == pytest.approx([counts[0] / valid, 0.0, 0.0]) and np.isnan(ious[3])
    assert metrics["mIoU"] == pytest.approx(counts[0] / valid / 3)
    assert metrics["mAcc"] == pytest.approx(1 / 3)
    assert [c["pixels"] for c in metrics["per_class"]] == [*counts, 0]


def test_predict_writes_label_and_overlay_per_image(model, tmp_path):
    sizes = [(64, 48), (40, 72), (64, 48)]
    for i, (h, w) in enumerate(sizes):
        save(tmp_path / "in" / "sub" / f"img{i}.png", np.random.default_rng(i).integers(0, 256, (h, w, 3)))
    single = tmp_path / "tiny.jpg"  # below the model's 29 px minimum: padded for the model, cropped back
    save(single, np.random.default_rng(9).integers(0, 256, (12, 20, 3)))
    palette = palette_for(4)
    records = predict(model, [tmp_path / "in", single], tmp_path / "out", palette=palette, batch_size=2)
    assert [r["image"] for r in records] == [str(tmp_path / "in" / "sub" / f"img{i}.png") for i in range(3)] + [str(single)]
    for record, (h, w) in zip(records, sizes + [(12, 20)]):
        label_png, overlay_png = Image.open(record["label"]), Image.open(record["overlay"])
        assert label_png.mode == "P" and label_png.size == (w, h)
        assert overlay_png.mode == "RGB" and overlay_png.size == (w, h)
        assert np.asarray(label_png).max() < 4
        assert np.array_equal(np.asarray(label_png.getpalette(), dtype=np.uint8).reshape(-1, 3)[:4], palette)
    assert records[0]["label"].endswith("out/sub/img0_label.png")
    # batching does not change the result
    alone = predict(model, [records[2]["image"]], tmp_path / "alone", palette=palette, batch_size=1)
    assert np.array_equal(np.asarray(Image.open(alone[0]["label"])), np.asarray(Image.open(records[2]["label"])))


def test_palettes():
    assert ADE20K_PALETTE.shape == (150, 3) and CITYSCAPES_PALETTE.shape == (19, 3)
    assert palette_for(150) is ADE20K_PALETTE and palette_for(19, "cityscapes") is CITYSCAPES_PALETTE
    assert palette_for(19, "folder").shape == (19, 3) and palette_for(19, "folder") is not CITYSCAPES_PALETTE
    assert CITYSCAPES_PALETTE[0].tolist() == [128, 64, 128] and ADE20K_PALETTE[0].tolist() == [120, 120, 120]
    generated = generated_palette(40)
    assert len({tuple(c) for c in generated.tolist()}) == 40


def test_eval_command_writes_json(model, tmp_path, capsys):
    model.save_pretrained(tmp_path / "model")
    code = main(["eval", "--checkpoint", str(tmp_path / "model"), "--data", "synthetic", "--crop-size", "96",
                 "--mode", "slide", "--stride", "64", "--kernels", "torch", "--json", str(tmp_path / "m.json"),
                 "--no-progress", "--no-resize"])
    assert code == 0
    out = capsys.readouterr().out
    assert "mIoU" in out and "background" in out
    data = json.loads((tmp_path / "m.json").read_text())
    assert set(data) == {"mIoU", "mAcc", "aAcc", "per_class"} and len(data["per_class"]) == 4
    code = main(["eval", "--checkpoint", str(tmp_path / "nothing"), "--data", "synthetic"])
    assert code == 2 and "cannot load the model" in capsys.readouterr().err
