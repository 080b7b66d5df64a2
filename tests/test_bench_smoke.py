"""The benchmark suite's CPU checks: the smoke run end to end, the flop formulas against
torch's flop counter, the time budget and --merge, and the report and Performance section
on rows shaped like a GPU run's (no GPU needed for any of it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.core import ROW_FIELDS, CompileSpec, Context, make_row, read_rows, write_rows
from bench.e2e import e2e_items
from bench.measure import Memory, Timing
from bench.ops import KERNEL_OPS, Maker, Stage, benchmark_stages
from bench.providers import EAGER, SDPA
from bench.report import performance_markdown, write_performance, write_report
from bench.roofline import Ceilings
from bench.suite import Options, run
from segformer_kernels._backend import triton_implementation

REPO = Path(__file__).resolve().parent.parent
PNGS = ("speedup_fwd.png", "speedup_bwd.png", "speedup_fwd_bwd.png", "ceiling_fraction.png", "e2e.png")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def check_outputs(out: Path) -> list[dict]:
    rows = read_rows(out / "rows.jsonl")
    assert rows, "no rows written"
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), "row ids are not unique"
    for row in rows:
        assert set(ROW_FIELDS) <= set(row), f"{row['id']}: missing {set(ROW_FIELDS) - set(row)}"
        assert row["status"] in ("ok", "skipped", "error"), row["id"]
        if row["status"] == "ok" and row["suite"] == "pipeline":  # a rate, no per-call roofline
            assert row["images_per_s"] > 0, row["id"]
        elif row["status"] == "ok":
            assert row["min_bytes"] > 0, f"{row['id']}: min_bytes {row['min_bytes']}"
            assert row["ms_p20"] <= row["ms_p50"] <= row["ms_p80"], row["id"]
            assert row["ms_p50"] > 0 and row["achieved_gbps"] > 0, row["id"]
        else:
            assert row["note"], f"{row['id']}: {row['status']} without a reason"
    for name in PNGS:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000, name
    return rows


def test_smoke_run_writes_rows_report_and_plots(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--out", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "timings mean nothing" in done.stdout
    rows = check_outputs(tmp_path)
    assert not [r["id"] for r in rows if r["status"] == "error"], [r["note"] for r in rows if r["status"] == "error"]
    assert all(r["timings_meaningful"] is False for r in rows)
    by_id = {r["id"]: r for r in rows}
    for op in KERNEL_OPS:
        for mode in op.modes:
            case = op.case(benchmark_stages(smoke=True)[0])
            assert by_id[f"kernel/{op.name}/{case}/eager/{mode}"]["status"] == "ok"
            if op.uses_attention:
                assert by_id[f"kernel/{op.name}/{case}/sdpa/{mode}"]["status"] == "ok"
            fused = by_id[f"kernel/{op.name}/{case}/fused/{mode}"]
            # where every kernel an op needs exists, the interpreter really ran it
            if all(triton_implementation(k) is not None for k in op.kernels):
                assert fused["status"] == "ok", fused["note"]
                assert fused["note"] == "Triton: " + ", ".join(op.kernels)
    mix_fwd = by_id[f"kernel/mix_ffn/{op.case(benchmark_stages(smoke=True)[0])}/eager/fwd"]
    assert mix_fwd["saved_activation_bytes"] > 0
    assert {r["mode"] for r in rows if r["suite"] == "e2e" and r["status"] == "ok"} == {"inference", "train_step"}
    assert {r["op"] for r in rows if r["suite"] == "ceiling"} == {"copy", "gemm"}
    assert {"augment", "read+augment", "workers-4"} <= {r["mode"] for r in rows if r["suite"] == "pipeline" and r["status"] == "ok"}
    report = (tmp_path / "report.md").read_text()
    assert "these timings mean nothing" in report and "## Kernel benchmarks" in report and "## Input pipeline" in report
    assert (tmp_path / "PERFORMANCE.md").read_text().startswith("## Performance")


# Small shapes: one with a reduction and one head, one without a reduction and several heads.
FLOP_STAGES = [Stage("tiny", (16, 16), 1, 16, 1, 2), Stage("tiny", (16, 16), 2, 32, 2, 1)]


@pytest.mark.parametrize("op", KERNEL_OPS, ids=lambda op: op.name)
@pytest.mark.parametrize("stage", FLOP_STAGES, ids=lambda s: f"C{s.channels}-sr{s.sr}")
def test_flop_formulas_match_torch_flop_counter(op, stage):
    if not op.applies(stage):
        pytest.skip(f"{op.name} does not apply to sr={stage.sr}")
    batch = 2
    inputs = op.inputs(stage, batch, Maker(torch.device("cpu"), torch.float32, grad=not op.inference_only))
    counter = FlopCounterMode(display=False)
    with counter:
        out = op.call(EAGER, *inputs)
    assert counter.get_total_flops() == op.forward_flops(stage, batch)
    # torch's counter ignores groups in the depthwise conv's weight gradient (it counts
    # it as a dense conv, C times too much), so the backward check leaves those ops out.
    if op.inference_only or op.name in ("dwconv_gelu", "mix_ffn", "mix_ffn_block"):
        return
    outputs = out if isinstance(out, tuple) else (out,)
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    counter = FlopCounterMode(display=False)
    with counter:
        torch.autograd.grad(outputs, leaves, [torch.randn_like(o) for o in outputs])
    assert counter.get_total_flops() == 2 * op.forward_flops(stage, batch)


@pytest.mark.parametrize("op", [op for op in KERNEL_OPS if op.uses_attention], ids=lambda op: op.name)
def test_sdpa_provider_computes_the_reference_through_sdpa(op, monkeypatch):
    stage = FLOP_STAGES[1]  # several heads
    inputs = op.inputs(stage, 2, Maker(torch.device("cpu"), torch.float64))
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **kw: calls.append(1) or sdpa(*a, **kw))
    out = op.call(SDPA, *inputs)
    assert calls, f"{op.name}: the sdpa provider never called F.scaled_dot_product_attention"
    torch.testing.assert_close(out, op.call(EAGER, *inputs))


def test_budget_skips_then_merge_fills_in(tmp_path):
    run(Options(smoke=True, out=tmp_path, budget_s=0.0, only="kernel/layer_norm/"))
    rows = check_outputs(tmp_path)
    planned = [r for r in rows if r["suite"] == "kernel"]
    assert planned and all(r["status"] == "skipped" and "time budget" in r["note"] for r in planned)

    run(Options(smoke=True, out=tmp_path, only="kernel/layer_norm/.*/eager$", merge=True))
    merged = {r["id"]: r for r in read_rows(tmp_path / "rows.jsonl")}
    assert merged.keys() == {r["id"] for r in rows}
    for row_id, row in merged.items():
        if row_id.startswith("kernel/"):
            assert row["status"] == ("ok" if "/eager/" in row_id else "skipped"), row_id


def fake_gpu_rows(speed: dict[str, float], peak: dict[str, float]) -> list[dict]:
    """Rows for the whole GPU plan (built on CPU, which must work) with made-up numbers:
    ``speed`` is ms per provider for kernels (and 1 / images per ms end to end)."""
    env = {"device": "cuda", "gpu": "NVIDIA H100 80GB HBM3", "timer": "fake", "timings_meaningful": True,
           "torch": "2.11.0", "triton": "3.6.0", "cuda": "13.0", "python": "3.12.3", "git_commit": "abc123",
           "timestamp": "2030-01-01T00:00:00+00:00"}
    ctx = Context(device=torch.device("cuda"), dtype=torch.bfloat16, timer=None, env=env, smoke=False,
                  compile=CompileSpec(), ceilings=Ceilings(copy_gbps=3000.0, gemm_tflops=800.0))
    from bench.ops import kernel_items

    items = kernel_items(False, ("eager", "sdpa", "compile", "fused"), torch.bfloat16)
    items += e2e_items(False, ("eager", "sdpa", "compile", "fused", "transformers"), torch.bfloat16)
    rows = [make_row(ctx, suite="ceiling", op="copy", case="1024MiB", provider="torch", mode="copy", dtype="float32",
                     timing=Timing(0.7, 0.7, 0.7), min_bytes=2 * 2**30, min_flops=0)]
    for item in items:
        ms = speed.get(item.provider, 10.0)
        for mode in item.modes:
            rows.append(make_row(
                ctx, suite=item.suite, op=item.op, case=item.case, provider=item.provider, mode=mode,
                dtype=item.dtype, batch=item.batch, shape=item.shape, timing=Timing(0.9 * ms, ms, 1.1 * ms),
                memory=Memory(peak.get(item.provider, 1000.0), 100.0), images=item.batch if item.suite == "e2e" else None,
                min_bytes=10**9, min_flops=10**12,
                saved_bytes=2**20, saved_activation_bytes=2**19,
            ))
    return rows


def test_targets_report_and_performance_from_gpu_shaped_rows(tmp_path):
    rows = fake_gpu_rows(speed={"eager": 10.0, "sdpa": 8.0, "compile": 4.0, "fused": 2.0, "transformers": 12.0},
                         peak={"eager": 1000.0, "compile": 700.0, "fused": 500.0})
    results = tmp_path / "results"
    write_rows(results / "nvidia-h100-80gb-hbm3" / "rows.jsonl", rows)
    text = write_performance(results, tmp_path / "PERFORMANCE.md").read_text()
    assert "Measured on **NVIDIA H100 80GB HBM3**" in text
    assert "| Mix-FFN block fwd+bwd | b2-512x512-s1 | 5.00x (≥ 4.0x) met | 2.00x (≥ 1.8x) met |" in text
    assert "| attention half-block fwd+bwd | b0-512x512-s1 | 5.00x (≥ 5.0x) met | 2.00x (≥ 1.5x) met |" in text
    assert "| B2 512² training step, batch 8 | 512x512-bs8 | 5.00x (≥ 1.6x) met | 2.00x (≥ 1.3x) met | 6.00x |" in text
    assert "| peak training memory, B2 512² batch 8 | 512x512-bs8 | 0.50x (≤ 0.6x) met | 0.71x (≤ 0.8x) met |" in text
    assert "bench/results/nvidia-h100-80gb-hbm3/report.md" in text

    slow = fake_gpu_rows(speed={"eager": 10.0, "compile": 4.0, "fused": 3.0}, peak={"eager": 1000.0, "fused": 900.0})
    slow_text = performance_markdown((results / "x" / "rows.jsonl", slow))
    assert "| Mix-FFN block fwd+bwd | b2-512x512-s1 | 3.33x (≥ 4.0x) missed | 1.33x (≥ 1.8x) missed |" in slow_text
    assert "0.90x (≤ 0.6x) missed" in slow_text

    out = tmp_path / "report"
    write_report(rows, out)
    check_outputs_report = (out / "report.md").read_text()
    assert "timings mean nothing" not in check_outputs_report
    assert "| b2-512x512-s1 | fwd+bwd |" in check_outputs_report
    for name in PNGS:
        assert (out / name).read_bytes().startswith(PNG_MAGIC), name


def test_performance_says_plainly_when_nothing_was_measured_on_a_gpu(tmp_path):
    smoke_like = tmp_path / "results" / "cpu"
    smoke_like.mkdir(parents=True)
    (smoke_like / "rows.jsonl").write_text(json.dumps({"timings_meaningful": False, "timestamp": "x"}) + "\n")
    text = write_performance(tmp_path / "results", tmp_path / "PERFORMANCE.md").read_text()
    assert "Nothing has been measured on a GPU yet" in text


def test_segformer_bench_runs_the_suite_from_any_folder(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "segformer", "bench", "--smoke", "--list", "--only", "kernel/mix_ffn"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "kernel/mix_ffn" in done.stdout and "items" in done.stdout


def test_the_wheel_ships_the_suite_as_segformer_bench(tmp_path):
    import zipfile

    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                           str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=300)
    if done.returncode != 0 and "No module named" in done.stderr:
        pytest.skip(f"cannot build a wheel here: {done.stderr.strip().splitlines()[-1]}")
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = tmp_path.glob("segformer_kernels-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("segformer_bench/__main__.py", "segformer_bench/suite.py", "segformer_bench/report.py",
                   "segformer_bench/results/PERFORMANCE.md", "segformer/benchsuite.py",
                   "segformer_kernels/transformers_patch.py", "segformer_kernels/compile_check/__main__.py",
                   "segformer_kernels/triton/launch.py", "segformer_kernels/triton/attention.py"):
        assert needed in names, needed
    assert not any(name.startswith("bench/") for name in names)  # no generic top-level "bench"


def test_cpu_suite_rows_and_performance_section(tmp_path):
    """`python -m bench --cpu --smoke`: inference rows for ours and transformers with peak
    memory from a fresh process, pipeline rows, and the CPU part of the Performance section."""
    pytest.importorskip("transformers")
    from bench import cpu

    out = cpu.run(tmp_path / "results" / "cpu", threads=1, smoke=True)
    rows = read_rows(out / "rows.jsonl")
    inference = {r["provider"]: r for r in rows if r["suite"] == "cpu"}
    assert set(inference) == {"eager", "transformers"}
    for row in inference.values():
        assert row["status"] == "ok" and row["ms_p50"] > 0 and row["peak_over_start_mb"] is not None
        assert "relative error" in inference["eager"]["note"]
    modes = {r["mode"]: r for r in rows if r["suite"] == "pipeline"}
    assert {"augment", "read+augment", "read+augment-colour-on-device", "finish-batch-on-device", "workers-4"} <= set(modes)
    assert modes["workers-4"]["images_per_s"] == pytest.approx(4 * modes["read+augment"]["images_per_s"])
    text = write_performance(tmp_path / "results", tmp_path / "PERFORMANCE.md").read_text()
    assert "Nothing has been measured on a GPU yet" in text
    assert "### On CPU" in text and "| segformer-b0 | 64x64-bs1 |" in text and "### Input pipeline" in text
