"""The package layout the import contracts rely on: every module of a stage is either an algorithm module, which the
contract in pyproject.toml keeps free of Prefect, MLflow and the registry, or one of the few orchestration modules
(a stage's task.py, the pre-training launcher, the whole pipeline's configuration). A module added to tasks/ without
being classified fails here, so the contract cannot silently stop covering new code."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# Modules that orchestrate: they may touch Prefect, MLflow and the registry.
ORCHESTRATION = {"tasks.pretrain.entry", "tasks.pipeline_config", "tasks.config_reference"}


def _algorithm_contract() -> dict:
    contracts = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    return next(c for c in contracts if c["type"] == "forbidden" and "prefect" in c["forbidden_modules"])


def _covered(module: str, sources: list[str]) -> bool:
    return any(module == source or module.startswith(source + ".") for source in sources)


def _modules() -> list[str]:
    paths = (REPO / "tasks").rglob("*.py")
    names = [".".join(p.relative_to(REPO).with_suffix("").parts) for p in paths if p.name != "__init__.py"]
    return sorted(names)


@pytest.mark.parametrize("module", _modules())
def test_every_stage_module_is_an_algorithm_or_orchestrates(module: str) -> None:
    sources = _algorithm_contract()["source_modules"]
    orchestrates = module.endswith(".task") or module in ORCHESTRATION
    assert orchestrates != _covered(module, sources), (
        f"{module}: list it in pyproject.toml's algorithm contract (source_modules), or name it task.py if it is "
        "the stage's orchestration"
        if not orchestrates
        else f"{module} orchestrates (Prefect, MLflow, the registry) and must not be in the algorithm contract"
    )


def test_each_stage_package_has_a_config_and_one_task_module() -> None:
    for stage in ("data", "pretrain", "search", "extract", "align", "deploy", "init_from"):
        folder = REPO / "tasks" / stage
        assert (folder / "task.py").is_file(), f"tasks/{stage}/task.py: the stage's one orchestration module"
        if stage != "init_from":  # its settings are the pipeline's `init_from` and `init_steps`
            assert (folder / "config.py").is_file(), f"tasks/{stage}/config.py: the stage's settings"
