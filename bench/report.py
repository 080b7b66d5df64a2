"""Markdown report, PNG plots and the README "Performance" section, from rows.jsonl.

    python -m bench.report --rows DIR/rows.jsonl [--out DIR]      # report.md + plots
    python -m bench.report --performance [--results bench/results] [--dest FILE]

The Performance section comes from the newest GPU results under bench/results/ and
compares them with the targets in docs/design.md ("Benchmarks and performance targets"), or says plainly that nothing has
been measured on a GPU yet.
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from . import RESULTS_ROOT
from .core import TARGET_E2E, TARGET_KERNEL_CASES, read_rows
from .roofline import MODES

KERNEL_PROVIDERS = ("eager", "sdpa", "compile", "fused")
E2E_PROVIDERS = ("eager", "sdpa", "compile", "fused", "transformers")
BANDWIDTH_TARGET = 0.7


@dataclass(frozen=True)
class Target:
    what: str
    suite: str
    op: str
    cases: tuple[str, ...]
    mode: str
    vs_eager: float
    vs_compile: float
    metric: str = "speed"  # "speed": other time / fused time >= target; "memory": fused peak / other peak <= target


B0_INFERENCE, B2_TRAINING = TARGET_E2E  # (variant, mode, batch)
B0_CASE, B2_CASE = f"512x512-bs{B0_INFERENCE[2]}", f"512x512-bs{B2_TRAINING[2]}"
TARGETS = (
    Target("Mix-FFN block fwd+bwd", "kernel", "mix_ffn_block", TARGET_KERNEL_CASES, "fwd+bwd", 4.0, 1.8),
    Target("attention half-block fwd+bwd", "kernel", "attention_block", TARGET_KERNEL_CASES, "fwd+bwd", 5.0, 1.5),
    Target(f"B0 512² inference, batch {B0_INFERENCE[2]}", "e2e", "segformer-b0", (B0_CASE,), "inference", 3.0, 2.0),
    Target(f"B2 512² training step, batch {B2_TRAINING[2]}", "e2e", "segformer-b2", (B2_CASE,), "train_step", 1.6, 1.3),
    Target(f"peak training memory, B2 512² batch {B2_TRAINING[2]}", "e2e", "segformer-b2", (B2_CASE,), "train_step",
           0.6, 0.8, "memory"),
)


class Rows:
    """Rows indexed by (suite, op, case, mode, provider)."""

    def __init__(self, rows: list[dict]):
        self.all = rows
        self.by_key = {(r["suite"], r["op"], r["case"], r["mode"], r["provider"]): r for r in rows}

    def get(self, suite, op, case, mode, provider) -> dict | None:
        return self.by_key.get((suite, op, case, mode, provider))

    def ok(self, *key) -> dict | None:
        row = self.get(*key)
        return row if row is not None and row["status"] == "ok" else None

    def of(self, suite: str) -> list[dict]:
        return [r for r in self.all if r["suite"] == suite]

    def distinct(self, suite: str, field: str, **where) -> list:
        seen = {}
        for r in self.of(suite):
            if all(r[k] == v for k, v in where.items()):
                seen.setdefault(r[field], None)
        return list(seen)


def ratio(rows: Rows, target: Target, case: str, other: str) -> tuple[float | None, str]:
    """Fused compared with ``other`` for one target case: the number, or None and why."""
    key = (target.suite, target.op, case, target.mode)
    fused, base = rows.get(*key, "fused"), rows.get(*key, other)
    for name, row in (("fused", fused), (other, base)):
        if row is None:
            return None, "not in this run"
        if row["status"] != "ok":
            return None, f"{name} {row['status']}: {row['note']}"
    if target.metric == "memory":
        if fused["peak_mb"] is None or base["peak_mb"] is None:
            return None, "no memory measurement"
        return fused["peak_mb"] / base["peak_mb"], ""
    return base["ms_p50"] / fused["ms_p50"], ""


def judged(value: float | None, why: str, goal: float, metric: str) -> str:
    if value is None:
        return f"not measured ({why})" if why else "not measured"
    if metric == "memory":
        return f"{value:.2f}x (≤ {goal}x) " + ("met" if value <= goal else "missed")
    return f"{value:.2f}x (≥ {goal}x) " + ("met" if value >= goal else "missed")


def speedup_range(rows: Rows, target: Target, other: str) -> str:
    """Fused vs ``other`` over every case of a kernel target's op (min - max)."""
    values = []
    for case in rows.distinct(target.suite, "case", op=target.op):
        value, _ = ratio(rows, Target(**{**target.__dict__, "cases": (case,)}), case, other)
        if value is not None:
            values.append(value)
    return f"{min(values):.2f}x - {max(values):.2f}x over {len(values)} cases" if values else "none measured"


def bandwidth_summary(rows: Rows) -> str:
    fractions = [r["frac_copy_bandwidth"] for r in rows.of("kernel")
                 if r["provider"] == "fused" and r["status"] == "ok" and r.get("bound") == "memory"]
    if not fractions:
        return "not measured (no fused memory-bound kernel rows)"
    reached = sum(f >= BANDWIDTH_TARGET for f in fractions)
    return (f"{reached} of {len(fractions)} fused memory-bound rows reach {BANDWIDTH_TARGET:.0%} "
            f"(median {statistics.median(fractions):.0%}, min {min(fractions):.0%})")


def targets_table(rows: Rows) -> list[str]:
    lines = [
        "| target (docs/design.md) | case | fused vs eager | fused vs torch.compile | fused vs transformers (no target) |",
        "|---|---|---|---|---|",
    ]
    for target in TARGETS:
        for case in target.cases:
            cells = [judged(*ratio(rows, target, case, other), goal, target.metric)
                     for other, goal in (("eager", target.vs_eager), ("compile", target.vs_compile))]
            informative = "-"
            if target.suite == "e2e":
                value, why = ratio(rows, target, case, "transformers")
                informative = f"{value:.2f}x" if value is not None else f"not measured ({why})"
            lines.append(f"| {target.what} | {case} | {cells[0]} | {cells[1]} | {informative} |")
    lines.append(f"| memory-bound kernels ≥ {BANDWIDTH_TARGET:.0%} of measured copy bandwidth | all | {bandwidth_summary(rows)} | | |")
    for target in TARGETS:
        if target.suite == "kernel":
            lines.append(f"\n{target.what}, over every stage shape: fused vs eager {speedup_range(rows, target, 'eager')}; "
                         f"vs torch.compile {speedup_range(rows, target, 'compile')}.")
    return lines


# ---- the report -------------------------------------------------------------------------


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def cell(row: dict | None, field: str = "ms_p50", digits: int = 3) -> str:
    if row is None:
        return ""
    if row["status"] != "ok":
        return row["status"]
    return fmt(row.get(field), digits)


def percent(value) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def header(rows: Rows) -> list[str]:
    first = next((r for r in rows.all if r.get("gpu")), {})
    lines = [
        "# segformer-kernels benchmark report",
        "",
        f"- device: {first.get('gpu')} ({first.get('device')}); torch {first.get('torch')}, triton {first.get('triton')}, "
        f"CUDA {first.get('cuda')}, Python {first.get('python')}",
        f"- commit: {first.get('git_commit')}; measured {first.get('timestamp')}",
        f"- timer: {first.get('timer')}",
    ]
    if not first.get("timings_meaningful", False):
        lines += ["", "> **CPU smoke run: these timings mean nothing.** It checks that the benchmark pipeline runs "
                      "(tiny shapes, fp32, the fused provider through the Triton interpreter). Speed needs a GPU: `bench/run_gpu.sh`."]
    copy = rows.ok("ceiling", "copy", *_only_case(rows, "copy"), "copy", "torch")
    gemm = rows.ok("ceiling", "gemm", *_only_case(rows, "gemm"), "matmul", "torch")
    if copy and gemm:
        lines.append(f"- ceilings measured in this run: copy {copy['achieved_gbps']:.0f} GB/s (read + write, {copy['case']}), "
                     f"{gemm['dtype']} GEMM {gemm['achieved_tflops']:.1f} TFLOP/s ({gemm['case']})")
    return lines


def _only_case(rows: Rows, op: str) -> tuple[str]:
    cases = rows.distinct("ceiling", "case", op=op)
    return (cases[0] if cases else "",)


def kernel_tables(rows: Rows) -> list[str]:
    lines = ["## Kernel benchmarks", "",
             "Median ms per call (p50); speedups are eager or compile time over fused time; GB/s, % of the copy "
             "ceiling and % of the roofline are for fused on the minimum bytes/flops (bench/README.md).", ""]
    for op in rows.distinct("kernel", "op"):
        providers = [p for p in KERNEL_PROVIDERS if p in rows.distinct("kernel", "provider", op=op)]
        lines += [f"### {op}", "",
                  "| case | mode | " + " | ".join(f"{p} ms" for p in providers)
                  + " | fused vs eager | fused vs compile | fused GB/s | fused % copy BW | fused % roofline | peak MB eager / fused |",
                  "|---|---|" + "---|" * (len(providers) + 6)]
        for case in rows.distinct("kernel", "case", op=op):
            for mode in MODES:
                got = {p: rows.get("kernel", op, case, mode, p) for p in providers}
                if not any(got.values()):
                    continue
                fused = rows.ok("kernel", op, case, mode, "fused")
                speed = [_speedup(rows.ok("kernel", op, case, mode, base), fused) for base in ("eager", "compile")]
                eager = rows.ok("kernel", op, case, mode, "eager")
                lines.append(
                    f"| {case} | {mode} | " + " | ".join(cell(got[p]) for p in providers)
                    + f" | {speed[0]} | {speed[1]} | {cell(fused, 'achieved_gbps', 4)} | "
                    f"{percent(fused and fused.get('frac_copy_bandwidth'))} | {percent(fused and fused.get('frac_roofline'))} | "
                    f"{cell(eager, 'peak_mb', 4)} / {cell(fused, 'peak_mb', 4)} |")
        lines.append("")
    return lines


def _speedup(base: dict | None, fused: dict | None) -> str:
    if base is None or fused is None:
        return "-"
    return f"{base['ms_p50'] / fused['ms_p50']:.2f}x"


def saved_bytes_table(rows: Rows) -> list[str]:
    lines = ["## Activation memory autograd keeps per call (forward)", "",
             "Bytes of the distinct storages saved for backward (torch.autograd.graph.saved_tensors_hooks), "
             "not counting the inputs and weights themselves.", "",
             "| op | case | eager MB | fused MB | fused / eager |", "|---|---|---|---|---|"]
    for op in rows.distinct("kernel", "op"):
        for case in rows.distinct("kernel", "case", op=op):
            eager, fused = rows.ok("kernel", op, case, "fwd", "eager"), rows.ok("kernel", op, case, "fwd", "fused")
            if eager is None or eager.get("saved_activation_bytes") is None:
                continue
            eager_mb = eager["saved_activation_bytes"] / 2**20
            fused_mb = fused["saved_activation_bytes"] / 2**20 if fused and fused.get("saved_activation_bytes") is not None else None
            share = f"{fused_mb / eager_mb:.2f}" if fused_mb is not None and eager_mb else "-"
            lines.append(f"| {op} | {case} | {eager_mb:.3g} | {fmt(fused_mb)} | {share} |")
    return lines + [""]


def e2e_table(rows: Rows) -> list[str]:
    providers = [p for p in E2E_PROVIDERS if p in rows.distinct("e2e", "provider")]
    lines = ["## End to end", "",
             "Images/s at the median time per call; peak MB is torch.cuda.max_memory_allocated over one call "
             "(weights, optimizer state and activations).", "",
             "| model | mode | case | " + " | ".join(f"{p} img/s" for p in providers) + " | "
             + " | ".join(f"{p} peak MB" for p in providers) + " | fused vs eager | fused vs compile | fused vs transformers |",
             "|---|---|---|" + "---|" * (2 * len(providers) + 3)]
    for op in rows.distinct("e2e", "op"):
        for mode in ("inference", "train_step"):
            for case in rows.distinct("e2e", "case", op=op, mode=mode):
                got = [rows.get("e2e", op, case, mode, p) for p in providers]
                fused = rows.ok("e2e", op, case, mode, "fused")
                speed = [_speedup(rows.ok("e2e", op, case, mode, base), fused) for base in ("eager", "compile", "transformers")]
                lines.append(f"| {op} | {mode} | {case} | " + " | ".join(cell(r, "images_per_s", 4) for r in got) + " | "
                             + " | ".join(cell(r, "peak_mb", 4) for r in got) + " | " + " | ".join(speed) + " |")
    return lines + [""]


def not_measured(rows: Rows) -> list[str]:
    groups: dict[tuple, list[str]] = defaultdict(list)
    for r in rows.all:
        if r["status"] != "ok":
            groups[(r["status"], r["note"])].append(r["id"])
    if not groups:
        return []
    lines = ["## Not measured", "", "| status | rows | reason | first row |", "|---|---|---|---|"]
    for (status, note), ids in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        lines.append(f"| {status} | {len(ids)} | {note.replace('|', '/')} | {ids[0]} |")
    return lines + [""]


def pipeline_table(rows: Rows) -> list[str]:
    """The input pipeline's rates beside the training steps it has to feed: which one
    bounds training."""
    pipeline = [r for r in rows.of("pipeline") if r["status"] == "ok"]
    if not pipeline:
        return []
    lines = ["## Input pipeline", "",
             f"One worker (one thread) making training crops ({pipeline[0]['case']}): with the photometric "
             "distortion in the worker (`read+augment`) or left to the training device "
             "(`read+augment-colour-on-device`, the trainer's default on GPUs), and the device step that then "
             "finishes a batch (`finish-batch-on-device`); `workers-N` is N times the one-worker rate of the "
             "trainer's default where the run was made, with the training steps per second it feeds at batch 8.", "",
             "| mode | images/s (wall) | images/s (CPU time) | train steps/s at batch 8 |", "|---|---|---|---|"]
    for row in pipeline:
        steps, cpu_rate = row["shape"].get("train_steps_per_s"), row["shape"].get("cpu_images_per_s")
        lines.append(f"| {row['mode']} | {fmt(row['images_per_s'], 4)} | {fmt(cpu_rate, 4) if cpu_rate else '-'} | "
                     f"{fmt(steps, 3) if steps else '-'} |")
    steps = [r for r in rows.of("e2e") if r["mode"] == "train_step" and r["status"] == "ok"]
    if steps:
        lines += ["", "Training steps measured in this run (images/s the loader must match):", "",
                  "| model | provider | case | images/s |", "|---|---|---|---|"]
        lines += [f"| {r['op']} | {r['provider']} | {r['case']} | {fmt(r['images_per_s'], 4)} |" for r in steps]
    return lines + [""]


def report_markdown(rows: list[dict], plots: list[str]) -> str:
    indexed = Rows(rows)
    lines = header(indexed) + ["", "## Targets", ""] + targets_table(indexed) + [""]
    lines += kernel_tables(indexed) + saved_bytes_table(indexed) + e2e_table(indexed) + pipeline_table(indexed)
    lines += not_measured(indexed)
    lines += ["## Plots", ""] + [f"![{name}]({name})" for name in plots]
    return "\n".join(lines) + "\n"


# ---- plots ------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


COLORS = {"eager": "tab:gray", "sdpa": "tab:blue", "compile": "tab:orange", "fused": "tab:green", "transformers": "tab:purple"}


def plot_speedups(rows: Rows, mode: str, path: Path) -> None:
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter, NullLocator

    ops = [op for op in rows.distinct("kernel", "op") if rows.distinct("kernel", "case", op=op, mode=mode)]
    columns = 2
    figure_rows = max(1, -(-len(ops) // columns))
    fig, axes = plt.subplots(figure_rows, columns, figsize=(14, 3.2 * figure_rows), squeeze=False)
    others = [p for p in KERNEL_PROVIDERS if p != "eager"]
    width = 0.8 / len(others)
    for ax, op in zip(axes.flat, ops):
        cases = rows.distinct("kernel", "case", op=op, mode=mode)
        extreme = 2.0
        for i, provider in enumerate(others):
            values = []
            for case in cases:
                base, row = rows.ok("kernel", op, case, mode, "eager"), rows.ok("kernel", op, case, mode, provider)
                values.append(base["ms_p50"] / row["ms_p50"] if base and row else float("nan"))
            extreme = max([extreme] + [max(v, 1 / v) for v in values if v == v])
            # bars grow from 1x, up for faster and down for slower
            ax.bar([x + i * width for x in range(len(cases))], [v - 1 for v in values], width, bottom=1.0,
                   label=provider, color=COLORS[provider])
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_ylim(1 / (extreme * 1.3), extreme * 1.3)
        ax.set_xlim(-0.5, len(cases) - 0.2)
        steps = int(math.log2(extreme * 1.3))
        ax.set_yticks([2.0**k for k in range(-steps, steps + 1)])
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}x"))
        ax.yaxis.set_minor_locator(NullLocator())
        ax.set_title(op, fontsize=10)
        ax.set_ylabel("speedup over eager")
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(cases))], cases, rotation=30, ha="right", fontsize=7)
    for ax in list(axes.flat)[len(ops):]:
        ax.axis("off")
    if ops:
        axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"Kernel speedup over eager, {mode} (median times, log scale; no bar = not measured)")
    # fixed margins: tight_layout costs seconds on figures this size
    fig.subplots_adjust(left=0.06, right=0.99, top=1 - 0.9 / fig.get_figheight(), bottom=1.0 / fig.get_figheight(),
                        hspace=0.75, wspace=0.15)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_ceiling_fraction(rows: Rows, path: Path) -> None:
    plt = _pyplot()
    ops = rows.distinct("kernel", "op")
    fig, ax = plt.subplots(figsize=(12, 4.5))
    highest = 1.0
    for i, provider in enumerate(KERNEL_PROVIDERS):
        points = [(ops.index(r["op"]) + (i - 1.5) * 0.18, r["frac_roofline"]) for r in rows.of("kernel")
                  if r["provider"] == provider and r["status"] == "ok" and r.get("frac_roofline") is not None]
        if points:
            ax.scatter(*zip(*points), s=14, label=provider, alpha=0.75, color=COLORS[provider])
            highest = max(highest, max(y for _, y in points))
    ax.axhline(BANDWIDTH_TARGET, color="grey", linestyle="--", linewidth=0.8, label=f"{BANDWIDTH_TARGET:.0%}")
    ax.set_ylim(0, highest * 1.05)
    ax.set_xticks(range(len(ops)), ops, rotation=20, ha="right")
    ax.set_ylabel("roofline floor / measured time")
    ax.set_title("Fraction of this device's measured ceiling (copy bandwidth or GEMM rate, whichever bounds the case)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_e2e(rows: Rows, path: Path) -> None:
    plt = _pyplot()
    models = rows.distinct("e2e", "op")
    fig, axes = plt.subplots(1, len(models) + 2, figsize=(4.2 * (len(models) + 2), 4), squeeze=False)
    axes = list(axes.flat)
    for ax, op in zip(axes, models):
        for provider in E2E_PROVIDERS:
            points = sorted((r["batch"], r["images_per_s"]) for r in rows.of("e2e")
                            if r["op"] == op and r["mode"] == "inference" and r["provider"] == provider and r["status"] == "ok")
            if points:
                ax.plot(*zip(*points), marker="o", label=provider, color=COLORS[provider])
        ax.set_title(f"{op} inference")
        ax.set_xlabel("batch")
        ax.set_ylabel("images/s")
        ax.legend(fontsize=7)
    width = 0.8 / len(E2E_PROVIDERS)
    for ax, field, title in ((axes[-2], "images_per_s", "training step, images/s"), (axes[-1], "peak_mb", "training step, peak MB")):
        measured = False
        for i, provider in enumerate(E2E_PROVIDERS):
            values = []
            for op in models:
                row = next((r for r in rows.of("e2e") if r["op"] == op and r["mode"] == "train_step"
                            and r["provider"] == provider and r["status"] == "ok"), None)
                values.append(row[field] if row and row[field] is not None else float("nan"))
            measured |= any(v == v for v in values)
            ax.bar([x + i * width for x in range(len(models))], values, width, label=provider, color=COLORS[provider])
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(models))], models, fontsize=8)
        ax.set_title(title)
        if measured:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_report(rows: list[dict], out: Path) -> list[Path]:
    """report.md and the PNG plots into ``out``; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    indexed = Rows(rows)
    plots = []
    for mode in MODES:
        path = out / f"speedup_{mode.replace('+', '_')}.png"
        plot_speedups(indexed, mode, path)
        plots.append(path)
    plot_ceiling_fraction(indexed, out / "ceiling_fraction.png")
    plot_e2e(indexed, out / "e2e.png")
    plots += [out / "ceiling_fraction.png", out / "e2e.png"]
    report = out / "report.md"
    report.write_text(report_markdown(rows, [p.name for p in plots]))
    return [report, *plots]


# ---- the README "Performance" section ------------------------------------------------


def newest_gpu_results(results_root: Path) -> tuple[Path, list[dict]] | None:
    """The rows.jsonl under ``results_root`` holding the newest GPU (meaningful) timing."""
    best = None
    for path in sorted(results_root.glob("*/rows.jsonl")):
        rows = [r for r in read_rows(path) if r.get("timings_meaningful") and r.get("device") == "cuda"]
        if rows:
            newest = max(r["timestamp"] for r in rows)
            if best is None or newest > best[0]:
                best = (newest, path, rows)
    return None if best is None else (best[1], best[2])


def performance_markdown(found: tuple[Path, list[dict]] | None) -> str:
    generated = "<!-- generated by `python -m bench.report --performance` from bench/results/; do not edit by hand -->"
    lines = ["## Performance", "", generated, ""]
    if found is None:
        lines += [
            "**Nothing has been measured on a GPU yet.** The benchmark suite exists and its CPU smoke run passes in CI, "
            "but CPU timings say nothing about speed, so there are no performance numbers to show.",
            "",
            "The targets (docs/design.md; H100, bf16):",
            "",
            "| target | fused vs eager | fused vs torch.compile |",
            "|---|---|---|",
        ]
        for target in TARGETS:
            sign = "≤" if target.metric == "memory" else "≥"
            lines.append(f"| {target.what} | {sign} {target.vs_eager}x | {sign} {target.vs_compile}x |")
        lines.append(f"| memory-bound kernels | ≥ {BANDWIDTH_TARGET:.0%} of the measured copy bandwidth on the minimum bytes | |")
    else:
        path, rows = found
        indexed = Rows(rows)
        first = rows[0]
        report_link = f"bench/results/{path.parent.name}/report.md"
        copy = next((r for r in rows if r["suite"] == "ceiling" and r["op"] == "copy" and r["status"] == "ok"), None)
        gemm = next((r for r in rows if r["suite"] == "ceiling" and r["op"] == "gemm" and r["status"] == "ok"), None)
        lines += [
            f"Measured on **{first['gpu']}** ({first['timestamp'][:10]}; commit {first['git_commit'][:12]}; "
            f"torch {first['torch']}, triton {first['triton']}; bf16).",
        ]
        if copy and gemm:
            lines.append(f"Ceilings measured in the same run: copy {copy['achieved_gbps']:.0f} GB/s, "
                         f"bf16 GEMM {gemm['achieved_tflops']:.0f} TFLOP/s.")
        lines += ["", *targets_table(indexed), "", f"Full tables and plots: [{report_link}]({report_link})."]
    lines += ["", "Reproduce on a CUDA machine: `bench/run_gpu.sh` (about 10 minutes on an H100; results in "
                  "`bench/results/<gpu-name>/`)."]
    return "\n".join(lines) + "\n"


# CPU targets: (model, image) -> least speed-up over transformers; memory ratio at 1024x2048
CPU_SPEED_TARGETS = {("segformer-b0", "512x512-bs1"): 2.5, ("segformer-b2", "512x512-bs1"): 2.0}
CPU_MEMORY_TARGET = ("1024x2048-bs1", 0.5)
PIPELINE_TARGET = 150.0


def cpu_markdown(rows: list[dict]) -> list[str]:
    """The CPU rows (bench/results/cpu/): the PyTorch path against transformers, and the
    input pipeline, against their targets."""
    indexed = Rows(rows)
    cpu = [r for r in rows if r["suite"] == "cpu"]
    lines = ["### On CPU", ""]
    if cpu:
        first = cpu[0]
        lines += [
            f"`python -m bench --cpu` ({first['timestamp'][:10]}; commit {first['git_commit'][:12]}; torch {first['torch']}; "
            f"fp32, batch 1; {first['timer']}). `eager` is this library with kernels=\"torch\", `transformers` is "
            "SegformerForSemanticSegmentation with the same weights; peak MB is the growth of the resident set over one "
            "call, in a fresh process (bench/cpu.py).", "",
            "| model | image | ours ms | transformers ms | speed-up | ours peak MB | transformers peak MB | memory ratio |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for op in indexed.distinct("cpu", "op"):
            for case in indexed.distinct("cpu", "case", op=op):
                ours, theirs = indexed.ok("cpu", op, case, "inference", "eager"), indexed.ok("cpu", op, case, "inference", "transformers")
                speed = memory = "-"
                if ours and theirs:
                    value = theirs["ms_p50"] / ours["ms_p50"]
                    goal = CPU_SPEED_TARGETS.get((op, case))
                    speed = f"{value:.2f}x" + (f" (≥ {goal}x) {'met' if value >= goal else 'missed'}" if goal else "")
                    if ours["peak_over_start_mb"] and theirs["peak_over_start_mb"]:
                        value = ours["peak_over_start_mb"] / theirs["peak_over_start_mb"]
                        goal = CPU_MEMORY_TARGET[1] if case == CPU_MEMORY_TARGET[0] else None
                        memory = f"{value:.2f}x" + (f" (≤ {goal}x) {'met' if value <= goal else 'missed'}" if goal else "")
                lines.append(f"| {op} | {case} | {cell(ours, 'ms_p50', 4)} | {cell(theirs, 'ms_p50', 4)} | {speed} | "
                             f"{cell(ours, 'peak_over_start_mb', 4)} | {cell(theirs, 'peak_over_start_mb', 4)} | {memory} |")
        lines.append("")
    pipeline = pipeline_table(indexed)
    if pipeline:
        for mode, what in (("read+augment", "the photometric distortion in the worker"),
                           ("read+augment-colour-on-device", "the photometric distortion on the device")):
            per_worker = indexed.ok("pipeline", "train-transform", pipeline_case(indexed), mode, "ours")
            if per_worker:
                value, cpu_rate = per_worker["images_per_s"], per_worker["shape"].get("cpu_images_per_s") or 0.0
                lines += [f"Input pipeline, one worker reading and augmenting ({what}): {value:.1f} images/s by wall "
                          f"time, {cpu_rate:.1f} by CPU time (≥ {PIPELINE_TARGET:.0f}) "
                          f"{'met' if max(value, cpu_rate) >= PIPELINE_TARGET else 'missed'}.", ""]
        lines += ["#" + line if line.startswith("## ") else line for line in pipeline]
    return lines


def pipeline_case(rows: Rows) -> str | None:
    cases = rows.distinct("pipeline", "case")
    return cases[0] if cases else None


def write_performance(results_root: Path, dest: Path) -> Path:
    """The Performance section: the newest GPU results, then the CPU results in
    ``results_root``/cpu/ when there are any."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    text = performance_markdown(newest_gpu_results(results_root))
    cpu_rows = results_root / "cpu" / "rows.jsonl"
    if cpu_rows.exists():
        rows = [r for r in read_rows(cpu_rows) if r.get("timings_meaningful") and r.get("suite") in ("cpu", "pipeline")]
        if rows:
            text += "\n" + "\n".join(cpu_markdown(rows)) + "\n"
    dest.write_text(text)
    return dest


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=Path, help="rows.jsonl to report on")
    parser.add_argument("--out", type=Path, help="folder for report.md and the plots (default: beside --rows)")
    parser.add_argument("--performance", action="store_true", help="write the README Performance section")
    parser.add_argument("--results", type=Path, default=RESULTS_ROOT, help="results root searched for GPU rows")
    parser.add_argument("--dest", type=Path, help="where the Performance section goes (default: <results>/PERFORMANCE.md)")
    args = parser.parse_args(argv)
    if not args.rows and not args.performance:
        parser.error("give --rows FILE and/or --performance")
    if args.rows:
        for path in write_report(read_rows(args.rows), args.out or args.rows.parent):
            print(path)
    if args.performance:
        print(write_performance(args.results, args.dest or args.results / "PERFORMANCE.md"))


if __name__ == "__main__":
    main()
