"""Does the README's first command succeed on a busy machine? Runs what `make demo` runs (`trainonce pipeline
--config configs/tiny.yaml`, each time on a fresh workdir, so Prefect's temporary server and the MLflow store
start from nothing) N times while CPU-bound neighbours take the cores, and reports how many runs succeeded.

    .venv/bin/python benchmarks/stress_first_command.py --runs 10 --neighbours 2

`--set KEY=VALUE` shortens the pipeline (e.g. the test suite's short settings) when only the start-up and the
orchestration are under test; the installation (`make setup`) is not repeated. Not part of CI: it takes hours.
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def burn() -> None:
    """A CPU-bound neighbour: one core busy until it is terminated."""
    value = 0
    while True:
        value = (value * 1_103_515_245 + 12_345) % 2**31


def one_run(overrides: list[str], neighbours: int, timeout: int) -> tuple[bool, float, str]:
    """One pipeline run on a fresh workdir beside `neighbours` busy processes: (succeeded, seconds, last words)."""
    burners = [multiprocessing.Process(target=burn, daemon=True) for _ in range(neighbours)]
    for burner in burners:
        burner.start()
    workdir = Path(tempfile.mkdtemp(prefix="stress-"))
    command = [str(Path(sys.executable).parent / "trainonce"), "pipeline", "--config", "configs/tiny.yaml",
               "--workdir", str(workdir), *(arg for pair in overrides for arg in ("--set", pair))]  # fmt: skip
    start = time.monotonic()
    try:
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        ok, tail = done.returncode == 0, (done.stdout + done.stderr)[-400:]
    except subprocess.TimeoutExpired:
        ok, tail = False, f"timed out after {timeout} s"
    finally:
        for burner in burners:
            burner.terminate()
            burner.join()
        shutil.rmtree(workdir, ignore_errors=True)
    return ok, time.monotonic() - start, tail


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--neighbours", type=int, default=2, help="CPU-bound processes running beside each run")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds before a run counts as failed")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="pipeline overrides")
    args = parser.parse_args()
    results = []
    for index in range(args.runs):
        ok, seconds, tail = one_run(args.set, args.neighbours, args.timeout)
        results.append(ok)
        print(f"run {index + 1}/{args.runs}: {'ok' if ok else 'FAILED'} in {seconds:.0f} s"
              + ("" if ok else f"\n  {tail.strip()}"), flush=True)  # fmt: skip
    print(f"\n{sum(results)} of {args.runs} runs succeeded with {args.neighbours} CPU-bound neighbours; command: "
          f"benchmarks/stress_first_command.py {' '.join(sys.argv[1:])}")  # fmt: skip


if __name__ == "__main__":
    main()
