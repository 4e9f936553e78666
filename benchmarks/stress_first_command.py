"""Does the README's first command succeed on a busy machine? Runs what `make demo` runs (`trainonce pipeline
--config configs/tiny.yaml`, each time on a fresh workdir, so Prefect's temporary server and the MLflow store
start from nothing) N times while CPU-bound neighbours take the cores, and reports how many runs succeeded.

    .venv/bin/python benchmarks/stress_first_command.py --runs 10 --neighbours 2

Each run's outcome, wall time and the load average it met are appended to `--results`, and the tally covers every
recorded run. The neighbours may also be other CPU-bound jobs (a benchmark's workers): `--neighbours 0 --others
"what they are"` records them, and the load average says how busy the machine was.
`--set KEY=VALUE` shortens the pipeline (e.g. the test suite's short settings) when only the start-up and the
orchestration are under test; the installation (`make setup`) is not repeated. Not part of CI: it takes hours.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
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


def one_run(overrides: list[str], neighbours: int, others: str, timeout: int) -> dict:
    """One pipeline run on a fresh workdir beside `neighbours` busy processes of ours (and whatever else runs):
    whether it succeeded, its seconds, the load average it met and, if it failed, its last words."""
    burners = [multiprocessing.Process(target=burn, daemon=True) for _ in range(neighbours)]
    for burner in burners:
        burner.start()
    workdir = Path(tempfile.mkdtemp(prefix="stress-"))
    command = [
        str(Path(sys.executable).parent / "trainonce"),
        "pipeline",
        "--config",
        "configs/tiny.yaml",
        "--workdir",
        str(workdir),
        *(arg for pair in overrides for arg in ("--set", pair)),
    ]
    start, load_before = time.monotonic(), os.getloadavg()[0]
    try:
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        ok, tail = done.returncode == 0, (done.stdout + done.stderr)[-400:]
    except subprocess.TimeoutExpired:
        ok, tail = False, f"timed out after {timeout} s"
    finally:
        load_after = os.getloadavg()[0]
        for burner in burners:
            burner.terminate()
            burner.join()
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "ok": ok,
        "seconds": round(time.monotonic() - start, 1),
        "neighbours": neighbours,
        "others": others,
        "load_1min": [round(load_before, 2), round(load_after, 2)],
        "cores": os.cpu_count(),
        "overrides": overrides,
        "tail": "" if ok else tail.strip(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--neighbours", type=int, default=2, help="CPU-bound processes running beside each run")
    parser.add_argument("--others", default="", help="other CPU-bound jobs running beside the runs, recorded")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds before a run counts as failed")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="pipeline overrides")
    parser.add_argument(
        "--results",
        type=Path,
        default=REPO / "runs" / "stress_first_command.jsonl",
        help="every run is appended here, so a tally can span several sessions",
    )
    args = parser.parse_args()
    args.results.parent.mkdir(parents=True, exist_ok=True)
    for index in range(args.runs):
        run = one_run(args.set, args.neighbours, args.others, args.timeout)
        with args.results.open("a", encoding="utf-8") as out:
            out.write(json.dumps(run) + "\n")
        print(
            f"run {index + 1}/{args.runs}: {'ok' if run['ok'] else 'FAILED'} in {run['seconds']:.0f} s, load "
            f"{run['load_1min'][0]:.1f} -> {run['load_1min'][1]:.1f} on {run['cores']} cores"
            + ("" if run["ok"] else f"\n  {run['tail']}"),
            flush=True,
        )
    recorded = [json.loads(line) for line in args.results.read_text(encoding="utf-8").splitlines() if line]
    print(
        f"\n{sum(r['ok'] for r in recorded)} of {len(recorded)} recorded runs succeeded ({args.results}); "
        f"command: benchmarks/stress_first_command.py {' '.join(sys.argv[1:])}"
    )


if __name__ == "__main__":
    main()
