"""Moved to ``benchmarks/analysis/sass_report.py`` (issue 16: analysis scripts live apart
from the user-facing benchmarks).

This shim only keeps the old import path working: kernels were being written against
``from benchmarks.sass_report import compile_offline`` while the move happened. It makes
``benchmarks.sass_report`` *the same module object* as ``benchmarks.analysis.sass_report``
(so patching one patches the other). New code imports ``benchmarks.analysis.sass_report``;
run it as ``python -m benchmarks.analysis.sass_report``.
"""
import sys
from pathlib import Path

if not __package__:  # run as a script, or imported with benchmarks/ itself on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.analysis import sass_report as _impl  # noqa: E402

if __name__ == "__main__":
    sys.exit(_impl.main())
sys.modules[__name__] = _impl
