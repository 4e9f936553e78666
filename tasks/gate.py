"""Gate stage: measure the candidate and the current champion on the same held-out evaluation, then move
`trainonce-chat@champion` only if the rules pass. The decision and both sets of numbers are logged."""

from __future__ import annotations

import tempfile
from pathlib import Path

from prefect import task

from registry.models import CHAT_MODEL, download_chat_package
from registry.promotion import (
    CHAMPION,
    GateDecision,
    GateRules,
    Scores,
    alias_version,
    gate_decision,
    promote,
    record_decision,
)
from registry.tracking import RunLogger
from tasks.align_data import TaskMixConfig
from tasks.data import PreparedData
from tasks.evaluate import EvaluationConfig, PackageEvaluation, evaluate_package, held_out_examples
from tasks.stage_results import GateOutcome


def _scores(evaluation: PackageEvaluation) -> Scores:
    return Scores(evaluation.val_ppl, evaluation.accuracy["overall"])


def run_gate(
    workdir: str,
    model_name: str,
    candidate_version: str,
    rules: GateRules,
    evaluation: EvaluationConfig,
    tasks: TaskMixConfig,
    data: PreparedData,
) -> tuple[GateDecision, dict[str, PackageEvaluation]]:
    """Evaluate candidate (and champion, if any) with onnxruntime, decide, and promote when it passes."""
    champion_version = alias_version(workdir, model_name, CHAMPION)
    examples = held_out_examples(data, tasks)
    measured: dict[str, PackageEvaluation] = {}
    with tempfile.TemporaryDirectory(prefix="gate-") as scratch:
        refs = {"candidate": candidate_version}
        if champion_version is not None and champion_version != candidate_version:
            refs["champion"] = champion_version
        for role, version in refs.items():
            package = download_chat_package(workdir, f"{model_name}/{version}", Path(scratch) / role)
            measured[role] = evaluate_package(package, data, examples, evaluation)
    champion = _scores(measured["champion"]) if "champion" in measured else None
    if champion_version == candidate_version:  # re-gating the champion itself: it passes against itself
        champion = _scores(measured["candidate"])
    decision = gate_decision(_scores(measured["candidate"]), champion, rules, champion_version)
    record_decision(workdir, model_name, candidate_version, decision)
    if decision.promote:
        promote(workdir, model_name, candidate_version, reason="gate: " + decision.summary())
    return decision, measured


@task(name="gate", retries=1, retry_delay_seconds=5)
def gate_task(
    rules: GateRules,
    evaluation: EvaluationConfig,
    tasks: TaskMixConfig,
    candidate_version: str,
    data_dir: str,
    workdir: str,
    model_name: str = CHAT_MODEL,
) -> GateOutcome:
    """Compare `<model_name>/<candidate_version>` with its champion; promote it if the rules pass."""
    tags = {"stage": "gate", "candidate_version": candidate_version, "model_name": model_name}
    logger = RunLogger(workdir, run_name="gate", tags=tags)
    logger.log_params({"gate": rules.model_dump(mode="json"), "evaluation": evaluation.model_dump(mode="json")})
    data = PreparedData.load(data_dir)
    decision, measured = run_gate(workdir, model_name, candidate_version, rules, evaluation, tasks, data)
    for role, result in measured.items():
        logger.log_metrics(result.as_metrics(f"{role}/"), step=0)
    verdict = "promoted" if decision.promote else "rejected"
    logger.set_tags(
        {
            "decision": verdict,
            "reasons": " | ".join(decision.reasons),
            "champion_version": decision.champion_version or "none",
        }
    )
    logger.finish()
    return GateOutcome(
        model_name=model_name,
        promoted=decision.promote,
        reasons=decision.reasons,
        candidate_version=candidate_version,
        champion_version=alias_version(workdir, model_name, CHAMPION),
        previous_champion_version=decision.champion_version,
        candidate_scores=measured["candidate"].to_dict(),
        champion_scores=measured["champion"].to_dict() if "champion" in measured else None,
    )
