"""Compile every registered Triton kernel for sm_80 and sm_90 without a GPU.

Each kernel module lists what it can launch through ``compile_targets()``.
(Implementation in progress: see issue 2, item 7.)
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class CompileTarget:
    """One kernel at one launch configuration, as its launcher would launch it.

    ``signature`` maps every runtime argument to its Triton type ("*fp16", "*fp32",
    "i32", "fp32", ...); ``constexprs`` gives every tl.constexpr argument its value.
    """

    name: str
    kernel: object
    signature: dict[str, str]
    constexprs: dict[str, object] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 2
    config: str = ""
