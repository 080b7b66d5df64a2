"""The ``segformer`` command: train, eval, predict, demo.

    segformer demo --out runs/demo
    segformer train --data path/to/ADEChallengeData2016 --init mit_b0.pth --out runs/ade-b0
    segformer eval --checkpoint runs/ade-b0 --data path/to/ADEChallengeData2016 --mode slide --json eval.json
    segformer predict --checkpoint runs/ade-b0 --out masks/ photos/
    segformer export --checkpoint runs/ade-b0 --format onnx --out model.onnx
    segformer bench --smoke --out bench-smoke/
    torchrun --nproc-per-node 8 -m segformer train ...

Bad data or a bad checkpoint ends with a one-line message naming the file and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .data import DataError

KERNEL_CHOICES = ("auto", "triton", "torch")
PRECISION_CHOICES = ("fp32", "bf16", "fp16")
MODEL_CHOICES = ("b0", "b1", "b2", "b3", "b4", "b5")


def _size(values: list[int] | None) -> tuple[int, int] | None:
    if values is None:
        return None
    if len(values) not in (1, 2) or min(values) < 1:
        raise DataError(f"a size is one or two positive ints (H [W]), got {' '.join(map(str, values))}")
    return (values[0], values[-1])


def _add_runtime(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kernels", choices=KERNEL_CHOICES, default=None,
                        help="Triton kernels where they run (auto: on a GPU), always (triton), or the PyTorch reference (torch)")
    parser.add_argument("--precision", choices=PRECISION_CHOICES, default=None,
                        help="autocast dtype (default: bf16 on a GPU, fp32 on the CPU)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_overwrite(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the run already in the output folder (its log, model, checkpoints, eval, plot)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segformer", description="Train, evaluate and run SegFormer (MiT-B0..B5).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train or fine-tune (also under torchrun for several GPUs)",
                                description="Train with the SegFormer recipe. Every default not shown comes from the "
                                            "dataset: crop 512 (Cityscapes 1024, synthetic its image size), steps 160k "
                                            "(ADE20K/Cityscapes), 40k (folders), 300 (synthetic).")
    source = train.add_mutually_exclusive_group()
    source.add_argument("--model", choices=MODEL_CHOICES, default=None, help="architecture to train from scratch (default b0)")
    source.add_argument("--init", metavar="PATH", default=None,
                        help="start from a checkpoint: HF folder/file, NVlabs .pth (incl. ImageNet mit_b*.pth), state dict")
    train.add_argument("--data", default=None, metavar="DIR|synthetic",
                       help="ADE20K, Cityscapes or DIR/{train,val}/{images,masks} folder, or 'synthetic' (default)")
    train.add_argument("--num-classes", type=int, default=None, help="class count (folders without classes.txt)")
    train.add_argument("--crop-size", type=int, nargs="+", default=None, metavar="N", help="training crop: H [W]")
    train.add_argument("--batch-size", type=int, default=None, help="images per process per micro-batch (default 8)")
    train.add_argument("--steps", type=int, default=None, help="optimizer steps")
    train.add_argument("--lr", type=float, default=None, help="base learning rate (default 6e-5; decoder head x10)")
    train.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay (default 0.01)")
    train.add_argument("--warmup-steps", type=int, default=None, help="linear warm-up (default min(1500, steps/10))")
    train.add_argument("--grad-accum", type=int, default=None, help="micro-batches per optimizer step (default 1)")
    train.add_argument("--drop-path", type=float, default=None, dest="drop_path_rate", help="drop path rate (default 0.1)")
    train.add_argument("--seed", type=int, default=None, help="seed of data order, augmentation, init (default 0)")
    train.add_argument("--save-every", type=int, default=None, help="checkpoint every N steps (default 1000; 0: final only)")
    train.add_argument("--val-every", type=int, default=None, help="validate every N steps (default 1000; 0: at the end)")
    train.add_argument("--log-every", type=int, default=None, help="log.jsonl line every N steps (default 10)")
    train.add_argument("--workers", type=int, default=None, help="data-loading processes (default 0 on CPU, 4 per GPU)")
    train.add_argument("--synthetic-size", type=int, default=None, help="image size of --data synthetic (default 128)")
    train.add_argument("--resume", metavar="CHECKPOINT_DIR", default=None,
                       help="continue a run exactly from RUN_DIR/checkpoint-NNNNNN")
    train.add_argument("--out", metavar="RUN_DIR", default=None, help="run folder (default runs/train)")
    _add_overwrite(train)
    train.add_argument("--max-bad-steps", type=int, default=None, metavar="N",
                       help="stop (exit 2) after N steps in a row with a non-finite loss (default 10)")
    train.add_argument("--compile", action="store_true", default=None, help="torch.compile the model (custom ops included)")
    train.add_argument("--sync-bn", action="store_true", default=None, dest="sync_bn",
                       help="SyncBatchNorm in the decode head (torchrun on GPUs; elsewhere a note and plain BatchNorm)")
    train.add_argument("--colour-on-device", action=argparse.BooleanOptionalAction, default=None,
                       help="apply the photometric distortion batched on the training device instead of in the "
                            "data-loading workers (default: on GPUs)")
    _add_runtime(train)

    evaluate = commands.add_parser("eval", help="mIoU / mAcc / aAcc and per-class IoU of a model on a dataset")
    evaluate.add_argument("--checkpoint", required=True, metavar="DIR", help="a run folder, checkpoint folder or any checkpoint")
    evaluate.add_argument("--data", required=True, metavar="DIR|synthetic")
    evaluate.add_argument("--split", default="val", help="dataset split (default val)")
    evaluate.add_argument("--mode", choices=("whole", "slide"), default="whole", help="whole image or sliding window")
    evaluate.add_argument("--crop-size", type=int, nargs="+", default=None, metavar="N",
                          help="window size of slide mode and base of the test scale: H [W] (default: the training crop)")
    evaluate.add_argument("--stride", type=int, nargs="+", default=None, metavar="N",
                          help="slide stride: H [W] (default 2/3 crop)")
    evaluate.add_argument("--scales", type=float, nargs="+", default=[1.0], metavar="R",
                          help="test-scale ratios, e.g. 0.5 0.75 1.0 1.25 1.5 1.75 (default 1.0)")
    evaluate.add_argument("--flip", action="store_true", help="also average the horizontally flipped image")
    evaluate.add_argument("--no-resize", action="store_true", help="feed images at their own size (scales apply to it)")
    evaluate.add_argument("--json", metavar="PATH", default=None, help="write the metrics here")
    evaluate.add_argument("--plot", metavar="PATH", default=None, help="write a per-class IoU PNG here")
    _add_runtime(evaluate)

    predict = commands.add_parser("predict", help="label PNG + colour overlay for each image")
    predict.add_argument("--checkpoint", required=True, metavar="DIR")
    predict.add_argument("--out", required=True, metavar="DIR")
    predict.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER")
    predict.add_argument("--batch-size", type=int, default=8)
    predict.add_argument("--crop-size", type=int, nargs="+", default=None, metavar="N",
                         help="resize to the base scale of this crop: H [W] (default: the checkpoint's preprocessing: "
                              "preprocessor_config.json, else the training crop, else no resize)")
    predict.add_argument("--no-resize", action="store_true", help="feed images at their own size")
    _add_runtime(predict)

    demo = commands.add_parser("demo", help="the main job: train B0 on synthetic shapes, evaluate, predict, benchmark")
    demo.add_argument("--out", default="runs/demo", metavar="DIR")
    demo.add_argument("--model", choices=MODEL_CHOICES, default="b0")
    demo.add_argument("--steps", type=int, default=None, help="training steps (default 150 on CPU, 1000 on a GPU)")
    demo.add_argument("--batch-size", type=int, default=8)
    demo.add_argument("--image-size", type=int, default=128)
    demo.add_argument("--lr", type=float, default=6e-4)
    demo.add_argument("--no-bench", action="store_true", help="skip the kernel benchmark smoke run")
    _add_overwrite(demo)
    _add_runtime(demo)

    export = commands.add_parser("export", help="write the model as ONNX or a torch.export program (dynamic B, H, W)")
    export.add_argument("--checkpoint", required=True, metavar="DIR", help="a run folder, checkpoint folder or any checkpoint")
    export.add_argument("--format", choices=("onnx", "pt2"), default="onnx",
                        help="onnx (needs the export extra) or pt2 (torch.export.save)")
    export.add_argument("--out", required=True, metavar="PATH", help="file to write, e.g. model.onnx")
    export.add_argument("--opset", type=int, default=None, help="ONNX opset (default 18; at least 17)")

    bench = commands.add_parser("bench", add_help=False,
                                help="the kernel and end-to-end benchmark suite (python -m bench); --help for options")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    return parser


def _given(args: argparse.Namespace, names) -> dict:
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def run_train(args) -> int:
    from .train import TrainConfig, train

    settings = _given(args, ("model", "init", "data", "num_classes", "batch_size", "steps", "lr", "weight_decay",
                             "warmup_steps", "grad_accum", "drop_path_rate", "seed", "save_every", "val_every",
                             "log_every", "workers", "synthetic_size", "out", "kernels", "precision", "device",
                             "max_bad_steps", "compile", "sync_bn", "colour_on_device"))
    if args.crop_size is not None:
        settings["crop_size"] = _size(args.crop_size)
    if args.no_progress:
        settings["progress"] = False
    if args.resume is not None:
        train(resume=args.resume, overwrite=args.overwrite, **settings)
        return 0
    try:
        config = TrainConfig(**settings)
    except ValueError as error:
        raise DataError(f"bad option: {error}") from None
    train(config, overwrite=args.overwrite)
    return 0


def _inference_setup(args):
    from .evaluate import load_model
    from .runtime import resolve_device, resolve_precision

    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    model, info = load_model(args.checkpoint, kernels=args.kernels or "auto", device=device)
    crop_size = _size(args.crop_size) or (tuple(info["crop_size"]) if info.get("crop_size") else None)
    return model, info, precision, crop_size


def run_eval(args) -> int:
    from .data import open_dataset
    from .evaluate import check_scales, evaluate
    from .metrics import format_table, json_safe
    from .plots import plot_eval
    from .runtime import init_process_group

    try:
        check_scales(args.scales)
    except ValueError as error:
        raise DataError(f"--scales: {error}") from None
    group = init_process_group(args.device)
    try:
        model, info, precision, crop_size = _inference_setup(args)
        synthetic_size = info.get("config", {}).get("synthetic_size") or 128
        dataset = open_dataset(args.data, args.split, model.config.num_labels, synthetic_size=synthetic_size)
        crop_size = crop_size or tuple(dataset.default_crop_size)
        started = time.time()
        metrics = evaluate(model, dataset, mode=args.mode, crop_size=crop_size, stride=_size(args.stride),
                           scales=args.scales, flip=args.flip, precision=precision, resize=not args.no_resize,
                           group=group, progress=not args.no_progress)
        if group.is_main:
            print(f"{dataset.describe()} | mode {args.mode}, crop {crop_size[0]}x{crop_size[1]}, scales "
                  f"{' '.join(map(str, args.scales))}{', flip' if args.flip else ''} | {time.time() - started:.1f} s")
            print(format_table(metrics))
            if args.json:
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                Path(args.json).write_text(json.dumps(json_safe(metrics), indent=2), encoding="utf-8")
                print(f"metrics: {args.json}")
            if args.plot:
                written = plot_eval(metrics, args.plot)
                print(f"plot: {written}" if written else "note: matplotlib is not installed; --plot skipped")
    finally:
        group.close()
    return 0


def run_predict(args) -> int:
    from .evaluate import load_model
    from .palette import palette_for
    from .predict import predict
    from .runtime import resolve_device, resolve_precision

    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    model, info = load_model(args.checkpoint, kernels=args.kernels or "auto", device=device)
    preprocessing = model.preprocessing
    if args.crop_size:
        preprocessing = preprocessing.at_crop(_size(args.crop_size))
    if args.no_resize:
        preprocessing = preprocessing.without_resize()
    palette = palette_for(model.config.num_labels, info.get("dataset"))
    started = time.time()
    records = predict(model, args.inputs, args.out, palette=palette, preprocessing=preprocessing,
                      batch_size=args.batch_size, precision=precision, progress=not args.no_progress)
    print(f"predicted {len(records)} image(s) in {time.time() - started:.1f} s: label and overlay PNGs in {args.out}")
    return 0


def run_demo(args) -> int:
    from .demo import run_demo as demo

    return demo(out=args.out, model=args.model, steps=args.steps, batch_size=args.batch_size, image_size=args.image_size,
                lr=args.lr, kernels=args.kernels or "auto", precision=args.precision, device=args.device,
                bench=not args.no_bench, progress=not args.no_progress, overwrite=args.overwrite)


def run_export(args) -> int:
    from .evaluate import load_model
    from .export import EXAMPLE_SHAPE, MIN_EXPORT_SIZE, ONNX_OPSET, export_onnx, export_program

    if args.format == "onnx":
        from .export import missing_export_packages

        missing = missing_export_packages()
        if missing:
            raise DataError(f"ONNX export needs {', '.join(missing)}: pip install 'segformer-kernels[export]'")
    if args.opset is not None and (args.format != "onnx" or args.opset < 17):
        raise DataError("--opset is for --format onnx and must be at least 17")
    model, _ = load_model(args.checkpoint, kernels="torch", device="cpu")
    started = time.time()
    if args.format == "onnx":
        path = export_onnx(model, args.out, opset=args.opset or ONNX_OPSET)
    else:
        import torch

        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.export.save(export_program(model), str(path))
    print(f"exported {args.checkpoint} as {args.format} to {path} in {time.time() - started:.1f} s: input images "
          f"[B, {model.config.num_channels}, H, W] float (B, H, W dynamic; H, W >= {MIN_EXPORT_SIZE}; traced at "
          f"{EXAMPLE_SHAPE[1]}x{EXAMPLE_SHAPE[2]}), output logits [B, {model.config.num_labels}, ceil(H/4), ceil(W/4)]")
    return 0


def run_bench(args) -> int:
    from .benchsuite import run_suite

    try:
        return run_suite(args.bench_args).returncode
    except ModuleNotFoundError as error:
        raise DataError(str(error)) from None


def _bench_arguments(argv: list[str]) -> argparse.Namespace:
    """``segformer bench ARGS``: every ARG goes to the suite's own parser (argparse would
    take options after a subcommand as its own)."""
    return argparse.Namespace(command="bench", bench_args=argv[1:])


COMMANDS = {"train": run_train, "eval": run_eval, "predict": run_predict, "demo": run_demo, "export": run_export,
            "bench": run_bench}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _bench_arguments(argv) if argv[:1] == ["bench"] else build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except DataError as error:
        print(f"segformer {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"segformer {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
