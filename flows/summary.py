"""What a pipeline run produced, in a few lines: printed by `trainonce pipeline` and kept as the pipeline run's
`pipeline-summary` artifact in the Prefect UI (the stage flows' own artifacts hold the details)."""

from __future__ import annotations

from typing import Any


def summary_lines(result: dict[str, Any], workdir: str) -> list[str]:
    """The supernet, the chosen sub-model, alignment, the exported candidate and the gate's decision."""
    pretrained, extracted, aligned = result["pretrain"], result["extract"], result["align"]
    if pretrained["run_id"] is None:
        lines = [f"supernet {pretrained['model_uri']} (init_from, no continued pre-training)"]
    else:
        lines = [f"supernet registered as {pretrained['model_uri']} (MLflow run {pretrained['run_id']})"]
    lines += [f"  val loss {label:<12} {loss:.4f}" for label, loss in pretrained["val_loss"].items()]
    lines.append(
        f"sub-model {extracted['subnet']} registered as {extracted['model_uri']}: "
        f"{extracted['total_params']:,} params ({extracted['total_fraction']:.1%}), "
        f"{extracted['active_params']:,} active ({extracted['active_fraction']:.1%}); val loss "
        f"{extracted['val_loss_before']:.4f} extracted -> {extracted['val_loss_after']:.4f} after "
        f"{extracted['distill_steps']} distillation steps ({extracted['distill_compute_fraction']:.1%} of from-scratch)"
    )
    if result["search"].get("margin"):  # absent from search results cached before it was measured
        lines.append(f"  the search's choice is {result['search']['margin']}")
    lines.append(f"aligned: SFT {aligned['sft_uri']}, DPO {aligned['dpo_uri']} (held-out reward accuracy "
                 f"{aligned['reward_accuracy']:.3f}, pairs {aligned['pairs']})")  # fmt: skip
    lines.append(f"  {'task':<12}{'base':>8}{'SFT':>8}{'DPO':>8}")
    for task in aligned["accuracy"]["base"]:
        row = [aligned["accuracy"][stage][task] for stage in ("base", "sft", "dpo")]
        lines.append(f"  {task:<12}" + "".join(f"{value:>8.3f}" for value in row))
    exported, gated, parity = result["export"], result["gate"], result["export"]["parity"]
    lines.append(f"exported {exported['model_uri']} ({exported['candidate']}), alias candidate; onnxruntime fp32 vs "
                 f"PyTorch max abs logit diff {parity['max_abs_logit_diff']:.2e}, same greedy tokens "
                 f"{parity['greedy_tokens_equal']}:")  # fmt: skip
    lines += [f"  {line}" for line in exported["table"].splitlines()]
    if result["hugging_face"]:
        lines.append(f"transformers directory registered as {result['hugging_face']['model_uri']} "
                     f"(mlflow.transformers.load_model; files in {result['hugging_face']['directory']})")  # fmt: skip
    lines.append(f"gate: {'promoted' if gated['promoted'] else 'not promoted'}; " + "; ".join(gated["reasons"]))
    lines.append(f"trainonce-chat@champion = version {gated['champion']}  (serve it: trainonce serve --workdir "
                 f"{workdir})")  # fmt: skip
    return lines
