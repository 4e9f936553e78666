"""The search stage's Prefect task: rank importance on calibration data, search the family under the budgets
(tasks/search/search.py), and log the candidates table, the Pareto PNG and the choice to MLflow."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from prefect import task

from models.checkpoint import load_model, save_model
from models.subnet import ElasticSpace
from registry.tracking import stage_run
from tasks.common.plots import plot_pareto
from tasks.common.stage_results import RankingCheck, SearchOutcome
from tasks.data.corpus import PreparedData
from tasks.search.importance import ImportanceConfig, rank_importance
from tasks.search.search import (
    SearchConfig,
    ValidationObjective,
    _key,
    candidate_row,
    choice_margin,
    measure_latency_ms,
    run_search,
)


@task(name="search", retries=1, retry_delay_seconds=5)
def search_task(
    search: SearchConfig,
    importance: ImportanceConfig,
    elastic: ElasticSpace,
    supernet_dir: str,
    data_dir: str,
    workdir: str,
) -> SearchOutcome:
    """Rank importance on calibration data, then search the family; returns the ranked supernet and the spec."""
    data = PreparedData.load(data_dir)
    supernet = load_model(supernet_dir).eval()
    # One folder per (supernet, data, settings): a cached later stage may still point into an earlier one.
    key = json.dumps(
        [
            search.model_dump(mode="json"),
            importance.model_dump(mode="json"),
            elastic.model_dump(mode="json"),
            supernet_dir,
            data_dir,
        ]
    )
    out_dir = Path(workdir) / "search" / hashlib.sha256(key.encode()).hexdigest()[:16]
    with stage_run(workdir, "search") as logger:
        logger.log_params({"search": search.model_dump(mode="json"), "supernet_dir": supernet_dir})
        effect = None
        if importance.enabled:
            _, effect = rank_importance(supernet, data, importance, elastic, search.seq_len)
            logger.log_metrics(
                {
                    "ranking/val_loss_importance_order": effect.loss_importance,
                    "ranking/val_loss_identity_order": effect.loss_identity,
                },
                step=0,
            )
        ranked_dir = save_model(supernet, out_dir / "ranked_supernet")
        objective = ValidationObjective(supernet, data, search)

        result = run_search(
            search,
            supernet.config,
            elastic,
            supernet.importance(),
            objective,
            (lambda spec: measure_latency_ms(supernet, spec, search)) if search.needs_latency else None,
        )
        rows = [candidate_row(c, objective.batch_losses[_key(c.spec)]) for c in result.evaluated]
        margin = choice_margin(result, objective.batch_losses)
        (out_dir / "candidates.json").write_text(json.dumps(rows, indent=2))
        png = plot_pareto(
            [(c.active_params, c.val_loss) for c in result.evaluated],
            [(c.active_params, c.val_loss) for c in result.pareto],
            (result.chosen.active_params, result.chosen.val_loss),
            out_dir / "pareto.png",
        )
        logger.log_artifact(png, "plots")
        logger.log_artifact(out_dir / "candidates.json", "search")
        logger.log_metrics(
            {
                "search/evaluated": len(result.evaluated),
                "search/chosen_val_loss": result.chosen.val_loss,
                "search/chosen_active_params": result.chosen.active_params,
                **(
                    {}
                    if margin is None
                    else {"search/margin_to_runner_up": margin.margin, "search/margin_stderr": margin.stderr}
                ),
            },
            step=0,
        )
        logger.set_tags({"chosen_spec": result.chosen.spec.model_dump_json(), "method": result.method})
    chosen = result.chosen
    ranking = None
    if effect is not None:
        ranking = RankingCheck(
            subnet=effect.spec_importance.describe(),
            val_loss_importance_order=effect.loss_importance,
            val_loss_identity_order=effect.loss_identity,
        )
    return SearchOutcome(
        ranked_supernet_dir=str(ranked_dir),
        spec_json=chosen.spec.model_dump_json(),
        subnet=chosen.spec.describe(),
        layers=list(chosen.spec.layers),
        total_params=chosen.total_params,
        active_params=chosen.active_params,
        val_loss=chosen.val_loss,
        limits=result.limits,
        method=result.method,
        space_size=result.space_size,
        candidates=rows,
        run_id=logger.run_id,
        margin=None if margin is None else margin.describe(),
        ranking=ranking,
    )
