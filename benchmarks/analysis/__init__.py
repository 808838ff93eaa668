"""Analysis scripts that stay with the project but are not user-facing benchmarks.

``sass_report``: compiles the GPU kernels offline (no GPU) and reports what their main
loops became (MMA instructions, wgmma waits, ptxas serialisation notes, spills); its JSON
goes to ``benchmarks/analysis/results/``. The user-facing benchmarks (``svdq bench``,
``benchmarks/bench_*.py``) and their results stay in ``benchmarks/`` and
``benchmarks/results/``.
"""
