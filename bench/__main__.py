"""python -m bench [--smoke] [--out DIR] [--only REGEX] [--providers LIST] [--budget-s S] ...
python -m bench --cpu [--threads T] [--out DIR]

With --cpu: the CPU suite (bench/cpu.py): the PyTorch path against transformers and the
training input pipeline, into bench/results/cpu/.

Without --smoke: the GPU suite (bf16, batch 8 kernel shapes of B0/B2 at 512^2 and a
1024^2 crop, B0/B2/B5 end to end), results in bench/results/<gpu-name>/.
With --smoke: tiny shapes on CPU (fp32; the fused provider through the Triton
interpreter), into --out (default runs/bench-smoke/); checks the pipeline, not speed.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from . import PROVIDERS

GPU_BUDGET_S = 450.0  # leaves start-up, report and one overrunning compile inside 10 minutes


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run that checks the pipeline (timings mean nothing)")
    parser.add_argument("--out", type=Path, help="results folder (default: bench/results/<gpu-name>/, or runs/bench-smoke/ with --smoke; "
                        "installed: ./bench-results/<gpu-name>/ or ./runs/bench-smoke/)")
    parser.add_argument("--only", metavar="REGEX", help="run only items whose 'suite/op/case/provider' matches, e.g. 'kernel/mix_ffn' or '/compile$'")
    parser.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma-separated subset of {','.join(PROVIDERS)}")
    parser.add_argument("--budget-s", type=float, help=f"stop starting new items after this many seconds (GPU default {GPU_BUDGET_S:.0f}; smoke: none)")
    parser.add_argument("--compile-mode", default="max-autotune", help="torch.compile mode of the compile provider on a GPU")
    parser.add_argument("--merge", action="store_true", help="keep the rows already in --out that this run does not measure again")
    parser.add_argument("--list", action="store_true", help="print the planned items in run order and exit")
    parser.add_argument("--cpu", action="store_true",
                        help="the CPU suite instead: PyTorch path vs transformers (B0, B2 at 512^2 and 1024x2048) and "
                             "the input pipeline -> bench/results/cpu/ (with --smoke: tiny sizes)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for --cpu (default 1; see bench/cpu.py)")
    args = parser.parse_args(argv)
    unknown = set(args.providers.split(",")) - set(PROVIDERS)
    if unknown:
        parser.error(f"unknown providers {sorted(unknown)}; choose from {','.join(PROVIDERS)}")
    return args


def main(argv=None) -> None:
    args = parse(argv)
    if args.smoke:
        # The fused provider runs through the Triton interpreter on CPU: the variable
        # must be set before triton is first imported, which the imports below do.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if args.cpu:
        from .cpu import run as run_cpu

        run_cpu(args.out, args.threads, smoke=args.smoke, only=args.only)
        return
    from .suite import Options, run

    budget = args.budget_s if args.budget_s is not None else (math.inf if args.smoke else GPU_BUDGET_S)
    run(Options(
        smoke=args.smoke, out=args.out, only=args.only, providers=tuple(args.providers.split(",")),
        budget_s=budget, compile_mode=args.compile_mode, merge=args.merge, list_only=args.list,
    ))


if __name__ == "__main__":
    main()
