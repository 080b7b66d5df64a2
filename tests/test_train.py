"""Training: the loss goes down, resume is exact, non-finite losses are skipped, the recipe's
optimizer groups and schedule, the sharded data stream, mixed precision."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from segformer import SegFormer
from segformer.train import (
    CHECKPOINT_PREFIX, LOG_FILE, TRAINING_STATE, SampleStream, TrainConfig, Trainer, lr_factor, parameter_groups, train,
)

TINY = dict(data="synthetic", synthetic_size=64, batch_size=2, kernels="torch", progress=False, val_every=0, save_every=0)


def log_records(run_dir):
    return [json.loads(line) for line in (run_dir / LOG_FILE).read_text().splitlines()]


def test_loss_goes_down(tmp_path):
    """B0 from scratch on the synthetic shapes: 30 CPU steps cut the loss by more than 40%."""
    result = train(TrainConfig(**{**TINY, "batch_size": 4}, out=str(tmp_path), steps=30, lr=3e-4, warmup_steps=3, log_every=3))
    losses = [r["loss"] for r in log_records(tmp_path) if r["event"] == "train"]
    assert len(losses) == 10 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-2:]) / 2 < 0.6 * losses[0], losses
    assert result.metrics["mIoU"] > 0.35  # a constant prediction scores about 0.18
    # the final model is in RUN_DIR in the HF on-disk format, with the class names
    model = SegFormer.from_pretrained(tmp_path, kernels="torch")
    assert model.config.num_labels == 4 and model.config.id2label[1] == "circle"
    assert (tmp_path / "training.png").is_file() and (tmp_path / "eval.json").is_file()


@pytest.mark.parametrize("colour_on_device", [False, True], ids=["colour-in-workers", "colour-on-device"])
def test_resume_gives_the_same_weights(tmp_path, colour_on_device):
    """6 steps straight vs 3 steps, checkpoint, resume for 3: bitwise equal weights and losses
    (drop path and dropout on, gradient accumulation 2, augmentation random; the photometric
    distortion in the workers or batched on the device)."""
    settings = dict(TINY, steps=6, lr=3e-4, warmup_steps=2, grad_accum=2, log_every=1, save_every=3,
                    colour_on_device=colour_on_device)
    straight = tmp_path / "straight"
    train(TrainConfig(**settings, out=str(straight)))
    checkpoint = straight / f"{CHECKPOINT_PREFIX}000003"
    assert sorted(p.name for p in checkpoint.iterdir()) == ["config.json", "model.safetensors", "run.json", TRAINING_STATE]
    assert not [p for p in straight.iterdir() if p.name.startswith(".")]  # no temporary folders left

    resumed = tmp_path / "resumed"
    result = train(resume=checkpoint, out=str(resumed), progress=False)
    assert result.steps == 6
    first, second = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert first.keys() == second.keys()
    different = [k for k in first if not torch.equal(first[k], second[k])]
    assert not different, f"resumed weights differ: {different[:5]}"
    # the final weights did change during the resumed half
    middle = load_file(checkpoint / "model.safetensors")
    assert any(not torch.equal(middle[k], first[k]) for k in first)
    # the log continues the original one: steps 1..3 copied, 4..6 recomputed identically
    straight_log = [r for r in log_records(straight) if r["event"] == "train"]
    resumed_log = [r for r in log_records(resumed) if r["event"] == "train"]
    assert [r["step"] for r in resumed_log] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in resumed_log] == [r["loss"] for r in straight_log]


def test_non_finite_loss_is_skipped_and_counted(tmp_path, monkeypatch, capsys):
    calls = []
    original = SegFormer.loss

    def flaky_loss(self, logits, labels):
        calls.append(1)
        loss = original(self, logits, labels)
        return loss * float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(SegFormer, "loss", flaky_loss)
    result = train(TrainConfig(**TINY, out=str(tmp_path), steps=3, lr=3e-4, log_every=1))
    assert result.skipped_steps == 1
    err = capsys.readouterr()
    assert "warning: step 2: loss is not finite" in err.err
    assert "skipped steps (non-finite loss): 1" in err.out
    records = [r for r in log_records(tmp_path) if r["event"] == "train"]
    assert [r["skipped_steps"] for r in records] == [0, 1, 1]
    assert records[1]["loss"] is None
    weights = load_file(tmp_path / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())


def test_parameter_groups_follow_the_recipe():
    model = SegFormer.from_config("b0", num_classes=4, kernels="torch")
    groups = {g["name"]: g for g in parameter_groups(model, lr=6e-5, weight_decay=0.01, head_lr_mult=10.0)}
    assert set(groups) == {"encoder", "encoder_no_decay", "head", "head_no_decay"}
    assert groups["encoder"]["lr"] == 6e-5 and groups["head"]["lr"] == pytest.approx(6e-4)
    assert groups["encoder"]["weight_decay"] == 0.01 and groups["encoder_no_decay"]["weight_decay"] == 0.0
    head_ids = {id(p) for p in model.decode_head.parameters()}
    assert all(id(p) in head_ids for p in groups["head"]["params"] + groups["head_no_decay"]["params"])
    no_decay = {id(p) for g in ("encoder_no_decay", "head_no_decay") for p in groups[g]["params"]}
    for name, p in model.named_parameters():
        is_norm_or_bias = name.endswith("bias") or "norm" in name
        assert (id(p) in no_decay) == is_norm_or_bias, name


def test_lr_schedule_warmup_then_poly():
    factor = [lr_factor(s, total=100, warmup=10, warmup_ratio=1e-6, power=1.0, min_ratio=0.0) for s in range(101)]
    assert factor[0] == pytest.approx(1e-6)
    assert factor[5] == pytest.approx(0.95 * (1 - 0.5 * (1 - 1e-6)))
    assert factor[10] == pytest.approx(0.9) and factor[50] == pytest.approx(0.5) and factor[100] == 0.0
    assert all(a < b for a, b in zip(factor[:10], factor[1:11]))  # warm-up rises
    assert all(a > b for a, b in zip(factor[10:100], factor[11:101]))  # then decays


def test_sample_stream_shards_epochs():
    shards = [SampleStream(10, seed=3, rank=r, world_size=2) for r in range(2)]
    epoch0 = [s.keys(0, 5) for s in shards]
    assert all(e == 0 for keys in epoch0 for e, _ in keys)
    indices = [i for keys in epoch0 for _, i in keys]
    assert sorted(indices) == list(range(10))  # disjoint shards covering the epoch
    epoch1 = shards[0].keys(5, 5)
    assert all(e == 1 for e, _ in epoch1) and [i for _, i in epoch1] != [i for _, i in epoch0[0]]
    assert shards[0].keys(3, 4) == epoch0[0][3:] + epoch1[:2]  # positions run on across epochs
    padded = [SampleStream(5, seed=0, rank=r, world_size=2).keys(0, 3) for r in range(2)]
    assert sorted({i for keys in padded for _, i in keys}) == list(range(5))  # one sample repeats


def test_colour_on_device_defaults_off_on_cpu_and_moves_the_distortion_into_the_step(tmp_path):
    """Loader batches are uint8 pixels and labels; with colour_on_device they also carry each
    sample's photometric distortion, which the training step applies."""
    for colour_on_device, items in ((None, 2), (True, 3)):
        config = TrainConfig(**TINY, out=str(tmp_path / str(colour_on_device)), steps=1, colour_on_device=colour_on_device)
        trainer = Trainer(config)
        try:
            assert trainer.config.colour_on_device == (colour_on_device is True)
            batch = trainer.load_batch(trainer.micro_batch_keys(0)[0])
            assert len(batch) == items and batch[0].dtype == torch.uint8 and batch[1].dtype == torch.uint8
            assert torch.isfinite(trainer.forward_backward([batch])).all()
        finally:
            trainer.close()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_step(tmp_path, precision):
    trainer = Trainer(TrainConfig(**{**TINY, "batch_size": 1}, out=str(tmp_path), steps=2, precision=precision))
    try:
        assert trainer.scaler.is_enabled() == (precision == "fp16")
        before = [p.detach().clone() for p in trainer.model.parameters()]
        losses = trainer.forward_backward([trainer.load_batch(keys) for keys in trainer.micro_batch_keys(0)])
        assert losses.dtype == torch.float32 and torch.isfinite(losses).all()
        loss, outcome = trainer.optimizer_step(losses)
        assert math.isfinite(loss)
        changed = any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
        # fp16's GradScaler may skip a step on an overflow (and lower its scale); bf16 must step
        assert outcome == "stepped" if precision == "bf16" else outcome in ("stepped", "overflow")
        assert changed == (outcome == "stepped")
    finally:
        trainer.close()


def test_fine_tune_from_a_checkpoint_with_other_classes(tmp_path, capsys):
    """--init keeps the encoder and gives a fresh head for the folder's class count; a folder
    without a val split trains without validation."""
    import numpy as np
    from PIL import Image

    for name in ("a", "b"):
        (tmp_path / "data" / "train" / "images").mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / "train" / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(
            tmp_path / "data" / "train" / "images" / f"{name}.jpg")
        Image.fromarray(np.arange(1600, dtype=np.uint8).reshape(40, 40) % 3).save(
            tmp_path / "data" / "train" / "masks" / f"{name}.png")
    (tmp_path / "data" / "classes.txt").write_text("sky\nroad\ncar\n")
    pretrained = SegFormer.from_config("b0", num_classes=7, kernels="torch")
    pretrained.save_pretrained(tmp_path / "pretrained")
    result = train(TrainConfig(data=str(tmp_path / "data"), init=str(tmp_path / "pretrained"), out=str(tmp_path / "run"),
                               steps=1, batch_size=2, crop_size=(32, 32), lr=1e-4, kernels="torch", progress=False))
    err = capsys.readouterr().err
    assert result.metrics is None and "no validation split" in err
    assert "note: " in err and "classifier" in err  # the fresh head is announced
    tuned = SegFormer.from_pretrained(tmp_path / "run", kernels="torch")
    assert tuned.config.num_labels == 3 and tuned.config.id2label == {0: "sky", 1: "road", 2: "car"}
    before, after = pretrained.encoder.state_dict(), tuned.encoder.state_dict()
    moved = max((after[k].float() - before[k].float()).abs().max().item() for k in before if before[k].is_floating_point())
    assert 0 < moved < 1e-3  # one small AdamW step from the loaded encoder, not a fresh one
