"""The model is transformers' SegformerForSemanticSegmentation: same logits, loss, gradients
and parameter counts with the same weights (docs/design.md, "Checkpoints").

transformers is the oracle here and only here (a test dependency). The helpers at the top
are shared with test_checkpoints.py.
"""

from __future__ import annotations

import re

import pytest
import torch

from helpers import assert_close
from segformer import PRESETS, SegFormer, SegFormerConfig
from segformer.checkpoint import translate_key

def hf_model(config: SegFormerConfig, device: str = "cpu", head: str = "SegformerForSemanticSegmentation"):
    """transformers' model for this architecture, built from our config.json dict (so that
    dict is proven readable by transformers too). Eager attention: the plain math. The
    weights are left uninitialised (transformers' initialiser is slow): fill them. Skips
    the calling test when transformers is not installed."""
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.SegformerConfig.from_dict(config.to_hf_dict())
    hf_config._attn_implementation = "eager"
    with torch.device("meta"):
        model = getattr(transformers, head)(hf_config)
    return model if device == "meta" else model.to_empty(device=device)


@torch.no_grad()
def randomize_(model: torch.nn.Module) -> torch.nn.Module:
    """Every parameter and BatchNorm statistic random (not the initialiser's ones and zeros)."""
    for name, parameter in model.named_parameters():
        if parameter.dim() > 1:
            parameter.normal_(0.0, parameter[0].numel() ** -0.5)
        elif "norm" in name and name.endswith("weight"):
            parameter.copy_(1.0 + 0.2 * torch.randn_like(parameter))
        else:
            parameter.normal_(0.0, 0.2)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0.0, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.num_batches_tracked.zero_()
    return model


def random_hf_model(config: SegFormerConfig):
    return randomize_(hf_model(config)).eval()


def set_nvlabs_eps_(hf: torch.nn.Module) -> torch.nn.Module:
    """Give a transformers model NVlabs' eps semantics: 1e-6 in the block norms and the
    stage norms; the patch-embedding and sequence-reduction norms keep 1e-5."""
    for name, module in hf.named_modules():
        block_norm = "layernorm_before" in name or "layernorm_after" in name
        stage_norm = re.fullmatch(r"segformer\.stages\.\d+\.layer_norm", name) is not None
        if block_norm or stage_norm:
            module.eps = 1e-6
    return hf


def vanishes(name: str, training: bool, stages: int) -> bool:
    """Gradients that are zero in exact arithmetic, rounding noise on both sides: a key
    bias shifts a whole row of scores (softmax ignores it); in training, BatchNorm subtracts
    per-channel constants, which is all the decoder projections' biases and the last stage
    norm's bias contribute."""
    if name.endswith("attn.k.bias"):
        return True
    last_norm = f"encoder.stages.{stages - 1}.norm.bias"
    return training and (name == last_norm or name.startswith("decode_head.linear_c.") and name.endswith("bias"))


def assert_same_gradients(model: SegFormer, expected: dict[str, torch.Tensor], training: bool, scale: float = 10):
    """Every parameter's gradient against ``expected`` (by this model's names), within
    ``scale`` times the fp32 tolerance (the error grows with depth)."""
    # a vanishing gradient is noise: against the norm of all gradients, 1e-6 at scale 10
    noise = 1e-7 * scale * torch.cat([g.flatten() for g in expected.values()]).norm()
    for name, parameter in model.named_parameters():
        if vanishes(name, training, model.config.num_stages):
            assert parameter.grad.norm() <= noise and expected[name].norm() <= noise, f"grad of {name} should vanish"
        else:
            assert_close(parameter.grad, expected[name], torch.float32, f"grad of {name}", scale=scale)


def labels_for(batch: int, height: int, width: int, classes: int) -> torch.Tensor:
    """Random class indices with a block of ignored (255) pixels."""
    labels = torch.randint(0, classes, (batch, height, width))
    labels[:, : height // 3, : width // 2] = 255
    return labels


def ours_from(hf) -> SegFormer:
    """Our model with the transformers model's (in-memory, transformers-5 named) weights."""
    config = SegFormerConfig.from_hf_dict(hf.config.to_dict())
    return SegFormer.from_pretrained(hf.state_dict(), config=config, kernels="torch").train(hf.training)


@pytest.mark.parametrize("preset", ["b0", "b1"])
@pytest.mark.parametrize("batch", [1, 3])
def test_logits_and_loss_match_transformers(preset, batch):
    config = SegFormerConfig.preset(preset, num_labels=7)
    hf = random_hf_model(config)
    model = ours_from(hf)
    images = torch.randn(batch, 3, 83, 117)
    labels = labels_for(batch, 83, 117, 7)
    with torch.no_grad():
        expected = hf(images, labels=labels)
        logits = model(images)
        loss = model.loss(logits, labels)
    assert logits.shape == (batch, 7, 21, 30)
    assert_close(logits, expected.logits, torch.float32, "logits")
    assert_close(loss, expected.loss, torch.float32, "loss")


@pytest.fixture
def transformers_softmax_in_input_dtype(monkeypatch):
    """transformers' eager attention takes its softmax in fp32 even in an fp64 model
    (``softmax(..., dtype=torch.float32)``), a ~1e-8 relative error: run its attention
    function with the softmax in the scores' own dtype instead."""
    modeling = pytest.importorskip("transformers.models.segformer.modeling_segformer")
    eager_attention = modeling.eager_attention_forward
    softmax = torch.nn.functional.softmax

    def in_input_dtype(*args, **kwargs):
        with monkeypatch.context() as patch:
            patch.setattr(torch.nn.functional, "softmax", lambda x, dim, dtype=None: softmax(x, dim))
            return eager_attention(*args, **kwargs)

    monkeypatch.setattr(modeling, "eager_attention_forward", in_input_dtype)


def test_training_step_matches_transformers(transformers_softmax_in_input_dtype):
    """Train mode with dropout and drop path off: the same logits, loss, BatchNorm running
    statistics and gradient for every parameter (the decoder fold's included).

    In fp64, with transformers' softmax in fp64 too: training-mode BatchNorm over a batch of
    two small maps is ill-conditioned enough that a 1e-8 difference in the forward (fp32
    rounding, or transformers' fp32 softmax) moved some gradients by up to ~1e-2 on some
    random draws; this compares the two functions, not their rounding."""
    config = SegFormerConfig.preset("b0", num_labels=5, drop_path_rate=0.0, classifier_dropout_prob=0.0)
    hf = random_hf_model(config).train().double()
    model = ours_from(hf).double()
    images = torch.randn(2, 3, 67, 45, dtype=torch.float64)
    labels = labels_for(2, 67, 45, 5)
    expected = hf(images, labels=labels)
    expected.loss.backward()
    logits = model(images)
    loss = model.loss(logits, labels)
    loss.backward()
    assert_close(logits, expected.logits, torch.float32, "logits")
    assert_close(loss, expected.loss, torch.float32, "loss")
    assert_same_gradients(model, {translate_key(n, "hf5", "ours"): p.grad for n, p in hf.named_parameters()}, True)
    for stat in ("running_mean", "running_var"):
        assert_close(getattr(model.decode_head.batch_norm, stat), getattr(hf.decode_head.batch_norm, stat), torch.float32, stat)


def test_drop_path_and_dropout_act_only_in_training():
    config = SegFormerConfig.preset("b0", num_labels=3, drop_path_rate=0.5, classifier_dropout_prob=0.5)
    model = SegFormer(config, kernels="torch")
    images = torch.randn(2, 3, 40, 40)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(images), model(images)), "eval mode must be deterministic"
        model.train()
        assert not torch.equal(model(images), model(images)), "train mode must drop paths and features"
    rates = [block.drop_path_rate for stage in model.encoder.stages for block in stage.blocks]
    assert rates == pytest.approx([0.5 * i / 7 for i in range(8)]), "stochastic depth grows linearly as in HF"


@pytest.mark.parametrize("preset", PRESETS)
def test_parameter_counts_match_transformers(preset):
    config = SegFormerConfig.preset(preset, num_labels=150)
    with torch.device("meta"):
        ours = SegFormer(config)
    theirs = hf_model(config, device="meta")
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(ours) == count(theirs)
    assert len(ours.state_dict()) == len(theirs.state_dict())
