"""The Triton kernels, one module per op (kernels, launch configs, launchers, custom op
and autograd, compile targets), and ``launch``: what every op's launchers share (tiles,
autotuning, layout hints, dot precision, dtype names, the device guard). The public
functions live in ``segformer_kernels.ops``; see docs/design.md, "Layout"."""
