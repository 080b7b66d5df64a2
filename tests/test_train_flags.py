"""--compile (one graph, the custom ops included) and --sync-bn (a note off torchrun GPUs)."""

from __future__ import annotations

import pytest
import torch

from segformer.cli import build_parser
from segformer.train import TrainConfig, train
from tests.helpers import rel_err, tiny_segformer


@pytest.mark.slow
def test_compiled_model_is_one_graph_with_the_custom_ops():
    model = tiny_segformer(3, kernels="auto", drop_path_rate=0.0, classifier_dropout_prob=0.0)
    images = torch.randn(2, 3, 33, 35)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss = compiled(images).square().mean()
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    expected = model(images).square().mean()
    expected.backward()
    assert rel_err(loss, expected) < 1e-5
    wanted = [p.grad for p in model.parameters()]
    # the floor: gradients that are zero in exact arithmetic (a key bias's, say)
    floor = 1e-3 * max(want.norm().item() for want in wanted)
    for got, want in zip(grads, wanted):
        assert (got - want).norm().item() <= 1e-4 * max(want.norm().item(), floor)


def test_cli_flags_reach_the_config():
    args = build_parser().parse_args(["train", "--compile", "--sync-bn"])
    assert args.compile is True and args.sync_bn is True
    args = build_parser().parse_args(["train"])
    assert args.compile is None and args.sync_bn is None
    assert TrainConfig().compile is False and TrainConfig().sync_bn is False


def test_sync_bn_on_one_cpu_process_is_a_note_not_a_crash(tmp_path, capsys):
    result = train(TrainConfig(data="synthetic", synthetic_size=32, crop_size=32, steps=1, batch_size=2,
                               out=str(tmp_path / "run"), sync_bn=True, kernels="torch", device="cpu",
                               save_every=0, val_every=0, progress=False))
    assert result.steps == 1
    out = capsys.readouterr()
    assert "--sync-bn needs several processes" in out.out + out.err
