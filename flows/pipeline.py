"""The `pipeline` Prefect flow: data, elastic pre-training, search, extraction, SFT and DPO, ONNX export and
quantization, and the gate that promotes `trainonce-chat@champion`.

Its parameter is the pydantic PipelineConfig, so the Prefect UI renders it as a form and rejects bad
values before a run starts. Tasks pass paths and model URIs, never tensors.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from registry.models import CHAT_MODEL
from tasks.align import align_task
from tasks.data import prepare_data_task
from tasks.export import export_task
from tasks.extract import extract_task
from tasks.gate import gate_task
from tasks.pipeline_config import PipelineConfig
from tasks.pretrain import pretrain_task
from tasks.search import search_task


@flow(name="pipeline", log_prints=True)
def pipeline(config: PipelineConfig = PipelineConfig(), workdir: str = "runs/pipeline") -> dict:  # noqa: B008
    """Train once: prepare the corpus, pre-train the elastic supernet, search the family under budgets,
    extract and distil the chosen sub-model, align it, export and quantize it, and promote it if it beats
    the champion; every model registered in MLflow."""
    workdir = str(Path(workdir).resolve())
    data_dir = prepare_data_task(config.data)
    pretrained = pretrain_task(config.pretrain, data_dir, workdir)
    lines = [f"| {label} | {loss:.4f} |" for label, loss in pretrained["val_loss"].items()]
    create_markdown_artifact(
        key="pretrain-summary",
        markdown="\n".join(
            [
                f"### Supernet {pretrained['model_uri']}",
                f"MLflow run `{pretrained['run_id']}`, {pretrained['tokens_per_second']:,.0f} tokens/s, "
                f"MFU {pretrained['mfu']:.1%}",
                "",
                "| sub-model | validation loss |",
                "|---|---|",
                *lines,
            ]
        ),
        description="Elastic pre-training: validation loss of each panel sub-model",
    )
    print(f"registered {pretrained['model_uri']}; validation losses {pretrained['val_loss']}")
    chosen = search_task(
        config.search, config.extract, config.pretrain.elastic, pretrained["checkpoint_dir"], data_dir, workdir
    )
    extracted = extract_task(
        config.extract,
        chosen["ranked_supernet_dir"],
        chosen["spec_json"],
        data_dir,
        workdir,
        pretrained["version"],
        config.pretrain.tokens_per_step() * config.pretrain.total_steps(),
        chosen["limits"],
    )
    print(
        f"registered {extracted['model_uri']} ({extracted['subnet']}): {extracted['total_fraction']:.1%} of the "
        f"parameters, {extracted['active_fraction']:.1%} active; validation loss {extracted['val_loss_before']:.4f} "
        f"-> {extracted['val_loss_after']:.4f} after {extracted['distill_steps']} distillation steps "
        f"({extracted['distill_compute_fraction']:.1%} of from-scratch compute)"
    )
    aligned = align_task(config.sft, config.dpo, extracted["model_dir"], data_dir, workdir, extracted["version"])
    rows = [
        f"| {task} | {aligned['accuracy']['base'][task]:.3f} | {aligned['accuracy']['sft'][task]:.3f} | "
        f"{aligned['accuracy']['dpo'][task]:.3f} |"
        for task in aligned["accuracy"]["base"]
    ]
    create_markdown_artifact(
        key="alignment",
        markdown="\n".join(
            [f"### {aligned['sft_uri']} (SFT), {aligned['dpo_uri']} (DPO)",
             f"held-out DPO reward accuracy {aligned['reward_accuracy']:.3f}; pairs {aligned['pairs']}", "",
             "| task | base | SFT | DPO |", "|---|---|---|---|", *rows]
        ),
        description="Held-out exact match per task",
    )  # fmt: skip
    print(f"aligned: SFT {aligned['sft_uri']}, DPO {aligned['dpo_uri']}; accuracy {aligned['accuracy']}")
    lineage = {
        "parent_model": aligned["dpo_uri"], "parent_sft": aligned["sft_uri"], "parent_subnet": extracted["model_uri"],
        "parent_supernet": pretrained["model_uri"], "subnet": extracted["subnet"],
    }  # fmt: skip
    exported = export_task(config.deploy, config.sft.tasks, aligned["dpo_dir"], data_dir, workdir, lineage)
    create_markdown_artifact(
        key="export",
        markdown="\n".join([f"### {exported['model_uri']} (alias candidate): {exported['candidate']}",
                            f"onnxruntime fp32 vs PyTorch: max abs logit diff "
                            f"{exported['parity']['max_abs_logit_diff']:.2e}, same greedy tokens: "
                            f"{exported['parity']['greedy_tokens_equal']}", "", exported["table"]]),
        description="ONNX variants measured with onnxruntime on the held-out evaluation",
    )  # fmt: skip
    print(f"exported {exported['model_uri']} ({exported['candidate']}) as candidate")
    gated = gate_task(config.gate, config.deploy.evaluation, config.sft.tasks, exported["version"], data_dir, workdir)
    create_markdown_artifact(
        key="promotion",
        markdown="\n".join(
            [f"### {CHAT_MODEL}/{gated['candidate_version']}: {'promoted' if gated['promoted'] else 'not promoted'}",
             f"champion now: version {gated['champion']} (before: {gated['previous_champion'] or 'none'})", "",
             *[f"- {reason}" for reason in gated["reasons"]]]
        ),
        description="Gate decision: candidate vs champion on the same held-out evaluation",
    )  # fmt: skip
    verdict = "promoted" if gated["promoted"] else "kept the champion"
    print(f"gate: {verdict}; {CHAT_MODEL}@champion = version {gated['champion']}")
    return {"data_dir": data_dir, "pretrain": pretrained, "search": chosen, "extract": extracted, "align": aligned,
            "export": exported, "gate": gated}  # fmt: skip
