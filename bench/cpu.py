"""CPU benchmarks: this library's PyTorch path against transformers, and the training
input pipeline, written as rows like every other benchmark.

    python -m bench --cpu [--out DIR] [--threads T] [--only REGEX]   # -> bench/results/cpu/

Inference (suite "cpu"): SegFormer B0 and B2, batch 1, 512x512 and 1024x2048, fp32,
150 classes; ``eager`` is segformer.SegFormer with kernels="torch" (segformer_kernels.torch_ops),
``transformers`` is SegformerForSemanticSegmentation loaded from that model's
save_pretrained folder (the same weights). The two run interleaved in one process
(one call of each per round, median over the rounds), so load from other processes
hits both alike. Peak memory is measured in a fresh process per (model, size): glibc is
told to serve every allocation above 128 KiB with its own mapping
(MALLOC_MMAP_THRESHOLD_), so freed tensors leave the resident set at once and the
resident set follows live memory; after one warm-up call the kernel's high-water mark
is reset (/proc/self/clear_refs) and the row's ``peak_over_start_mb`` is the high-water
mark over one call minus the resident set before it (``peak_mb``: the high-water mark).

Input pipeline (suite "pipeline"): images/s of one worker (one thread, as a DataLoader
worker runs) making 512x512 training crops from 512x683 JPEG + PNG pairs, either from
decoded arrays (``augment``: segformer.transforms.TrainTransform alone) or from the files
(``read+augment``: JPEG and PNG decoding and the label mapping, as
segformer.data.FileDataset reads a training sample, then the transform), up to the uint8
crop a worker hands over (the normalisation runs on the training device: it is
segformer.transforms.finish_batch in the training step); and the rate N such workers sustain (``workers-N`` rows: N x the per-worker
rate, with the training steps per second that feeds at batch 8 in the shape). Rates come
from wall time; the one-worker rows also give the rate from the process's CPU time
(``shape.cpu_images_per_s``), what a worker with a core to itself delivers on a machine
where other processes compete for the cores.
"""

from __future__ import annotations

import gc
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from . import RESULTS_ROOT
from .core import PRIORITY_E2E, CompileSpec, Context, Item, make_row, merge_rows, read_rows, write_rows
from .measure import REPO_ROOT, Memory, Timing, environment

VARIANTS = ("b0", "b2")
IMAGES = ((512, 512), (1024, 2048))
SMOKE_IMAGES = ((64, 64),)
NUM_CLASSES = 150
ROUNDS = {(512, 512): 7, (1024, 2048): 3, (64, 64): 2}
PIPELINE_SOURCE = (512, 683)
PIPELINE_CROP = (512, 512)
SMOKE_PIPELINE = ((64, 86), (48, 48))
WORKERS = (1, 2, 4, 8)
TRAIN_BATCH = 8
PEAK_MMAP_THRESHOLD = 131072


class CpuWallTimer:
    meaningful = True

    def __init__(self, threads: int):
        self.name = f"wall clock on CPU, {threads} torch thread(s); providers interleaved, quantiles over rounds"


def cpu_context(threads: int) -> Context:
    timer = CpuWallTimer(threads)
    return Context(device=torch.device("cpu"), dtype=torch.float32, timer=timer, env=environment(torch.device("cpu"), timer),
                   smoke=False, compile=CompileSpec())


def quantiles(times_s: list[float]) -> Timing:
    ms = sorted(t * 1e3 for t in times_s)
    pick = lambda q: ms[min(len(ms) - 1, round(q * (len(ms) - 1)))]  # noqa: E731
    return Timing(pick(0.2), statistics.median(ms), pick(0.8))


# ---- models -----------------------------------------------------------------------------------


def build_pair(variant: str, folder: Path):
    """(ours, transformers') with the same weights, in eval mode; transformers is None
    when it is not installed."""
    from segformer import SegFormer

    torch.manual_seed(0)
    ours = SegFormer.from_config(variant, num_classes=NUM_CLASSES, kernels="torch").eval()
    try:
        import transformers
    except ImportError:
        return ours, None
    ours.save_pretrained(folder)
    theirs = transformers.SegformerForSemanticSegmentation.from_pretrained(folder).eval()
    return ours, theirs


def forward(provider: str, model, images: torch.Tensor) -> torch.Tensor:
    return model(images) if provider == "eager" else model(pixel_values=images).logits


def peak_memory(variant: str, provider: str, image: tuple[int, int], threads: int) -> Memory:
    """Peak resident-set growth of one call, in a fresh process (see the module docstring)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(PEAK_MMAP_THRESHOLD))
    command = [sys.executable, "-m", "bench.cpu", "--peak", variant, provider, str(image[0]), str(image[1]), str(threads)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parent.parent)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return Memory(result["peak_mb"], result["peak_over_start_mb"])


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure_peak_here(variant: str, provider: str, image: tuple[int, int], threads: int) -> dict:
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as folder:
        ours, theirs = build_pair(variant, Path(folder))
    model = ours if provider == "eager" else theirs
    images = torch.randn(1, 3, *image)
    with torch.no_grad():
        forward(provider, model, images)
        gc.collect()
        start_kb = _status_kb("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        forward(provider, model, images)
        peak_kb = _status_kb("VmHWM")
    return {"peak_mb": peak_kb / 1024, "peak_over_start_mb": (peak_kb - start_kb) / 1024}


def inference_case(image: tuple[int, int]) -> str:
    return f"{image[0]}x{image[1]}-bs1"


def inference_rows(ctx: Context, threads: int, images: tuple, variants: tuple, log, wanted) -> list[dict]:
    """The inference rows of the (variant, image) cases that ``wanted(suite, op, case)`` picks."""
    rows = []
    for variant in variants:
        picked = [image for image in images if wanted("cpu", f"segformer-{variant}", inference_case(image))]
        if not picked:
            continue
        with tempfile.TemporaryDirectory() as folder:
            ours, theirs = build_pair(variant, Path(folder))
        models = {"eager": ours, "transformers": theirs}
        for image in picked:
            x = torch.randn(1, 3, *image)
            times = {p: [] for p, m in models.items() if m is not None}
            with torch.no_grad():
                logits = {p: forward(p, models[p], x) for p in times}  # warm-up
                agreement = ""
                if "transformers" in logits:
                    error = ((logits["eager"] - logits["transformers"]).norm() / logits["transformers"].norm()).item()
                    agreement = f"; logits vs transformers: relative error {error:.1e}"
                del logits
                for _ in range(ROUNDS[image]):
                    for provider in times:
                        started = time.perf_counter()
                        forward(provider, models[provider], x)
                        times[provider].append(time.perf_counter() - started)
            for provider in times:
                memory = peak_memory(variant, provider, image, threads)
                note = ("kernels='torch' (segformer_kernels.torch_ops)" if provider == "eager" else
                        f"transformers, attention {models[provider].config._attn_implementation}")
                row = make_row(ctx, suite="cpu", op=f"segformer-{variant}", case=inference_case(image),
                               provider=provider, mode="inference", dtype="float32", batch=1,
                               shape={"B": 1, "H": image[0], "W": image[1], "classes": NUM_CLASSES, "threads": threads,
                                      "rounds": ROUNDS[image]},
                               note=note + agreement, timing=quantiles(times[provider]), memory=memory, images=1)
                rows.append(row)
                log(row)
        del ours, theirs, models
        gc.collect()
    return rows


# ---- input pipeline ---------------------------------------------------------------------------


def pipeline_samples(folder: Path, source: tuple[int, int], count: int = 8) -> list[tuple[Path, Path]]:
    """JPEG pictures (quality 90, a natural-image-like mix of smooth regions and texture)
    and PNG label maps at ``source`` (h, w), written to ``folder``."""
    from PIL import Image

    from segformer.data import SyntheticShapes

    shapes = SyntheticShapes("train", size=source, length=count, seed=1)
    pairs = []
    for index in range(count):
        picture, label = shapes[index]
        image_path, label_path = folder / f"{index}.jpg", folder / f"{index}.png"
        Image.fromarray(picture).save(image_path, quality=90)
        Image.fromarray(label.astype(np.uint8)).save(label_path)
        pairs.append((image_path, label_path))
    return pairs


def pipeline_rate(source: tuple[int, int], crop: tuple[int, int], seconds: float,
                  device: torch.device) -> dict[str, tuple[float, float | None]]:
    """Images/s (wall time, and from the process's CPU time) of one single-threaded worker:
    the transform alone, reading + transform, reading + transform with the photometric
    distortion left to the device; and of the device step that then finishes a batch."""
    from segformer.data import SYNTHETIC_CLASSES, FileDataset
    from segformer.transforms import TrainTransform, finish_batch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        in_worker, on_device = TrainTransform(crop), TrainTransform(crop, colour_on_device=True)
        with tempfile.TemporaryDirectory() as folder:
            files = FileDataset("folder", "train", pipeline_samples(Path(folder), source), SYNTHETIC_CLASSES)
            decoded = [files[index] for index in range(len(files))]
            batch = [on_device(*decoded[n % len(decoded)], np.random.default_rng([0, 0, n])) for n in range(TRAIN_BATCH)]
            pixels, photometric = (torch.stack([sample[i] for sample in batch]).to(device) for i in (0, 2))

            def finish(_):
                finish_batch(pixels, photometric)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)

            steps = {
                "augment": lambda n: in_worker(*decoded[n % len(decoded)], np.random.default_rng([0, 0, n])),
                "read+augment": lambda n: in_worker(*files[n % len(files)], np.random.default_rng([0, 0, n])),
                "read+augment-colour-on-device": lambda n: on_device(*files[n % len(files)], np.random.default_rng([0, 0, n])),
                "finish-batch-on-device": finish,
            }
            rates = {}
            for mode, step in steps.items():
                images = TRAIN_BATCH if mode.startswith("finish-batch") else 1
                step(0)
                count, started, cpu_started = 0, time.perf_counter(), time.process_time()
                while count < 20 or time.perf_counter() - started < seconds:
                    step(count)
                    count += 1
                # a GPU step's process time is the host's waiting, not its work
                on_gpu = mode.startswith("finish-batch") and device.type != "cpu"
                cpu_rate = None if on_gpu else images * count / (time.process_time() - cpu_started)
                rates[mode] = (images * count / (time.perf_counter() - started), cpu_rate)
            return rates
    finally:
        torch.set_num_threads(threads)


def pipeline_case(smoke: bool) -> tuple[tuple[int, int], tuple[int, int], str]:
    source, crop = SMOKE_PIPELINE if smoke else (PIPELINE_SOURCE, PIPELINE_CROP)
    return source, crop, f"{source[0]}x{source[1]}-jpeg-crop{crop[0]}x{crop[1]}"


def pipeline_items(smoke: bool) -> list[Item]:
    """The pipeline rows as an item of the main suite: on a GPU machine they sit beside the
    training step they have to feed."""
    _, _, case = pipeline_case(smoke)
    modes = ("augment", "read+augment", "read+augment-colour-on-device", "finish-batch-on-device",
             *(f"workers-{n}" for n in WORKERS))
    return [Item(suite="pipeline", op="train-transform", case=case, provider="ours", modes=modes, priority=PRIORITY_E2E,
                 est_s=0.0 if smoke else 30.0, dtype="uint8", batch=1,
                 run=lambda ctx: pipeline_rows(ctx, smoke))]


def pipeline_rows(ctx: Context, smoke: bool, log=None) -> list[dict]:
    source, crop, case = pipeline_case(smoke)
    rates = pipeline_rate(source, crop, seconds=0.2 if smoke else 10.0, device=ctx.device)
    rows = []
    for mode, (rate, cpu_rate) in rates.items():
        device_step = mode.startswith("finish-batch")
        note = (f"the training device ({ctx.device.type}) finishing a uint8 batch of {TRAIN_BATCH}: photometric "
                "distortion, normalisation" if device_step else
                "one worker, one thread; images_per_s from wall time, cpu_images_per_s from the process's CPU time "
                "(what a worker with a core to itself delivers)")
        rows.append(make_row(ctx, suite="pipeline", op="train-transform", case=case, provider="ours", mode=mode,
                             dtype="uint8", batch=TRAIN_BATCH if device_step else 1,
                             shape={"source": list(source), "crop": list(crop), "workers": 0 if device_step else 1,
                                    "cpu_images_per_s": cpu_rate},
                             note=note, images_per_s=rate, ms_p50=1e3 / rate))
    # the trainer's default: the distortion in the workers on the CPU, on the device on GPUs
    worker_mode = "read+augment-colour-on-device" if ctx.device.type == "cuda" else "read+augment"
    for workers in WORKERS:
        rate = workers * rates[worker_mode][0]
        rows.append(make_row(ctx, suite="pipeline", op="train-transform", case=case, provider="ours",
                             mode=f"workers-{workers}", dtype="uint8", batch=TRAIN_BATCH,
                             shape={"source": list(source), "crop": list(crop), "workers": workers,
                                    "train_steps_per_s": rate / TRAIN_BATCH},
                             note=f"{workers} x the one-worker {worker_mode} rate (the trainer's default here; workers "
                                  "run in parallel on their own cores)",
                             images_per_s=rate))
    for row in rows:
        if log is not None:
            log(row)
    return rows


def run(out: Path | None, threads: int, smoke: bool = False, only: str | None = None) -> Path:
    """Measure and write rows.jsonl; ``only`` (a regular expression) measures the cases whose
    'suite/op/case' it matches (e.g. 'pipeline', 'cpu/segformer-b2/1024x2048') and keeps the
    other rows already in the folder."""
    ctx = cpu_context(threads)
    out = Path(out) if out else (REPO_ROOT / "runs" / "bench-cpu-smoke" if smoke else RESULTS_ROOT / "cpu")
    torch.set_num_threads(threads)

    path = out / "rows.jsonl"
    def wanted(suite: str, op: str, case: str) -> bool:
        return only is None or re.search(only, f"{suite}/{op}/{case}") is not None

    earlier = [r for r in read_rows(path) if not wanted(r["suite"], r["op"], r["case"])] if only and path.exists() else []
    rows = []

    def log(row):
        peak = f", peak +{row['peak_over_start_mb']:.0f} MB" if row.get("peak_over_start_mb") is not None else ""
        ms = f"{row['ms_p50']:.1f} ms, " if row.get("ms_p50") is not None else ""
        print(f"{row['id']}: {ms}{row['images_per_s']:.1f} img/s{peak}", flush=True)
        rows.append(row)
        write_rows(path, merge_rows(earlier, rows))  # after every row: a run stopped early keeps what it measured

    print(f"# {ctx.env['gpu']}, torch {ctx.env['torch']}, commit {ctx.env['git_commit']}; {ctx.timer.name}")
    if wanted("pipeline", "train-transform", pipeline_case(smoke)[2]):
        pipeline_rows(ctx, smoke, log)
    inference_rows(ctx, threads, SMOKE_IMAGES if smoke else IMAGES, ("b0",) if smoke else VARIANTS, log, wanted)
    from .report import write_performance

    write_performance(RESULTS_ROOT, RESULTS_ROOT / "PERFORMANCE.md" if out.resolve().parent == RESULTS_ROOT.resolve()
                      else out / "PERFORMANCE.md")
    print(f"# rows: {out / 'rows.jsonl'}")
    return out


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == "--peak":
        _, _, variant, provider, height, width, threads = sys.argv
        print(json.dumps(measure_peak_here(variant, provider, (int(height), int(width)), int(threads))))
    else:
        raise SystemExit("usage: python -m bench --cpu (this module's --peak mode is internal)")
