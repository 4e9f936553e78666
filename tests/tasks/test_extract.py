"""Extraction stage: importance ranking with its effect, exact extraction, budgeted distillation."""

from pathlib import Path

import pytest
import torch

from models.checkpoint import load_model
from models.config import MoEConfig
from models.extract import extract_subnet
from models.moe import ElasticMoE
from models.subnet import ElasticSpace, Importance, SubnetSpec
from tasks.common.throughput import training_flops
from tasks.data.config import DataConfig
from tasks.data.corpus import PreparedData, prepare_data
from tasks.extract.config import ExtractConfig
from tasks.extract.distill import distill_subnet
from tasks.extract.extract import run_extract
from tasks.search.config import ImportanceConfig
from tasks.search.importance import rank_importance

CONFIG = MoEConfig(vocab_size=300, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, n_experts=8, expert_ffn_dim=32)
SPEC = SubnetSpec(layers=(0, 2, 3), experts=((0, 1, 2, 3),) * 3, top_k=1)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory, small_corpus: Path) -> PreparedData:
    return prepare_data(DataConfig(source=str(small_corpus), vocab_size=300, data_dir=tmp_path_factory.mktemp("d")))


def _supernet() -> ElasticMoE:
    torch.manual_seed(0)
    return ElasticMoE(CONFIG).eval()


def test_ranking_stores_measured_orders_and_reports_their_effect(data: PreparedData) -> None:
    model = _supernet()
    space = ElasticSpace(depths=(2, 4), expert_counts=(2, 8), top_ks=(1,))
    config = ImportanceConfig(calibration_batches=2, batch_size=4, eval_batches=2)
    scores, effect = rank_importance(model, data, config, space, seq_len=32)
    assert model.importance() == scores.importance() != Importance.identity(CONFIG)
    assert effect.spec_identity == space.smallest(CONFIG, Importance.identity(CONFIG))
    assert effect.spec_importance == space.smallest(CONFIG, scores.importance())
    assert effect.loss_importance > 0 and effect.loss_identity > 0


def test_without_distillation_the_saved_subnet_is_exactly_the_masked_supernet(tmp_path: Path, data) -> None:
    supernet = _supernet()
    result = run_extract(
        supernet, SPEC, data, ExtractConfig(distill=False, eval_batches=1, seq_len=32), 10_000, tmp_path
    )
    saved = load_model(result.model_dir).eval()
    tokens = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(saved(tokens).logits, supernet(tokens, subnet=SPEC).logits, atol=1e-5, rtol=0)
    assert (result.model_dir / "subnet_spec.json").read_text() == SPEC.model_dump_json()
    assert result.distill.steps == 0 and result.distill.val_loss_before == result.distill.val_loss_after


def test_distillation_spends_its_compute_budget_and_trains_the_student(data: PreparedData) -> None:
    supernet = _supernet()
    student = extract_subnet(supernet, SPEC)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    config = ExtractConfig(distill_compute_fraction=0.06, batch_size=4, seq_len=32, eval_batches=1)
    pretrain_tokens = 50_000
    result = distill_subnet(student, supernet, data, config, pretrain_tokens, curve_at=(0.02, 0.04, 0.5))
    tokens = config.batch_size * config.seq_len
    scratch = training_flops(student.config, [None], config.seq_len, pretrain_tokens)
    per_step = (
        training_flops(student.config, [None], config.seq_len, tokens)
        + training_flops(supernet.config, [None], config.seq_len, tokens) / 3
    )
    assert result.steps == int(0.06 * scratch // per_step) > 0
    assert 0.06 - per_step / scratch < result.compute_fraction <= 0.06
    # the budget curve: 2% and 4% (0.5 is beyond the budget), then the end; the last point is the final figure
    fractions = [f for f, _ in result.curve]
    assert len(fractions) == 3 and fractions[0] == pytest.approx(0.02, abs=per_step / scratch)
    assert fractions[1] == pytest.approx(0.04, abs=per_step / scratch) and fractions[2] == result.compute_fraction
    assert result.curve[-1][1] == result.val_loss_after
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())
