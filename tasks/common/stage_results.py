"""What each stage hands the next: one frozen pydantic model per stage result, built by the stage's task.

Each result's `summary(links)` is what a person reads about it, written once: a headline sentence, then detail lines
indented by two spaces (table rows, reasons). The stage flows print it and turn it into their Prefect artifacts
(flows/stages.py, with `links` rendering registered models and MLflow runs as links to the MLflow UI), and the
pipeline's summary is the stages' summaries in order (`PipelineResult`).

What a stage was asked for and what it achieved have distinct names: an extracted sub-model's `budget` holds the
search's bounds and the distillation compute asked for, its `achieved` the measured counts, fractions and losses
(named as its MLflow metrics and tags are).

Prefect persists task results as JSON (flows/stages.py) and validates a cached result against its model when a
re-run reads it back, so a field added later needs a default.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from registry.names import CHAT_MODEL


class Links:
    """How a summary names registered models (`NAME/VERSION` or `models:/NAME/VERSION`) and MLflow runs: as plain
    text, for logs and the terminal; flows/stages.py renders them as links to the MLflow UI in Prefect artifacts."""

    def model(self, ref: str) -> str:
        return ref

    def run(self, run_id: str) -> str:
        return f"run {run_id}"


PLAIN = Links()


class StageResult(BaseModel):
    """Frozen: a result records what a stage did. `constants`: an infinite standard error (one validation batch)
    stays infinite through the JSON cache instead of coming back as null."""

    model_config = ConfigDict(frozen=True, ser_json_inf_nan="constants")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Markdown table rows, indented as summary details."""
    lines = [header, ["---"] * len(header), *rows]
    return ["  | " + " | ".join(cells) + " |" for cells in lines]


class PretrainedSupernet(StageResult):
    """The supernet the later stages start from: registered by pre-training or, with `init_from` and no continued
    pre-training, the source itself (then only `model_uri` and `data_dir` are set)."""

    model_uri: str
    data_dir: str  # the prepared data every later stage reads
    version: str | None = None
    run_id: str | None = None  # None: no pre-training ran
    checkpoint_dir: str | None = None
    val_loss: dict[str, float] = {}  # last validation, per panel label
    tokens_per_second: float | None = None
    mfu: float | None = None
    warm_started_from: str | None = None  # the registered supernet training continued from
    resumed_from_step: int = 0  # the run's own checkpoint it resumed from after an interruption (0: none)
    image_val_loss: dict[str, float] = {}  # with images: last validation on held-out image documents, per label
    modality_routing: dict[str, Any] | None = None  # with images: tasks/pretrain/modality_routing.ModalityRouting

    def summary(self, links: Links = PLAIN) -> list[str]:
        if self.run_id is None:
            return [f"supernet {links.model(self.model_uri)} (init_from, no continued pre-training)"]
        start = f"warm-started from {self.warm_started_from}" if self.warm_started_from else "from scratch"
        if self.resumed_from_step:
            start += f", resumed from its checkpoint at step {self.resumed_from_step}"
        lines = [
            f"supernet registered as {links.model(self.model_uri)} ({start}; MLflow {links.run(self.run_id)}, weights "
            f"in {self.checkpoint_dir}): {self.tokens_per_second:,.0f} tokens/s, MFU {self.mfu:.1%}"
        ]
        if not self.image_val_loss:
            rows = [[label, f"{loss:.4f}"] for label, loss in self.val_loss.items()]
            return [*lines, *_table(["sub-model", "validation loss"], rows)]
        rows = [[label, f"{loss:.4f}", f"{self.image_val_loss[label]:.4f}"] for label, loss in self.val_loss.items()]
        lines += _table(["sub-model", "text validation loss", "image-text validation loss"], rows)
        return lines + self._modality_summary()

    def _modality_summary(self) -> list[str]:
        """The routing split by modality: the purity figure and each expert's image share (%), as the heatmap."""
        routing = self.modality_routing
        if not routing:
            return []
        experts = len(routing["image_fraction"][0]) if routing["image_fraction"] else 0
        rows = [
            [str(layer), *("-" if v is None else f"{100 * v:.0f}" for v in fractions)]
            for layer, fractions in zip(routing["layers"], routing["image_fraction"], strict=True)
        ]
        return [
            f"routing by modality: mean purity {routing['mean_purity']:.3f} (0.5: agnostic, 1.0: every expert serves "
            f"one modality); image share of each expert's tokens in %, image tokens are "
            f"{100 * routing['image_token_share']:.0f}% of the batch:",
            *_table(["layer", *(f"e{e}" for e in range(experts))], rows),
        ]


class RankingCheck(StageResult):
    """The smallest sub-model of the space with the measured importance order vs the identity order."""

    subnet: str
    val_loss_importance_order: float
    val_loss_identity_order: float


class SearchOutcome(StageResult):
    """The sub-model the search chose under its budgets, and the supernet with importance orders to cut it from."""

    ranked_supernet_dir: str
    spec_json: str  # the chosen SubnetSpec
    subnet: str  # its short label, e.g. `L3 E4 k1`
    layers: list[int]
    total_params: int
    active_params: int
    val_loss: float
    limits: dict[str, float]  # the budgets applied, absolute: total_params, active_params, latency_ms
    method: str  # exhaustive or evolutionary
    space_size: int
    candidates: list[dict[str, Any]]  # every evaluated sub-model, one table row each
    run_id: str
    margin: str | None = None  # how much better than the runner-up, and whether beyond the noise
    ranking: RankingCheck | None = None  # None: importance was not measured

    def summary(self, links: Links = PLAIN) -> list[str]:
        lines = [
            f"search chose {self.subnet} (layers {self.layers}): {self.total_params:,} params, "
            f"{self.active_params:,} active, validation loss {self.val_loss:.4f}; {self.method} search, "
            f"{len(self.candidates)} of {self.space_size} sub-models evaluated under budgets {self.limits} (MLflow "
            f"{links.run(self.run_id)})"
        ]
        if self.margin is not None:
            lines.append(f"  the search's choice is {self.margin}")
        if self.ranking is not None:
            lines.append(
                f"  importance ranking: {self.ranking.subnet} loses {self.ranking.val_loss_importance_order:.4f} "
                f"with the measured order vs {self.ranking.val_loss_identity_order:.4f} with the identity order"
            )
        return lines


class SubnetBudget(StageResult):
    """What extraction was asked for: the search's bounds, absolute (None: no such budget), and the distillation
    compute as a fraction of pre-training the sub-model from scratch (None: distillation off)."""

    total_params: float | None = None
    active_params: float | None = None
    latency_ms: float | None = None
    distill_compute_fraction: float | None = None


class SubnetAchieved(StageResult):
    """What the extracted sub-model is and what distillation did; named as its MLflow metrics and tags."""

    total_params: int
    active_params: int
    total_params_fraction: float  # of the supernet's
    active_params_fraction: float
    val_loss_before_distill: float
    val_loss_after_distill: float
    distill_steps: int
    distill_compute_fraction: float  # spent, of pre-training the sub-model from scratch


class ExtractedSubnet(StageResult):
    """The chosen sub-model, cut out of the supernet, distilled and registered."""

    model_uri: str
    version: str
    model_dir: str
    subnet: str
    parent_model: str  # the supernet it was cut from, `NAME/VERSION`
    budget: SubnetBudget
    achieved: SubnetAchieved

    def summary(self, links: Links = PLAIN) -> list[str]:
        done, asked = self.achieved, self.budget.distill_compute_fraction
        distillation = f"{done.distill_compute_fraction:.1%} of from-scratch compute" + (
            f", {asked:.1%} asked" if asked is not None else ", distillation off"
        )
        return [
            f"sub-model {self.subnet} registered as {links.model(self.model_uri)} from "
            f"{links.model(self.parent_model)}: {done.total_params:,} params ({done.total_params_fraction:.1%}), "
            f"{done.active_params:,} active ({done.active_params_fraction:.1%}); val loss "
            f"{done.val_loss_before_distill:.4f} extracted -> {done.val_loss_after_distill:.4f} after "
            f"{done.distill_steps} distillation steps ({distillation})"
        ]


class ExtractionResult(StageResult):
    """The extract flow's two tasks: the search's choice and the sub-model extracted from it."""

    search: SearchOutcome
    subnet: ExtractedSubnet

    def summary(self, links: Links = PLAIN) -> list[str]:
        return [*self.search.summary(links), *self.subnet.summary(links)]


class AlignedStep(StageResult):
    """One alignment step's model (SFT, DPO or GRPO), registered in `trainonce-chat-torch`: what the next step
    starts from, and its held-out exact match per task (and "overall") after the step."""

    step: str  # "sft", "dpo" or "grpo"
    model_uri: str
    accuracy: dict[str, float]
    accuracy_before: dict[str, float] = {}  # SFT: the sub-model's own, before alignment
    reward_accuracy: float | None = None  # DPO: its implicit reward ranks the held-out pairs right this often
    pairs: dict[str, int] = {}  # DPO: training pairs per kind

    @property
    def version(self) -> str:
        return self.model_uri.rsplit("/", 1)[-1]


class AlignedModels(StageResult):
    """The SFT, DPO (and GRPO) models aligned from a sub-model, and their held-out exact match per task."""

    sft_uri: str
    dpo_uri: str
    grpo_uri: str | None = None  # when GRPO ran
    parent_model: str  # the sub-model they were aligned from, `NAME/VERSION`
    accuracy: dict[str, dict[str, float]]  # "base", "sft", "dpo" (, "grpo") -> task (and "overall") -> exact match
    reward_accuracy: float  # DPO's implicit reward ranks the held-out pairs right this often
    pairs: dict[str, int]  # DPO training pairs per kind

    @classmethod
    def of(cls, parent_model: str, sft: AlignedStep, dpo: AlignedStep, grpo: AlignedStep | None) -> AlignedModels:
        """The alignment stage's result from its steps' results."""
        assert dpo.reward_accuracy is not None, "a DPO step measures its reward accuracy"
        accuracy = {"base": sft.accuracy_before, "sft": sft.accuracy, "dpo": dpo.accuracy}
        return cls(
            sft_uri=sft.model_uri,
            dpo_uri=dpo.model_uri,
            grpo_uri=grpo.model_uri if grpo else None,
            parent_model=parent_model,
            accuracy={**accuracy, **({"grpo": grpo.accuracy} if grpo else {})},
            reward_accuracy=dpo.reward_accuracy,
            pairs=dpo.pairs,
        )

    @property
    def final_uri(self) -> str:
        """The model the deploy stage exports: GRPO's when it ran, else DPO's."""
        return self.grpo_uri or self.dpo_uri

    def summary(self, links: Links = PLAIN) -> list[str]:
        stages = [s for s in ("base", "sft", "dpo", "grpo") if s in self.accuracy]
        rows = [[task, *(f"{self.accuracy[stage][task]:.3f}" for stage in stages)] for task in self.accuracy["base"]]
        grpo = f", GRPO {links.model(self.grpo_uri)}" if self.grpo_uri else ""
        return [
            f"aligned {links.model(self.parent_model)}: SFT {links.model(self.sft_uri)}, "
            f"DPO {links.model(self.dpo_uri)}{grpo} (held-out DPO reward accuracy {self.reward_accuracy:.3f}, "
            f"pairs {self.pairs})",
            *_table(["task", *(s.upper() if s != "base" else s for s in stages)], rows),
        ]


class OnnxParity(StageResult):
    """The fp32 ONNX graph under onnxruntime against the PyTorch model it came from."""

    max_abs_logit_diff: float
    greedy_tokens_equal: bool


class ExportedCandidate(StageResult):
    """The ONNX variant registered in `trainonce-chat` with alias `candidate`, and how every variant measured."""

    model_uri: str
    version: str
    candidate: str  # the chosen variant: fp32, int8 or int4
    package_dir: str
    table: str  # markdown: size, perplexity, exact match and speed per variant
    parity: OnnxParity
    evaluations: dict[str, dict[str, Any]]  # variant -> PackageEvaluation as a dict

    def summary(self, links: Links = PLAIN) -> list[str]:
        return [
            f"exported {links.model(self.model_uri)} ({self.candidate}), alias candidate; onnxruntime fp32 vs "
            f"PyTorch max abs logit diff {self.parity.max_abs_logit_diff:.2e}, same greedy tokens "
            f"{self.parity.greedy_tokens_equal}:",
            *(f"  {line}" for line in self.table.splitlines()),
        ]


class HuggingFaceExport(StageResult):
    """The aligned model as a transformers directory, registered in `trainonce-chat-hf`."""

    model_uri: str
    version: str
    directory: str

    def summary(self, links: Links = PLAIN) -> list[str]:
        return [
            f"transformers directory registered as {links.model(self.model_uri)} "
            f"(mlflow.transformers.load_model; files in {self.directory})"
        ]


class GgufExport(StageResult):
    """The aligned model as GGUF files (llama.cpp, Ollama), logged as the artifacts of an `export-gguf` run."""

    run_id: str
    artifact_uri: str
    files: dict[str, str]

    def summary(self, links: Links = PLAIN) -> list[str]:
        return [
            f"GGUF files ({', '.join(self.files)}) logged as {self.artifact_uri} in {links.run(self.run_id)}",
            *(f"  {gguf_type}: {path}" for gguf_type, path in self.files.items()),
        ]


class GateOutcome(StageResult):
    """The gate's decision on a `trainonce-chat` candidate against the champion, measured on the same evaluation."""

    model_name: str = CHAT_MODEL  # the registered model (a family member's own, for members)
    promoted: bool
    reasons: list[str]
    candidate_version: str
    champion_version: str | None  # after the decision
    previous_champion_version: str | None
    candidate_scores: dict[str, Any]  # PackageEvaluation as a dict
    champion_scores: dict[str, Any] | None

    def summary(self, links: Links = PLAIN) -> list[str]:
        verdict = "promoted" if self.promoted else "not promoted"
        candidate = links.model(f"{self.model_name}/{self.candidate_version}")
        return [
            f"gate: {candidate} {verdict}; {self.model_name}@champion = "
            f"version {self.champion_version or 'none'} (before: {self.previous_champion_version or 'none'})",
            *(f"  - {reason}" for reason in self.reasons),
        ]


class DeploymentResult(StageResult):
    """The deploy flow's tasks: the exported candidate, its transformers twin and GGUF files (when asked for),
    and the gate."""

    export: ExportedCandidate
    hugging_face: HuggingFaceExport | None
    gate: GateOutcome
    gguf: GgufExport | None = None

    def summary(self, links: Links = PLAIN) -> list[str]:
        twin = self.hugging_face.summary(links) if self.hugging_face else []
        gguf = self.gguf.summary(links) if self.gguf else []
        return [*self.export.summary(links), *twin, *gguf, *self.gate.summary(links)]


class FamilyMemberResult(StageResult):
    """One more member of the family: its own search, extraction, alignment, export and gate."""

    name: str
    extraction: ExtractionResult
    alignment: AlignedModels
    deployment: DeploymentResult

    def summary(self, links: Links = PLAIN) -> list[str]:
        return [
            f"family member {self.name}:",
            *(
                f"  {line}"
                for part in (self.extraction, self.alignment, self.deployment)
                for line in part.summary(links)
            ),
        ]


class PipelineResult(StageResult):
    """Every stage's result, in pipeline order: what `trainonce pipeline` prints and the pipeline run keeps as its
    `pipeline-summary` artifact (the stage flows' own artifacts hold the details)."""

    pretrain: PretrainedSupernet
    extraction: ExtractionResult
    alignment: AlignedModels
    deployment: DeploymentResult
    family: list[FamilyMemberResult] = Field(default_factory=list)

    def summary(self, workdir: str) -> list[str]:
        """The supernet, the chosen sub-model, alignment, the exported candidate and the gate's decision (and
        the same for each other member of the family)."""
        also = "".join(f" --also {m.deployment.gate.model_name}" for m in self.family)
        return [
            *self.pretrain.summary(),
            *self.extraction.summary(),
            *self.alignment.summary(),
            *self.deployment.summary(),
            *(line for member in self.family for line in member.summary()),
            f"serve the champion: trainonce serve --workdir {workdir}{also}",
        ]
