"""Plan the measurements, run them in priority order within the time budget, write the
rows, the report, the plots and (after a GPU run into bench/results/) PERFORMANCE.md."""

from __future__ import annotations

import gc
import math
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from . import IN_CHECKOUT, PROVIDERS, RESULTS_ROOT
from .core import CompileSpec, Context, Item, Skip, make_row, matches, merge_rows, read_rows, write_rows
from .cpu import pipeline_items
from .e2e import e2e_items
from .measure import REPO_ROOT, CpuTimer, GpuTimer, environment, results_dir_name
from .ops import kernel_items
from .providers import reset_compiled_state
from .roofline import measure_ceilings



@dataclass
class Options:
    smoke: bool = False
    out: Path | None = None
    only: str | None = None
    providers: tuple[str, ...] = PROVIDERS
    budget_s: float = math.inf
    compile_mode: str = "max-autotune"
    merge: bool = False
    list_only: bool = False


def plan(options: Options, dtype: torch.dtype) -> list[Item]:
    items = kernel_items(options.smoke, options.providers, dtype) + e2e_items(options.smoke, options.providers, dtype)
    items += pipeline_items(options.smoke)
    items = [item for item in items if matches(options.only, item.key)]
    return sorted(items, key=lambda item: item.priority)  # stable: plan order within a priority


def make_context(options: Options) -> Context:
    if options.smoke:
        device, dtype, timer = torch.device("cpu"), torch.float32, CpuTimer()
        spec = CompileSpec(backend="aot_eager", mode=None)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: the benchmark suite needs a GPU (run `python -m bench --smoke` on CPU)")
        device, dtype, timer = torch.device("cuda"), torch.bfloat16, GpuTimer()
        spec = CompileSpec(backend="inductor", mode=options.compile_mode)
    return Context(device=device, dtype=dtype, timer=timer, env=environment(device, timer), smoke=options.smoke, compile=spec)


def describe(row: dict) -> str:
    if row["status"] != "ok":
        return f"{row['id']}: {row['status']}: {row['note']}"
    parts = [f"{row['ms_p50']:.4f} ms"] if row.get("ms_p50") is not None else []
    if row.get("images_per_s"):
        parts.append(f"{row['images_per_s']:.1f} img/s")
    if row.get("frac_roofline") is not None:
        parts.append(f"{100 * row['frac_roofline']:.0f}% of roofline ({row['bound']})")
    if row.get("peak_mb") is not None:
        parts.append(f"peak {row['peak_mb']:.0f} MB")
    return f"{row['id']}: " + ", ".join(parts)


def run_item(item: Item, ctx: Context) -> list[dict]:
    try:
        return item.run(ctx)
    except Skip as skip:
        return item.rows(ctx, "skipped", str(skip))
    except Exception as error:  # noqa: BLE001 - a failed item is recorded, the run goes on
        last = traceback.format_exception_only(type(error), error)[-1].strip()
        return item.rows(ctx, "error", last[:500])
    finally:
        # Kernel items free their tensors by reference counting; models and compiled
        # graphs (CUDA-graph pools included) need a collection to give memory back.
        if item.provider == "compile":
            reset_compiled_state()
        if item.provider == "compile" or item.suite == "e2e":
            gc.collect()
            if ctx.device.type == "cuda":
                torch.cuda.empty_cache()


def default_out(ctx: Context) -> Path:
    root = REPO_ROOT if IN_CHECKOUT else Path.cwd()
    if ctx.smoke:
        return root / "runs" / "bench-smoke"
    return (RESULTS_ROOT if IN_CHECKOUT else root / "bench-results") / results_dir_name(ctx.env["gpu"])


def print_plan(options: Options) -> None:
    """The planned items in run order (no device needed)."""
    items = plan(options, torch.float32 if options.smoke else torch.bfloat16)
    for item in items:
        print(f"priority {item.priority}  ~{item.est_s:>4.0f} s  {item.key}  {'/'.join(item.modes)}")
    print(f"# {len(items)} items, about {sum(item.est_s for item in items):.0f} s estimated in all")


def run(options: Options) -> Path | None:
    if options.list_only:
        print_plan(options)
        return None
    ctx = make_context(options)
    items = plan(options, ctx.dtype)
    out = Path(options.out) if options.out else default_out(ctx)
    started = time.monotonic()
    print(f"# {ctx.env['gpu']}, torch {ctx.env['torch']}, triton {ctx.env['triton']}, commit {ctx.env['git_commit']}")
    print(f"# timer: {ctx.timer.name}")
    if not ctx.timer.meaningful:
        print("# SMOKE RUN ON CPU: this checks the pipeline; its timings mean nothing.")
    print(f"# {len(items)} items planned, budget {options.budget_s:.0f} s, results -> {out}")

    rows_path = out / "rows.jsonl"
    earlier = read_rows(rows_path) if options.merge and rows_path.exists() else []
    ctx.ceilings, ceiling_items = measure_ceilings(ctx.timer, ctx.device, ctx.dtype, ctx.smoke)
    rows = [make_row(ctx, provider="torch", note="this run's ceiling", **fields) for fields in ceiling_items]
    for row in rows:
        print(describe(row))

    for item in items:
        left = options.budget_s - (time.monotonic() - started)
        if left < item.est_s:
            new = item.rows(ctx, "skipped", f"time budget: {max(left, 0):.0f} s left of --budget-s {options.budget_s:.0f}, "
                                             f"this item needs about {item.est_s:.0f} s")
        else:
            new = run_item(item, ctx)
        for row in new:
            print(f"[{time.monotonic() - started:6.1f} s] {describe(row)}", flush=True)
        rows += new
        # after every item, so a run killed from outside still leaves its rows
        write_rows(rows_path, merge_rows(earlier, rows))
    rows = merge_rows(earlier, rows)
    write_rows(rows_path, rows)

    from .report import write_performance, write_report

    write_report(rows, out)
    performance = RESULTS_ROOT / "PERFORMANCE.md" if out.resolve().parent == RESULTS_ROOT.resolve() else out / "PERFORMANCE.md"
    write_performance(RESULTS_ROOT, performance)
    counts = {status: sum(r["status"] == status for r in rows) for status in ("ok", "skipped", "error")}
    print(f"# {counts['ok']} ok, {counts['skipped']} skipped, {counts['error']} errors in {time.monotonic() - started:.0f} s")
    print(f"# rows: {rows_path}\n# report: {out / 'report.md'}\n# performance section: {performance}")
    return out
