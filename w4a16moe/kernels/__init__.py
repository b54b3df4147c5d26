"""Triton kernels over the packed int4 layout: the split-K decode GEMV and the grouped-GEMM
prefill kernel. Import the launchers from their modules (``kernels.decode``,
``kernels.prefill``); importing this package compiles nothing."""
