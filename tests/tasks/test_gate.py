"""The gate measures candidate and champion on the same held-out evaluation and moves the alias only on a pass."""

from pathlib import Path

import pytest

from registry.models import resolve_version, version_tags
from registry.names import CHAT_MODEL
from registry.promotion import CHAMPION, GateRules, alias_version
from tasks.data.config import TaskMixConfig
from tasks.data.corpus import PreparedData
from tasks.deploy.config import EvaluationConfig
from tasks.deploy.task import run_gate

EVALUATION = EvaluationConfig(
    val_batches=2, batch_size=2, seq_len=32, max_new_tokens=8, speed_prompts=1, speed_new_tokens=4
)
TASKS = TaskMixConfig(test_per_task=2)


@pytest.fixture(scope="module")
def workdir(make_chat_registry) -> Path:
    return make_chat_registry()


def test_gate_promotes_the_first_then_only_what_passes(workdir: Path, small_data: PreparedData) -> None:
    decision, measured = run_gate(str(workdir), CHAT_MODEL, "1", GateRules(), EVALUATION, TASKS, small_data)
    assert decision.promote and decision.champion is None and set(measured) == {"candidate"}
    assert alias_version(workdir, CHAT_MODEL, CHAMPION) == "1"

    # demanding a 0.5 accuracy gain cannot pass: the champion stays
    strict = GateRules(min_accuracy_delta=0.5)
    decision, measured = run_gate(str(workdir), CHAT_MODEL, "2", strict, EVALUATION, TASKS, small_data)
    assert not decision.promote and decision.champion_version == "1" and set(measured) == {"candidate", "champion"}
    assert alias_version(workdir, CHAT_MODEL, CHAMPION) == "1"
    tags = version_tags(workdir, resolve_version(workdir, f"{CHAT_MODEL}/2"))
    assert tags["gate.decision"] == "rejected" and tags["gate.champion_version"] == "1"
    assert float(tags["gate.champion_val_ppl"]) == pytest.approx(measured["champion"].val_ppl, rel=1e-5)

    lenient = GateRules(max_ppl_increase=1.0, min_accuracy_delta=-1.0)
    decision, _ = run_gate(str(workdir), CHAT_MODEL, "3", lenient, EVALUATION, TASKS, small_data)
    assert decision.promote and alias_version(workdir, CHAT_MODEL, CHAMPION) == "3"
    assert version_tags(workdir, resolve_version(workdir, f"{CHAT_MODEL}/3"))["gate.decision"] == "promoted"
