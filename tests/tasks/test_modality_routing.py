"""Routing made visible: which experts serve text and which serve image tokens. The counts and the purity figure
against hand counts, the measurement against an independent re-run of the router on captured hidden states, and a
pre-training run with images that logs the figures, the heatmap and the image-text validation loss."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models.config import MoEConfig
from models.moe import ElasticMoE, MoEBlock, image_mask, route_top_k
from tasks.common.stage_results import PretrainedSupernet
from tasks.data.corpus import PreparedData
from tasks.data.sampling import TrainingMix
from tasks.pipeline_config import load_pipeline_config
from tasks.pretrain.config import PretrainConfig
from tasks.pretrain.loop import run_pretrain
from tasks.pretrain.modality_routing import measure_modality_routing, modality_counts, modality_purity
from tasks.pretrain.validation_panel import VALIDATION_SEED


def test_counts_and_purity_by_hand() -> None:
    """6 tokens, top-1 over 3 experts: text tokens go to experts 0, 0, 1, 2 and the two image tokens to 2, 2.
    Normalised per modality: image a = (0, 0, 1), text b = (.5, .25, .25). Experts 0 and 1 are pure (weights .25
    and .125); expert 2 has p = 1 / 1.25 = .8 (weight .625). Purity = .25 + .125 + .625 x .8 = .875."""
    assignments = torch.tensor([[0], [0], [1], [2], [2], [2]])
    is_image = torch.tensor([False, False, False, False, True, True])
    counts = modality_counts(assignments, is_image, n_experts=3)
    assert counts.tolist() == [[2, 1, 1], [0, 0, 2]]
    assert modality_purity(counts) == pytest.approx(0.875)
    assert modality_purity(torch.tensor([[40, 20, 20, 0], [4, 2, 2, 0]])) == pytest.approx(0.5)  # agnostic
    assert modality_purity(torch.tensor([[30, 10, 0], [0, 0, 7]])) == pytest.approx(1.0)  # separated
    assert modality_purity(torch.tensor([[3, 1], [0, 0]])) == 0.5  # one modality only: nothing to tell apart


def test_two_slots_per_token_count_once_each() -> None:
    counts = modality_counts(torch.tensor([[0, 1], [1, 2]]), torch.tensor([False, True]), n_experts=3)
    assert counts.tolist() == [[1, 1, 0], [0, 1, 1]]


def test_only_the_codes_are_image_tokens() -> None:
    tokens = torch.tensor([[5, 400, 402, 529, 401, 7]])  # text, <image>, code 0, code 127, </image>, text
    assert image_mask(tokens, first_code=402, codes=128).tolist() == [[False, False, True, True, False, False]]


def test_the_measurement_equals_the_router_re_run_on_captured_hidden_states(tiny_config: MoEConfig) -> None:
    config = MoEConfig.model_validate({**tiny_config.model_dump(), "vocab_size": 160, "n_layers": 3})
    torch.manual_seed(0)
    model = ElasticMoE(config).eval()
    rng = np.random.default_rng(0)
    mix = TrainingMix(rng.integers(0, 100, 2000), rng.integers(100, 160, 2000), image_share=0.25)
    hidden: dict[int, torch.Tensor] = {}
    hooks = [
        layer.mlp.register_forward_pre_hook(lambda module, args: hidden.__setitem__(module.layer, args[0]))
        for layer in model.layers
        if isinstance(layer.mlp, MoEBlock)
    ]
    measured = measure_modality_routing(model, mix, image_tokens=(110, 50), batch_size=8, seq_len=32)
    for hook in hooks:
        hook.remove()
    tokens = mix.sample(8, 32, np.random.default_rng(VALIDATION_SEED)).reshape(-1)
    is_image = (tokens >= 110) & (tokens < 160)
    assert measured.layers == [1, 2] and measured.image_token_share == pytest.approx(float(is_image.float().mean()))
    for row, layer in enumerate(measured.layers):
        block = model.layers[layer].mlp
        _, _, chosen = route_top_k(
            hidden[layer].reshape(-1, 32), block.gate.weight, block.gate.e_score_correction_bias, 2, block.norm_min
        )
        for expert in range(6):
            text = int((chosen[~is_image] == expert).sum())
            image = int((chosen[is_image] == expert).sum())
            assert (measured.text_pairs[row][expert], measured.image_pairs[row][expert]) == (text, image)
            expected = image / (text + image) if text + image else None
            assert measured.image_fraction[row][expert] == pytest.approx(expected)
    pairs = zip(measured.text_pairs, measured.image_pairs, strict=True)
    by_layer = [modality_purity(torch.tensor([text, image])) for text, image in pairs]
    assert measured.mean_purity == pytest.approx(np.mean(by_layer))


@pytest.mark.parametrize("routing", ["shared", "heterogeneous"])
def test_pretraining_with_images_logs_the_image_loss_the_purity_and_the_heatmap(
    routing: str, tmp_path: Path, image_data: PreparedData
) -> None:
    """Both routings train on text and image-text rows: finite losses on both validation streams, and the purity
    figure (1.0 by construction when each pool serves one modality)."""
    base = load_pipeline_config("tiny").pretrain.model_dump()
    base["model"].update(vocab_size=530, n_layers=4, n_experts=8, image_token_range=(402, 128), routing=routing)
    base["elastic"].update(depths=[2, 3, 4], expert_counts=[2, 4, 6, 8], top_ks=[1, 2])
    if routing == "heterogeneous":
        base["model"].update(n_image_experts=4, orthogonal_loss_coef=0.01)
        base["elastic"].update(expert_counts=[2, 4])  # per pool of 4
    config = PretrainConfig.model_validate(
        {**base, "max_steps": 10, "eval_interval": 5, "batch_size": 8, "seq_len": 64, "optim": {"warmup_steps": 2}}
    )
    result = run_pretrain(config, image_data, tmp_path / "run")
    assert set(result.image_val_loss) == set(result.val_loss)
    assert all(np.isfinite(loss) for loss in result.image_val_loss.values())
    modality = result.modality_routing
    assert modality is not None and modality["layers"] == [0, 1, 2, 3] and 0.5 <= modality["mean_purity"] <= 1.0
    if routing == "heterogeneous":
        assert modality["mean_purity"] == 1.0
        assert all(f in (None, 0.0) for row in modality["image_fraction"] for f in row[:4])  # the text pool
        assert all(f in (None, 1.0) for row in modality["image_fraction"] for f in row[4:])  # the image pool
    assert (tmp_path / "run" / "routing_modality_heatmap.png").stat().st_size > 10_000
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evaluated = [r for r in records if "routing/mean_modality_purity" in r]
    assert [r["step"] for r in evaluated] == [5, 10]
    assert {"val_image_loss/full", "routing/modality_purity_layer_3"} <= set(evaluated[-1])

    summary = PretrainedSupernet(
        model_uri="models:/trainonce-supernet/1",
        data_dir=str(image_data.directory),
        run_id="r",
        checkpoint_dir="c",
        val_loss=result.val_loss,
        tokens_per_second=1.0,
        mfu=0.1,
        image_val_loss=result.image_val_loss,
        modality_routing=modality,
    ).summary()
    assert any("image-text validation loss" in line for line in summary)
    assert any(f"mean purity {modality['mean_purity']:.3f}" in line for line in summary)
    assert sum(line.startswith("  | 3 |") for line in summary) == 1  # the last MoE layer's row of the table
