"""Datasets (layouts, label mapping, bad data) and the training transform."""

import numpy as np
import pytest
import torch
from PIL import Image

from segformer.cli import main
from segformer.data import DataError, SyntheticShapes, open_dataset
from segformer.transforms import (
    PAD_PIXEL, TrainTransform, base_scale, normalize, rescaled_size,
)


def save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


def image(h=40, w=48, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3))


def folder_dataset(root, masks, classes=None, split="train"):
    """DIR/{split}/{images,masks}/NAME.png for each (name, mask array)."""
    for name, mask in masks.items():
        save(root / split / "images" / f"{name}.png", image(*mask.shape))
        save(root / split / "masks" / f"{name}.png", mask)
    if classes:
        (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return root


# ---- synthetic ---------------------------------------------------------------------------------


def test_synthetic_is_deterministic_and_labelled():
    a, b = SyntheticShapes("train", size=64), SyntheticShapes("train", size=64)
    image0, label0 = a[3]
    image1, label1 = b[3]
    assert image0.dtype == np.uint8 and image0.shape == (64, 64, 3) and label0.shape == (64, 64)
    assert np.array_equal(image0, image1) and np.array_equal(label0, label1)
    assert not np.array_equal(a[4][0], image0)
    assert not np.array_equal(SyntheticShapes("val", size=64)[3][0], image0)
    assert set(np.unique(label0)) <= {0, 1, 2, 3}
    # the shapes carry their class colour: circles red, rectangles green, triangles blue
    colours = {c: [] for c in (1, 2, 3)}
    for i in range(20):
        picture, label = a[i]
        for c in colours:
            if (label == c).sum() > 20:
                colours[c].append(picture[label == c].mean(axis=0))
    for c, channel in ((1, 0), (2, 1), (3, 2)):
        mean = np.mean(colours[c], axis=0)
        assert mean.argmax() == channel, (c, mean)


# ---- layouts ----------------------------------------------------------------------------------


def test_ade20k_layout_reduces_the_zero_label(tmp_path):
    mask = np.array([[0, 1, 150, 255]] * 4)
    save(tmp_path / "images" / "training" / "a.jpg", image(4, 4))
    save(tmp_path / "annotations" / "training" / "a.png", mask)
    dataset = open_dataset(tmp_path, "train")
    assert dataset.kind == "ade20k" and dataset.num_classes == 150 and dataset.class_names[0] == "wall"
    _, label = dataset[0]
    assert label[0].tolist() == [255, 0, 149, 255]

    save(tmp_path / "annotations" / "training" / "a.png", np.full((4, 4), 151))
    with pytest.raises(DataError, match=r"a\.png.*151"):
        dataset[0]


def test_cityscapes_layout(tmp_path):
    stem = "aachen_000000_000019"
    save(tmp_path / "leftImg8bit" / "train" / "aachen" / f"{stem}_leftImg8bit.png", image(8, 16))
    mask_path = tmp_path / "gtFine" / "train" / "aachen" / f"{stem}_gtFine_labelTrainIds.png"
    save(mask_path, np.array([[0, 18, 255, 5] * 4] * 8))
    dataset = open_dataset(tmp_path, "train")
    assert dataset.kind == "cityscapes" and dataset.num_classes == 19
    assert dataset.default_crop_size == (1024, 1024)
    assert set(np.unique(dataset[0][1])) == {0, 5, 18, 255}
    mask_path.unlink()
    with pytest.raises(DataError, match="labelTrainIds"):
        open_dataset(tmp_path, "train")


def test_folder_layout_with_and_without_classes(tmp_path):
    masks = {"x": np.array([[0, 1], [2, 255]]).repeat(8, 0).repeat(8, 1), "y": np.zeros((16, 16))}
    folder_dataset(tmp_path, masks)
    dataset = open_dataset(tmp_path, "train")
    assert dataset.kind == "folder" and dataset.num_classes == 3  # read from the masks
    assert [dataset.name(i) for i in range(2)] == ["x", "y"]
    (tmp_path / "classes.txt").write_text("sky\nroad\ncar\nperson\n")
    dataset = open_dataset(tmp_path, "train")
    assert dataset.class_names == ("sky", "road", "car", "person")
    with pytest.raises(DataError, match="classes.txt"):
        open_dataset(tmp_path, "train", num_classes=5)


def test_unknown_layout_and_missing_folder(tmp_path):
    with pytest.raises(DataError, match="unknown dataset layout"):
        open_dataset(tmp_path, "train")
    with pytest.raises(DataError, match="not found"):
        open_dataset(tmp_path / "nope", "train")


# ---- bad data: each case names the file and the problem ----------------------------------------


def test_unreadable_image(tmp_path):
    folder_dataset(tmp_path, {"good": np.zeros((8, 8))}, classes=["a", "b"])
    (tmp_path / "train" / "images" / "good.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError, match=r"good\.png: cannot read image"):
        open_dataset(tmp_path, "train")[0]


def test_missing_mask(tmp_path):
    folder_dataset(tmp_path, {"a": np.zeros((8, 8))}, classes=["a", "b"])
    save(tmp_path / "train" / "images" / "lonely.png", image(8, 8))
    with pytest.raises(DataError, match=r"lonely\.png: missing mask \(expected .*masks/lonely\.png\)"):
        open_dataset(tmp_path, "train")


def test_label_outside_the_class_list(tmp_path):
    folder_dataset(tmp_path, {"a": np.array([[0, 1], [7, 255]])}, classes=["a", "b"])
    with pytest.raises(DataError, match=r"masks/a\.png: label value\(s\) 7 outside the class list \(2 classes"):
        open_dataset(tmp_path, "train")[0]


def test_size_mismatch(tmp_path):
    folder_dataset(tmp_path, {"a": np.zeros((8, 8))}, classes=["a", "b"])
    save(tmp_path / "train" / "images" / "a.png", image(8, 9))
    with pytest.raises(DataError, match=r"masks/a\.png: mask is 8x8 \(WxH\) but its image .*a\.png is 9x8"):
        open_dataset(tmp_path, "train")[0]


def test_colour_mask(tmp_path):
    folder_dataset(tmp_path, {"a": np.zeros((8, 8))}, classes=["a", "b"])
    save(tmp_path / "train" / "masks" / "a.png", image(8, 8))
    with pytest.raises(DataError, match="colour image"):
        open_dataset(tmp_path, "train")[0]


@pytest.mark.parametrize("problem", ["cannot read image", "missing mask", "outside the class list", "mask is 40x40"])
def test_train_stops_with_one_line(tmp_path, capsys, problem):
    """Through the CLI: exit code 2 and one line naming the file, no traceback."""
    root = folder_dataset(tmp_path / "data", {"a": np.zeros((40, 40))}, classes=["a", "b"])
    if problem == "cannot read image":
        (root / "train" / "images" / "a.png").write_bytes(b"\x89PNG broken")
        name = "images/a.png"
    elif problem == "missing mask":
        (root / "train" / "masks" / "a.png").unlink()
        name = "images/a.png"
    elif problem == "outside the class list":
        save(root / "train" / "masks" / "a.png", np.full((40, 40), 9))
        name = "masks/a.png"
    else:
        save(root / "train" / "images" / "a.png", image(40, 41))
        name = "masks/a.png"
    # the unreadable image is met in a data-loading worker process: its message must come through as is
    workers = "1" if problem == "cannot read image" else "0"
    code = main(["train", "--data", str(root), "--steps", "1", "--batch-size", "1", "--crop-size", "32",
                 "--kernels", "torch", "--workers", workers, "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("segformer train: error: ") and name in err[-1] and problem in err[-1]
    assert not any("Traceback" in line for line in err)


# ---- transforms ---------------------------------------------------------------------------------


def test_rescaled_size_follows_the_base_scale():
    assert base_scale((512, 512)) == (2048, 512)
    assert rescaled_size(683, 512, base_scale((512, 512))) == (683, 512)
    assert rescaled_size(1024, 2048, base_scale((1024, 1024))) == (1024, 2048)
    assert rescaled_size(256, 480, (2048, 512), ratio=0.5) == (256, 480)
    assert rescaled_size(100, 100, (400, 100), ratio=2.0) == (200, 200)


def test_train_transform_shapes_padding_and_determinism():
    picture, label = SyntheticShapes("train", size=64)[0]
    transform = TrainTransform((64, 64))
    a = transform(picture, label, np.random.default_rng([1, 2, 3]))
    b = transform(picture, label, np.random.default_rng([1, 2, 3]))
    assert a[0].shape == (3, 64, 64) and a[0].dtype == torch.uint8
    assert a[1].shape == (64, 64) and a[1].dtype == torch.uint8
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    shrunk = TrainTransform((64, 64), ratio_range=(0.5, 0.5), photometric=False)
    pixels, label_t = shrunk(picture, label, np.random.default_rng(0))
    assert (label_t[32:] == 255).all() and (label_t[:, 32:] == 255).all() and (label_t[:32, :32] != 255).all()
    assert (pixels[:, 32:] == PAD_PIXEL).all()


def test_flip_moves_image_and_label_together():
    picture, label = SyntheticShapes("train", size=64)[1]
    flip = TrainTransform((64, 64), ratio_range=(1.0, 1.0), flip_prob=1.0, photometric=False)
    pixels, label_t = flip(picture, label, np.random.default_rng(0))
    assert torch.equal(pixels, torch.from_numpy(picture).permute(2, 0, 1).flip(-1))
    assert torch.equal(label_t.long(), torch.from_numpy(label).flip(-1))
