"""Stage results: what a stage hands the next survives Prefect's JSON result cache, and its summary keeps what was
asked apart from what was achieved."""

from __future__ import annotations

import math

import pytest
from prefect.serializers import JSONSerializer

from tasks.common.stage_results import (
    AlignedModels,
    DeploymentResult,
    ExportedCandidate,
    ExtractedSubnet,
    ExtractionResult,
    GateOutcome,
    HuggingFaceExport,
    Links,
    OnnxParity,
    PipelineResult,
    PretrainedSupernet,
    RankingCheck,
    SearchOutcome,
    SubnetAchieved,
    SubnetBudget,
)

SCORES = {
    "val_nll": 4.0,
    "val_ppl": 54.6,
    "accuracy": {"copy": 0.5, "overall": 0.5},
    "tokens_per_second": 900.0,
    "size_bytes": 123_456,
}
PRETRAINED = PretrainedSupernet(
    model_uri="models:/trainonce-supernet/1",
    data_dir="/data",
    version="1",
    run_id="abc123",
    checkpoint_dir="/ckpt",
    val_loss={"full": 3.21, "L2 E4 k1": 3.5},
    tokens_per_second=12_345.6,
    mfu=0.0123,
)
SEARCH = SearchOutcome(
    ranked_supernet_dir="/ranked",
    spec_json="{}",
    subnet="L3 E4 k1",
    layers=[0, 1, 3],
    total_params=475_000,
    active_params=183_000,
    val_loss=3.4567,
    limits={"total_params": 475_869.44, "active_params": 183_712.0},
    method="exhaustive",
    space_size=32,
    run_id="def456",
    candidates=[
        {"subnet": "L3 E4 k1", "val_loss": 3.4567, "val_loss_stderr": math.inf},
        {"subnet": "L3 E8 k1", "val_loss": 3.4601, "val_loss_stderr": 0.001},
    ],
    margin="0.0034 ± 0.0010 nats better than the runner-up L3 E8 k1 (...; beyond the noise)",
    ranking=RankingCheck(subnet="L2 E4 k1", val_loss_importance_order=3.6, val_loss_identity_order=3.9),
)
EXTRACTED = ExtractedSubnet(
    model_uri="models:/trainonce-subnet/1",
    version="1",
    model_dir="/subnet",
    subnet="L3 E4 k1",
    parent_model="trainonce-supernet/1",
    budget=SubnetBudget(total_params=475_869.44, active_params=183_712.0, distill_compute_fraction=0.06),
    achieved=SubnetAchieved(
        total_params=475_000,
        active_params=183_000,
        total_params_fraction=0.3394,
        active_params_fraction=0.4981,
        val_loss_before_distill=3.9876,
        val_loss_after_distill=3.5432,
        distill_steps=12,
        distill_compute_fraction=0.0587,
    ),
)
ALIGNED = AlignedModels(
    sft_uri="models:/trainonce-chat-torch/1",
    dpo_uri="models:/trainonce-chat-torch/2",
    parent_model="trainonce-subnet/1",
    reward_accuracy=0.75,
    pairs={"corrupted": 40},
    accuracy={
        "base": {"copy": 0.0, "overall": 0.0},
        "sft": {"copy": 0.5, "overall": 0.5},
        "dpo": {"copy": 0.625, "overall": 0.625},
    },
)
DEPLOYED = DeploymentResult(
    export=ExportedCandidate(
        model_uri="models:/trainonce-chat/1",
        version="1",
        candidate="int8",
        package_dir="/int8",
        table="| variant | size (KB) |\n|---|---|\n| fp32 | 1,000 |\n| int8 (candidate) | 300 |",
        parity=OnnxParity(max_abs_logit_diff=2.5e-6, greedy_tokens_equal=True),
        evaluations={"fp32": SCORES, "int8": SCORES},
    ),
    hugging_face=HuggingFaceExport(model_uri="models:/trainonce-chat-hf/1", version="1", directory="/hf"),
    gate=GateOutcome(
        promoted=True,
        reasons=["no champion yet, promoting the first candidate"],
        candidate_version="1",
        champion_version="1",
        previous_champion_version=None,
        candidate_scores=SCORES,
        champion_scores=None,
    ),
)
EXTRACTION = ExtractionResult(search=SEARCH, subnet=EXTRACTED)
PIPELINE = PipelineResult(pretrain=PRETRAINED, extraction=EXTRACTION, alignment=ALIGNED, deployment=DEPLOYED)
RESULTS = [PRETRAINED, SEARCH, EXTRACTED, EXTRACTION, ALIGNED, DEPLOYED]


@pytest.mark.parametrize("result", [*RESULTS, PIPELINE], ids=lambda result: type(result).__name__)
def test_results_survive_the_json_result_cache(result) -> None:
    """The stage tasks persist their results with Prefect's JSON serializer (flows/stages.py `cached`): a re-run
    reads back the same typed result, an infinite standard error (one validation batch) included."""
    serializer = JSONSerializer()
    assert serializer.loads(serializer.dumps(result)) == result


def test_an_extracted_subnet_names_what_was_asked_apart_from_what_was_achieved() -> None:
    assert EXTRACTED.summary() == [
        "sub-model L3 E4 k1 registered as models:/trainonce-subnet/1 from trainonce-supernet/1: 475,000 params "
        "(33.9%), 183,000 active (49.8%); val loss 3.9876 extracted -> 3.5432 after 12 distillation steps (5.9% of "
        "from-scratch compute, 6.0% asked)"
    ]
    off = EXTRACTED.model_copy(update={"budget": SubnetBudget(total_params=475_869.44)})
    assert off.summary()[0].endswith("(5.9% of from-scratch compute, distillation off)")


def test_pretrained_supernet_from_init_from_without_training() -> None:
    imported = PretrainedSupernet(model_uri="models:/trainonce-supernet/1", data_dir="/data")
    assert imported.summary() == ["supernet models:/trainonce-supernet/1 (init_from, no continued pre-training)"]


def test_details_are_indented_below_their_headline() -> None:
    """A summary is a headline and detail lines indented by two spaces, so stage summaries concatenate into the
    pipeline's and the stage flows can put a blank line before the details of their markdown artifacts."""
    for result in (PRETRAINED, SEARCH, EXTRACTED, ALIGNED, DEPLOYED.export, DEPLOYED.hugging_face, DEPLOYED.gate):
        headline, *details = result.summary()
        assert not headline.startswith(" ") and all(line.startswith("  ") for line in details)
    assert PRETRAINED.summary()[1:] == [
        "  | sub-model | validation loss |",
        "  | --- | --- |",
        "  | full | 3.2100 |",
        "  | L2 E4 k1 | 3.5000 |",
    ]


class Bracketed(Links):
    def model(self, ref: str) -> str:
        return f"<{ref}>"

    def run(self, run_id: str) -> str:
        return f"<run {run_id}>"


def test_links_render_every_registered_model_and_run() -> None:
    """The stage flows' artifacts link what a summary names to the MLflow UI through `links`."""
    text = "\n".join(line for result in RESULTS for line in result.summary(Bracketed()))
    for ref in (
        "models:/trainonce-supernet/1",
        "trainonce-supernet/1",
        "models:/trainonce-subnet/1",
        "trainonce-subnet/1",
        "models:/trainonce-chat-torch/2",
        "models:/trainonce-chat/1",
        "trainonce-chat/1",
        "models:/trainonce-chat-hf/1",
    ):
        assert f"<{ref}>" in text
    assert "<run abc123>" in text and "<run def456>" in text


def test_the_pipeline_summary_is_the_stage_summaries_in_order() -> None:
    """`trainonce pipeline` prints it and the pipeline run keeps it as an artifact; the end-to-end tests and the
    README quote some of its lines."""
    lines = PIPELINE.summary("/runs/pipeline")
    stages = [
        *PRETRAINED.summary(),
        *SEARCH.summary(),
        *EXTRACTED.summary(),
        *ALIGNED.summary(),
        *DEPLOYED.export.summary(),
        *DEPLOYED.hugging_face.summary(),
        *DEPLOYED.gate.summary(),
    ]
    assert lines == [*stages, "serve the champion: trainonce serve --workdir /runs/pipeline"]
    text = "\n".join(lines)
    assert text.startswith("supernet registered as models:/trainonce-supernet/1 (from scratch; MLflow run abc123")
    assert f"  the search's choice is {SEARCH.margin}" in lines
    assert "transformers directory registered as models:/trainonce-chat-hf/1" in text
    assert "trainonce-chat@champion = version 1" in text
