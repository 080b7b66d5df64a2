"""python -m segformer_kernels.compile_check: real compiles for sm_80/sm_90 on a CPU.

Each test runs the tool in a subprocess (kernels must be JITFunctions, which this
pytest process, under TRITON_INTERPRET=1, cannot give) with its own empty triton
cache, so every run really compiles. They check only the tool's own self-test
kernels and kernels written here, never other modules' kernels.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SELF_MODULE = "segformer_kernels.compile_check"
LIMIT = {80: 166912, 90: 232448}

# Targets that must fail, each for one reason, plus one that must pass.
FAILURES_MODULE = textwrap.dedent(
    """
    import triton
    import triton.language as tl

    from segformer_kernels.compile_check import CompileTarget


    @triton.jit
    def scale_by_sum_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        # The whole row stays live across the reduction: BLOCK / 32 values per
        # thread with one warp, far past 255 registers.
        offsets = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offsets, mask=offsets < n, other=0.0)
        tl.store(out_ptr + offsets, x * tl.sum(x, axis=0), mask=offsets < n)


    @triton.jit
    def transpose_kernel(x_ptr, out_ptr, ROWS: tl.constexpr, COLS: tl.constexpr):
        # The transpose goes through shared memory: ROWS * COLS * 4 bytes.
        rows = tl.arange(0, ROWS)
        cols = tl.arange(0, COLS)
        x = tl.load(x_ptr + rows[:, None] * COLS + cols[None, :])
        tl.store(out_ptr + cols[:, None] * ROWS + rows[None, :], tl.trans(x))


    def compile_targets():
        pointers = {"x_ptr": "*fp32", "out_ptr": "*fp32"}
        return [
            CompileTarget("spilling", scale_by_sum_kernel, {**pointers, "n": "i32"}, {"BLOCK": 8192},
                          num_warps=1, num_stages=1, config="BLOCK=8192"),
            CompileTarget("too_much_shared", transpose_kernel, pointers, {"ROWS": 256, "COLS": 256},
                          num_warps=8, num_stages=1, config="256x256"),
            CompileTarget("small_transpose", transpose_kernel, pointers, {"ROWS": 32, "COLS": 32},
                          num_warps=4, num_stages=1, config="32x32"),
            # tl.arange needs a power-of-two range: triton refuses to compile.
            CompileTarget("not_power_of_two", scale_by_sum_kernel, {**pointers, "n": "i32"}, {"BLOCK": 1000},
                          num_warps=4, num_stages=1, config="BLOCK=1000"),
            CompileTarget("missing_argument", scale_by_sum_kernel, pointers, {"BLOCK": 64},
                          num_warps=4, num_stages=1, config="no n"),
        ]
    """
)


def run_compile_check(args, tmp_path, *, interpret=False, code=None):
    """Run the tool (or ``code`` with python -c) from the repo root, with or
    without TRITON_INTERPRET=1; the process sees tmp_path on its import path and
    uses a fresh triton cache there."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton_cache")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), str(tmp_path), env.get("PYTHONPATH", "")])
    command = [sys.executable, "-c", code] if code else [sys.executable, "-m", SELF_MODULE]
    return subprocess.run(command + list(args), cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


def rows_by_key(json_path):
    rows = json.loads(Path(json_path).read_text())["rows"]
    return {(row["name"], row["arch"]): row for row in rows}


@pytest.fixture
def failures_module(tmp_path):
    (tmp_path / "compile_check_failures.py").write_text(FAILURES_MODULE)
    return "compile_check_failures"


@pytest.fixture
def module_without_targets(tmp_path):
    (tmp_path / "compile_check_no_targets.py").write_text("import triton\n")
    return "compile_check_no_targets"


def test_self_test_kernels_compile_clean_for_sm80_and_sm90(tmp_path):
    json_path = tmp_path / "rows.json"
    done = run_compile_check(["--module", SELF_MODULE, "--json", str(json_path)], tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr

    rows = rows_by_key(json_path)
    assert set(rows) == {(name, arch) for name in ("self_test_axpy", "self_test_matmul") for arch in (80, 90)}
    for (name, arch), row in rows.items():
        assert row["problems"] == [], row
        assert row["resource_source"] == "cuobjdump"
        assert 0 < row["registers"] <= 255
        assert row["spill_bytes"] == 0
        assert 0 <= row["shared_bytes"] <= LIMIT[arch]
        assert row["shared_limit"] == LIMIT[arch]
        # The table on stdout has one row per (kernel, arch).
        assert any(line.split()[:1] == [name] and f"sm_{arch}" in line for line in done.stdout.splitlines())
    # An fp16 tl.dot becomes Hopper's warpgroup MMA on sm_90; an axpy has none.
    assert rows["self_test_matmul", 90]["hgmma"] is True
    assert rows["self_test_axpy", 90]["hgmma"] is False
    assert rows["self_test_matmul", 80]["hgmma"] is None
    # The matmul stages its tiles through shared memory; the axpy needs none.
    assert rows["self_test_matmul", 80]["shared_bytes"] > 0
    assert rows["self_test_axpy", 80]["shared_bytes"] == 0
    assert "4 passed, 0 failed" in done.stderr


def test_spills_shared_memory_and_compile_errors_fail_with_reasons(tmp_path, failures_module, module_without_targets):
    json_path = tmp_path / "rows.json"
    # --jobs 2: the worker-pool path, as a full run on 2 cores uses.
    done = run_compile_check(
        ["--module", failures_module, "--module", module_without_targets, "--jobs", "2", "--json", str(json_path)],
        tmp_path,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 1, output

    rows = rows_by_key(json_path)
    for arch in (80, 90):
        spilling = rows["spilling", arch]
        assert spilling["spill_bytes"] > 0 and spilling["registers"] == 255, spilling
        assert spilling["problems"] == [
            f"spills: {spilling['stack_bytes']} B stack frame + {spilling['local_bytes']} B local memory per thread"
        ]
        shared = rows["too_much_shared", arch]
        assert shared["shared_bytes"] >= 256 * 256 * 4 > LIMIT[arch], shared
        assert shared["problems"] == [f"shared memory {shared['shared_bytes']} B > sm_{arch} limit {LIMIT[arch]} B"]
        assert rows["small_transpose", arch]["problems"] == []
        (compile_error,) = rows["not_power_of_two", arch]["problems"]
        assert compile_error.startswith("compile error: ") and "power of 2" in compile_error
        (missing,) = rows["missing_argument", arch]["problems"]
        assert missing == "compile error: ValueError: runtime argument 'n' has no type in the signature"
    (no_targets,) = rows[module_without_targets, None]["problems"]
    assert no_targets == (
        f"TypeError: {module_without_targets} has Triton kernels but no compile_targets() listing what it launches"
    )
    # The reasons reach the person reading the output, not just the JSON.
    assert "spills: " in done.stdout and "> sm_80 limit 166912 B" in done.stdout
    assert "power of 2" in done.stderr and "has no type in the signature" in done.stderr
    assert "no compile_targets()" in done.stdout
    assert "2 passed, 9 failed" in done.stderr


def test_reruns_itself_without_triton_interpret(tmp_path):
    # As in this pytest process without a GPU: kernels would be interpreter objects.
    done = run_compile_check(["--module", SELF_MODULE, "--only", "axpy", "--arch", "80"], tmp_path, interpret=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "re-running without it" in done.stderr
    table = done.stdout.splitlines()
    assert len(table) == 2 and table[1].split()[:3] == ["self_test_axpy", "BLOCK=1024", "fp32"] and "sm_80" in table[1]


def test_ptxas_fallback_without_cuobjdump(tmp_path, failures_module):
    # Stand in a triton without cuobjdump; ptxas -v must still tell registers,
    # spills and (from the PTX) wgmma use.
    code = textwrap.dedent(
        f"""
        import sys
        import segformer_kernels.compile_check as cc

        real_tool = cc.nvidia_tool
        cc.nvidia_tool = lambda name: None if name == "cuobjdump" else real_tool(name)
        clean = cc.main(["--module", "{SELF_MODULE}", "--only", "matmul", "--arch", "90", "--json", sys.argv[1]])
        spilling = cc.main(
            ["--module", "{failures_module}", "--only", "spilling", "--arch", "80", "--json", sys.argv[2]]
        )
        sys.exit(10 * clean + spilling)
        """
    )
    clean_json, spilling_json = tmp_path / "clean.json", tmp_path / "spilling.json"
    done = run_compile_check([str(clean_json), str(spilling_json)], tmp_path, code=code)
    assert done.returncode == 1, done.stdout + done.stderr  # clean run 0, spilling run 1

    # sm_90: the ptxas triton picks for Hopper (3.9 uses its newer one there).
    (clean,) = rows_by_key(clean_json).values()
    assert clean["resource_source"] == "ptxas -v" and clean["arch"] == 90
    assert 0 < clean["registers"] <= 255 and clean["spill_bytes"] == 0 and clean["problems"] == []
    assert clean["hgmma"] is True
    spilling = rows_by_key(spilling_json)["spilling", 80]
    assert spilling["resource_source"] == "ptxas -v" and spilling["spill_bytes"] > 0
