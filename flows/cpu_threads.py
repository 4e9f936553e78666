"""CPU threads that stop spinning soon, so that a busy machine slows training down instead of stalling it.

torch's CPU kernels run on OpenMP (libgomp) threads that spin while they wait for work, 300,000 rounds by default. On
cores that other jobs also use, the spinning threads of one process take the time slices the working ones need, and
a training step takes tens of times longer. A short spin (GOMP_SPINCOUNT=1000) keeps the idle speed within a few
percent and loses little beside other jobs; sleeping at once (OMP_WAIT_POLICY=PASSIVE) costs 2x on idle cores
(benchmarks/omp_wait_policy.py). OpenMP reads these once, when torch loads it, so the spin count is set before any
of our packages imports torch and is inherited by the processes they start (accelerate, Prefect workers' flow runs).
A wait policy or spin count already in the environment is kept.
"""

from __future__ import annotations

import os

SPIN_COUNT = "1000"


def spin_briefly() -> None:
    """GOMP_SPINCOUNT=SPIN_COUNT for this process and its children, unless the environment already chose."""
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", SPIN_COUNT)
