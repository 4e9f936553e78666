"""CPU threads that sleep while they wait, so that a busy machine slows training down instead of stalling it.

torch's CPU kernels run on OpenMP threads that spin while they wait for work. On cores that other jobs also use, the
spinning threads of one process take the time slices the working ones need, and a training step takes tens of
times longer (benchmarks/omp_wait_policy.py: a 2-thread step 20-100x slower beside other CPU-bound jobs, against
a few percent on idle cores). OpenMP reads OMP_WAIT_POLICY once, when torch loads it, so it is set before any of
our packages imports torch and is inherited by the processes they start (accelerate, Prefect workers' flow runs).
A value already in the environment is kept.
"""

from __future__ import annotations

import os


def wait_passively() -> None:
    """OMP_WAIT_POLICY=PASSIVE for this process and its children, unless the environment already chose."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
