"""The decoder fold (docs/design.md, "The decoder fold") is the unfolded all-MLP decoder,
in fp64 to rounding and in fp32 to tolerance, in eval and in training, gradients of every
decoder parameter included; and it does about half the model's multiply-adds at 512x512."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from helpers import assert_close, rel_err
from segformer import SegFormer, SegFormerConfig
from segformer.model import DecodeHead, tokens_as_image


def unfolded_decoder(head: DecodeHead, features: list[torch.Tensor], grids: list[tuple[int, int]]) -> torch.Tensor:
    """The decoder as HF and NVlabs compute it: project every stage to D channels, upsample
    to stage-1 size, concat [c_n .. c_1], 1x1 conv, BatchNorm, ReLU, dropout, classifier."""
    size = grids[0]
    upsampled = []
    for tokens, grid, projection in zip(features, grids, head.linear_c):
        projected = tokens_as_image(F.linear(tokens, projection.proj.weight, projection.proj.bias), grid)
        upsampled.append(F.interpolate(projected, size=size, mode="bilinear", align_corners=False))
    fused = head.linear_fuse(torch.cat(upsampled[::-1], dim=1))
    return head.classifier(head.dropout(F.relu(head.batch_norm(fused))))


def random_head(config: SegFormerConfig, dtype: torch.dtype) -> DecodeHead:
    head = DecodeHead(config).to(dtype)
    with torch.no_grad():
        for parameter in head.parameters():
            parameter.normal_(0.0, 0.5 if parameter.dim() == 1 else parameter[0].numel() ** -0.5)
        head.batch_norm.running_mean.normal_(0.0, 0.5)
        head.batch_norm.running_var.uniform_(0.5, 2.0)
    return head


def stage_features(config: SegFormerConfig, batch: int, height: int, width: int, dtype: torch.dtype):
    grids = config.stage_grid(height, width)
    features = [
        torch.randn(batch, h * w, c, dtype=dtype, requires_grad=True) for (h, w), c in zip(grids, config.hidden_sizes)
    ]
    return features, grids


class FixedDropout(torch.nn.Module):
    """Dropout with one mask drawn up front, so two decoders drop the same features."""

    def __init__(self, batch: int, channels: int, size: tuple[int, int], p: float, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("mask", torch.bernoulli(torch.full((batch, channels, *size), 1 - p, dtype=dtype)) / (1 - p))

    def forward(self, x):
        return x * self.mask


# fp64 is the identity to rounding; fp32 to its usual tolerance
FOLD_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("batch,height,width", [(1, 83, 117), (3, 64, 64), (2, 37, 29)])
def test_fold_equals_unfolded_decoder(dtype, training, batch, height, width):
    config = SegFormerConfig.preset("b0", num_labels=7, classifier_dropout_prob=0.3)
    folded = random_head(config, dtype).train(training)
    features, grids = stage_features(config, batch, height, width, dtype)
    if training:
        # one fixed dropout mask for both: proves dropout sits at the same place
        folded.dropout = FixedDropout(batch, config.decoder_hidden_size, grids[0], p=0.3, dtype=dtype)
    unfolded = copy.deepcopy(folded)

    out = folded(features, grids)
    expected = unfolded_decoder(unfolded, features, grids)
    assert out.shape == (batch, 7, *grids[0])
    tolerance = FOLD_TOLERANCE[dtype]
    assert rel_err(out, expected) <= tolerance, "logits"

    upstream = torch.randn_like(out)
    inputs = features + list(folded.parameters())
    got = torch.autograd.grad(out, inputs, upstream)
    want = torch.autograd.grad(expected, features + list(unfolded.parameters()), upstream)
    names = [f"features[{i}]" for i in range(len(features))] + [name for name, _ in folded.named_parameters()]
    for name, mine, theirs in zip(names, got, want):
        # linear_c biases only add per-channel constants, which training-mode BatchNorm
        # removes: their gradient is zero up to rounding, compared on its weight's scale
        if training and name.startswith("linear_c.") and name.endswith("bias"):
            weight = dict(zip(names, want))[name.replace("bias", "weight")]
            assert mine.norm() <= tolerance * weight.norm() and theirs.norm() <= tolerance * weight.norm(), name
            continue
        assert rel_err(mine, theirs) <= tolerance * 10, f"gradient of {name}: {rel_err(mine, theirs):.2e}"
    for stat in ("running_mean", "running_var"):
        assert rel_err(getattr(folded.batch_norm, stat), getattr(unfolded.batch_norm, stat)) <= tolerance, stat


@pytest.mark.parametrize("kernels", ["torch", "auto"])
@pytest.mark.parametrize("batch,height,width", [(1, 83, 117), (3, 37, 29)])
def test_inference_tail_equals_unfolded_decoder(kernels, batch, height, width):
    """In eval mode without autograd the decoder's tail after the fold is one op,
    sk.decode_head (the Triton kernel under "auto" where Triton runs), with BatchNorm
    and the folded bias turned into a per-channel scale and shift."""
    config = SegFormerConfig.preset("b0", num_labels=7)
    head = random_head(config, torch.float32).eval()
    head.kernels = kernels
    features, grids = stage_features(config, batch, height, width, torch.float32)
    expected = unfolded_decoder(head, features, grids)
    with torch.no_grad():
        out = head(features, grids)
    assert_close(out, expected, torch.float32, "inference logits", scale=10)


def test_fold_keeps_the_checkpoint_parameters():
    """The fold composes weights on the fly: the parameters stay HF's, nothing is cached."""
    head = DecodeHead(SegFormerConfig.preset("b0", num_labels=4))
    assert sorted(name for name, _ in head.named_parameters()) == sorted(
        [f"linear_c.{i}.proj.{kind}" for i in range(4) for kind in ("weight", "bias")]
        + ["linear_fuse.weight", "batch_norm.weight", "batch_norm.bias", "classifier.weight", "classifier.bias"]
    )
    weights, bias = head.folded_projections()
    assert [tuple(w.shape) for w in weights] == [(256, 32), (256, 64), (256, 160), (256, 256)]
    assert tuple(bias.shape) == (256,)
    assert all(w.grad_fn is not None for w in weights), "autograd must reach linear_c and linear_fuse"


def test_fold_under_autocast_matches_fp32():
    """The composition runs in fp32 even under autocast; only the per-pixel work is cast."""
    config = SegFormerConfig.preset("b0", num_labels=5)
    head = random_head(config, torch.float32).eval()
    features, grids = stage_features(config, 2, 64, 64, torch.float32)
    with torch.no_grad():
        expected = unfolded_decoder(head, features, grids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = head(features, grids)
    assert out.dtype == torch.bfloat16
    assert_close(out.float(), expected, torch.bfloat16, "logits under bf16 autocast", scale=2)


# ---- multiply-adds ---------------------------------------------------------------------------


def decoder_macs(config: SegFormerConfig, height: int, width: int, folded: bool) -> int:
    """Multiply-adds of the decoder for one image (matmuls and convolutions, like
    FlopCounterMode; the bilinear resizes, BatchNorm and ReLU are a few per element)."""
    grids = config.stage_grid(height, width)
    tokens = [h * w for h, w in grids]
    width_d, classes = config.decoder_hidden_size, config.num_labels
    project = sum(n * c * width_d for n, c in zip(tokens, config.hidden_sizes))
    classify = tokens[0] * width_d * classes
    if folded:
        compose = sum(width_d * width_d * c for c in config.hidden_sizes)  # once per batch
        return compose + project + classify
    fuse = tokens[0] * config.num_stages * width_d * width_d
    return project + fuse + classify


def counted_macs(fn, *args):
    """(multiply-adds, result) of one call: FlopCounterMode counts 2 flops per MAC."""
    with FlopCounterMode(display=False) as counter:
        result = fn(*args)
    return counter.get_total_flops() // 2, result


@pytest.mark.parametrize("preset,encoder_gmacs", [("b0", 3.20), ("b2", None)])
def test_mac_counts_before_and_after_the_fold(preset, encoder_gmacs):
    """At 512x512 with 150 classes the decoder drops from 5.18 to 0.92 GMACs in B0 and
    from 42.1 to 4.05 in B2; the whole B0 from 8.39 to 4.13 and B2 from 62.3 to 24.3
    (patch-embedding convolutions included; docs/design.md quotes these numbers)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    config = SegFormerConfig.preset(preset, num_labels=150)
    # B2's encoder is slow to build and trace here; its decoder needs only the feature shapes
    model = SegFormer(config, kernels="torch").eval() if encoder_gmacs is not None else None
    head = model.decode_head if model is not None else DecodeHead(config).eval()
    with FakeTensorMode(allow_non_fake_inputs=True):  # shapes only: nothing is computed
        if model is not None:
            encoder, (features, grids) = counted_macs(model.encoder, torch.randn(1, 3, 512, 512))
        else:
            features, grids = stage_features(config, 1, 512, 512, torch.float32)
        folded, _ = counted_macs(head, features, grids)
        unfolded, _ = counted_macs(unfolded_decoder, head, features, grids)
    assert folded == decoder_macs(config, 512, 512, folded=True)
    assert unfolded == decoder_macs(config, 512, 512, folded=False)
    report = f"\n{preset} 512x512 GMACs: decoder unfolded {unfolded / 1e9:.2f} -> folded {folded / 1e9:.2f}"
    if encoder_gmacs is not None:
        assert encoder / 1e9 == pytest.approx(encoder_gmacs, abs=0.005)
        report += f"; encoder {encoder / 1e9:.2f}; model {(encoder + unfolded) / 1e9:.2f} -> {(encoder + folded) / 1e9:.2f}"
    print(report)
    assert folded < 0.2 * unfolded
