"""How much do spinning OpenMP threads cost on a busy machine? A tiny-preset training step (2 threads) timed with
OpenMP's default (spin 300,000 rounds), a short spin (GOMP_SPINCOUNT=1000, what flows/cpu_threads.py sets) and no
spin (OMP_WAIT_POLICY=PASSIVE), on idle cores and beside CPU-bound neighbours, side by side in one run.

    .venv/bin/python benchmarks/omp_wait_policy.py --neighbours 0 2 --seconds 10

Each measurement runs in a fresh process (OpenMP reads these once, when torch loads it). The rows depend on what else
the machine runs; the ratios within one row are the result.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

from stress_first_command import burn

REPO = Path(__file__).resolve().parents[1]
STEP = """
import time, torch
from models.moe import ElasticMoE
from tasks.pipeline_config import load_pipeline_config
torch.set_num_threads(2)
config = load_pipeline_config("tiny").pretrain
model = ElasticMoE(config.model)
batch = torch.randint(0, config.model.vocab_size, (config.batch_size, config.seq_len))
def step():
    out = model(batch)
    out.logits.float().logsumexp(-1).mean().backward()
for _ in range(3):
    step()
start, steps = time.perf_counter(), 0
while time.perf_counter() - start < {seconds}:
    step()
    steps += 1
print((time.perf_counter() - start) / steps * 1e3)
"""


SETTINGS = {
    "default": {},
    "GOMP_SPINCOUNT=1000": {"GOMP_SPINCOUNT": "1000"},
    "PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
}


def step_ms(setting: dict[str, str], seconds: float) -> float:
    """Milliseconds per training step in a fresh process with OpenMP's wait `setting` (empty: its default)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    done = subprocess.run(
        [sys.executable, "-c", STEP.format(seconds=seconds)],
        cwd=REPO,
        env={**env, **setting},
        capture_output=True,
        text=True,
        check=True,
        timeout=3600,
    )
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--neighbours", type=int, nargs="+", default=[0, 2], help="CPU-bound processes beside it")
    parser.add_argument("--seconds", type=float, default=10.0, help="timed seconds per measurement")
    args = parser.parse_args()
    print(f"| neighbours | {' | '.join(f'{name} (ms/step)' for name in SETTINGS)} | load 1 min |")
    print("|---" * (len(SETTINGS) + 2) + "|")
    for count in args.neighbours:
        burners = [multiprocessing.Process(target=burn, daemon=True) for _ in range(count)]
        for burner in burners:
            burner.start()
        try:
            times = [step_ms(setting, args.seconds) for setting in SETTINGS.values()]
        finally:
            for burner in burners:
                burner.terminate()
                burner.join()
        print(f"| {count} | {' | '.join(f'{t:.1f}' for t in times)} | {os.getloadavg()[0]:.1f} |")
    print(f"command: benchmarks/omp_wait_policy.py {' '.join(sys.argv[1:])}")


if __name__ == "__main__":
    main()
