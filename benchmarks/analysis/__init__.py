"""Analyses that stay with the project: quality measurements and static reports, not timings.

Run by the same runner and written in the same result format as the timing suites
(``svdq bench --suite NAME``, see benchmarks/suites/__init__.py):

- ``ablation``: SVDQuant's parts (smoothing, low-rank branch, refinement) and a rank sweep;
- ``modes_quality``: w4a4 vs the per-token w4a8-int8 / w4a8-fp8 on our models;
- ``lora_margin``: the SQNR gap of quantized tiny pipelines with vs without a LoRA.

``sass_report`` is a tool of its own (``python -m benchmarks.analysis.sass_report``): it
compiles the GPU kernels offline (no GPU) and reports what their main loops became (MMA
instructions, wgmma waits, ptxas serialisation notes, spills); its JSON goes to
``benchmarks/analysis/results/``.
"""
