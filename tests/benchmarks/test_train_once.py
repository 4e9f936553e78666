"""The claim benchmark runs end to end on a few steps with every arm's learning rate tuned: every row, the costs, the
budget curve, the sweep, the report and PNG."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from lr_grid import MAX_EXTENSIONS, MULTIPLIERS  # noqa: E402


@pytest.mark.slow
def test_claim_benchmark_produces_every_row(tmp_path: Path) -> None:
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "train_once.py"),
        "--config",
        "tiny",
        "--recipe",
        "nested_delayed",
        "--seeds",
        "0",
        "--tune-lr",
        "--cache",
        str(tmp_path),
        "--set",
        "pretrain.max_steps=12",
        "--set",
        "pretrain.eval_interval=6",
        "--set",
        "pretrain.checkpoint_interval=12",
        "--set",
        "pretrain.optim.warmup_steps=2",
        "--set",
        "extract.eval_batches=1",
        "--set",
        "extract.distill_compute_fraction=0.5",
        "--set",
        "data.data_dir=" + str(tmp_path / "data"),
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    results = tmp_path / "tiny" / "results"
    run = json.loads((results / "nested_delayed@tuned_lr-seed0.json").read_text())
    rows = run["rows"]
    assert run["tokens"] == 12 * 16 * 128
    # the elastic run trained the full model alone for 6 steps, then 3 members per step: more FLOPs than alone
    assert rows["full_alone"]["flops"] < rows["elastic"]["flops"] < 3 * rows["full_alone"]["flops"]
    assert set(rows["members"]) == {"ERNIE 5.1 cut", "active <= 60%", "active <= 75%", "active <= 90%"}
    cut = rows["members"]["ERNIE 5.1 cut"]
    assert cut["params"] <= 0.34 * rows["full_alone"]["params"] and cut["active"] <= 0.5 * rows["full_alone"]["active"]
    for member in rows["members"].values():
        assert 0 < member["distill_flops"] <= 0.5 * member["twin_flops"]  # 12 steps: 6% would be no step at all
        assert member["distill_curve"][0][0] == 0.0 and member["distill_curve"][-1][1] == member["distilled"]
        assert all(loss > 0 for loss in (member["twin"], member["cut"], member["minitron"]))
    assert "(c) cut + distilled" in done.stdout and "Family cost" in done.stdout
    assert (tmp_path / "tiny" / "claim-nested_delayed@tuned_lr.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "tiny" / "mlflow.db").is_file()

    # every arm trained at the rate its sweep found best, and every sweep bracketed its best or spent its extensions
    sweeps = {entry["arm"]: entry for entry in json.loads((results / "lr-sweep.json").read_text()).values()}
    for entry in sweeps.values():
        losses = {float(lr): loss for lr, loss in entry["losses"].items()}
        assert entry["best"] == min(losses, key=losses.__getitem__)
        assert entry["bracketed"] == (min(losses) < entry["best"] < max(losses))
        assert entry["bracketed"] or len(losses) == len(MULTIPLIERS) + MAX_EXTENSIONS
    assert rows["elastic"]["lr"] == sweeps["(a) elastic run nested_delayed"]["best"]
    assert rows["full_alone"]["lr"] == sweeps["(f) full model alone L6 E16 k2"]["best"]
    for member in rows["members"].values():
        spec = member["spec"]
        assert member["twin_lr"] == sweeps[f"(b) twin {spec}"]["best"]
        assert member["distill_lr"] == sweeps[f"(c) {spec} of nested_delayed"]["best"]
        assert member["minitron_lr"] == sweeps[f"(m) {spec} of the full model"]["best"]
    assert "### Learning-rate sweeps" in done.stdout and "family / separate cost with the sweeps" in done.stdout
