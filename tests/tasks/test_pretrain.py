"""Elastic pre-training: config validation before compute, and a short real run that learns."""

import pickle
import re
import shutil
from io import BytesIO
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from torch.distributed.checkpoint import CheckpointException

from models.accounting import subnet_cost
from models.checkpoint import load_model
from models.moe import ElasticMoE
from models.subnet import Importance
from tasks.common.optim import cosine_with_warmup, warmup_factor
from tasks.data.config import DataConfig
from tasks.data.corpus import PreparedData, prepare_data
from tasks.pipeline_config import load_pipeline_config
from tasks.pretrain.config import PretrainConfig
from tasks.pretrain.loop import run_pretrain
from tasks.pretrain.sharding import _IndexUnpickler, load_sharded
from tasks.pretrain.step import plan_for_step
from tasks.pretrain.validation_panel import MetricsHistory, evaluation_panel

# Sub-models from the first step to the last (the tiny preset's recipe delays them and ends with the full model alone)
UNDELAYED = {"elastic_start": 0.0, "ramp": 0.0, "elastic_end": 1.0}


def _tiny_pretrain(**overrides) -> PretrainConfig:
    """The tiny preset's loop settings on a smaller 4-layer, 8-expert supernet (fast enough for many tests)."""
    base = load_pipeline_config("tiny").pretrain.model_dump()
    base["model"].update(vocab_size=400, n_layers=4, n_experts=8)
    base["elastic"].update(depths=[2, 3, 4], expert_counts=[2, 4, 6, 8], top_ks=[1, 2])
    return PretrainConfig.model_validate({**base, **overrides})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"seq_len": 512}, "seq_len=512 exceeds model.max_seq_len=256"),
        ({"elastic": {"depths": [2, 6], "expert_counts": [2, 4], "top_ks": [1]}}, "elastic: depths: 6 exceeds"),
        ({"max_steps": 5, "optim": {"warmup_steps": 5}}, "optim.warmup_steps=5 must be < max_steps=5"),
        ({"sampling": {"policy": "everything"}}, "sampling.policy"),
        ({"batch_size": 0}, "batch_size"),
        ({"precision": "fp16", "launch": {"sharding": "fsdp2"}}, "precision=fp16 with launch.sharding=fsdp2"),
    ],
)
def test_bad_pretrain_config_is_rejected(overrides: dict, message: str) -> None:
    with pytest.raises(ValidationError) as error:
        _tiny_pretrain(**overrides)
    assert message in str(error.value).replace("\n  ", ".")


def test_pipeline_rejects_vocab_mismatch() -> None:
    with pytest.raises(ValidationError, match="must equal data.vocab_size=1024"):
        load_pipeline_config("tiny", {"pretrain.model.vocab_size": 1000})


def test_presets_are_valid() -> None:
    for preset in ("tiny", "small", "claim", "elastify", "tiny-grpo", "tiny-images", "tiny-images-het"):
        config = load_pipeline_config(preset)
        assert config.data.vocab_size == config.pretrain.model.vocab_size
    with_images = load_pipeline_config("tiny-images")
    assert with_images.data.text_vocab_size() == load_pipeline_config("tiny").data.vocab_size  # tiny's BPE, reused
    with_grpo = load_pipeline_config("tiny-grpo")
    assert with_grpo.grpo.enabled and with_grpo.pretrain == load_pipeline_config("tiny").pretrain
    claim = load_pipeline_config("claim").pretrain
    tokens = claim.tokens_per_step() * claim.total_steps()
    assert tokens >= 20 * subnet_cost(claim.model).active_params  # the compute-optimal regime the claim needs
    presets = "'claim', 'elastify', 'small', 'tiny', 'tiny-grpo', 'tiny-images', 'tiny-images-het'"
    with pytest.raises(FileNotFoundError, match=re.escape(f"available: [{presets}]")):
        load_pipeline_config("huge")


def test_sampling_policies(tiny_config) -> None:
    model = ElasticMoE(tiny_config)
    elastic = {"depths": [2, 4], "expert_counts": [2, 6], "top_ks": [1, 2]}
    full = plan_for_step(_tiny_pretrain(elastic=elastic, sampling={"policy": "full", **UNDELAYED}), model, 0).members
    assert full == [None]
    rand = plan_for_step(_tiny_pretrain(elastic=elastic, sampling={"policy": "random", **UNDELAYED}), model, 0).members
    assert rand[0] is None and len(rand) == 2
    config = _tiny_pretrain(elastic=elastic, sampling={"policy": "sandwich", "n_random": 3, **UNDELAYED})
    sandwich = plan_for_step(config, model, 0).members
    assert sandwich[0] is None and len(sandwich) == 5
    assert sandwich[1] == config.elastic.smallest(tiny_config, model.importance())


def test_schedule_warms_up_then_decays() -> None:
    config = _tiny_pretrain(max_steps=100, optim={"lr": 1e-3, "warmup_steps": 10, "min_lr_ratio": 0.1})
    factor = cosine_with_warmup(config.optim, config.max_steps)
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(55) == pytest.approx(0.55) and factor(100) == pytest.approx(0.1)


def test_a_warmup_alone_rises_linearly_then_holds() -> None:  # DPO's schedule (dpo.warmup_steps)
    assert [warmup_factor(step, 4) for step in (0, 1, 3, 50)] == [0.25, 0.5, 1.0, 1.0]
    assert warmup_factor(0, 0) == 1.0  # no warm-up: the full learning rate from the first step


def test_short_run_learns_and_saves_a_loadable_supernet(tmp_path: Path, small_data: PreparedData) -> None:
    data = small_data
    config = _tiny_pretrain(
        max_steps=40, batch_size=8, seq_len=64, eval_interval=20, checkpoint_interval=20, optim={"warmup_steps": 4}
    )
    result = run_pretrain(config, data, tmp_path / "run")
    assert (result.steps, result.resumed_from) == (40, 0)
    uniform = torch.log(torch.tensor(400.0)).item()  # loss of an untrained model is about ln(V)
    assert result.train_loss < uniform - 0.8
    assert set(result.val_loss) == {"full", "L2 E2 k1", "L3 E2 k1", "L3 E6 k2"}  # smallest .. largest
    assert all(loss < uniform - 0.5 for loss in result.val_loss.values())  # the whole family learned
    assert result.tokens_per_second > 0 and 0 < result.mfu < 1
    assert load_model(result.checkpoint_dir).config == config.model
    assert [p.name for p in sorted((tmp_path / "run" / "checkpoints").iterdir())] == ["step_00000020", "step_00000040"]
    assert result.loss_curve is not None and result.loss_curve.read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "run" / "routing_heatmap.png").read_bytes()[:4] == b"\x89PNG"


def test_a_sharded_checkpoint_resumes_only_sharded(tmp_path: Path, small_data: PreparedData) -> None:
    """Under fsdp2 the checkpoint is torch.distributed.checkpoint's (one process writes it too, so that N processes
    can resume it); a run asking for the other sharding is refused before it trains, and nothing is changed."""
    steps = {"max_steps": 4, "batch_size": 8, "seq_len": 64, "checkpoint_interval": 2, "optim": {"warmup_steps": 1}}
    sharded = run_pretrain(_tiny_pretrain(**steps, launch={"sharding": "fsdp2"}), small_data, tmp_path)
    checkpoint = tmp_path / "checkpoints" / "step_00000004"
    assert (checkpoint / "__0_0.distcp").is_file() and not (checkpoint / "model.safetensors").exists()
    before = load_model(sharded.checkpoint_dir).state_dict()
    with pytest.raises(ValueError, match="sharding=fsdp2; resume it with the same sharding, not ddp"):
        run_pretrain(_tiny_pretrain(**steps), small_data, tmp_path)
    again = run_pretrain(_tiny_pretrain(**steps, launch={"sharding": "fsdp2"}), small_data, tmp_path)
    assert again.resumed_from == 4
    for name, tensor in load_model(again.checkpoint_dir).state_dict().items():
        assert torch.equal(tensor, before[name]), name

    # a checkpoint folder from elsewhere: its index may hold only what torch writes there, never a call to run
    crafted, ran = tmp_path / "crafted", tmp_path / "code-ran"
    shutil.copytree(checkpoint, crafted)
    (crafted / ".metadata").write_bytes(pickle.dumps(_Touches(ran)))
    model = ElasticMoE(_tiny_pretrain().model)
    with pytest.raises(CheckpointException, match="may not name pathlib.Path.touch"):
        load_sharded(model, torch.optim.AdamW(model.parameters()), crafted)
    assert not ran.exists()
    index = _IndexUnpickler(BytesIO())
    assert index.find_class("pathlib._local", "PosixPath") is Path  # the checkpoint's own path, pickled by 3.13


class _Touches:
    """Unpickled with plain pickle, creates `path`: what a crafted checkpoint index could do."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.path,))


def test_a_supernet_continues_only_on_data_tokenized_with_its_vocabulary(
    tmp_path: Path, small_corpus: Path, small_data: PreparedData
) -> None:
    """Continuing weights on text tokenized with another vocabulary would read every id as another token: an explicit
    parent is refused, a warm start is skipped, and a retrain's data is prepared with the supernet's tokenizer."""
    import dataclasses

    from registry.tracking import RunLogger
    from tasks.pretrain.task import (
        parent_supernet,
        register_pretrained,
        retrain_data_config,
        same_vocabulary,
        warm_start_source,
    )

    config = _tiny_pretrain(max_steps=2, eval_interval=2, batch_size=4, seq_len=32, optim={"warmup_steps": 1})
    workdir = tmp_path / "workdir"
    logger = RunLogger(workdir, run_name="pretrain")
    result = run_pretrain(config, small_data, tmp_path / "run")
    register_pretrained(dataclasses.replace(result, mlflow_run_id=logger.run_id), config, small_data, workdir)
    logger.finish()

    play = next(small_corpus.iterdir())  # other text: its own BPE of the same size is another vocabulary
    (tmp_path / "new" / play.name).parent.mkdir()
    (tmp_path / "new" / play.name).write_text(play.read_text()[::-1])
    new_text = DataConfig(source=str(tmp_path / "new"), vocab_size=400, data_dir=str(tmp_path / "data"))
    own_vocabulary = prepare_data(new_text)
    assert not same_vocabulary(own_vocabulary.tokenizer_path, small_data.tokenizer_path)
    with pytest.raises(ValueError, match="parent: trainonce-supernet/1 was trained with another tokenizer"):
        parent_supernet("trainonce-supernet/1", own_vocabulary, workdir)
    assert warm_start_source(config, own_vocabulary, workdir) is None

    retrain = prepare_data(retrain_data_config(new_text, config, workdir))
    assert same_vocabulary(retrain.tokenizer_path, small_data.tokenizer_path)
    assert warm_start_source(config, retrain, workdir).version.version == "1"


def test_metrics_history_resumes_past_a_line_torn_by_a_kill(tmp_path: Path) -> None:
    """A kill mid-append leaves half a line: the restart drops it (and the points after its checkpoint) instead of
    refusing to resume."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 10, "train/loss_full": 5.0}\n{"step": 20, "train/loss_full": 4.0}\n{"step": 30, "tra')
    history = MetricsHistory(path, resume_step=10)
    history.append({"step": 20, "train/loss_full": 3.9})
    assert history.curves()[0] == [(10, 5.0), (20, 3.9)]
    assert MetricsHistory(path, resume_step=20).records == history.records


def test_token_budget_sets_the_step_count() -> None:
    config = _tiny_pretrain(max_steps=None, max_tokens=10_000, batch_size=4, seq_len=64, grad_accum=2)
    assert config.tokens_per_step() == 512 and config.total_steps() == 20  # ceil(10000 / 512)
    assert config.rows_of_process(2, 1) == slice(2, 4)  # the batch is global: 2 of its 4 rows on process 1
    with pytest.raises(ValueError, match="pretrain.batch_size=4 must be a multiple of the 3 processes"):
        config.rows_of_process(3, 0)
    with pytest.raises(ValidationError, match="set exactly one of max_steps and max_tokens"):
        _tiny_pretrain(max_steps=10, max_tokens=1000)


def test_panel_is_fixed_and_ordered_by_size(tiny_config) -> None:
    config = _tiny_pretrain(
        elastic={"depths": [2, 3, 4], "expert_counts": [2, 4, 6], "top_ks": [1, 2]}, eval_panel_size=3
    )
    panel = evaluation_panel(config, ElasticMoE(tiny_config))
    assert list(panel)[0] == "full" and panel["full"] is None
    assert len(panel) == 5 and list(panel)[1] == "L2 E2 k1"


def test_vocab_mismatch_with_prepared_data_fails_before_training(tmp_path: Path, small_corpus: Path) -> None:
    data = prepare_data(DataConfig(source=str(small_corpus), vocab_size=500, data_dir=tmp_path))
    with pytest.raises(ValueError, match=r"model.vocab_size=400 is smaller than the tokenizer's vocabulary \(500\)"):
        run_pretrain(_tiny_pretrain(), data, tmp_path / "run")


def test_reranking_during_training_stores_the_measured_order(tmp_path: Path, small_data: PreparedData) -> None:
    data = small_data
    config = _tiny_pretrain(
        max_steps=20, batch_size=4, seq_len=32, rerank_interval=10, eval_interval=20, optim={"warmup_steps": 2}
    )
    result = run_pretrain(config, data, tmp_path / "run")
    importance = load_model(result.checkpoint_dir).importance()
    assert importance != Importance.identity(config.model)  # 8 experts per layer: identity is vanishingly unlikely
    importance.check_fits(config.model)


def test_a_setting_added_later_leaves_earlier_runs_identity_unchanged() -> None:
    """`sampling.elastic_end` and the routing fields did not exist when earlier runs were checkpointed: at the values
    those runs trained with they are left out of the run's identity, so their checkpoints still resume; any other
    value is a different run."""
    import hashlib

    tiny = load_pipeline_config("tiny").pretrain
    config = tiny.model_copy(update={"sampling": tiny.sampling.model_copy(update={"elastic_end": 1.0})})
    routing = {"routing", "image_token_range", "n_image_experts", "orthogonal_loss_coef"}
    earlier = config.model_dump_json(exclude={"launch": True, "sampling": {"elastic_end"}, "model": routing})
    assert '"elastic_end"' not in earlier and '"elastic_start"' in earlier and '"routing"' not in earlier
    assert config.config_hash("fp") == hashlib.sha256((earlier + "fp").encode()).hexdigest()
    annealed = config.model_copy(update={"sampling": config.sampling.model_copy(update={"elastic_end": 0.9})})
    assert annealed.config_hash("fp") != config.config_hash("fp")
    orthogonal = config.model_copy(update={"model": config.model.model_copy(update={"orthogonal_loss_coef": 0.01})})
    assert orthogonal.config_hash("fp") != config.config_hash("fp")
