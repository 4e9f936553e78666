"""The promotion gate and the `champion` alias: promote only what passes, roll back on demand.

The alias is the source of truth for what is served; every move is one atomic alias update, so
`NAME@champion` never points nowhere. Each promotion is also appended to the registered model's
`champion_history` tag, which is what `rollback` walks back along.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
from pydantic import BaseModel, ConfigDict, Field

from registry.tracking import store_client

CHAMPION, CANDIDATE = "champion", "candidate"
_HISTORY_TAG = "champion_history"


class GateRules(BaseModel):
    """When a candidate may replace the champion (both measured on the same held-out evaluation)."""

    model_config = ConfigDict(extra="forbid")

    max_ppl_increase: float = Field(
        0.01, ge=0.0, le=10.0, description="Largest relative validation perplexity increase vs the champion."
    )
    min_accuracy_delta: float = Field(
        0.0,
        ge=-1.0,
        le=1.0,
        description="Candidate exact match minus champion's must be at least this (negative tolerates a drop).",
    )
    promote_first: bool = Field(True, description="With no champion yet, the first candidate becomes champion.")


@dataclass(frozen=True)
class Scores:
    """What the gate compares: validation perplexity and overall held-out exact match."""

    val_ppl: float
    accuracy: float


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reasons: list[str]
    candidate: Scores
    champion: Scores | None
    champion_version: str | None = None
    checks: dict[str, bool] = field(default_factory=dict)

    def summary(self) -> str:
        verdict = "promote" if self.promote else "keep the champion"
        return f"{verdict}: " + "; ".join(self.reasons)


def gate_decision(
    candidate: Scores, champion: Scores | None, rules: GateRules, champion_version: str | None = None
) -> GateDecision:
    """Apply `rules`; every rule's outcome and numbers go into the reasons."""
    if champion is None:
        reason = "no champion yet" + (", promoting the first candidate" if rules.promote_first else "")
        return GateDecision(rules.promote_first, [reason], candidate, None, None, {"first": rules.promote_first})
    ppl_limit = champion.val_ppl * (1 + rules.max_ppl_increase)
    accuracy_floor = champion.accuracy + rules.min_accuracy_delta
    checks = {"perplexity": candidate.val_ppl <= ppl_limit, "accuracy": candidate.accuracy >= accuracy_floor}
    reasons = [
        f"perplexity {candidate.val_ppl:.4f} vs champion {champion.val_ppl:.4f} (limit {ppl_limit:.4f}): "
        + ("ok" if checks["perplexity"] else "too high"),
        f"exact match {candidate.accuracy:.4f} vs champion {champion.accuracy:.4f} (floor {accuracy_floor:.4f}): "
        + ("ok" if checks["accuracy"] else "too low"),
    ]
    return GateDecision(all(checks.values()), reasons, candidate, champion, champion_version, checks)


def alias_version(workdir: str | Path, name: str, alias: str) -> str | None:
    """The version `name@alias` points at, or None if the model or the alias does not exist."""
    try:
        return str(store_client(workdir).get_model_version_by_alias(name, alias).version)
    except mlflow.exceptions.MlflowException:
        return None


def _existing_version(workdir: str | Path, name: str, version: str) -> str:
    try:
        return str(store_client(workdir).get_model_version(name, str(version)).version)
    except mlflow.exceptions.MlflowException as error:
        raise LookupError(f"{name} has no version {version!r}: nothing was changed ({error.message})") from error


def champion_history(workdir: str | Path, name: str) -> list[str]:
    try:
        tags = store_client(workdir).get_registered_model(name).tags
    except mlflow.exceptions.MlflowException as error:
        raise LookupError(f"no registered model {name!r}: {error.message}") from error
    return json.loads(tags.get(_HISTORY_TAG, "[]"))


def promote(workdir: str | Path, name: str, version: str, reason: str = "manual") -> str:
    """Point `name@champion` at `version` (which must exist) and record it in the history."""
    version = _existing_version(workdir, name, version)
    client = store_client(workdir)
    history = champion_history(workdir, name)
    # the alias first: a promotion killed before its history write leaves a history that rollback still walks
    # correctly (back to the last recorded champion); the other order would let a rollback move forward to `version`
    client.set_registered_model_alias(name, CHAMPION, version)
    if not history or history[-1] != version:
        client.set_registered_model_tag(name, _HISTORY_TAG, json.dumps([*history, version]))
    client.set_model_version_tag(name, version, "promoted_at", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    client.set_model_version_tag(name, version, "promotion_reason", reason)
    return version


def rollback(workdir: str | Path, name: str) -> tuple[str, str]:
    """Move `name@champion` back to the champion before the current one; returns (from, to).

    Refuses (and changes nothing) when there is no current champion or no earlier one still registered."""
    current = alias_version(workdir, name, CHAMPION)
    if current is None:
        raise LookupError(f"{name} has no champion to roll back from")
    history = champion_history(workdir, name)
    while history and history[-1] == current:
        history.pop()
    client = store_client(workdir)
    while history:
        target = history[-1]
        try:
            _existing_version(workdir, name, target)
        except LookupError:
            history.pop()  # that version was deleted since: look further back
            continue
        # the history first: a rollback killed between the two writes and retried then moves the alias to the same
        # version (the other order would leave the version rolled back from on top, and a retry would return to it)
        client.set_registered_model_tag(name, _HISTORY_TAG, json.dumps(history))
        client.set_registered_model_alias(name, CHAMPION, target)
        client.set_model_version_tag(name, target, "promotion_reason", f"rollback from version {current}")
        return current, target
    raise LookupError(f"{name}: no earlier champion than version {current} to roll back to; nothing was changed")


def record_decision(workdir: str | Path, name: str, version: str, decision: GateDecision) -> None:
    """Tag the candidate version with the gate's verdict and numbers (visible in the MLflow UI)."""
    client = store_client(workdir)
    tags = {
        "gate.decision": "promoted" if decision.promote else "rejected",
        "gate.reasons": " | ".join(decision.reasons),
        "gate.champion_version": decision.champion_version or "none",
        "gate.candidate_val_ppl": f"{decision.candidate.val_ppl:.6f}",
        "gate.candidate_accuracy": f"{decision.candidate.accuracy:.6f}",
    }
    if decision.champion is not None:
        tags["gate.champion_val_ppl"] = f"{decision.champion.val_ppl:.6f}"
        tags["gate.champion_accuracy"] = f"{decision.champion.accuracy:.6f}"
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
