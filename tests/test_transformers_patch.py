"""patch_transformers: a patched transformers SegFormer gives the unpatched model's logits,
loss and parameter gradients (both against an fp64 unpatched copy), in train and eval, on
the installed transformers (5.x layout) and on stand-in modules of the 4.x layout."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import segformer_kernels as sk
from segformer_kernels.transformers_patch import REPORT_ATTRIBUTE
from tests.helpers import CPU_DTYPES, TOLERANCE, rel_err

transformers = pytest.importorskip("transformers")

# Tests of what is patched and how the model behaves around it run the ops' reference path
# (fast); the parity tests run the kernels (the Triton interpreter on CPU).
LOGIC_KERNELS = "torch"

# errors of a deep network's gradients grow with depth: the patched model must be as close
# to the fp64 model as the unpatched one at the same dtype (or within the dtype's tolerance
# times this)
DEPTH_SCALE = 20.0


def tiny_config(**changes):
    settings = dict(
        num_channels=3, depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 32, 64], decoder_hidden_size=32,
        num_attention_heads=[1, 2, 2, 4], num_labels=5, drop_path_rate=0.0, classifier_dropout_prob=0.0,
    )
    settings.update(changes)
    return transformers.SegformerConfig(**settings)


def check_close(name, patched, unpatched, reference, dtype, floor=0.0):
    """||patched - reference|| / max(||reference||, floor) within the dtype's tolerance (times
    DEPTH_SCALE) or 3x the unpatched model's; ``floor`` for gradients that are zero in exact
    arithmetic (a key bias's: softmax ignores a shift shared by all keys)."""
    assert torch.isfinite(patched).all(), f"{name}: non-finite values"
    reference = reference.double()
    scale = max(reference.norm().item(), floor) or 1.0
    err = (patched.double() - reference).norm().item() / scale
    plain = (unpatched.double() - reference).norm().item() / scale
    allowed = max(TOLERANCE[dtype] * DEPTH_SCALE, 3 * plain)
    assert err <= allowed, f"{name}: relative error {err:.2e} > {allowed:.2e} ({dtype})"


def gradient_floor(grads) -> float:
    return 1e-3 * max(g.double().norm().item() for g in grads.values())


def run(model, images, labels, train, **kwargs):
    model.train(train)
    model.zero_grad(set_to_none=True)
    out = model(pixel_values=images, labels=labels, **kwargs)
    out.loss.backward()
    return out, {name: p.grad for name, p in model.named_parameters()}


def compare(reference_model, dtype, train, images, labels, prepare=lambda m: m, kernels="auto", **kwargs):
    """Run fp64 unpatched, dtype unpatched and dtype patched copies; check logits, loss and
    every parameter gradient; return the patched output."""
    unpatched = prepare(copy.deepcopy(reference_model).to(dtype))
    patched = sk.patch_transformers(prepare(copy.deepcopy(reference_model).to(dtype)), kernels=kernels)
    reference = prepare(copy.deepcopy(reference_model).double())
    ref_out, ref_grads = run(reference, images.double(), labels, train, **kwargs)
    plain_out, plain_grads = run(unpatched, images.to(dtype), labels, train, **kwargs)
    out, grads = run(patched, images.to(dtype), labels, train, **kwargs)
    assert type(out) is type(ref_out)
    check_close("logits", out.logits, plain_out.logits, ref_out.logits, dtype)
    check_close("loss", out.loss, plain_out.loss, ref_out.loss, dtype)
    assert set(grads) == set(ref_grads)
    for name in ref_grads:
        assert grads[name] is not None, f"{name}: no gradient"
        check_close(f"grad {name}", grads[name], plain_grads[name], ref_grads[name], dtype, gradient_floor(ref_grads))
    return out


@pytest.fixture(scope="module")
def segmentation_model():
    torch.manual_seed(0)
    model = transformers.SegformerForSemanticSegmentation(tiny_config())
    with torch.no_grad():  # running statistics away from the init's 0 / 1
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return model


def inputs(height=33, width=35, classes=5, batch=2):
    images = torch.randn(batch, 3, height, width)
    labels = torch.randint(0, classes, (batch, height, width))
    labels[:, :3] = 255  # ignored pixels
    return images, labels


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_semantic_segmentation_matches_unpatched(segmentation_model, dtype, train):
    images, labels = inputs()
    out = compare(segmentation_model, dtype, train, images, labels, output_hidden_states=True)
    assert len(out.hidden_states) == 4 and out.hidden_states[0].shape == (2, 16, 9, 9)


def test_inference_under_no_grad_runs_the_fused_decoder(segmentation_model):
    images, _ = inputs(33, 50, batch=1)
    model = copy.deepcopy(segmentation_model).eval()
    with torch.no_grad():
        expected = model(pixel_values=images).logits
        sk.patch_transformers(model)
        got = model(pixel_values=images).logits
    assert rel_err(got, expected) <= TOLERANCE[torch.float32] * DEPTH_SCALE


def test_gradient_checkpointing(segmentation_model):
    images, labels = inputs()

    def checkpointed(model):
        model.gradient_checkpointing_enable()
        return model

    compare(segmentation_model, torch.float32, True, images, labels, prepare=checkpointed, kernels=LOGIC_KERNELS)


@pytest.mark.parametrize("kind", ["SegformerModel", "SegformerForImageClassification"])
def test_other_model_classes(kind):
    torch.manual_seed(1)
    model = getattr(transformers, kind)(tiny_config())
    patched = sk.patch_transformers(copy.deepcopy(model), kernels=LOGIC_KERNELS)
    images = torch.randn(2, 3, 40, 36)
    expected, got = model(pixel_values=images), patched(pixel_values=images)
    key = "logits" if kind.endswith("Classification") else "last_hidden_state"
    assert rel_err(got[key], expected[key]) <= TOLERANCE[torch.float32] * DEPTH_SCALE
    roles = {role for _, role in patched.segformer_kernels_patch.patched}
    assert roles == {"attention", "sequence reduction", "Mix-FFN", "LayerNorm"}


def test_patching_twice_is_harmless_and_the_report_lists_what_is_left(segmentation_model):
    model = copy.deepcopy(segmentation_model).eval()
    weights = {name: p.data_ptr() for name, p in model.named_parameters()}
    assert sk.patch_transformers(model) is model
    first = getattr(model, REPORT_ATTRIBUTE)
    forward = model.decode_head.forward
    sk.patch_transformers(model, kernels=LOGIC_KERNELS)
    second = getattr(model, REPORT_ATTRIBUTE)
    assert first.patched == second.patched and first.left_alone == second.left_alone
    assert model.decode_head.forward.__func__ is forward.__func__  # not wrapped twice
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == weights  # no copy
    left = dict(second.left_alone)
    assert set(left) == {f"segformer.stages.{i}.patch_embeddings.proj" for i in range(4)}
    assert "no fused op" in next(iter(left.values()))
    images, _ = inputs()
    with torch.no_grad():
        assert rel_err(model(pixel_values=images).logits, segmentation_model.eval()(pixel_values=images).logits) < 1e-5
    assert set(model.state_dict()) == set(segmentation_model.state_dict())


def test_attention_weights_still_come_back():
    torch.manual_seed(4)
    config = tiny_config()
    config._attn_implementation = "eager"  # the implementation that returns attention weights
    reference = transformers.SegformerModel(config).eval()
    model = sk.patch_transformers(copy.deepcopy(reference), kernels=LOGIC_KERNELS)
    images = torch.randn(1, 3, 33, 33)
    with torch.no_grad():
        out = model(pixel_values=images, output_attentions=True)
        expected = reference(pixel_values=images, output_attentions=True)
    assert len(out.attentions) == len(expected.attentions) == 4
    for got, want in zip(out.attentions, expected.attentions):
        assert got is not None and rel_err(got, want) < 1e-5


def test_unsupported_activation_is_left_alone_and_listed():
    model = transformers.SegformerModel(tiny_config(hidden_act="relu"))
    sk.patch_transformers(model)
    report = getattr(model, REPORT_ATTRIBUTE)
    assert "Mix-FFN" not in {role for _, role in report.patched}
    reasons = dict(report.left_alone)
    assert "not the exact (erf) GELU" in reasons["stages.0.blocks.0.mlp"]
    assert "stages.0.blocks.0.mlp.fc1" not in reasons  # listed once, with the Mix-FFN


def test_rejects_what_is_not_a_module():
    with pytest.raises(TypeError, match="model must be"):
        sk.patch_transformers("nvidia/mit-b0")
    with pytest.raises(ValueError, match="kernels"):
        sk.patch_transformers(nn.Linear(2, 2), kernels="cuda")


def test_hf_trainer_step_matches_unpatched(segmentation_model, tmp_path):
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    images, labels = inputs(32, 32, batch=4)
    samples = [{"pixel_values": i, "labels": label} for i, label in zip(images, labels)]
    # plain SGD: Adam would blow the rounding noise of gradients that are zero in exact
    # arithmetic (key biases) up to full-size steps
    args = dict(per_device_train_batch_size=4, max_steps=2, learning_rate=0.1, optim="sgd", report_to=[],
                use_cpu=True, save_strategy="no", logging_strategy="no", seed=0, dataloader_num_workers=0)
    trained = []
    for patch in (False, True):
        model = copy.deepcopy(segmentation_model)
        if patch:
            sk.patch_transformers(model, kernels=LOGIC_KERNELS)
        trainer = transformers.Trainer(
            model=model, train_dataset=samples,
            args=transformers.TrainingArguments(output_dir=str(tmp_path / str(patch)), **args),
        )
        result = trainer.train()
        assert math.isfinite(result.training_loss)
        trained.append(model)
    starts = list(segmentation_model.parameters())
    updates = [(name, got - start, want - start) for (name, want), got, start
               in zip(trained[0].named_parameters(), trained[1].parameters(), starts)]
    # the floor: updates that are zero in exact arithmetic (rounding noise either way)
    floor = 1e-3 * max(want.norm().item() for _, _, want in updates)
    assert floor > 0
    for name, got, want in updates:
        assert (got - want).norm().item() <= 1e-3 * max(want.norm().item(), floor), name


# ---- the transformers 4.x layout, from stand-in modules with its attribute names and signatures ----


class SelfAttention4(nn.Module):
    """Like 4.x SegformerEfficientSelfAttention: query/key/value, sr + layer_norm when sr > 1."""

    def __init__(self, hidden, heads, sr_ratio):
        super().__init__()
        self.num_attention_heads, self.attention_head_size, self.sr_ratio = heads, hidden // heads, sr_ratio
        self.query, self.key, self.value = (nn.Linear(hidden, hidden) for _ in range(3))
        self.dropout = nn.Dropout(0.0)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(hidden, hidden, kernel_size=sr_ratio, stride=sr_ratio)
            self.layer_norm = nn.LayerNorm(hidden)

    def heads(self, x):
        return x.unflatten(-1, (self.num_attention_heads, self.attention_head_size)).transpose(1, 2)

    def forward(self, hidden_states, height, width, output_attentions=False):
        query = self.heads(self.query(hidden_states))
        if self.sr_ratio > 1:
            grid = hidden_states.transpose(1, 2).unflatten(2, (height, width))
            hidden_states = self.layer_norm(self.sr(grid).flatten(2).transpose(1, 2))
        key, value = self.heads(self.key(hidden_states)), self.heads(self.value(hidden_states))
        probabilities = (query @ key.transpose(-1, -2) / math.sqrt(self.attention_head_size)).softmax(-1)
        context = (self.dropout(probabilities) @ value).transpose(1, 2).flatten(2)
        return (context, probabilities) if output_attentions else (context,)


class SelfOutput4(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.dense, self.dropout = nn.Linear(hidden, hidden), nn.Dropout(0.0)

    def forward(self, hidden_states, input_tensor):
        return self.dropout(self.dense(hidden_states))


class Attention4(nn.Module):
    def __init__(self, hidden, heads, sr_ratio):
        super().__init__()
        self.self, self.output, self.pruned_heads = SelfAttention4(hidden, heads, sr_ratio), SelfOutput4(hidden), set()

    def forward(self, hidden_states, height, width, output_attentions=False):
        inner = self.self(hidden_states, height, width, output_attentions)
        return (self.output(inner[0], hidden_states),) + inner[1:]


class DWConv4(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim)

    def forward(self, hidden_states, height, width):
        grid = hidden_states.transpose(1, 2).unflatten(2, (height, width))
        return self.dwconv(grid).flatten(2).transpose(1, 2)


class MixFFN4(nn.Module):
    def __init__(self, hidden, inner, activation):
        super().__init__()
        self.dense1, self.dwconv, self.dense2 = nn.Linear(hidden, inner), DWConv4(inner), nn.Linear(inner, hidden)
        self.intermediate_act_fn, self.dropout = activation, nn.Dropout(0.0)

    def forward(self, hidden_states, height, width):
        hidden_states = self.intermediate_act_fn(self.dwconv(self.dense1(hidden_states), height, width))
        return self.dropout(self.dense2(self.dropout(hidden_states)))


class Projection4(nn.Module):
    def __init__(self, width, decoder_width):
        super().__init__()
        self.proj = nn.Linear(width, decoder_width)


class DecodeHead4(nn.Module):
    """4.x SegformerDecodeHead: linear_c.{i}.proj, then the same fuse / norm / classifier."""

    def __init__(self, widths, decoder_width, classes):
        super().__init__()
        self.linear_c = nn.ModuleList(Projection4(w, decoder_width) for w in widths)
        self.linear_fuse = nn.Conv2d(decoder_width * len(widths), decoder_width, 1, bias=False)
        self.batch_norm, self.activation = nn.BatchNorm2d(decoder_width), nn.ReLU()
        self.dropout, self.classifier = nn.Dropout(0.0), nn.Conv2d(decoder_width, classes, 1)

    def forward(self, encoder_hidden_states):
        size = encoder_hidden_states[0].shape[2:]
        projected = []
        for state, mlp in zip(encoder_hidden_states, self.linear_c):
            height, width = state.shape[2:]
            tokens = mlp.proj(state.flatten(2).transpose(1, 2))
            grid = tokens.transpose(1, 2).unflatten(2, (height, width))
            projected.append(F.interpolate(grid, size=size, mode="bilinear", align_corners=False))
        hidden = self.linear_fuse(torch.cat(projected[::-1], dim=1))
        return self.classifier(self.dropout(self.activation(self.batch_norm(hidden))))


class Layout4(nn.Module):
    """One 4.x block per stage (LayerNorm, attention, LayerNorm, Mix-FFN) and the decode head."""

    def __init__(self, widths=(16, 32), heads=(1, 2), sr=(2, 1), activation=None):
        super().__init__()
        self.widths = widths
        self.embed = nn.Conv2d(3, widths[0], 3, padding=1)
        self.layer_norm_1 = nn.ModuleList(nn.LayerNorm(w) for w in widths)
        self.attention = nn.ModuleList(Attention4(w, h, s) for w, h, s in zip(widths, heads, sr))
        self.layer_norm_2 = nn.ModuleList(nn.LayerNorm(w) for w in widths)
        self.mlp = nn.ModuleList(MixFFN4(w, 2 * w, activation or transformers.activations.ACT2FN["gelu"]) for w in widths)
        self.widen = nn.Linear(widths[0], widths[1])
        self.decode_head = DecodeHead4((widths[0], widths[1], widths[1], widths[1]), 16, 3)

    def forward(self, images):
        x = self.embed(images)
        height, width = x.shape[2:]
        x = x.flatten(2).transpose(1, 2)
        maps = []
        for i in range(len(self.widths)):
            if i:
                x = self.widen(x)
            x = x + self.attention[i](self.layer_norm_1[i](x), height, width)[0]
            x = x + self.mlp[i](self.layer_norm_2[i](x), height, width)
            maps.append(x.transpose(1, 2).unflatten(2, (height, width)))
        pooled = F.avg_pool2d(maps[-1], 2, ceil_mode=True)
        return self.decode_head([maps[0], maps[1], pooled, F.avg_pool2d(pooled, 2, ceil_mode=True)])


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_transformers_4_layout(dtype, train):
    torch.manual_seed(2)
    reference_model = Layout4()
    images = torch.randn(2, 3, 11, 13)
    runs = []
    for model, patch, run_dtype in ((reference_model, False, torch.float64), (reference_model, False, dtype),
                                    (reference_model, True, dtype)):
        model = copy.deepcopy(model).to(run_dtype).train(train)
        if patch:
            sk.patch_transformers(model)
        logits = model(images.to(run_dtype))
        upstream = torch.linspace(-1, 1, logits.numel(), dtype=torch.float64).view_as(logits).to(run_dtype)
        logits.backward(upstream)
        runs.append((logits, {name: p.grad for name, p in model.named_parameters()}, model))
    (ref, ref_grads, _), (plain, plain_grads, _), (out, grads, patched) = runs
    roles = sorted({role for _, role in getattr(patched, REPORT_ATTRIBUTE).patched})
    assert roles == ["LayerNorm", "Mix-FFN", "attention", "decode head"]
    check_close("logits", out, plain, ref, dtype)
    for name in ref_grads:
        check_close(f"grad {name}", grads[name], plain_grads[name], ref_grads[name], dtype, gradient_floor(ref_grads))


def test_transformers_4_layout_attention_weights_and_activations():
    torch.manual_seed(3)
    attention = Attention4(16, 2, 2)
    x = torch.randn(2, 35, 16)
    expected = attention(x, 5, 7, output_attentions=True)
    sk.patch_transformers(attention, kernels=LOGIC_KERNELS)
    got = attention(x, 5, 7, output_attentions=True)
    assert len(got) == 2 and rel_err(got[1], expected[1]) < 1e-6
    assert rel_err(attention(x, 5, 7)[0], expected[0]) < 1e-5
    mlp = MixFFN4(16, 32, nn.GELU(approximate="tanh"))
    sk.patch_transformers(mlp)
    assert "forward" not in mlp.__dict__ and "not the exact (erf) GELU" in dict(mlp.segformer_kernels_patch.left_alone)[""]
