"""The image benchmark runs end to end on a few steps: every arm, the cuts and their twins, every figure."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_image_benchmark_measures_every_model(tmp_path: Path) -> None:
    command = [
        sys.executable, str(ROOT / "benchmarks" / "image_family.py"), "--seeds", "0", "--steps", "12",
        "--cache", str(tmp_path), "--set", "pretrain.eval_interval=6", "--set", "pretrain.optim.warmup_steps=2",
        "--set", "extract.distill_compute_fraction=0.5", "--set", f"data.data_dir={tmp_path / 'data'}",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    row = json.loads((tmp_path / "image-family-steps12-seed0.json").read_text())
    assert "image_val" not in row["text"]  # the text-only arm has no images to measure
    for key in ("shared", "heterogeneous", "shared_cut", "shared_twin", "heterogeneous_cut", "heterogeneous_twin"):
        figures = row[key]
        assert 0 <= figures["understanding"] <= 1 and set(figures["generation"]) == {"sampled", "greedy"}
        assert figures["image_val"] > 0 and figures["text_val"] > 0 and 0.5 <= figures["mean_purity"] <= 1
    assert row["heterogeneous"]["mean_purity"] == 1.0  # each pool serves one modality by construction
    assert row["shared_cut"]["spec"].startswith("L")
    assert (tmp_path / "heatmap-shared-seed0.png").is_file() and "| (H) its twin, alone" in done.stdout
    assert "chance 0.100" in done.stdout
