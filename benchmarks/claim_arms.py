"""The claim benchmark's arms: pre-training runs and distillations in a process pool, each cached by what it is (so
recipes and seeds share them and a killed benchmark resumes), and the learning-rate tuner that sweeps each arm once
(benchmarks/lr_grid.py) before every seed trains it at its best rate."""

from __future__ import annotations

import hashlib
import json
import threading
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

import torch
from claim_recipes import BUDGET_CURVE
from lr_grid import LrSweep, sweep_learning_rate

from models.checkpoint import load_model
from models.extract import extract_subnet
from models.subnet import SubnetSpec
from tasks.data.corpus import PreparedData
from tasks.extract.config import ExtractConfig
from tasks.extract.distill import distill_subnet
from tasks.pretrain.config import PretrainConfig
from tasks.pretrain.loop import run_pretrain

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def use_one_thread() -> None:
    """Arms share 2 cores: one thread each, or OpenMP threads spin against each other."""
    torch.set_num_threads(1)


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def arm_identity(config: PretrainConfig) -> dict:
    """What an arm's cache key hashes: the run's identity (tasks.pretrain.config: settings added later, at the value
    earlier runs trained with, are left out, so those arms are still found)."""
    return config.model_dump(mode="json", exclude=config.identity_exclude())


def train_arm(pretrain_json: str, data_dir: str, output_dir: str) -> dict:
    """One pre-training run (resumed, or read back when finished): its checkpoint and learning curve."""
    config = PretrainConfig.model_validate_json(pretrain_json)
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    (Path(output_dir) / "pretrain.json").write_text(config.model_dump_json(indent=1))  # what this arm is
    result = run_pretrain(config, PreparedData.load(data_dir), output_dir)
    curve = [
        (r["step"], r["val_loss/full"])
        for r in map(json.loads, (Path(output_dir) / "metrics.jsonl").read_text().splitlines())
        if "val_loss/full" in r
    ]
    return {"checkpoint_dir": str(result.checkpoint_dir), "curve": curve}


class Arms:
    """The process pool that trains arms, with one future per distinct arm: recipes run side by side share their
    seed's (f) and twins instead of training them twice into the same folder. Distillations are cached too, as JSON
    under `cache/distills/`, by their teacher, student, settings and budget."""

    def __init__(self, pool: ProcessPoolExecutor, cache: Path, data: PreparedData) -> None:
        self.pool, self.cache, self.data = pool, cache, data
        self.futures: dict[str, Future] = {}
        self.lock = threading.Lock()

    def train(self, config: PretrainConfig) -> Future:
        key = _key(arm_identity(config), self.data.fingerprint)
        with self.lock:
            if key not in self.futures:
                out = str(self.cache / "arms" / key)
                self.futures[key] = self.pool.submit(train_arm, config.model_dump_json(), str(self.data.directory), out)
            return self.futures[key]

    def distill(self, teacher_dir: str, spec: SubnetSpec, extract: ExtractConfig, tokens: int) -> Future:
        args = (teacher_dir, spec.model_dump_json(), extract.model_dump_json(), str(self.data.directory), tokens)
        key = _key(*args, self.data.fingerprint)
        with self.lock:
            if key not in self.futures:
                out = str(self.cache / "distills" / f"{key}.json")
                self.futures[key] = self.pool.submit(distill_arm, *args, out)
            return self.futures[key]


def distill_arm(teacher_dir: str, spec_json: str, extract_json: str, data_dir: str, tokens: int, out: str) -> dict:
    """Cut `spec` from the teacher, then distil it from the teacher (tasks.extract.distill) for its share of
    `tokens`; the result is kept in `out` and read back from there when the same distillation is asked for again."""
    if Path(out).is_file():
        return json.loads(Path(out).read_text())
    teacher = load_model(teacher_dir, DEVICE).eval()
    spec = SubnetSpec.model_validate_json(spec_json)
    extract = ExtractConfig.model_validate_json(extract_json)
    data = PreparedData.load(data_dir)
    student = extract_subnet(teacher, spec)
    result = distill_subnet(student, teacher, data, extract, tokens, curve_at=BUDGET_CURVE)
    cut = result.val_loss_before  # measured by student_val_loss, like every other row
    done = {
        "cut": cut,
        "distilled": result.val_loss_after,
        "fraction": result.compute_fraction,
        "curve": [(0.0, cut), *result.curve],
    }
    _write_atomically(Path(out), json.dumps(done))
    return done


def _write_atomically(path: Path, text: str) -> None:
    """A reader (or a killed run) sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(path.suffix + ".partial")
    partial.write_text(text)
    partial.replace(path)


def with_lr(config: PretrainConfig, lr: float) -> PretrainConfig:
    """`config` at another peak learning rate (the schedule's shape, warm-up and floor, unchanged)."""
    return config.model_copy(update={"optim": config.optim.model_copy(update={"lr": lr})})


def with_distill_lr(extract: ExtractConfig, lr: float) -> ExtractConfig:
    """`extract` distilling at another peak learning rate."""
    return extract.model_copy(update={"optim": extract.optim.model_copy(update={"lr": lr})})


def unseeded(identity: dict, *drop: str) -> dict:
    """An identity without its seed (and the other top-level fields named): what a sweep is keyed by, since a
    learning rate tuned on one seed serves every seed."""
    return {name: value for name, value in identity.items() if name not in ("seed", *drop)}


class LrTuner:
    """--tune-lr: the peak learning rate of each arm, swept once (benchmarks/lr_grid.py) on the first seed that
    trains the arm, stored in `record` (arm -> rate -> validation loss, and the compute of one rate), and from then
    on the rate that arm trains at on every seed. Sweeps of different arms run side by side; two recipes that need
    the same arm (the same twin) wait for one sweep."""

    def __init__(self, arms: Arms, record: Path) -> None:
        self.arms, self.record = arms, record
        self.sweeps: dict[str, dict] = json.loads(record.read_text()) if record.is_file() else {}
        self.key_locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)
        self.lock = threading.Lock()

    def best_lr(self, key: str, entry: dict, base_lr: float, measure: Callable[[list[float]], dict]) -> float:
        with self.lock:
            key_lock = self.key_locks[key]
        with key_lock:
            if key not in self.sweeps:
                sweep = sweep_learning_rate(measure, base_lr)
                with self.lock:
                    self.sweeps[key] = {**entry, **sweep.to_json()}
                    _write_atomically(self.record, json.dumps(self.sweeps, indent=1, sort_keys=True))
                print(f"lr sweep, {entry['arm']}: {sweep.to_json()}", flush=True)
            return LrSweep.from_json(self.sweeps[key]).best

    def pretrain(self, config: PretrainConfig, label: str, loss: Callable[[dict], float], flops: float):
        """`config` at its arm's best peak learning rate; `loss(arm)` scores a trained arm (lower is better)."""
        identity = unseeded(arm_identity(config), "optim")
        identity["optim"] = {k: v for k, v in config.optim.model_dump(mode="json").items() if k != "lr"}

        def measure(rates: list[float]) -> dict[float, float]:
            futures = {lr: self.arms.train(with_lr(config, lr)) for lr in rates}
            return {lr: loss(future.result()) for lr, future in futures.items()}

        key = _key("pretrain", identity, self.arms.data.fingerprint)
        entry = {"arm": label, "kind": "pretrain", "tuned_on_seed": config.seed, "flops_per_rate": flops}
        return with_lr(config, self.best_lr(key, entry, config.optim.lr, measure))

    def extract(
        self, teacher: PretrainConfig, teacher_dir: str, spec: SubnetSpec, extract: ExtractConfig, tokens: int, **entry
    ) -> ExtractConfig:
        """`extract` at the best distillation learning rate of `spec`'s architecture distilled from `teacher`'s arm."""

        def measure(rates: list[float]) -> dict[float, float]:
            futures = {lr: self.arms.distill(teacher_dir, spec, with_distill_lr(extract, lr), tokens) for lr in rates}
            return {lr: future.result()["distilled"] for lr, future in futures.items()}

        settings = unseeded(extract.model_dump(mode="json"))
        settings["optim"].pop("lr")
        key = _key(
            "distill", unseeded(arm_identity(teacher)), spec.describe(), settings, tokens, self.arms.data.fingerprint
        )
        entry = {"kind": "distill", "tuned_on_seed": extract.seed, **entry}
        return with_distill_lr(extract, self.best_lr(key, entry, extract.optim.lr, measure))


SWEEP_RECORD = "lr-sweep.json"  # beside the per-seed results: every arm's sweep
