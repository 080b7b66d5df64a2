"""End-to-end benchmarks: SegFormer B0, B2 and B5 inference over a batch sweep, and a
training step, at 512 x 512 with 150 classes (ADE20K), under bf16 autocast.

inference   model(images) under torch.no_grad() -> logits [B, 150, 128, 128]
train_step  forward, loss (logits resized to the labels, cross entropy, ignore 255),
            backward, AdamW step (fused on CUDA), zero_grad; drop-path 0.1 and
            classifier dropout 0.1 as in the published fine-tuning recipes.
Weights stay fp32 (autocast casts per op), as in mixed-precision training.

Providers: ``eager`` / ``sdpa`` / ``compile`` / ``fused`` run this library's model
(segformer.model.SegFormer) with kernels="torch" (sdpa: attention routed to SDPA;
compile: torch.compile of the eager model) or kernels="auto" (every op that has a Triton
kernel runs it); ``transformers`` runs SegformerForSemanticSegmentation with the same
sizes and its default attention implementation, when transformers is installed.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
from dataclasses import dataclass
from typing import Callable

import torch

from segformer_kernels._backend import TRITON_IMPLEMENTATIONS

from . import PROVIDERS
from .core import (
    PRIORITY_COMPILE_E2E, PRIORITY_COMPILE_TARGET_E2E, PRIORITY_E2E, PRIORITY_TARGET,
    TARGET_E2E, Context, Item, Skip, dtype_name, make_row,
)
from .providers import check_triton_runs, compiled, sdpa_everywhere

NUM_CLASSES = 150
IGNORE_INDEX = 255
GPU_IMAGE = (512, 512)
GPU_INFERENCE_BATCHES = {"b0": (1, 8, 16, 32), "b2": (1, 8, 16), "b5": (1, 8)}
GPU_TRAIN_BATCH = 8
SMOKE_IMAGE = (32, 32)
SMOKE_INFERENCE_BATCHES = {"tiny": (1,)}
SMOKE_TRAIN_BATCH = 2

# hidden sizes, depths, heads and decoder width: the presets measured on a GPU, and the
# smoke run's tiny stand-in (sr ratios 8, 4, 2, 1 and MLP ratio 4 everywhere).
ARCHITECTURES = {
    "b0": dict(hidden_sizes=(32, 64, 160, 256), depths=(2, 2, 2, 2), num_attention_heads=(1, 2, 5, 8), decoder_hidden_size=256),
    "b2": dict(hidden_sizes=(64, 128, 320, 512), depths=(3, 4, 6, 3), num_attention_heads=(1, 2, 5, 8), decoder_hidden_size=768),
    "b5": dict(hidden_sizes=(64, 128, 320, 512), depths=(3, 6, 40, 3), num_attention_heads=(1, 2, 5, 8), decoder_hidden_size=768),
    "tiny": dict(hidden_sizes=(16, 32, 32, 64), depths=(1, 1, 1, 1), num_attention_heads=(1, 2, 2, 4), decoder_hidden_size=32),
}
PRESETS = ("b0", "b2", "b5")
DROP_PATH = 0.1
CLASSIFIER_DROPOUT = 0.1

# Rough seconds per item on an H100 for the time budget (model build included).
EST_S = {"b0": 2.0, "b2": 3.0, "b5": 6.0, "tiny": 0.0}
EST_COMPILE_S = {"inference": 120.0, "train_step": 300.0}


@dataclass
class Model:
    module: torch.nn.Module
    infer: Callable[[torch.Tensor], torch.Tensor]  # images -> logits
    train_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # images, labels -> loss
    note: str = ""


def our_model(variant: str, kernels: str, device: torch.device) -> Model:
    try:
        from segformer.config import SegFormerConfig
        from segformer.model import SegFormer
    except ImportError as error:
        raise Skip(f"segformer.model is not importable yet ({error})") from error
    name_or_config = variant if variant in PRESETS else SegFormerConfig(**ARCHITECTURES[variant])
    with device:
        module = SegFormer.from_config(
            name_or_config, num_classes=NUM_CLASSES, kernels=kernels, drop_path_rate=DROP_PATH,
            classifier_dropout=CLASSIFIER_DROPOUT,
        )
    return Model(module, module, lambda images, labels: module.loss(module(images), labels))


def transformers_model(variant: str, device: torch.device) -> Model:
    if importlib.util.find_spec("transformers") is None:
        raise Skip("transformers is not installed")
    import transformers
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    sizes = {key: list(value) if isinstance(value, tuple) else value for key, value in ARCHITECTURES[variant].items()}
    config = SegformerConfig(
        num_labels=NUM_CLASSES, drop_path_rate=DROP_PATH, classifier_dropout_prob=CLASSIFIER_DROPOUT,
        semantic_loss_ignore_index=IGNORE_INDEX, **sizes,
    )
    with device:
        module = SegformerForSemanticSegmentation(config)
    return Model(
        module,
        lambda images: module(pixel_values=images).logits,
        lambda images, labels: module(pixel_values=images, labels=labels).loss,
        note=f"transformers {transformers.__version__}, attention {getattr(module.config, '_attn_implementation', '?')}",
    )


def smoke_skip(provider: str, mode: str) -> str | None:
    """Why the smoke run leaves out a provider's end-to-end measurement, if it does.
    The kernel rows already run every fused op's backward through the interpreter."""
    if provider == "compile":
        return "smoke: torch.compile of the whole model is not run on CPU (slow, and timings mean nothing)"
    if mode == "train_step" and provider in ("fused", "transformers"):
        return (f"smoke: the {provider} training step is not run on CPU (about 20 s through the interpreter for "
                "fused, several for transformers); the GPU suite runs it")
    return None


def build(variant: str, provider: str, image: tuple[int, int], ctx: Context, stack: contextlib.ExitStack) -> Model:
    """The model for ``provider``; context managers it needs stay open on ``stack``."""
    if provider == "transformers":
        return transformers_model(variant, ctx.device)
    if provider == "fused":
        check_triton_runs(ctx.device)
        model = our_model(variant, "auto", ctx.device)
        model.note = "kernels='auto'; Triton: " + ", ".join(TRITON_IMPLEMENTATIONS)
        return model
    model = our_model(variant, "torch", ctx.device)
    if provider == "sdpa":
        calls = stack.enter_context(sdpa_everywhere())
        with torch.no_grad():
            model.infer(torch.randn(1, 3, *image, device=ctx.device))
        if calls[0] == 0:
            raise Skip("sdpa: the model's kernels='torch' path (segformer_kernels.torch_ops) already runs attention "
                       "through SDPA: the eager row is this measurement")
        model.note = "reference with attention through F.scaled_dot_product_attention"
    if provider == "compile":
        model.infer = compiled(model.infer, ctx.compile, ctx.device, fullgraph=False)
        model.train_loss = compiled(model.train_loss, ctx.compile, ctx.device, fullgraph=False)
        model.note = ctx.compile.describe() + " of the eager model (forward and loss; backward through AOTAutograd)"
    return model


def autocast(ctx: Context):
    return torch.autocast(ctx.device.type, dtype=ctx.dtype, enabled=ctx.dtype != torch.float32)


def parameter_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


_flop_cache: dict[tuple, int | None] = {}


def reference_flops(variant: str, mode: str, image: tuple[int, int], ctx: Context) -> int | None:
    """Flops of one image through the reference model (forward, or forward + backward),
    as torch.utils.flop_counter counts them; None when no reference model can be built."""
    key = (variant, mode, image)
    if key not in _flop_cache:
        from torch.utils.flop_counter import FlopCounterMode

        for make in (lambda: our_model(variant, "torch", ctx.device), lambda: transformers_model(variant, ctx.device)):
            try:
                model = make()
            except Skip:
                continue
            images = torch.randn(1, 3, *image, device=ctx.device)
            labels = torch.randint(0, NUM_CLASSES, (1, *image), device=ctx.device)
            counter = FlopCounterMode(display=False)
            with counter, autocast(ctx):
                if mode == "inference":
                    with torch.no_grad():
                        model.infer(images)
                else:
                    model.train_loss(images, labels).backward()
            _flop_cache[key] = counter.get_total_flops()
            break
        else:
            _flop_cache[key] = None
    return _flop_cache[key]


def run_e2e_item(variant: str, provider: str, mode: str, batch: int, image: tuple[int, int], ctx: Context) -> list[dict]:
    if ctx.smoke and smoke_skip(provider, mode):
        raise Skip(smoke_skip(provider, mode))
    with contextlib.ExitStack() as stack:
        model = build(variant, provider, image, ctx, stack)
        module = model.module
        images = torch.randn(batch, 3, *image, device=ctx.device)
        param_bytes = parameter_bytes(module)
        if mode == "inference":
            module.eval()

            def step():
                with torch.no_grad(), autocast(ctx):
                    return model.infer(images)

            logits_bytes = batch * NUM_CLASSES * math.ceil(image[0] / 4) * math.ceil(image[1] / 4) * ctx.dtype.itemsize
            bytes_ = param_bytes + images.nbytes + logits_bytes
        else:
            module.train()
            labels = torch.randint(0, NUM_CLASSES, (batch, *image), device=ctx.device)
            optimizer = torch.optim.AdamW(module.parameters(), lr=6e-5, fused=ctx.device.type == "cuda")

            def step():
                with autocast(ctx):
                    loss = model.train_loss(images, labels)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            # forward and backward read the weights, backward writes their gradients, AdamW
            # reads weight, gradient and both moments and writes weight and both moments.
            bytes_ = 10 * param_bytes + images.nbytes + labels.nbytes
        timing = ctx.timer.time(step)
        memory = ctx.timer.memory(step)
    per_image = reference_flops(variant, mode, image, ctx)
    return [make_row(
        ctx, suite="e2e", op=f"segformer-{variant}", case=case_name(image, batch), provider=provider, mode=mode,
        dtype=dtype_name(ctx.dtype), batch=batch, shape=shape(image, batch), note=model.note,
        timing=timing, memory=memory, images=batch, min_bytes=bytes_,
        min_flops=None if per_image is None else per_image * batch,
    )]


def case_name(image: tuple[int, int], batch: int) -> str:
    return f"{image[0]}x{image[1]}-bs{batch}"


def shape(image: tuple[int, int], batch: int) -> dict:
    return {"B": batch, "H": image[0], "W": image[1], "classes": NUM_CLASSES}


def e2e_items(smoke: bool, providers: tuple[str, ...], dtype: torch.dtype) -> list[Item]:
    image = SMOKE_IMAGE if smoke else GPU_IMAGE
    inference = SMOKE_INFERENCE_BATCHES if smoke else GPU_INFERENCE_BATCHES
    train_batch = SMOKE_TRAIN_BATCH if smoke else GPU_TRAIN_BATCH
    configs = [(variant, "inference", batch) for variant, batches in inference.items() for batch in batches]
    configs += [(variant, "train_step", train_batch) for variant in inference]
    items = []
    for variant, mode, batch in configs:
        target = (variant, mode, batch) in TARGET_E2E
        for provider in PROVIDERS:
            if provider not in providers:
                continue
            if provider == "compile":
                priority, est = (PRIORITY_COMPILE_TARGET_E2E if target else PRIORITY_COMPILE_E2E), EST_COMPILE_S[mode]
            else:
                priority, est = (PRIORITY_TARGET if target else PRIORITY_E2E), EST_S[variant]
            items.append(Item(
                suite="e2e", op=f"segformer-{variant}", case=case_name(image, batch), provider=provider, modes=(mode,),
                priority=priority, est_s=0.0 if smoke else est, dtype=dtype_name(dtype), batch=batch, shape=shape(image, batch),
                run=functools.partial(run_e2e_item, variant, provider, mode, batch, image),
            ))
    return items
