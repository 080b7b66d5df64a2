"""Training with the SegFormer recipe, exact resume, and data-parallel runs under torchrun.

    from segformer.train import TrainConfig, train
    result = train(TrainConfig(data="synthetic", out="runs/b0", steps=300, lr=6e-4))

Recipe: AdamW (lr 6e-5, weight decay 0.01 except on norms and biases, decoder head at
10x lr), poly decay (power 1) after a linear warm-up, autocast (bf16/fp16) with the loss
in fp32 (GradScaler for fp16), drop path, gradient accumulation.

Determinism: the data stream is a function of (seed, step): each rank reads an endless
sequence of epochs, epoch e being a permutation of the dataset drawn from (seed, e) and
dealt round-robin to the ranks; the augmentation of a sample is drawn from a generator
seeded with (seed, epoch, index). A checkpoint holds the model, optimizer, scheduler,
GradScaler and every rank's torch RNG state at a step boundary, so ``--resume`` continues
bit for bit (on CPU) where an uninterrupted run would have been.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .data import DataError, SegmentationDataset, check_datasets, has_split, open_dataset, problems_error
from .evaluate import RUN_INFO, evaluate
from .metrics import format_table, json_safe
from .runtime import autocast, init_process_group, process_device, progress_bar, resolve_precision
from .transforms import TrainTransform, finish_batch

CHECKPOINT_PREFIX = "checkpoint-"
TRAINING_STATE = "training_state.pt"
LOG_FILE = "log.jsonl"
EVAL_FILE = "eval.json"
PLOT_FILE = "training.png"
# what a run writes in RUN_DIR besides its checkpoint folders (--overwrite removes exactly these)
RUN_FILES = (LOG_FILE, EVAL_FILE, PLOT_FILE, RUN_INFO, "config.json", "model.safetensors", "pytorch_model.bin")
CHECKPOINT_PATTERN = re.compile(rf"^{CHECKPOINT_PREFIX}\d{{6,}}$")
# a checkpoint being written (.tmp) or replaced (.old) when its process was killed
PARTIAL_CHECKPOINT_PATTERN = re.compile(rf"^\.{CHECKPOINT_PREFIX}\d{{6,}}\.(tmp|old)\d+$")

# schedule lengths when --steps is not given: the SegFormer papers' 160k iterations for the
# benchmarks, shorter for your own folders, and a CPU-friendly demo on the synthetic shapes
DEFAULT_STEPS = {"ade20k": 160_000, "cityscapes": 160_000, "folder": 40_000, "synthetic": 300}


@dataclass
class TrainConfig:
    """Everything a run depends on (saved in every checkpoint, so --resume can rebuild it)."""

    data: str = "synthetic"
    out: str = "runs/train"
    model: str = "b0"
    init: str | None = None
    num_classes: int | None = None
    crop_size: tuple[int, int] | None = None  # default: the dataset's (512, 1024 Cityscapes, 128 synthetic)
    batch_size: int = 8  # per process and micro-batch
    steps: int | None = None  # optimizer steps; default DEFAULT_STEPS[dataset kind]
    lr: float = 6e-5
    weight_decay: float = 0.01
    head_lr_mult: float = 10.0
    warmup_steps: int | None = None  # default min(1500, steps // 10)
    warmup_ratio: float = 1e-6
    poly_power: float = 1.0
    min_lr: float = 0.0
    kernels: str = "auto"
    precision: str | None = None  # default bf16 on a GPU, fp32 on the CPU
    grad_accum: int = 1
    seed: int = 0
    save_every: int = 1000  # 0: only the final model
    val_every: int = 1000  # 0: only at the end
    log_every: int = 10
    drop_path_rate: float = 0.1
    classifier_dropout: float = 0.1
    workers: int | None = None  # data-loading processes; default 0 on CPU, 4 per GPU
    device: str | None = None
    synthetic_size: int = 128
    progress: bool = True
    max_bad_steps: int = 10  # stop after this many consecutive steps with a non-finite loss
    compile: bool = False  # torch.compile the model (the custom ops included, one graph)
    sync_bn: bool = False  # SyncBatchNorm in the decode head under torchrun on GPUs
    colour_on_device: bool | None = None  # photometric distortion batched on the device; default on GPUs

    def __post_init__(self):
        if self.crop_size is not None:
            size = (self.crop_size,) if isinstance(self.crop_size, int) else tuple(self.crop_size)
            if len(size) not in (1, 2) or min(size) < 1:
                raise ValueError(f"crop_size must be one or two positive ints, got {self.crop_size!r}")
            self.crop_size = (int(size[0]), int(size[-1]))
        for name in ("batch_size", "grad_accum"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        for name in ("save_every", "val_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("log_every", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


# settings that may change on --resume without changing the result
RESUME_OVERRIDABLE = ("out", "save_every", "val_every", "log_every", "workers", "device", "kernels", "progress",
                      "max_bad_steps", "compile")


class TrainingDiverged(DataError):
    """Too many consecutive steps had a non-finite loss; the run stopped (its checkpoints are kept)."""


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    skipped_steps: int
    final_loss: float | None
    metrics: dict | None  # final validation (None without a validation split)
    seconds: float
    files: dict = field(default_factory=dict)


# ---- the data stream --------------------------------------------------------------------------


class SampleStream:
    """Which samples a rank reads: an endless sequence of epochs, each a permutation of the
    dataset (drawn from (seed, epoch)) padded to a multiple of world_size and dealt
    round-robin. Position p of a rank is sample ``p % per_rank`` of epoch ``p // per_rank``."""

    def __init__(self, dataset_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if dataset_size < 1:
            raise DataError("the training set is empty")
        self.dataset_size, self.seed, self.rank, self.world_size = dataset_size, seed, rank, world_size
        self.per_rank = math.ceil(dataset_size / world_size)
        self._epoch, self._order = None, None

    def _epoch_order(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.dataset_size, generator=generator).tolist()
            order += order[: self.per_rank * self.world_size - self.dataset_size]  # pad, as DistributedSampler does
            self._epoch, self._order = epoch, order[self.rank :: self.world_size]
        return self._order

    def keys(self, start: int, count: int) -> list[tuple[int, int]]:
        """(epoch, dataset index) of positions start .. start + count - 1."""
        keys = []
        for position in range(start, start + count):
            epoch = position // self.per_rank
            keys.append((epoch, self._epoch_order(epoch)[position % self.per_rank]))
        return keys


class MicroBatches(torch.utils.data.Sampler):
    """The micro-batches of keys from a step on, for a DataLoader's batch_sampler."""

    def __init__(self, stream: SampleStream, batch_size: int, start_step: int, grad_accum: int):
        self.stream, self.batch_size = stream, batch_size
        self.start = start_step * grad_accum * batch_size

    def __iter__(self):
        position = self.start
        while True:
            yield self.stream.keys(position, self.batch_size)
            position += self.batch_size


class AugmentedSamples(torch.utils.data.Dataset):
    """(epoch, index) -> augmented (image, label); the augmentation RNG is seeded from
    (seed, epoch, index) alone, so it does not depend on which process or when."""

    def __init__(self, dataset: SegmentationDataset, transform: TrainTransform, seed: int):
        self.dataset, self.transform, self.seed = dataset, transform, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        image, label = self.dataset[index]
        return self.transform(image, label, np.random.default_rng([self.seed, epoch, index]))


@dataclass
class SampleError:
    """A DataError met in a data-loading worker, carried to the main process as a value (an
    exception raised in a worker would come back wrapped in the worker's traceback text)."""

    message: str


class _CheckedSamples(torch.utils.data.Dataset):
    def __init__(self, samples: AugmentedSamples):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key):
        try:
            return self.samples[key]
        except DataError as error:
            return SampleError(str(error))


def _collate(samples):
    for sample in samples:
        if isinstance(sample, SampleError):
            return sample
    return tuple(torch.stack(items) for items in zip(*samples))


# ---- optimisation -----------------------------------------------------------------------------


def parameter_groups(model, lr: float, weight_decay: float, head_lr_mult: float) -> list[dict]:
    """AdamW groups: encoder / decoder head (head_lr_mult x lr), each split into weights
    (decayed) and 1-D parameters: norms and biases (not decayed)."""
    groups = []
    for part, scale in ((model.encoder, 1.0), (model.decode_head, head_lr_mult)):
        params = [p for p in part.parameters() if p.requires_grad]
        for decayed in (True, False):
            chosen = [p for p in params if (p.ndim > 1) == decayed]
            if chosen:
                groups.append({"params": chosen, "lr": lr * scale, "weight_decay": weight_decay if decayed else 0.0,
                               "name": f"{'head' if scale != 1.0 else 'encoder'}{'' if decayed else '_no_decay'}"})
    covered = sum(len(g["params"]) for g in groups)
    total = sum(1 for p in model.parameters() if p.requires_grad)
    if covered != total:
        raise RuntimeError(f"parameter groups cover {covered} of {total} trainable parameters")
    return groups


def lr_factor(step: int, total: int, warmup: int, warmup_ratio: float, power: float, min_ratio: float) -> float:
    """Multiplier of the base lr after ``step`` steps: poly decay, linear warm-up first."""
    decay = (1.0 - min(step, total) / total) ** power * (1.0 - min_ratio) + min_ratio
    if step < warmup:
        decay *= 1.0 - (1.0 - step / warmup) * (1.0 - warmup_ratio)
    return decay


# ---- the trainer --------------------------------------------------------------------------------


class Trainer:
    """Builds everything a run needs from a TrainConfig (a copy: the caller's is not changed);
    ``run()`` trains. ``overwrite`` lets the run replace an earlier run in its folder."""

    def __init__(self, config: TrainConfig, resume: str | os.PathLike | None = None, overwrite: bool = False):
        self.group = init_process_group(config.device)
        self.device = process_device(self.group, config.device)
        self.resume_from = resume
        self.resume_state = None if resume is None else read_training_state(resume)
        self.run_dir = Path(config.out)
        self.overwrite = overwrite
        self._check_run_dir()
        self.train_set = open_dataset(config.data, "train", config.num_classes, synthetic_size=config.synthetic_size)
        self.val_set = (open_dataset(config.data, "val", self.train_set.num_classes, synthetic_size=config.synthetic_size)
                        if has_split(config.data, "val") else None)
        self._check_samples(config.progress)
        steps = config.steps or DEFAULT_STEPS.get(self.train_set.kind, 40_000)
        config = self.config = dataclasses.replace(
            config, precision=resolve_precision(config.precision, self.device), steps=steps,
            crop_size=config.crop_size or tuple(self.train_set.default_crop_size),
            warmup_steps=min(1500, steps // 10) if config.warmup_steps is None else config.warmup_steps,
            colour_on_device=self.device.type == "cuda" if config.colour_on_device is None else config.colour_on_device,
        )
        self.precision = config.precision
        self.start_step = 0 if self.resume_state is None else int(self.resume_state["step"])
        self.skipped_steps = 0 if self.resume_state is None else int(self.resume_state["skipped_steps"])
        self.overflow_steps = 0 if self.resume_state is None else int(self.resume_state.get("fp16_overflow_steps", 0))
        self.bad_streak = 0  # consecutive steps with a non-finite loss
        self.last_checkpoint: Path | None = Path(resume) if resume is not None else None

        torch.manual_seed(config.seed)  # the same initial weights on every rank
        self.model = self._build_model(resume).to(self.device)
        self.model.config.id2label = dict(enumerate(self.train_set.class_names))
        smallest = self.model.config.min_image_size()
        if min(config.crop_size) < smallest:
            raise DataError(f"crop size {config.crop_size[0]}x{config.crop_size[1]} is below this model's minimum "
                            f"input size {smallest}x{smallest}")
        self.model.train()
        self.running_stats = [buffer for module in self.model.modules()
                              if isinstance(module, torch.nn.modules.batchnorm._NormBase)
                              for buffer in module.buffers(recurse=False)]
        self.ddp_model = self.model
        if self.group.distributed:
            self.ddp_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        if config.compile:
            self.ddp_model = torch.compile(self.ddp_model)
        self.optimizer = torch.optim.AdamW(parameter_groups(self.model, config.lr, config.weight_decay, config.head_lr_mult),
                                           lr=config.lr, betas=(0.9, 0.999), weight_decay=config.weight_decay)
        min_ratio = config.min_lr / config.lr if config.lr > 0 else 0.0
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: lr_factor(step, config.steps, config.warmup_steps, config.warmup_ratio, config.poly_power, min_ratio),
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        # dropout / drop path differ per rank; resume restores the saved states instead
        torch.manual_seed(config.seed * 1_000_003 + 7919 * (self.group.rank + 1))
        if self.resume_state is not None:
            self._restore(self.resume_state)

        self.stream = SampleStream(len(self.train_set), config.seed, self.group.rank, self.group.world_size)
        self.samples = AugmentedSamples(self.train_set, TrainTransform(config.crop_size, colour_on_device=config.colour_on_device),
                                        config.seed)

    def _check_run_dir(self) -> None:
        """Refuse a folder that holds another run unless overwriting (resuming continues the run
        in the checkpoint's own folder); before anything is loaded or written."""
        run_dir = self.run_dir
        if run_dir.exists() and not run_dir.is_dir():
            raise DataError(f"{run_dir}: --out must be a folder, this is a file")
        resumed = Path(self.resume_from).resolve() if self.resume_from is not None else None
        if resumed is not None and resumed.is_relative_to(run_dir.resolve()):
            if self.overwrite:
                raise DataError(f"{run_dir}: --overwrite would delete the checkpoint being resumed ({self.resume_from}); "
                                "resume without --overwrite to continue the run in its folder")
            return
        found = [p.name for p in run_files(run_dir) if not PARTIAL_CHECKPOINT_PATTERN.match(p.name)]
        if found and not self.overwrite:
            shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
            raise DataError(f"{run_dir}: already holds a run ({shown}); pass --overwrite to replace it, --resume "
                            f"{run_dir / (CHECKPOINT_PREFIX + 'NNNNNN')} to continue it, or choose another --out")

    def _check_samples(self, progress: bool) -> None:
        """Every image/mask pair's headers, before training: all problems reported at once."""
        datasets = [self.train_set] + ([self.val_set] if self.val_set is not None else [])
        mine = check_datasets(datasets, self.group.rank, self.group.world_size, progress=progress and self.group.is_main)
        problems = [problem for share in self.group.all_gather_object(mine) for problem in share]
        if problems:
            raise problems_error(problems, "the training and validation data")

    # -- construction --

    def _build_model(self, resume):
        from . import SegFormer

        config = self.config
        options = dict(kernels=config.kernels, drop_path_rate=config.drop_path_rate,
                       classifier_dropout=config.classifier_dropout)
        if resume is None and config.init is None:
            return self._sync_batch_norm(SegFormer.from_config(config.model, num_classes=self.train_set.num_classes, **options))
        source = resume if resume is not None else config.init
        num_classes = {} if resume is not None else {"num_classes": self.train_set.num_classes}
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                model = SegFormer.from_pretrained(source, **num_classes, **options)
        except (OSError, ValueError, ImportError) as error:
            raise DataError(f"{source}: cannot load the model: {error}") from None
        for warning in caught:  # e.g. "fresh classifier for N classes": shown as a note, not a code location
            self.note(f"note: {warning.message}")
        return self._sync_batch_norm(model)

    def _sync_batch_norm(self, model):
        """--sync-bn: the decode head's BatchNorm statistics over all processes, which
        SyncBatchNorm computes only for CUDA tensors under torch.distributed."""
        if not self.config.sync_bn:
            return model
        if self.group.distributed and self.device.type == "cuda":
            model.decode_head = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model.decode_head)
        else:
            self.note("note: --sync-bn needs several processes on CUDA GPUs (torchrun); plain BatchNorm here")
        return model

    def _restore(self, state: dict) -> None:
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            raise DataError(f"{Path(self.resume_from) / TRAINING_STATE}: the optimizer state does not fit this "
                            f"model ({type(error).__name__}: {error})") from None
        saved = state["rng"]
        if len(saved) != self.group.world_size:
            self.note(f"warning: the checkpoint was written by {len(saved)} processes, this run has "
                      f"{self.group.world_size}: data order and random draws will differ from the original run")
        rng = saved[self.group.rank % len(saved)]
        torch.set_rng_state(rng["torch"])
        if self.device.type == "cuda" and rng.get("cuda") is not None:
            torch.cuda.set_rng_state(rng["cuda"], self.device)

    # -- data --

    def micro_batch_keys(self, step: int) -> list[list[tuple[int, int]]]:
        """The (epoch, index) keys of each micro-batch this rank reads at ``step``."""
        config = self.config
        start = step * config.grad_accum * config.batch_size
        return [self.stream.keys(start + m * config.batch_size, config.batch_size) for m in range(config.grad_accum)]

    def load_batch(self, keys) -> tuple[torch.Tensor, ...]:
        return _collate([self.samples[key] for key in keys])

    def _loader(self):
        """Yields this rank's micro-batches from the resumed step on (a DataError in a worker
        surfaces here as a DataError with the worker's message)."""
        workers = self.config.workers
        if workers is None:
            workers = min(4, (os.cpu_count() or 1) // max(1, self.group.world_size)) if self.device.type == "cuda" else 0
        loader = torch.utils.data.DataLoader(
            _CheckedSamples(self.samples), collate_fn=_collate,
            batch_sampler=MicroBatches(self.stream, self.config.batch_size, self.start_step, self.config.grad_accum),
            num_workers=workers, pin_memory=self.device.type == "cuda", persistent_workers=workers > 0,
            generator=torch.Generator(),  # its seed draw must not consume the global RNG (dropout)
        )
        for batch in loader:
            if isinstance(batch, SampleError):
                raise DataError(batch.message)
            yield batch

    # -- one step --

    def forward_backward(self, micro_batches) -> torch.Tensor:
        """Accumulate the gradients of the mean loss over the micro-batches (under DDP, averaged
        over ranks too); returns this rank's per-micro-batch losses (fp32, detached)."""
        losses = []
        for m, (images, labels, *photometric) in enumerate(micro_batches):
            # the loader's uint8 pixels and labels are finished (colours, normalisation) and widened here, on the device
            photometric = photometric[0].to(self.device, non_blocking=True) if photometric else None
            images = finish_batch(images.to(self.device, non_blocking=True), photometric)
            labels = labels.to(self.device, non_blocking=True).long()
            last = m == len(micro_batches) - 1
            sync = contextlib.nullcontext() if last or not self.group.distributed else self.ddp_model.no_sync()
            with sync:
                with autocast(self.device, self.precision):
                    logits = self.ddp_model(images)
                loss = self.model.loss(logits.float(), labels)
                self.scaler.scale(loss / len(micro_batches)).backward()
            losses.append(loss.detach())
        return torch.stack(losses)

    def train_step(self, micro_batches) -> tuple[float, str]:
        """One optimizer step on the micro-batches; returns optimizer_step's (loss, outcome). A
        step skipped for a non-finite loss leaves no trace: neither the optimizer nor the
        GradScaler steps, and the BatchNorm running statistics that the train-mode forward
        already updated (with NaN, typically) are put back."""
        running_stats = [buffer.clone() for buffer in self.running_stats]
        loss, outcome = self.optimizer_step(self.forward_backward(micro_batches))
        if outcome == "non_finite":
            with torch.no_grad():
                torch._foreach_copy_(self.running_stats, running_stats)
        return loss, outcome

    def optimizer_step(self, losses: torch.Tensor) -> tuple[float, str]:
        """Step unless some rank's loss was not finite. Returns (mean loss over ranks and
        micro-batches, outcome): "stepped", "non_finite" (skipped here: NaN loss) or "overflow"
        (fp16 only: GradScaler found inf/NaN gradients, skipped the step and lowered its scale).
        The schedule advances either way, so step numbers and learning rates stay aligned."""
        finite = torch.isfinite(losses)
        summary = torch.stack([torch.where(finite, losses, torch.zeros_like(losses)).sum(), (~finite).sum().float(),
                               torch.tensor(float(losses.numel()), device=losses.device)])
        self.group.all_reduce_sum(summary)
        loss_sum, bad, count = summary.tolist()
        if bad > 0:
            outcome, loss = "non_finite", float("nan")
        else:
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            outcome, loss = ("overflow" if self.scaler.get_scale() < scale else "stepped"), loss_sum / count
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            # a skipped optimizer step makes the scheduler warn about the call order; intended here
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            self.scheduler.step()
        return loss, outcome

    # -- checkpoints and files --

    def note(self, message: str) -> None:
        if not self.group.is_main:
            return
        try:
            from tqdm import tqdm

            tqdm.write(message, file=sys.stderr)
        except ImportError:
            print(message, file=sys.stderr)

    def run_info(self, step: int) -> dict:
        return {
            "dataset": self.train_set.kind,
            "data": str(self.config.data),
            "class_names": list(self.train_set.class_names),
            "crop_size": list(self.config.crop_size),
            "step": step,
            "skipped_steps": self.skipped_steps,
            "world_size": self.group.world_size,
            "config": json_safe(dataclasses.asdict(self.config)),
        }

    def save_checkpoint(self, step: int) -> Path | None:
        """RUN_DIR/checkpoint-<step>: model (HF format), training state, run.json; written to a
        temporary folder and renamed into place, so a crash never leaves half a checkpoint."""
        rng = {"torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}
        rng_states = self.group.all_gather_object(rng)
        final = self.run_dir / f"{CHECKPOINT_PREFIX}{step:06d}"
        if self.group.is_main:
            temporary = self.run_dir / f".{final.name}.tmp{os.getpid()}"
            shutil.rmtree(temporary, ignore_errors=True)
            self.model.save_pretrained(temporary)
            state = {
                "step": step,
                "skipped_steps": self.skipped_steps,
                "fp16_overflow_steps": self.overflow_steps,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "rng": rng_states,
                "samples_read_per_rank": step * self.config.grad_accum * self.config.batch_size,
                "config": json_safe(dataclasses.asdict(self.config)),
            }
            torch.save(state, temporary / TRAINING_STATE)
            (temporary / RUN_INFO).write_text(json.dumps(self.run_info(step), indent=2), encoding="utf-8")
            if final.exists():  # an earlier run's checkpoint of the same step
                stale = final.with_name(f".{final.name}.old{os.getpid()}")
                os.replace(final, stale)
                os.replace(temporary, final)
                shutil.rmtree(stale, ignore_errors=True)
            else:
                os.replace(temporary, final)
        self.group.barrier()
        return final if self.group.is_main else None

    def _open_log(self):
        """log.jsonl, keeping the lines up to the resumed step (copied from the checkpoint's
        run folder when resuming into a new one)."""
        path = self.run_dir / LOG_FILE
        kept = []
        if self.start_step > 0:
            source = path if path.is_file() else Path(self.resume_from).parent / LOG_FILE
            if source.is_file():
                for line in source.read_text(encoding="utf-8").splitlines():
                    try:
                        if json.loads(line).get("step", 0) <= self.start_step:
                            kept.append(line)
                    except json.JSONDecodeError:
                        continue
        log = open(path, "w", encoding="utf-8")
        for line in kept:
            log.write(line + "\n")
        log.flush()
        return log

    def validate(self, step: int) -> dict | None:
        if self.val_set is None:
            return None
        metrics = evaluate(self.model, self.val_set, crop_size=self.config.crop_size, precision=self.precision,
                           group=self.group)
        return metrics

    # -- the loop --

    def run(self) -> TrainResult:
        started = time.time()
        log = bar = batches = None
        try:
            log, bar = self._prepare_run_dir()
            batches = self._loader()
            window = _Window(time.time())
            for step in range(self.start_step + 1, self.config.steps + 1):
                loss, outcome = self.train_step([next(batches) for _ in range(self.config.grad_accum)])
                self._count_step(step, loss, outcome, window)
                self._report_step(step, loss, window, log, bar, started)
                paused = time.time()
                self._validate_and_save(step, log)
                window.start += time.time() - paused  # validation and saving are not training throughput
            metrics, files = self._finish(log, bar)
        finally:
            if batches is not None:
                batches.close()  # stops the loader's worker processes
            if bar is not None:
                bar.close()
            if log is not None:
                log.close()
        self.group.barrier()
        return TrainResult(self.run_dir, self.config.steps, self.skipped_steps, window.last_loss, metrics,
                           time.time() - started, files)

    def _prepare_run_dir(self):
        """Main process: the run folder (an overwritten run's files and a killed run's partial
        checkpoints removed), log.jsonl, the progress bar, the opening note. Returns (log, bar);
        (None, None) on the other processes."""
        config = self.config
        if not self.group.is_main:
            return None, None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for path in run_files(self.run_dir):
            if self.overwrite or PARTIAL_CHECKPOINT_PATTERN.match(path.name):
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        log = self._open_log()
        bar = None
        if config.progress:
            bar = progress_bar(total=config.steps, initial=self.start_step, desc="train", unit="step")
        self.note(f"training {self.model.config.preset_name() or 'SegFormer'} on {self.train_set.describe()}"
                  f" | {config.steps} steps, batch {config.batch_size} x {config.grad_accum} accum x "
                  f"{self.group.world_size} proc, crop {config.crop_size[0]}x{config.crop_size[1]}, {self.precision}, "
                  f"kernels={self.model.kernels}, device {self.device}" +
                  (f" | resuming at step {self.start_step}" if self.start_step else ""))
        if self.val_set is None:
            self.note("note: no validation split found; validation is skipped")
        return log, bar

    def _count_step(self, step: int, loss: float, outcome: str, window: "_Window") -> None:
        """Count the step's outcome; stop after max_bad_steps non-finite losses in a row."""
        window.steps += 1
        if outcome != "non_finite":
            self.bad_streak = 0
            self.overflow_steps += outcome == "overflow"
            window.losses.append(loss)
            window.last_loss = loss
            return
        self.skipped_steps += 1
        self.bad_streak += 1
        self.note(f"warning: step {step}: loss is not finite on some process; step skipped "
                  f"({self.skipped_steps} skipped so far)")
        if self.bad_streak >= self.config.max_bad_steps:
            kept = f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint else "no checkpoint was saved"
            raise TrainingDiverged(
                f"{self.run_dir}: training diverged: the loss was not finite for {self.bad_streak} steps in a row "
                f"(steps {step - self.bad_streak + 1}..{step}); stopped, {kept} (lower --lr, check the data, or "
                "raise --max-bad-steps)")

    def _report_step(self, step: int, loss: float, window: "_Window", log, bar, started: float) -> None:
        """The progress bar, and every log_every steps a log.jsonl line (and a printed line without a bar)."""
        config = self.config
        lr = self.optimizer.param_groups[0]["lr"]
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
        if step % config.log_every != 0 and step != config.steps:
            return
        seconds = time.time() - window.start
        images_per_step = config.batch_size * config.grad_accum * self.group.world_size
        record = {"step": step, "event": "train",
                  "loss": sum(window.losses) / len(window.losses) if window.losses else None,
                  "lr": lr, "head_lr": self.optimizer.param_groups[-1]["lr"],
                  "images_per_s": images_per_step * window.steps / max(seconds, 1e-9),
                  "skipped_steps": self.skipped_steps,
                  **({"fp16_overflow_steps": self.overflow_steps} if self.scaler.is_enabled() else {}),
                  "epoch": (step * config.grad_accum * config.batch_size) // self.stream.per_rank,
                  "time_s": time.time() - started}
        shown = float("nan") if record["loss"] is None else record["loss"]
        if bar is not None:
            bar.set_postfix(loss=f"{shown:.4f}", lr=f"{lr:.2e}", img_s=f"{record['images_per_s']:.1f}")
        elif self.group.is_main:
            print(f"step {step}/{config.steps}  loss {shown:.4f}  lr {lr:.2e}  "
                  f"{record['images_per_s']:.1f} img/s", flush=True)
        self._write(log, record)
        window.losses, window.steps, window.start = [], 0, time.time()

    def _validate_and_save(self, step: int, log) -> None:
        """Validation every val_every steps (the final one is _finish's) and a checkpoint every save_every."""
        config = self.config
        if step < config.steps and config.val_every and step % config.val_every == 0:
            metrics = self.validate(step)
            if metrics is not None:
                self._write(log, _val_record(step, metrics))
                self.note(f"step {step}: val mIoU {100 * metrics['mIoU']:.2f}")
        if config.save_every and step % config.save_every == 0:
            path = self.save_checkpoint(step)
            if path is not None:
                self.last_checkpoint = path
                self.note(f"step {step}: checkpoint {path}")

    def _finish(self, log, bar) -> tuple[dict | None, dict]:
        """The final validation and files; returns (metrics, files written)."""
        if bar is not None:
            bar.close()
        metrics = self.validate(self.config.steps)
        files = {}
        if self.group.is_main:
            if metrics is not None:
                self._write(log, _val_record(self.config.steps, metrics))
            files = self._write_final(metrics)
        return metrics, files

    def _write(self, log, record: dict) -> None:
        if log is not None:
            log.write(json.dumps(json_safe(record)) + "\n")
            log.flush()

    def _write_final(self, metrics: dict | None) -> dict:
        """The final model (HF format) and run.json in RUN_DIR, eval.json, the plot."""
        from .plots import plot_run

        self.model.save_pretrained(self.run_dir)
        (self.run_dir / RUN_INFO).write_text(json.dumps(self.run_info(self.config.steps), indent=2), encoding="utf-8")
        files = {"model": str(self.run_dir), "log": str(self.run_dir / LOG_FILE)}
        if metrics is not None:
            (self.run_dir / EVAL_FILE).write_text(json.dumps(json_safe(metrics), indent=2), encoding="utf-8")
            files["eval"] = str(self.run_dir / EVAL_FILE)
        plot = plot_run(self.run_dir / LOG_FILE, self.run_dir / PLOT_FILE, metrics)
        if plot is None:
            self.note("note: matplotlib is not installed; the training plot is skipped (pip install matplotlib)")
        else:
            files["plot"] = str(plot)
        return files

    def close(self) -> None:
        self.group.close()


@dataclass
class _Window:
    """The steps since the last log line: their losses (finite ones) and when the window started."""

    start: float
    losses: list[float] = field(default_factory=list)
    steps: int = 0
    last_loss: float | None = None  # of the last step that was not skipped, for the summary


def run_files(run_dir: Path) -> list[Path]:
    """What a training run wrote in ``run_dir``: log, run.json, eval.json, plot, the final model
    (config.json only beside weights or run.json), checkpoint folders (with their training
    state) and partial checkpoints. Nothing else there is ever removed."""
    if not run_dir.is_dir():
        return []
    found = []
    for path in run_dir.iterdir():
        if path.name == "config.json":
            ours = any((run_dir / name).is_file() for name in (RUN_INFO, "model.safetensors", "pytorch_model.bin"))
        elif CHECKPOINT_PATTERN.match(path.name):
            ours = (path / TRAINING_STATE).is_file()
        else:
            ours = path.name in RUN_FILES or PARTIAL_CHECKPOINT_PATTERN.match(path.name) is not None
        if ours:
            found.append(path)
    return sorted(found)


def _val_record(step: int, metrics: dict) -> dict:
    return {"step": step, "event": "val", "mIoU": metrics["mIoU"], "mAcc": metrics["mAcc"], "aAcc": metrics["aAcc"]}


# ---- entry points ------------------------------------------------------------------------------


TRAINING_STATE_KEYS = ("step", "skipped_steps", "optimizer", "scheduler", "scaler", "rng", "config")


def read_training_state(checkpoint: str | os.PathLike) -> dict:
    """The training state of a checkpoint folder (a DataError naming the file when it is
    missing, unreadable, corrupt or not written by segformer train)."""
    path = Path(checkpoint)
    state_file = path / TRAINING_STATE
    if not state_file.is_file():
        raise DataError(f"{path}: not a training checkpoint (no {TRAINING_STATE}); --resume takes a "
                        f"{CHECKPOINT_PREFIX}NNNNNN folder written by segformer train")
    try:
        state = torch.load(state_file, map_location="cpu", weights_only=True)
    except OSError as error:
        raise DataError(f"{state_file}: cannot read the file ({error.strerror or error})") from None
    except Exception as error:  # torch.load raises many types for a damaged file; none of them is the user's fault
        raise DataError(f"{state_file}: corrupt or truncated training state ({type(error).__name__}); resume from "
                        "another checkpoint") from None
    missing = [key for key in TRAINING_STATE_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise DataError(f"{state_file}: not a training state written by segformer train (missing {', '.join(missing)})")
    return state


def resume_config(checkpoint: str | os.PathLike, overrides: dict) -> TrainConfig:
    """The saved run's config, with the settings that do not change the result overridden.
    ``steps`` may grow (train longer; the learning-rate schedule then follows the new total).
    Any other setting given with --resume must equal the saved one."""
    path = Path(checkpoint)
    state = read_training_state(path)
    saved = state["config"]
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in saved.items() if k in fields}
    values["out"] = str(path.parent)  # by default the run continues in its own folder
    for name, value in overrides.items():
        if name == "steps" and value != values.get("steps"):
            if value <= int(state["step"]):
                raise DataError(f"--steps {value} with --resume: the checkpoint is at step {state['step']}; "
                                "give more steps to train longer")
            values[name] = value
        elif name in RESUME_OVERRIDABLE:
            values[name] = value
        elif name in values and _normalised(value) != _normalised(values[name]):
            raise DataError(f"--resume continues the saved run exactly; {name} = {value!r} differs from the "
                            f"checkpoint's {values[name]!r}")
    try:
        return TrainConfig(**values)
    except (TypeError, ValueError) as error:
        raise DataError(f"--resume {path}: bad option or saved setting: {error}") from None


def _normalised(value):
    return list(value) if isinstance(value, tuple) else value


def train(config: TrainConfig | None = None, resume: str | os.PathLike | None = None, overwrite: bool = False,
          **settings) -> TrainResult:
    """Train (or, with ``resume``, continue) a run; ``settings`` are TrainConfig fields.
    A folder that holds another run is refused unless ``overwrite`` (its run files are then
    removed first). Under torchrun every process calls this; rank 0 writes the files."""
    if resume is not None:
        if config is not None:
            raise ValueError("train(resume=...) rebuilds the saved config; pass only the settings to change as keywords")
        config = resume_config(resume, settings)
    elif config is None:
        config = TrainConfig(**settings)
    trainer = Trainer(config, resume=resume, overwrite=overwrite)
    try:
        result = trainer.run()
        if trainer.group.is_main:
            _print_summary(result, trainer)
        return result
    finally:
        trainer.close()


def _print_summary(result: TrainResult, trainer: Trainer) -> None:
    print(f"\ntrained {result.steps} steps in {result.seconds:.1f} s"
          + (f"; final loss {result.final_loss:.4f}" if result.final_loss is not None else "")
          + f"; skipped steps (non-finite loss): {result.skipped_steps}")
    if result.metrics is not None:
        print(f"validation ({trainer.val_set.describe()}):")
        print(format_table(result.metrics))
    for what, where in result.files.items():
        print(f"  {what:<6} {where}")
