"""The deploy stage's Prefect tasks: export and quantize the aligned model to ONNX and register the candidate
(`export`), register it as a transformers directory (`export-hf`) and as GGUF files (`export-gguf`), and the gate that
measures the candidate against the champion on the same held-out evaluation and moves `champion` only if the rules
pass (`gate`, one at a time per registered model). The work itself is in tasks/deploy/onnx_export.py, evaluate.py,
hugging_face.py and gguf.py; this module logs it to MLflow and versions it in the registry."""

from __future__ import annotations

import contextlib
import hashlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock
from prefect import task

from models.checkpoint import load_model
from models.hf import HF_ARCHITECTURE
from registry.models import (
    download_chat_package,
    parse_model_ref,
    register_chat_package,
    register_hf_model,
    set_alias,
)
from registry.names import CHAT_MODEL
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
from registry.tracking import lineage_tags, stage_run, tracking_uri
from serving import CHAT_PYFUNC_CODE
from tasks.common.stage_results import ExportedCandidate, GateOutcome, GgufExport, HuggingFaceExport
from tasks.data.config import TaskMixConfig
from tasks.data.corpus import PreparedData
from tasks.deploy.config import DeployConfig, EvaluationConfig
from tasks.deploy.evaluate import PackageEvaluation, evaluate_package, held_out_examples
from tasks.deploy.gguf import export_gguf
from tasks.deploy.hugging_face import export_hf
from tasks.deploy.onnx_export import (
    run_export,
    variant_table,
)


@task(name="export", retries=1, retry_delay_seconds=5)
def export_task(
    config: DeployConfig, tasks: TaskMixConfig, aligned_dir: str, data_dir: str, workdir: str, lineage: dict
) -> ExportedCandidate:
    """Export and quantize the aligned model; register the chosen variant in `config.model_name`
    (`trainonce-chat`) as `candidate`."""
    data = PreparedData.load(data_dir)
    model = load_model(aligned_dir).eval()
    with stage_run(workdir, "export") as logger:
        logger.log_params({"deploy": config.model_dump(mode="json")})
        output = Path(workdir) / "export" / logger.run_id
        result = run_export(model, data, tasks, config, output)
        for variant, evaluation in result.evaluations.items():
            logger.log_metrics(evaluation.as_metrics(f"{variant}/"), step=0)
        logger.log_metrics(
            {
                "parity/max_abs_logit_diff": result.parity.max_abs_logit_diff,
                "parity/greedy_tokens_equal": float(result.parity.greedy_tokens_equal),
            },
            step=0,
        )
        table = "\n".join(variant_table(result))
        (output / "variants.md").write_text(table + "\n")
        logger.log_artifact(output / "variants.md")
        chosen = result.evaluations[result.candidate]
        reference = result.evaluations["fp32"]
        tags = {
            **lineage_tags("export", data.fingerprint, **lineage),
            "quantization": result.candidate,
            "val_ppl": f"{chosen.val_ppl:.4f}",
            "ppl_delta_vs_fp32": f"{chosen.val_ppl / reference.val_ppl - 1:.5f}",
            "accuracy_overall": f"{chosen.accuracy['overall']:.4f}",
            "size_bytes": str(chosen.size_bytes),
            "tokens_per_second": f"{chosen.tokens_per_second:.1f}",
            "onnx_max_abs_logit_diff": f"{result.parity.max_abs_logit_diff:.3e}",
            "onnx_greedy_tokens_equal": str(result.parity.greedy_tokens_equal),
            "evaluation": json.dumps({v: e.to_dict() for v, e in result.evaluations.items()}),
        }
        package = result.packages[result.candidate]
        version = register_chat_package(workdir, logger.run_id, package, tags, CHAT_PYFUNC_CODE, config.model_name)
        set_alias(workdir, config.model_name, "candidate", version.version)
    return ExportedCandidate(
        model_uri=version.uri,
        version=version.version,
        candidate=result.candidate,
        package_dir=str(result.packages[result.candidate]),
        table=table,
        parity=result.parity,
        evaluations={v: e.to_dict() for v, e in result.evaluations.items()},
    )


@task(name="export-hf", retries=1, retry_delay_seconds=5)
def export_hf_task(aligned_dir: str, data_dir: str, workdir: str, lineage: dict) -> HuggingFaceExport:
    """The aligned model as a transformers directory, registered in `trainonce-chat-hf` with the lineage of the
    ONNX candidate exported from the same model."""
    with stage_run(workdir, "export-hf") as logger:
        data = PreparedData.load(data_dir)
        out = export_hf(aligned_dir, data.tokenizer_path, data.chat_format, Path(workdir) / "export-hf" / logger.run_id)
        version = register_hf_model(
            workdir, logger.run_id, out, {**lineage, "stage": "export-hf", "architecture": HF_ARCHITECTURE}
        )
    return HuggingFaceExport(model_uri=version.uri, version=version.version, directory=str(out))


@task(name="export-gguf", retries=1, retry_delay_seconds=5)
def export_gguf_task(
    aligned_dir: str,
    data_dir: str,
    workdir: str,
    lineage: dict,
    types: tuple[str, ...],
    hf_dir: str | None = None,
) -> GgufExport:
    """The aligned model as GGUF files and their Ollama Modelfile, logged as the `gguf/` artifact of an
    `export-gguf` run tagged with the ONNX candidate's lineage (the same parent model and supernet), and named in
    the files' metadata after that parent model. `hf_dir`: the same model's transformers directory when the stage
    has just exported one, so it is not written twice."""
    name, _, version = parse_model_ref(lineage["parent_model"])
    with stage_run(workdir, "export-gguf", {**lineage}) as logger:
        data = PreparedData.load(data_dir)
        files = export_gguf(
            aligned_dir,
            data.tokenizer_path,
            data.chat_format,
            Path(workdir) / "export-gguf" / logger.run_id,
            types,
            hf_dir,
            name=name,
            version=version,
        )
        logger.log_params({"gguf_types": ",".join(files)})
        logger.log_metrics({f"size_mb/{t}": path.stat().st_size / 1e6 for t, path in files.items()}, step=0)
        folder = next(iter(files.values())).parent
        logger.log_artifact(folder, "gguf")
    return GgufExport(
        run_id=logger.run_id,
        artifact_uri=f"runs:/{logger.run_id}/gguf",
        files={t: str(path) for t, path in files.items()},
    )


def _scores(evaluation: PackageEvaluation) -> Scores:
    return Scores(evaluation.val_ppl, evaluation.accuracy["overall"])


# A gate that dies holding the promotion slot frees it within this (Prefect renews the lease while the gate runs;
# 60 s is the server's minimum).
PROMOTION_LEASE_SECONDS = 60


def promotion_limit(model_name: str) -> str:
    """The Prefect global concurrency limit that serialises `model_name`'s gates."""
    return f"promotion:{model_name}"


def _ensure_promotion_limit(name: str) -> None:
    """Create the limit with one slot if it is missing (Prefect skips a missing limit with a warning, and
    `strict=True` only turns that into an error); refuse one that was changed to let two gates in."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        # made by an earlier gate, or by another worker's gate just now
        with contextlib.suppress(ObjectAlreadyExists):
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
        found = client.read_global_concurrency_limit_by_name(name)
    if found.limit != 1 or not found.active:
        raise RuntimeError(
            f"the Prefect global concurrency limit {name!r} must be active with limit 1 (it serialises promotion), "
            f"found limit {found.limit}, active {found.active}: `prefect gcl update {name} --limit 1 --enable`"
        )


@contextlib.contextmanager
def promotion_slot(workdir: str, model_name: str) -> Iterator[None]:
    """Hold `model_name`'s promotion for one gate, from reading its champion to moving the alias: two gates that
    overlap would both compare against the same champion, both promote, and one `champion_history` update would
    be lost. With a Prefect server (PREFECT_API_URL, shared by every worker) this is a global concurrency limit of
    one slot; without one (Prefect's temporary server lives in one process) a file lock keyed on the MLflow store
    and the model serialises the processes of this host."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        from prefect.concurrency.sync import concurrency

        name = promotion_limit(model_name)
        _ensure_promotion_limit(name)
        with concurrency(name, occupy=1, strict=True, lease_duration=PROMOTION_LEASE_SECONDS):
            yield
    else:
        key = hashlib.sha256(f"{tracking_uri(workdir)}\n{model_name}".encode()).hexdigest()[:16]
        with FileLock(Path(tempfile.gettempdir()) / f"trainonce-promotion-{key}.lock"):
            yield


def run_gate(
    workdir: str,
    model_name: str,
    candidate_version: str,
    rules: GateRules,
    evaluation: EvaluationConfig,
    tasks: TaskMixConfig,
    data: PreparedData,
) -> tuple[GateDecision, dict[str, PackageEvaluation]]:
    """Evaluate candidate (and champion, if any) with onnxruntime, decide, and promote when it passes; holds the
    model's promotion slot throughout, so concurrent gates of one model decide one after the other."""
    with promotion_slot(workdir, model_name):
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
    with stage_run(workdir, "gate", tags) as logger:
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
