"""The whole model on the kernels is the reference model.

``kernels="auto"`` runs every op that has a Triton kernel (on CPU: under the interpreter,
which conftest turns on), ``kernels="torch"`` the PyTorch reference; with the same weights
they must give the same logits, loss and gradients in train and eval mode. Plus: training
steps are deterministic, torch.compile traces the model with no graph break, CUDA graphs
capture inference, and the model's own glue code copies no token tensor between ops.
"""

from __future__ import annotations

import collections
import copy
from typing import NamedTuple

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import segformer.model as segformer_model
from helpers import TOLERANCE, assert_close
from segformer import SegFormer, SegFormerConfig
from segformer_kernels._backend import triton_implementation, triton_runs_on
from test_model_parity import assert_same_gradients

# A small odd image keeps interpreter runs short (stage grids 16x9, 8x5, 4x3, 2x2: every
# stage has M >= 2 keys); depth grows the error, hence 10x the fp32 op tolerance.
IMAGE_SIZE = (61, 35)
DEPTH_SCALE = 10
# On a GPU the kernels' fp32 dots use tf32 (about 5e-4 relative per op, docs/design.md,
# "Testing conventions"), and the public ops offer no way to pin "ieee" from the model.
TF32_SCALE = 50


def model_tolerance(device) -> float:
    """How many fp32 tolerances (1e-5) the whole model may differ by."""
    return DEPTH_SCALE * (TF32_SCALE if device.type == "cuda" else 1)


def b0_config(device) -> SegFormerConfig:
    """B0 (its widths, heads and reductions); under the interpreter, whose cost is per
    kernel launch, one block per stage instead of two. No dropout, no drop path."""
    depths = (2, 2, 2, 2) if device.type == "cuda" else (1, 1, 1, 1)
    return SegFormerConfig.preset("b0", depths=depths, num_labels=5, drop_path_rate=0.0, classifier_dropout_prob=0.0)


def run_step(model: SegFormer, images: torch.Tensor, labels: torch.Tensor):
    logits = model(images)
    loss = model.loss(logits, labels)
    loss.backward()
    return logits, loss


def batch(device, size: int = 2):
    images = torch.randn(size, 3, *IMAGE_SIZE, device=device)
    labels = torch.randint(0, 5, (size, *IMAGE_SIZE), device=device)
    labels[:, :5] = 255
    return images, labels


class Run(NamedTuple):
    model: SegFormer
    images: torch.Tensor  # its .grad holds the input gradient
    logits: torch.Tensor
    loss: torch.Tensor


def step_off_the_relu_kink(model: SegFormer, device, attempts: int = 3) -> tuple[Run, Run, torch.Tensor]:
    """(reference run, kernel run, labels): one step of a "torch" and an "auto" copy of ``model``
    on a batch where both put every input of the decoder's ReLU on the same side of 0. Where
    rounding moves one of them across 0 the gradient jumps (ReLU's kink) and the two paths'
    gradients differ by the jump, not by rounding; among the ~1e5 inputs one lands within fp32
    rounding of 0 about once in twenty batches, so such a batch is redrawn."""
    for _ in range(attempts):
        runs, signs = [], []
        images, labels = batch(device)
        for kernels in ("torch", "auto"):
            copied = copy.deepcopy(model)
            copied.kernels = kernels
            hook = copied.decode_head.batch_norm.register_forward_hook(lambda _, __, out: signs.append(out > 0))
            inputs = images.clone().requires_grad_()
            runs.append(Run(copied, inputs, *run_step(copied, inputs, labels)))
            hook.remove()
        if torch.equal(*signs):
            return runs[0], runs[1], labels
    raise AssertionError(f"{attempts} batches in a row put a decoder ReLU input within rounding of 0")


def ops_on_triton(device) -> list[str]:
    ops = ("fused_attention", "spatial_reduction", "mix_ffn", "layer_norm")
    return [op for op in ops if triton_runs_on(device) and triton_implementation(op) is not None]


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_kernels_match_the_reference_model(device, training, poisoned_allocations):
    """Same weights, same batch: "auto" (kernels) and "torch" (reference) give the same
    logits, loss, input gradient, every parameter gradient and BatchNorm statistics. In
    training, a second identical step gives bit-identical gradients and parameters.
    Allocations start as NaN, so an element a kernel forgot to write shows up."""
    if not ops_on_triton(device):
        pytest.skip("no op runs on Triton here (no triton, or CPU without TRITON_INTERPRET=1): "
                    "the kernel model would be the reference model itself")
    print(f"ops on Triton: {ops_on_triton(device)}")
    model = SegFormer(b0_config(device), kernels="torch").to(device).train(training)
    expected, got, labels = step_off_the_relu_kink(model, device)
    tolerance = model_tolerance(device)
    assert_close(got.logits, expected.logits, torch.float32, "logits", scale=tolerance)
    assert_close(got.loss, expected.loss, torch.float32, "loss", scale=tolerance)
    assert_close(got.images.grad, expected.images.grad, torch.float32, "grad of images", scale=tolerance)
    assert_same_gradients(got.model, {name: p.grad for name, p in expected.model.named_parameters()}, training, tolerance)
    if not training:
        return
    for stat in ("running_mean", "running_var"):
        assert_close(getattr(got.model.decode_head.batch_norm, stat), getattr(expected.model.decode_head.batch_norm, stat),
                     torch.float32, stat, scale=tolerance)
    # determinism: the same step again from the same state
    again = copy.deepcopy(model)
    again.kernels = "auto"
    run_step(again, got.images.detach(), labels)
    for stepped in (got.model, again):
        torch.optim.SGD(stepped.parameters(), lr=0.1).step()
    for (name, value), repeated in zip(got.model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(value, repeated), f"{name} differs after two identical training steps"


@pytest.mark.parametrize("stages", [1, 3, 5])
@torch.no_grad()
def test_any_stage_count_runs_in_evaluation(stages, device):
    """SegFormerConfig takes any number of stages; the decoder (the fused inference tail
    in evaluation included) must too, and give the reference model's logits."""
    if not ops_on_triton(device):
        pytest.skip("no op runs on Triton here: the kernel model would be the reference model itself")
    config = SegFormerConfig(
        hidden_sizes=(16, 32, 32, 64, 64)[:stages], depths=(1,) * stages, num_attention_heads=(1, 2, 2, 4, 4)[:stages],
        sr_ratios=(4, 2, 1, 1, 1)[:stages], patch_sizes=(7, 3, 3, 3, 3)[:stages], strides=(4, 2, 2, 2, 2)[:stages],
        mlp_ratios=(2,) * stages, decoder_hidden_size=32, num_labels=5, drop_path_rate=0.0,
        classifier_dropout_prob=0.0,
    )
    reference = SegFormer(config, kernels="torch").to(device).eval()
    fused = copy.deepcopy(reference)
    fused.kernels = "auto"
    images, _ = batch(device, size=1)
    assert_close(fused(images), reference(images), torch.float32, "logits", scale=model_tolerance(device))


def test_compile_traces_without_graph_break(device):
    """fullgraph=True fails on any graph break; the kernels are opaque custom ops with fake
    and autograd registrations. With parameters that need gradients, AOTAutograd traces the
    joint forward and backward graph when it compiles, so the first call proves both."""
    model = SegFormer(b0_config(device), kernels="auto").to(device).train()
    images, labels = batch(device)

    def step(images, labels):
        return model.loss(model(images), labels)

    loss = torch.compile(step, fullgraph=True, backend="aot_eager")(images, labels)
    assert loss.grad_fn is not None
    model.kernels = "torch"
    assert_close(loss, step(images, labels), torch.float32, "compiled loss", scale=model_tolerance(device))


@pytest.mark.gpu
def test_cuda_graph_capture_of_inference_matches_eager():
    model = SegFormer(b0_config(torch.device("cuda")), kernels="auto").cuda().eval()
    static_images = torch.randn(2, 3, 64, 64, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(2):  # warm-up: autotuning and lazy initialisation outside the capture
            model(static_images)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        static_logits = model(static_images)
    for _ in range(2):
        images = torch.randn_like(static_images)
        static_images.copy_(images)
        graph.replay()
        with torch.no_grad():
            expected = model(images)
        torch.cuda.synchronize()
        assert_close(static_logits, expected, torch.float32, "replayed logits")


@pytest.mark.gpu
def test_bf16_training_step_matches_the_fp32_reference():
    """The first bf16 (autocast) training step on the kernels, at a model-sized image,
    against the fp32 reference model: the loss and every parameter gradient, within bf16's
    tolerance times the depth (the step where autotuning first picks every tile)."""
    device = torch.device("cuda")
    config = SegFormerConfig.preset("b0", num_labels=19, drop_path_rate=0.0, classifier_dropout_prob=0.0)
    reference = SegFormer(config, kernels="torch").to(device).train()
    fused = copy.deepcopy(reference)
    fused.kernels = "auto"
    images = torch.randn(2, 3, 512, 512, device=device)
    labels = torch.randint(0, 19, (2, 512, 512), device=device)
    labels[:, :100] = 255
    expected_loss = reference.loss(reference(images), labels)
    expected_loss.backward()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = fused(images)
    loss = fused.loss(logits.float(), labels)
    loss.backward()
    scale = DEPTH_SCALE * TOLERANCE[torch.bfloat16] / TOLERANCE[torch.float32]
    assert_close(loss, expected_loss, torch.float32, "loss", scale=scale)
    assert_same_gradients(fused, {name: p.grad for name, p in reference.named_parameters()}, True, scale)


class _OpRecorder(TorchDispatchMode):
    """Counts the aten ops the model's own code dispatches, outside the sk ops."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()
        self.inside_op = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.inside_op:
            self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def test_no_layout_copies_between_ops(monkeypatch):
    """Tokens stay [B, N, C] from patch embedding to decoder: every tensor the model hands
    an sk op is contiguous, and the glue between ops never copies (no clone, copy_ or
    contiguous) given ops that return their documented layout (as the kernels do)."""
    recorder = _OpRecorder()
    real_sk = segformer_model.sk
    handed = []

    class RecordingOps:
        def __getattr__(self, name):
            op = getattr(real_sk, name)

            def call(*args, **kwargs):
                handed.extend((name, t.shape, t.is_contiguous()) for t in args if isinstance(t, torch.Tensor))
                recorder.inside_op = True
                try:
                    out = op(*args, **kwargs)
                    # the reference's einsum returns o permuted; the kernels write it contiguous
                    return tuple(t.contiguous() for t in out) if isinstance(out, tuple) else out.contiguous()
                finally:
                    recorder.inside_op = False

            return call

    monkeypatch.setattr(segformer_model, "sk", RecordingOps())
    import segformer_kernels.decoder as decoder_module  # the decoder tail calls decode_head from there

    monkeypatch.setattr(decoder_module, "decode_head", RecordingOps().decode_head)
    model = SegFormer(b0_config(torch.device("cpu")), kernels="torch").eval()
    images = torch.randn(2, 3, *IMAGE_SIZE)
    with recorder, torch.no_grad():
        model(images)
    assert handed and all(contiguous for _, _, contiguous in handed), [h for h in handed if not h[2]]
    copy_ops = ("aten.clone", "aten.copy_", "aten._to_copy", "aten.contiguous")
    copies = {op: n for op, n in recorder.counts.items() if op in copy_ops}
    # the one allowed copy: the 3-channel input image to channels-last
    assert copies == {"aten.clone": 1}, copies
