"""``python -m benchmarks [--suite ...] [--quick] [--device cpu|cuda] [--out DIR]`` (= ``svdq bench``)."""
import os
import sys

# Before torch is imported: OpenMP threads that spin-wait after each parallel region
# (torch's libgomp and the one linked into Inductor's compiled CPU kernels) starve each
# other on a small or busy machine and inflate CPU timings 10x or more.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .runner import main  # noqa: E402

sys.exit(main())
