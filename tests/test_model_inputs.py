"""Mistakes get a TypeError/ValueError that says what was expected, not a failure deep
inside a convolution; the loss's edge cases; the config's checks."""

from __future__ import annotations

import pytest
import torch

from segformer import PRESETS, SegFormer, SegFormerConfig


@pytest.fixture(scope="module")
def model():
    return SegFormer.from_config("b0", num_classes=4, kernels="torch").eval()


@pytest.mark.parametrize(
    "images,error,message",
    [
        ([[0.0]], TypeError, r"images must be a float tensor \[B, 3, H, W\].*got list"),
        (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), TypeError, r"got dtype torch\.uint8"),
        (torch.zeros(1, 3, 64, 64, dtype=torch.int64), TypeError, r"got dtype torch\.int64"),
        (torch.zeros(3, 64, 64), ValueError, r"got a 3-D tensor of shape \(3, 64, 64\)"),
        (torch.zeros(1, 4, 64, 64), ValueError, r"got 4 channels"),
        (torch.zeros(1, 1, 64, 64), ValueError, r"got 1 channels"),
        (torch.zeros(0, 3, 64, 64), ValueError, r"got an empty batch"),
        (torch.zeros(1, 3, 28, 64), ValueError, r"28x64 is too small .*minimum 29x29"),
        (torch.zeros(2, 3, 64, 0), ValueError, r"too small"),
    ],
    ids=["list", "uint8", "int64", "3-D", "4-channels", "1-channel", "empty-batch", "too-small", "zero-width"],
)
def test_bad_images_are_refused_with_what_was_expected(model, images, error, message):
    with pytest.raises(error, match=message):
        model(images)


def test_images_must_match_the_model_dtype_outside_autocast():
    model = SegFormer.from_config("b0", num_classes=2, kernels="torch").eval()
    images = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with pytest.raises(TypeError, match="images are torch.float64 but the model's weights are torch.float32"):
        model(images)
    with torch.no_grad():
        assert model.double()(images).dtype == torch.float64
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert model.float()(images.float()).dtype == torch.bfloat16


def test_the_minimum_size_works_and_logits_are_at_stage_one_size(model):
    with torch.no_grad():
        assert model(torch.randn(1, 3, 29, 29)).shape == (1, 4, 8, 8)
        logits = model(torch.randn(2, 3, 83, 117))
    assert logits.shape == (2, 4, 21, 30)  # ceil(H/4), ceil(W/4)
    assert logits.is_contiguous(), "logits are contiguous NCHW, as transformers returns them"


def test_loss_averages_over_valid_pixels_only(model):
    logits = torch.randn(2, 4, 8, 8, requires_grad=True)
    labels = torch.randint(0, 4, (2, 29, 31))
    labels[0] = 255
    loss = model.loss(logits, labels)
    resized = torch.nn.functional.interpolate(logits, size=(29, 31), mode="bilinear", align_corners=False)
    expected = torch.nn.functional.cross_entropy(resized[1:], labels[1:])
    assert torch.allclose(loss, expected, rtol=1e-6)


def test_loss_without_valid_pixels_is_zero_with_a_gradient(model):
    logits = torch.randn(2, 4, 8, 8, requires_grad=True)
    loss = model.loss(logits, torch.full((2, 30, 30), 255))
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize(
    "labels,error,message",
    [
        (torch.zeros(2, 30, 30), TypeError, r"labels must be an integer tensor"),
        ([[0]], TypeError, r"labels must be an integer tensor"),
        (torch.zeros(2, 1, 30, 30, dtype=torch.long), ValueError, r"labels must be \[B, H, W\] with B=2"),
        (torch.zeros(3, 30, 30, dtype=torch.long), ValueError, r"labels must be \[B, H, W\] with B=2"),
    ],
)
def test_bad_labels_are_refused(model, labels, error, message):
    with pytest.raises(error, match=message):
        model.loss(torch.randn(2, 4, 8, 8), labels)


def test_logits_of_another_model_are_refused(model):
    with pytest.raises(ValueError, match=r"logits must be \[B, 4, h, w\]"):
        model.loss(torch.randn(2, 150, 8, 8), torch.zeros(2, 30, 30, dtype=torch.long))


# ---- construction ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["b3", "B3", "mit-b3", "mit_b3", "nvidia/mit-b3", "segformer-b3"])
def test_preset_names(name):
    assert SegFormerConfig.preset(name) == SegFormerConfig.preset("b3")


def test_from_config_arguments():
    with pytest.raises(ValueError, match="unknown SegFormer preset 'b7'; expected one of b0, b1, b2, b3, b4, b5"):
        SegFormer.from_config("b7", num_classes=3)
    with pytest.raises(ValueError, match="needs num_classes"):
        SegFormer.from_config("b0")
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        SegFormer.from_config("b0", num_classes=0)
    with pytest.raises(TypeError, match="preset name like 'b0' or a SegFormerConfig"):
        SegFormer.from_config(3, num_classes=3)
    with pytest.raises(ValueError, match="kernels must be one of"):
        SegFormer.from_config("b0", num_classes=3, kernels="cuda")
    model = SegFormer.from_config("b0", num_classes=3, drop_path_rate=0.0, classifier_dropout=0.2)
    assert model.kernels == "auto" and model.config.num_labels == 3
    assert model.config.drop_path_rate == 0.0 and model.decode_head.dropout.p == 0.2
    assert SegFormer.from_config("b0", num_classes=3).config.drop_path_rate == 0.1
    with pytest.raises(ValueError, match="kernels must be one of"):
        model.kernels = "fast"


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"depths": (2, 2, 2)}, "depths has 3 entries but hidden_sizes has 4"),
        ({"num_attention_heads": (1, 2, 3, 8)}, "hidden size 160 is not divisible by its 3 attention heads"),
        ({"sr_ratios": (8, 4, 0, 1)}, "sr_ratios must be positive"),
        ({"num_labels": 0}, "num_labels must be >= 1"),
        ({"drop_path_rate": 1.0}, r"drop_path_rate must be in \[0, 1\)"),
    ],
)
def test_config_is_checked(changes, message):
    with pytest.raises(ValueError, match=message):
        SegFormerConfig.preset("b0", **changes)


def test_config_json_round_trip_and_minimum_sizes():
    for name in PRESETS:
        config = SegFormerConfig.preset(name, num_labels=19, block_norm_eps=1e-6)
        assert SegFormerConfig.from_hf_dict(config.to_hf_dict()) == config
        assert config.min_image_size() == 29
    grids = SegFormerConfig.preset("b0").stage_grid(83, 117)
    assert grids == [(21, 30), (11, 15), (6, 8), (3, 4)]
    with pytest.raises(ValueError, match="only hidden_act 'gelu'"):
        SegFormerConfig.from_hf_dict({"model_type": "segformer", "hidden_act": "relu"})
