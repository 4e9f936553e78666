"""Gate rules, promotion and rollback against a real MLflow store; the chat pyfunc answers messages."""

import threading
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from flows.cli import main
from models.chat_format import Message
from registry.names import CHAT_MODEL
from registry.promotion import (
    CHAMPION,
    GateRules,
    Scores,
    alias_version,
    champion_history,
    gate_decision,
    promote,
    rollback,
)
from registry.tracking import active_store
from serving.engine import ChatPackage
from tasks.deploy.task import promotion_slot


def test_first_candidate_is_promoted_only_if_configured() -> None:
    assert gate_decision(Scores(50.0, 0.1), None, GateRules()).promote
    assert not gate_decision(Scores(50.0, 0.1), None, GateRules(promote_first=False)).promote


@pytest.mark.parametrize(
    ("candidate", "rules", "promote", "failed"),
    [
        (Scores(10.05, 0.30), GateRules(max_ppl_increase=0.01), True, None),
        (Scores(10.20, 0.30), GateRules(max_ppl_increase=0.01), False, "perplexity"),
        (Scores(9.00, 0.29), GateRules(), False, "accuracy"),
        (Scores(9.00, 0.29), GateRules(min_accuracy_delta=-0.02), True, None),
        (Scores(9.00, 0.31), GateRules(min_accuracy_delta=0.05), False, "accuracy"),
    ],
)
def test_gate_rules(candidate: Scores, rules: GateRules, promote: bool, failed: str | None) -> None:
    decision = gate_decision(candidate, Scores(10.0, 0.30), rules, champion_version="4")
    assert decision.promote is promote
    assert [name for name, ok in decision.checks.items() if not ok] == ([failed] if failed else [])
    assert len(decision.reasons) == 2 and "champion 10.0000" in decision.reasons[0]


@pytest.fixture(scope="module")
def workdir(make_chat_registry) -> Path:
    return make_chat_registry()


def test_promote_and_rollback_never_leave_the_alias_pointing_nowhere(workdir: Path) -> None:
    with pytest.raises(LookupError, match="no champion"):
        rollback(workdir, CHAT_MODEL)
    with pytest.raises(LookupError, match="no version '99'"):
        promote(workdir, CHAT_MODEL, "99")
    assert alias_version(workdir, CHAT_MODEL, CHAMPION) is None
    promote(workdir, CHAT_MODEL, "1")
    promote(workdir, CHAT_MODEL, "3")
    with pytest.raises(LookupError, match="no version '7'"):
        promote(workdir, CHAT_MODEL, "7")
    assert alias_version(workdir, CHAT_MODEL, CHAMPION) == "3"  # a refused promotion changes nothing
    assert champion_history(workdir, CHAT_MODEL) == ["1", "3"]
    assert rollback(workdir, CHAT_MODEL) == ("3", "1")
    assert alias_version(workdir, CHAT_MODEL, CHAMPION) == "1"
    with pytest.raises(LookupError, match="no earlier champion"):
        rollback(workdir, CHAT_MODEL)
    assert alias_version(workdir, CHAT_MODEL, CHAMPION) == "1"


def test_cli_promote_and_rollback(workdir: Path, capsys: pytest.CaptureFixture) -> None:
    main(["promote", "2", "--workdir", str(workdir), "--reason", "test"])
    assert "version 2" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no version '42'"):
        main(["promote", "42", "--workdir", str(workdir)])
    main(["rollback", "--workdir", str(workdir)])
    assert alias_version(workdir, CHAT_MODEL, CHAMPION) == "1"


def test_cli_promotion_waits_for_a_gate_holding_the_models_promotion_slot(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`trainonce promote` moves the alias a gate compares against: it must wait for the gate, not interleave."""
    import registry.promotion

    before = alias_version(workdir, CHAT_MODEL, CHAMPION)
    target = "2" if before != "2" else "1"
    gate_deciding = threading.Event()
    moved_during_the_gate: list[bool] = []
    promote_now = registry.promotion.promote

    def recorded(*args, **kwargs):
        moved_during_the_gate.append(gate_deciding.is_set())
        return promote_now(*args, **kwargs)

    monkeypatch.setattr(registry.promotion, "promote", recorded)
    cli = threading.Thread(target=main, args=(["promote", target, "--workdir", str(workdir)],))
    with promotion_slot(str(workdir), CHAT_MODEL):
        gate_deciding.set()
        cli.start()
        cli.join(timeout=5.0)
        gate_deciding.clear()
    cli.join(timeout=120)
    assert moved_during_the_gate == [False]
    assert alias_version(workdir, CHAT_MODEL, CHAMPION) == target


def test_a_rollback_killed_between_its_two_registry_writes_and_retried_goes_back_one_champion(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rollback writes the history tag and moves the alias: killed after either one and run again, it must land
    on the champion before the current one, never return to the version it was rolling back from."""
    for version in ("1", "2", "3"):
        promote(workdir, CHAT_MODEL, version)
    writes = {"done": 0}

    def killed_after_one_write(original):
        def write(self, *args, **kwargs):
            if writes["done"] == 1:
                raise KeyboardInterrupt("killed between the rollback's two writes")
            writes["done"] += 1
            return original(self, *args, **kwargs)

        return write

    with monkeypatch.context() as patch:
        for method in ("set_registered_model_alias", "set_registered_model_tag"):
            patch.setattr(MlflowClient, method, killed_after_one_write(getattr(MlflowClient, method)))
        with pytest.raises(KeyboardInterrupt):
            rollback(workdir, CHAT_MODEL)
    assert rollback(workdir, CHAT_MODEL)[1] == "2"
    assert alias_version(workdir, CHAT_MODEL, CHAMPION) == "2"
    assert rollback(workdir, CHAT_MODEL) == ("2", "1")


def test_chat_pyfunc_answers_openai_style_messages(workdir: Path, chat_packages) -> None:
    with active_store(workdir):
        model = mlflow.pyfunc.load_model(f"models:/{CHAT_MODEL}/1")
    messages = [{"role": "user", "content": "Repeat: king queen"}]
    answer = model.predict(pd.DataFrame({"messages": [messages, messages], "max_tokens": [5, 3]}))
    package = ChatPackage(chat_packages["fp32"])
    expected = package.complete(package.chat_prompt([Message(**messages[0])]), 5)
    assert answer.loc[0, "content"] == expected.text
    assert answer.loc[0, "completion_tokens"] == expected.completion_tokens
    assert answer.loc[1, "completion_tokens"] <= 3
    assert set(answer["finish_reason"]) <= {"stop", "length"}
