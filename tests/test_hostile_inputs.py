"""The workflow under hostile inputs and faults: nothing lost, nothing silently wrong, and every
CLI error one line naming the file, exit code 2, no traceback."""

import json
import math
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from segformer import SegFormer
from segformer import checkpoint as checkpoint_module
from segformer import evaluate as evaluate_module
from segformer.cli import main
from segformer.data import DataError, image_size, open_dataset, read_image
from segformer.evaluate import segment
from segformer.predict import collect_images, predict
from segformer.train import (
    CHECKPOINT_PREFIX, LOG_FILE, TRAINING_STATE, TrainConfig, TrainingDiverged, Trainer, run_files, train,
)

TINY = dict(data="synthetic", synthetic_size=64, batch_size=2, kernels="torch", progress=False, val_every=0, save_every=0)
TINY_CLI = ["--data", "synthetic", "--synthetic-size", "64", "--batch-size", "2", "--kernels", "torch", "--no-progress",
            "--val-every", "0"]
EXIF_ROTATE_CLOCKWISE = 6  # EXIF orientation: the stored picture is shown turned 90 degrees clockwise


def tiny(**changes):
    return TrainConfig(**{**TINY, **changes})


def save(path, array, **options):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path, **options)


def rotated_photo(path, height=40, width=56):
    """A PNG stored height x width whose EXIF says it is displayed turned clockwise (width x height)."""
    stored = np.random.default_rng(0).integers(0, 256, (height, width, 3)).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = EXIF_ROTATE_CLOCKWISE
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(stored).save(path, exif=exif)
    return stored


def one_error_line(capsys, *names):
    """The CLI's stderr: exactly one line, the error, naming each of ``names``; returns it."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("segformer ") and ": error: " in err[0], err
    for name in names:
        assert str(name) in err[0], (name, err[0])
    return err[0]


@pytest.fixture(autouse=True)
def no_validation(monkeypatch):
    """Training runs here skip validation (the synthetic val split): it is not what is tested, and slow on a CPU."""
    monkeypatch.setattr(Trainer, "validate", lambda self, step: None)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model") / "b0"
    SegFormer.from_config("b0", num_classes=4, kernels="torch").save_pretrained(folder)
    return folder


@pytest.fixture
def poison_training_forward(monkeypatch):
    """poison(steps): the train-mode forwards of those (1-based) calls see NaN images."""
    def poison(calls):
        original, count = SegFormer.forward, []

        def forward(self, images, *args, **kwargs):
            if self.training:
                count.append(1)
                if len(count) in calls:
                    images = images * float("nan")
            return original(self, images, *args, **kwargs)

        monkeypatch.setattr(SegFormer, "forward", forward)
    return poison


# ---- 1. a skipped step leaves no trace ------------------------------------------------------------


def _tensors(value):
    """The tensors of a nested state dict, flattened in a fixed order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for key in sorted(value, key=str) for t in _tensors(value[key])]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    return [torch.tensor(float(value))] if isinstance(value, (int, float)) else []


def _state(trainer):
    """Copies of everything a step may change: weights and buffers, optimizer and GradScaler state."""
    optimizer = trainer.optimizer.state_dict()["state"]
    return ({k: v.clone() for k, v in trainer.model.state_dict().items()},
            [t.clone() for t in _tensors(optimizer)], _tensors(trainer.scaler.state_dict()))


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_a_skipped_step_leaves_no_trace(tmp_path, precision):
    """A step on NaN images is skipped: weights, BatchNorm statistics (and their count),
    optimizer and GradScaler state stay exactly as after the step before."""
    trainer = Trainer(tiny(out=str(tmp_path), steps=3, lr=3e-4, batch_size=1, precision=precision))
    try:
        batch = trainer.load_batch(trainer.micro_batch_keys(0)[0])
        assert trainer.train_step([batch])[1] in ("stepped", "overflow")
        weights, optimizer, scaler = _state(trainer)
        assert any(key.endswith("running_mean") for key in weights)
        assert any(key.endswith("num_batches_tracked") for key in weights)
        loss, outcome = trainer.train_step([(batch[0] * float("nan"), batch[1])])
        assert outcome == "non_finite" and math.isnan(loss)
        after_weights, after_optimizer, after_scaler = _state(trainer)
        changed = [key for key in weights if not torch.equal(weights[key], after_weights[key])]
        assert not changed, changed
        assert all(torch.equal(a, b) for a, b in zip(optimizer, after_optimizer)) and len(optimizer) == len(after_optimizer)
        assert all(torch.equal(a, b) for a, b in zip(scaler, after_scaler)) and len(scaler) == len(after_scaler)
        assert all(p.grad is None for p in trainer.model.parameters())
    finally:
        trainer.close()


# ---- 2. divergence stops the run ------------------------------------------------------------------


def test_divergence_stops_with_exit_2_and_keeps_the_last_good_checkpoint(tmp_path, poison_training_forward, capsys):
    """Every step from 3 on is non-finite: after 10 (the default) in a row the run stops with exit 2."""
    poison_training_forward(set(range(3, 100)))
    run = tmp_path / "run"
    code = main(["train", *TINY_CLI, "--steps", "20", "--save-every", "2", "--out", str(run)])
    line = one_error_line_after_warnings(capsys)
    assert code == 2
    assert "diverged" in line and "10 steps in a row" in line and "steps 3..12" in line
    # the checkpoint of step 10 (in the bad run) holds the state after step 2, the last good one
    assert f"{CHECKPOINT_PREFIX}000010" in line
    good, named = (load_file(run / f"{CHECKPOINT_PREFIX}0000{k:02d}" / "model.safetensors") for k in (2, 10))
    assert all(torch.equal(good[key], named[key]) for key in good)
    assert all(torch.isfinite(t).all() for t in good.values() if t.is_floating_point())
    assert not (run / "model.safetensors").exists()  # no final model from a diverged run


def one_error_line_after_warnings(capsys):
    """The last stderr line is the one error line; the lines before are the step warnings."""
    err = capsys.readouterr().err.strip().splitlines()
    assert not any("Traceback" in line for line in err)
    assert all(line.startswith("warning: step") or "checkpoint" in line or line.startswith("training ")
               or line.startswith("note:") for line in err[:-1]), err
    assert err[-1].startswith("segformer train: error: ")
    return err[-1]


def test_divergence_through_the_api(tmp_path, poison_training_forward):
    poison_training_forward(set(range(1, 100)))
    with pytest.raises(TrainingDiverged, match="2 steps in a row.*no checkpoint was saved"):
        train(tiny(out=str(tmp_path), steps=10, max_bad_steps=2))
    with pytest.raises(ValueError, match="max_bad_steps must be >= 1"):
        tiny(max_bad_steps=0)


# ---- 3. an existing run is never overwritten silently -----------------------------------------------


def test_out_onto_an_existing_run_is_refused_then_overwritten_with_overwrite(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY_CLI, "--steps", "2", "--save-every", "1", "--out", str(run)]) == 0
    (run / "notes.txt").write_text("mine")
    log_before = (run / LOG_FILE).read_text()
    capsys.readouterr()

    assert main(["train", *TINY_CLI, "--steps", "1", "--save-every", "1", "--out", str(run)]) == 2
    line = one_error_line(capsys, run, "--overwrite", "--resume")
    assert "already holds a run" in line
    assert (run / LOG_FILE).read_text() == log_before  # nothing touched

    (run / f"{CHECKPOINT_PREFIX}000009").mkdir()  # not a checkpoint (no training state): not the run's
    assert main(["train", *TINY_CLI, "--steps", "1", "--save-every", "1", "--out", str(run), "--overwrite"]) == 0
    assert sorted(p.name for p in run.glob(f"{CHECKPOINT_PREFIX}*")) == [f"{CHECKPOINT_PREFIX}00000{k}" for k in (1, 9)]
    assert [json.loads(line)["step"] for line in (run / LOG_FILE).read_text().splitlines()] == [1]
    assert (run / "notes.txt").read_text() == "mine"  # not a run file: kept


def test_a_model_folder_is_not_trained_over(tmp_path, saved_model, capsys):
    import shutil

    folder = shutil.copytree(saved_model, tmp_path / "pretrained")
    before = (folder / "model.safetensors").read_bytes()
    assert main(["train", *TINY_CLI, "--steps", "1", "--out", str(folder)]) == 2
    one_error_line(capsys, folder, "model.safetensors", "--overwrite")
    assert (folder / "model.safetensors").read_bytes() == before
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "config.json").write_text("{}")  # someone's config, no model beside it
    assert run_files(tmp_path / "project") == []


def test_resume_continues_in_its_folder_but_not_over_another_run(tmp_path, capsys):
    run, other = tmp_path / "run", tmp_path / "other"
    assert main(["train", *TINY_CLI, "--steps", "1", "--save-every", "1", "--out", str(run)]) == 0
    other.mkdir()
    (other / LOG_FILE).write_text("{}\n")  # another run's log
    checkpoint = run / f"{CHECKPOINT_PREFIX}000001"
    capsys.readouterr()
    assert main(["train", "--resume", str(checkpoint), "--out", str(other), "--no-progress"]) == 2
    one_error_line(capsys, other, "already holds a run")
    assert main(["train", "--resume", str(checkpoint), "--overwrite", "--no-progress"]) == 2
    one_error_line(capsys, "would delete the checkpoint being resumed")
    assert main(["train", "--resume", str(checkpoint), "--no-progress"]) == 0  # its own folder
    assert (other / LOG_FILE).read_text() == "{}\n"


def test_partial_checkpoints_of_a_killed_run_are_removed_at_the_next_start(tmp_path):
    run = tmp_path / "run"
    for stale in (f".{CHECKPOINT_PREFIX}000002.tmp4242", f".{CHECKPOINT_PREFIX}000001.old77"):
        (run / stale).mkdir(parents=True)
        (run / stale / "model.safetensors").write_bytes(b"half written")
    (run / ".keep").write_text("not ours")
    train(tiny(out=str(run), steps=1))
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == [".keep"]


def test_resume_may_train_longer(tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny(out=str(run), steps=2, save_every=2, warmup_steps=1, log_every=1))
    result = train(resume=run / f"{CHECKPOINT_PREFIX}000002", steps=4, progress=False)
    assert result.steps == 4
    assert [r["step"] for r in map(json.loads, (run / LOG_FILE).read_text().splitlines()) if r["event"] == "train"] == [
        1, 2, 3, 4]
    capsys.readouterr()
    assert main(["train", "--resume", str(run / f"{CHECKPOINT_PREFIX}000002"), "--steps", "1", "--no-progress"]) == 2
    one_error_line(capsys, "--steps 1", "at step 2")


# ---- 4, 5. EXIF orientation and 16-bit images ----------------------------------------------------


def test_exif_orientation_is_applied_to_images_not_masks(tmp_path):
    stored = rotated_photo(tmp_path / "photo.png")
    shown = read_image(tmp_path / "photo.png")
    assert shown.shape == (56, 40, 3) and np.array_equal(shown, np.rot90(stored, k=-1))
    assert image_size(tmp_path / "photo.png") == (56, 40)
    # a training pair: the mask is drawn on the displayed view (56 x 40) and stored as is
    root = tmp_path / "data"
    rotated_photo(root / "train" / "images" / "a.png")
    save(root / "train" / "masks" / "a.png", np.ones((56, 40)))
    (root / "classes.txt").write_text("a\nb\n")
    image, label = open_dataset(root, "train")[0]
    assert image.shape[:2] == label.shape == (56, 40)


def test_predict_writes_the_displayed_orientation(tmp_path, saved_model):
    rotated_photo(tmp_path / "in" / "photo.png")
    model = SegFormer.from_pretrained(saved_model, kernels="torch")
    record, = predict(model, [tmp_path / "in"], tmp_path / "out", palette=np.zeros((4, 3), np.uint8))
    assert record["size"] == [56, 40] and Image.open(record["label"]).size == (40, 56)


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 40 * 48).reshape(40, 48).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    with pytest.warns(UserWarning, match="16-bit images are scaled to 8 bits"):
        picture = read_image(tmp_path / "deep.png")
    assert picture.shape == (40, 48, 3) and picture.dtype == np.uint8
    assert np.array_equal(picture[..., 0], np.rint(ramp / 257).astype(np.uint8))
    assert picture.min() == 0 and picture.max() == 255 and len(np.unique(picture)) > 200


def test_16_bit_masks_past_the_class_list_are_refused(tmp_path):
    root = tmp_path / "data"
    save(root / "train" / "images" / "a.png", np.zeros((8, 8, 3)))
    (root / "train" / "masks").mkdir(parents=True)
    Image.fromarray(np.full((8, 8), 300, np.uint16)).save(root / "train" / "masks" / "a.png")
    (root / "classes.txt").write_text("a\nb\n")
    with pytest.raises(DataError, match="label value.*300.*outside the class list"):
        open_dataset(root, "train")[0]


# ---- 6. predict's inputs and names ---------------------------------------------------------------


def test_predict_skips_its_output_folder_and_names_never_collide(tmp_path, saved_model):
    folder = tmp_path / "photos"
    for name in ("x", "y"):
        save(folder / f"{name}.png", np.full((32, 32, 3), 90))
    model = SegFormer.from_pretrained(saved_model, kernels="torch")
    palette = np.zeros((4, 3), np.uint8)
    for _ in range(2):  # the second run must not read the first run's outputs
        records = predict(model, [folder], folder / "pred", palette=palette)
        assert len(records) == 2
    # a generated "x-2" must not take the name of a real input called x-2
    save(tmp_path / "a" / "x.png", np.zeros((32, 32, 3)))
    save(tmp_path / "b" / "x.png", np.zeros((32, 32, 3)))
    save(tmp_path / "c" / "x-2.png", np.zeros((32, 32, 3)))
    names = [name for _, name in collect_images([tmp_path / "a", tmp_path / "b", tmp_path / "c" / "x-2.png"])]
    assert len(set(names)) == 3 and names[0] == "x" and names[2] == "x-2", names
    records = predict(model, [tmp_path / "a", tmp_path / "b", tmp_path / "c" / "x-2.png"], tmp_path / "out",
                      palette=palette)
    assert len({r["label"] for r in records}) == 3 and len(list((tmp_path / "out").glob("*_label.png"))) == 3


# ---- 7, 8. scales, label shapes and values --------------------------------------------------------


@pytest.mark.parametrize("scales", [["0"], ["-1", "1"]])
def test_eval_refuses_scales_that_are_not_positive(saved_model, scales, capsys):
    code = main(["eval", "--checkpoint", str(saved_model), "--data", "synthetic", "--kernels", "torch", "--no-progress",
                 "--scales", *scales])
    assert code == 2
    one_error_line(capsys, "--scales", "positive")


def test_segment_refuses_a_zero_scale(saved_model):
    model = SegFormer.from_pretrained(saved_model, kernels="torch").eval()
    with pytest.raises(ValueError, match="scales must be positive"):
        segment(model, np.zeros((32, 32, 3), np.uint8), scales=[0.0])


def test_loss_refuses_labels_of_another_aspect_ratio():
    model = SegFormer.from_config("b0", num_classes=4, kernels="torch")
    logits = torch.randn(1, 4, 16, 16)
    with pytest.raises(ValueError, match="another aspect ratio"):
        model.loss(logits, torch.zeros(1, 64, 32, dtype=torch.long))
    assert torch.isfinite(model.loss(logits, torch.zeros(1, 64, 64, dtype=torch.long)))
    # odd sizes: the logits of a 63 x 65 image are 16 x 17 (rounded up)
    assert torch.isfinite(model.loss(torch.randn(2, 4, 16, 17), torch.zeros(2, 63, 65, dtype=torch.long)))
    assert torch.isfinite(model.loss(torch.randn(1, 4, 1, 3), torch.zeros(1, 3, 11, dtype=torch.long)))


@pytest.mark.parametrize("bad", [4, 7, -1])
def test_loss_names_a_label_past_the_classes(bad):
    model = SegFormer.from_config("b0", num_classes=4, kernels="torch")
    labels = torch.zeros(1, 16, 16, dtype=torch.long)
    labels[0, 3, 5] = bad
    labels[0, 0, 0] = 255  # the ignore index is fine
    with pytest.raises(ValueError, match=rf"value\(s\) {bad} outside the classes: num_classes=4"):
        model.loss(torch.randn(1, 4, 4, 4), labels)


# ---- 9. every CLI error path: one line naming the file -------------------------------------------


def test_corrupt_training_state_on_resume(tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny(out=str(run), steps=1, save_every=1))
    capsys.readouterr()
    state = run / f"{CHECKPOINT_PREFIX}000001" / TRAINING_STATE
    for damage in (state.read_bytes()[: len(state.read_bytes()) // 2], b"not a checkpoint at all\n"):
        state.write_bytes(damage)
        assert main(["train", "--resume", str(state.parent), "--no-progress"]) == 2
        one_error_line(capsys, state, "corrupt or truncated")
    torch.save({"step": 1}, state)  # loads, but is not a training state
    assert main(["train", "--resume", str(state.parent), "--no-progress"]) == 2
    one_error_line(capsys, state, "missing")


def _write_text_pth(folder):
    (folder / "weights.pth").write_text("these are my notes, not weights\n")
    return folder / "weights.pth"


def _write_plain_pickle(folder):
    with open(folder / "weights.pth", "wb") as f:
        pickle.dump({"layer": {1, 2, 3}, "note": "a plain pickle"}, f)
    return folder / "weights.pth"


def _write_config(saved_model, folder, field, value):
    import shutil

    shutil.copytree(saved_model, folder / "model")
    config = json.loads((folder / "model" / "config.json").read_text())
    config[field] = value
    (folder / "model" / "config.json").write_text(json.dumps(config))
    return folder / "model"


BAD_CHECKPOINTS = {
    "text file named .pth": (_write_text_pth, "not a torch file"),
    "plain pickle": (_write_plain_pickle, "other than tensors"),
    "config.json hidden_sizes a string": (lambda f, m: _write_config(m, f, "hidden_sizes", "big"), "config.json"),
    "config.json num_labels a word": (lambda f, m: _write_config(m, f, "num_labels", "many"), "config.json"),
    "config.json depths with a word": (lambda f, m: _write_config(m, f, "depths", [2, "x", 2, 2]), "config.json"),
    "config.json id2label a list": (lambda f, m: _write_config(m, f, "id2label", ["a", "b"]), "config.json"),
}


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
@pytest.mark.parametrize("command", ["predict", "train --init"])
def test_bad_checkpoint_files_give_one_line(tmp_path, saved_model, capsys, case, command):
    write, expected = BAD_CHECKPOINTS[case]
    path = write(tmp_path, saved_model) if "config" in case else write(tmp_path)
    if command == "predict":
        argv = ["predict", "--checkpoint", str(path), "--out", str(tmp_path / "o"), str(tmp_path)]
    else:
        argv = ["train", *TINY_CLI, "--steps", "1", "--init", str(path), "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    line = one_error_line(capsys, path, expected)
    assert "weights_only" not in line


def test_unreadable_weights_are_not_reported_as_missing(tmp_path, saved_model, capsys, monkeypatch):
    import shutil

    folder = shutil.copytree(saved_model, tmp_path / "model")
    weights = folder / "model.safetensors"
    weights.unlink()
    weights.mkdir()  # a folder where the weights file should be
    assert main(["predict", "--checkpoint", str(folder), "--out", str(tmp_path / "o"), str(tmp_path)]) == 2
    line = one_error_line(capsys, weights, "is a folder")
    assert "No such" not in line
    weights.rmdir()
    weights.symlink_to(tmp_path / "moved-away.safetensors")  # a dangling link
    assert main(["predict", "--checkpoint", str(folder), "--out", str(tmp_path / "o"), str(tmp_path)]) == 2
    one_error_line(capsys, weights, "broken link")
    weights.unlink()
    shutil.copy(saved_model / "model.safetensors", weights)

    def refused(path, *args, **kwargs):  # as for a file without read permission (tests may run as root)
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(checkpoint_module, "open", refused, raising=False)
    assert main(["predict", "--checkpoint", str(folder), "--out", str(tmp_path / "o"), str(tmp_path)]) == 2
    line = one_error_line(capsys, weights, "Permission denied")
    assert "corrupt" not in line


@pytest.mark.parametrize("command", ["predict", "eval"])
def test_out_of_memory_at_native_size_says_what_to_do(tmp_path, saved_model, capsys, monkeypatch, command):
    def out_of_memory(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(evaluate_module, "model_logits", out_of_memory)
    monkeypatch.setattr("segformer.predict.model_logits", out_of_memory)
    save(tmp_path / "in" / "huge.png", np.zeros((40, 60, 3)))
    if command == "predict":
        argv = ["predict", "--checkpoint", str(saved_model), "--out", str(tmp_path / "o"), str(tmp_path / "in"),
                "--no-resize", "--kernels", "torch", "--no-progress"]
        name = tmp_path / "in" / "huge.png"
    else:
        argv = ["eval", "--checkpoint", str(saved_model), "--data", "synthetic", "--no-resize", "--kernels", "torch",
                "--no-progress"]
        name = "synthetic_val_00000"
    assert main(argv) == 2
    one_error_line(capsys, name, "out of memory", "--crop-size")


# ---- 10. the data is checked before training --------------------------------------------------------


def test_train_checks_every_pair_up_front_and_reports_all_problems(tmp_path, capsys, monkeypatch):
    root = tmp_path / "data"
    good = np.zeros((40, 40))
    for split in ("train", "val"):
        for name in ("a", "b", "c"):
            save(root / split / "images" / f"{name}.png", np.zeros((40, 40, 3)))
            save(root / split / "masks" / f"{name}.png", good)
    (root / "classes.txt").write_text("a\nb\n")
    save(root / "train" / "masks" / "b.png", np.zeros((40, 41)))  # size
    (root / "val" / "images" / "c.png").write_bytes(b"\x89PNG broken")  # unreadable
    Image.new("CMYK", (40, 40)).save(root / "val" / "masks" / "a.tif")  # mode
    (root / "val" / "masks" / "a.png").unlink()
    read = []
    monkeypatch.setattr("segformer.data.read_image", lambda path: read.append(path))  # nothing may be decoded
    code = main(["train", "--data", str(root), "--steps", "1", "--batch-size", "1", "--crop-size", "32",
                 "--kernels", "torch", "--out", str(tmp_path / "run"), "--no-progress"])
    assert code == 2 and not read
    line = one_error_line(capsys, "3 problems", "train/masks/b.png", "mask is 41x40", "val/images/c.png",
                          "cannot read image", "val/masks/a.tif", "mode CMYK")
    assert not (tmp_path / "run").exists()


def test_missing_masks_are_all_reported(tmp_path):
    root = tmp_path / "data"
    for name in ("a", "b", "c"):
        save(root / "train" / "images" / f"{name}.png", np.zeros((8, 8, 3)))
    save(root / "train" / "masks" / "b.png", np.zeros((8, 8)))
    with pytest.raises(DataError, match="2 problems.*a.png: missing mask.*c.png: missing mask"):
        open_dataset(root, "train", num_classes=2)


def test_a_broken_val_split_is_reported_not_skipped(tmp_path, capsys):
    root = tmp_path / "data"
    save(root / "train" / "images" / "a.png", np.zeros((40, 40, 3)))
    save(root / "train" / "masks" / "a.png", np.zeros((40, 40)))
    save(root / "val" / "images" / "v.png", np.zeros((40, 40, 3)))  # and no mask
    (root / "classes.txt").write_text("a\nb\n")
    code = main(["train", "--data", str(root), "--steps", "1", "--batch-size", "1", "--crop-size", "32",
                 "--kernels", "torch", "--out", str(tmp_path / "run"), "--no-progress"])
    assert code == 2
    one_error_line(capsys, "val/images/v.png", "missing mask")


def test_train_does_not_change_the_callers_config(tmp_path):
    config = tiny(out=str(tmp_path), steps=1)
    before = TrainConfig(**vars(config))
    trainer = Trainer(config)
    trainer.close()
    assert config == before and trainer.config.crop_size == (64, 64) and trainer.config.precision == "fp32"


def test_the_data_check_shows_a_progress_bar_on_large_datasets(tmp_path, capsys, monkeypatch):
    from segformer import data as data_module

    root = tmp_path / "data"
    for name in ("a", "b"):
        save(root / "train" / "images" / f"{name}.png", np.zeros((8, 8, 3)))
        save(root / "train" / "masks" / f"{name}.png", np.zeros((8, 8)))
    dataset = open_dataset(root, "train", num_classes=2)
    assert data_module.check_datasets([dataset], progress=True) == []
    assert "checking data" not in capsys.readouterr().err  # small: no bar
    monkeypatch.setattr(data_module, "CHECK_PROGRESS_FROM", 2)
    assert data_module.check_datasets([dataset], progress=True) == []
    assert "checking data" in capsys.readouterr().err
