"""The segformer command: train -> eval -> predict, resume, option errors, the demo."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from segformer.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY_TRAIN = ["--data", "synthetic", "--synthetic-size", "64", "--batch-size", "2", "--kernels", "torch", "--no-progress"]


def test_help_of_every_command(capsys):
    for argv in (["--help"], ["train", "--help"], ["eval", "--help"], ["predict", "--help"], ["demo", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--init", "--num-classes", "--crop-size", "--grad-accum", "--save-every", "--resume", "--precision",
                 "--mode", "--stride", "--scales", "--flip", "--json"):
        assert flag in out


def test_python_dash_m_entry_point():
    completed = subprocess.run([sys.executable, "-m", "segformer", "eval", "--help"], cwd=REPO, capture_output=True,
                               text=True, timeout=120)
    assert completed.returncode == 0 and "--checkpoint" in completed.stdout


def test_train_eval_predict(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY_TRAIN, "--steps", "2", "--save-every", "1", "--lr", "1e-4", "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert "trained 2 steps" in out and "mIoU" in out
    for name in ("config.json", "model.safetensors", "log.jsonl", "run.json", "eval.json", "training.png"):
        assert (run / name).is_file(), name
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-000001", "checkpoint-000002"]

    assert main(["eval", "--checkpoint", str(run), "--data", "synthetic", "--json", str(tmp_path / "eval.json"),
                 "--kernels", "torch", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "crop 64x64" in out  # the training crop, from run.json
    assert json.loads((tmp_path / "eval.json").read_text()) == json.loads((run / "eval.json").read_text())

    from segformer.data import SyntheticShapes, write_sample_files

    write_sample_files(SyntheticShapes("test", size=64), range(3), tmp_path / "samples")
    assert main(["predict", "--checkpoint", str(run), "--out", str(tmp_path / "pred"), str(tmp_path / "samples" / "images"),
                 "--kernels", "torch", "--no-progress"]) == 0
    assert len(list((tmp_path / "pred").glob("*_label.png"))) == 3
    assert len(list((tmp_path / "pred").glob("*_overlay.png"))) == 3

    # resume: settings that would change the result must match the checkpoint's
    checkpoint = str(run / "checkpoint-000001")
    assert main(["train", "--resume", checkpoint, "--lr", "1e-3", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lr" in err[0] and "differs" in err[0]
    assert main(["train", "--resume", checkpoint, "--out", str(tmp_path / "resumed"), "--no-progress"]) == 0
    assert "resuming at step 1" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["train", "--steps", "0"], "steps must be >= 1"),
    (["train", "--crop-size", "1", "2", "3"], "one or two positive ints"),
    (["train", "--data", "/nonexistent/data"], "dataset folder not found"),
    (["train", "--crop-size", "24", "--kernels", "torch"], "below this model's minimum input size 29x29"),
    (["train", "--resume", "/nonexistent/checkpoint"], "not a training checkpoint"),
    (["predict", "--checkpoint", "/nonexistent", "--out", "x", "y.png"], "cannot load the model"),
])
def test_bad_options_exit_2_with_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_demo(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "2", "--image-size", "64", "--batch-size", "2",
                 "--kernels", "torch", "--no-bench", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "done in" in printed and str(out) in printed
    assert (out / "model.safetensors").is_file() and (out / "eval.json").is_file()
    assert len(list((out / "predictions").glob("*_overlay.png"))) == 6
    assert len(list((out / "samples" / "images").glob("*.png"))) == 6
