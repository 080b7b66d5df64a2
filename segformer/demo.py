"""The main job (``segformer demo``): train a model on the synthetic shapes, evaluate the saved
model, predict a few images, run the kernel benchmark smoke test (``segformer bench --smoke``),
and say where everything went. A few minutes on 2 CPU cores; on a GPU the same command runs
the Triton kernels (kernels="auto")."""

from __future__ import annotations

import json
import time
from pathlib import Path

from .benchsuite import run_suite, suite_module
from .data import SyntheticShapes, write_sample_files
from .evaluate import evaluate, load_model
from .metrics import format_table, json_safe
from .palette import palette_for
from .predict import predict
from .runtime import resolve_device, resolve_precision
from .train import EVAL_FILE, TrainConfig, train

CPU_STEPS, GPU_STEPS = 150, 1000
PREDICT_IMAGES = 6


def run_demo(out: str = "runs/demo", model: str = "b0", steps: int | None = None, batch_size: int = 8,
             image_size: int = 128, lr: float = 6e-4, kernels: str = "auto", precision: str | None = None,
             device: str | None = None, bench: bool = True, progress: bool = True, overwrite: bool = False) -> int:
    started = time.time()
    out = Path(out)
    resolved = resolve_device(device)
    precision = resolve_precision(precision, resolved)
    steps = steps or (GPU_STEPS if resolved.type == "cuda" else CPU_STEPS)
    checkpoint_every = max(1, steps // 2)
    print(f"[1/4] training {model.upper()} on synthetic shapes ({image_size}x{image_size}) for {steps} steps -> {out}")
    result = train(TrainConfig(
        data="synthetic", out=str(out), model=model, steps=steps, batch_size=batch_size, crop_size=(image_size, image_size),
        synthetic_size=image_size, lr=lr, kernels=kernels, precision=precision, device=device,
        save_every=checkpoint_every, val_every=checkpoint_every, log_every=max(1, min(10, steps // 20)), progress=progress,
    ), overwrite=overwrite)

    print(f"\n[2/4] evaluating the saved model ({out}) on the synthetic val split")
    segformer, info = load_model(out, kernels=kernels, device=resolved)
    val_set = SyntheticShapes("val", size=image_size)
    metrics = evaluate(segformer, val_set, crop_size=(image_size, image_size), precision=precision)
    (out / EVAL_FILE).write_text(json.dumps(json_safe(metrics), indent=2), encoding="utf-8")
    print(format_table(metrics))

    print(f"\n[3/4] predicting {PREDICT_IMAGES} unseen synthetic images")
    samples = out / "samples"
    images = write_sample_files(SyntheticShapes("test", size=image_size), range(PREDICT_IMAGES), samples)
    predictions = out / "predictions"
    predict(segformer, images, predictions, palette=palette_for(segformer.config.num_labels, info.get("dataset")),
            batch_size=PREDICT_IMAGES, precision=precision)

    bench_result = _bench_smoke(out / "bench") if bench else "skipped (--no-bench)"
    print(f"\n[4/4] kernel benchmark smoke: {bench_result}")

    print(f"\ndone in {time.time() - started:.0f} s (device {resolved}, kernels={segformer.kernels}, {precision})")
    print(f"  model        {out}/config.json + model.safetensors (HF format; SegFormer.from_pretrained('{out}'))")
    print(f"  checkpoints  {out}/checkpoint-*  (segformer train --resume <one of them>)")
    print(f"  log          {out}/log.jsonl")
    print(f"  plot         {result.files.get('plot', '(matplotlib not installed)')}")
    print(f"  metrics      {out / EVAL_FILE}  (mIoU {100 * metrics['mIoU']:.1f})")
    print(f"  images       {samples}/images  (ground truth in {samples}/masks)")
    print(f"  predictions  {predictions}/*_label.png, *_overlay.png")
    if bench and (out / "bench").is_dir():
        print(f"  benchmark    {out / 'bench'}")
    return 0


def _bench_smoke(out: Path) -> str:
    """``segformer bench --smoke``: the installed suite, or the checkout's."""
    if suite_module() is None:
        return "skipped (the benchmark suite is neither installed nor importable here)"
    completed = run_suite(["--smoke", "--out", str(out)], capture_output=True, text=True, timeout=600)
    if completed.returncode != 0:
        tail = (completed.stderr or completed.stdout).strip().splitlines()[-1:] or [""]
        return f"failed (exit {completed.returncode}): {tail[0]}"
    return f"ok, results in {out}"
