"""Wall time of the whole tiny pipeline through `prefect deployment run 'pipeline/manual'` on a local Prefect
server with a process worker: once cold (fresh workdir), once again with every stage cached.

    .venv/bin/python benchmarks/prefect_pipeline.py            # targets: cold <= 5 min, cached <= 30 s (2 cores)
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from flows.prefect_local import local_prefect, run_deployment
from registry.promotion import alias_version


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", help="pipeline workdir (default: a fresh temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(args.workdir or Path(scratch) / "pipeline").resolve()
        with local_prefect(Path(scratch) / "prefect-home") as env:
            times = []
            for label in ("cold", "cached"):
                done, seconds = run_deployment(env, "pipeline/manual", {"workdir": str(workdir)}, timeout=1800)
                if done.returncode != 0:
                    raise SystemExit(f"{label} run failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
                times.append(seconds)
                print(f"{label:<7} prefect deployment run 'pipeline/manual' (tiny preset): {seconds:6.1f} s wall")
        print(
            f"trainonce-chat@champion = version {alias_version(workdir, 'trainonce-chat', 'champion')}; "
            f"cached / cold = {times[1] / times[0]:.1%}"
        )


if __name__ == "__main__":
    main()
