"""The claim benchmark's recipes (benchmarks/train_once.py --recipe NAME): each a set of config overrides, no code
forks. docs/claim.md says what each recipe measured."""

from __future__ import annotations

# Each recipe is a set of config overrides (KEY=VALUE as --set takes them): no code forks. Every recipe starts from
# NEUTRAL, so that it means the same whatever the preset's own recipe is.
NEUTRAL: dict[str, object] = {
    "pretrain.elastic.layer_sampling": "random",
    "pretrain.elastic.expert_sampling": "random",
    "pretrain.elastic.expert_ranking": "routing_mass",
    "pretrain.rerank_interval": None,
    "pretrain.sampling.policy": "sandwich",
    "pretrain.sampling.distill_weight": 1.0,
    "pretrain.sampling.subnet_lm_weight": 1.0,
    "pretrain.sampling.elastic_start": 0.0,
    "pretrain.sampling.ramp": 0.0,
    "pretrain.sampling.elastic_end": 1.0,
    "pretrain.sampling.dimension_order": "together",
    "pretrain.sampling.size_skew": 0.0,
    "pretrain.sampling.project_conflicts": False,
    "pretrain.sampling.elastic_lr": None,
    "extract.optim.lr": 1.0e-3,  # the distillation learning rate before the claim was measured
}


RECIPES: dict[str, dict[str, object]] = {
    # what the presets did before the claim was measured: random layers and experts from step 0, equal weights
    "random": {},
    # nested, importance-ordered prefixes for layers and experts (MatFormer, Once-for-All, Nemotron Elastic)
    "nested": {"pretrain.elastic.layer_sampling": "nested", "pretrain.elastic.expert_sampling": "nested"},
    # ... re-ranked by REAP saliency during training
    "nested_reap": {
        "pretrain.elastic.layer_sampling": "nested",
        "pretrain.elastic.expert_sampling": "nested",
        "pretrain.elastic.expert_ranking": "reap",
        "pretrain.rerank_interval": 500,
    },
    # delayed shrinking: the full model alone for half the run, sub-models ramped in (DepS)
    "nested_delayed": {
        "pretrain.elastic.layer_sampling": "nested",
        "pretrain.elastic.expert_sampling": "nested",
        "pretrain.sampling.elastic_start": 0.5,
        "pretrain.sampling.ramp": 0.1,
    },
    # ... opening top-k, then experts, then depth (Once-for-All's progressive shrinking)
    "nested_progressive": {
        "pretrain.elastic.layer_sampling": "nested",
        "pretrain.elastic.expert_sampling": "nested",
        "pretrain.sampling.elastic_start": 0.5,
        "pretrain.sampling.dimension_order": "progressive",
    },
    # the full model favoured: half-weight sub-model LM loss, larger members drawn more often (Nemotron Elastic)
    "nested_favour_full": {
        "pretrain.elastic.layer_sampling": "nested",
        "pretrain.elastic.expert_sampling": "nested",
        "pretrain.sampling.subnet_lm_weight": 0.5,
        "pretrain.sampling.size_skew": 1.0,
    },
    # the full model protected: sub-model losses (LM and in-place distillation) at 0.3 of the full model's, from step
    # 0 or after a delayed start (with Adam, equal weights leave the full model a third of each shared update)
    "nested_light": {
        "pretrain.elastic.layer_sampling": "nested",
        "pretrain.elastic.expert_sampling": "nested",
        "pretrain.sampling.subnet_lm_weight": 0.3,
        "pretrain.sampling.distill_weight": 0.3,
    },
    "nested_delayed_light": {
        "pretrain.elastic.layer_sampling": "nested",
        "pretrain.elastic.expert_sampling": "nested",
        "pretrain.sampling.elastic_start": 0.5,
        "pretrain.sampling.ramp": 0.1,
        "pretrain.sampling.subnet_lm_weight": 0.3,
        "pretrain.sampling.distill_weight": 0.3,
    },
    # a later start (the last quarter elastic), with equal or light sub-model weights: how much elastic training do
    # the members need, and how much does the full model recover?
    "nested_late": {
        "pretrain.elastic.layer_sampling": "nested",
        "pretrain.elastic.expert_sampling": "nested",
        "pretrain.sampling.elastic_start": 0.75,
        "pretrain.sampling.ramp": 0.1,
    },
    "nested_late_light": {
        "pretrain.elastic.layer_sampling": "nested",
        "pretrain.elastic.expert_sampling": "nested",
        "pretrain.sampling.elastic_start": 0.75,
        "pretrain.sampling.ramp": 0.1,
        "pretrain.sampling.subnet_lm_weight": 0.3,
        "pretrain.sampling.distill_weight": 0.3,
    },
    # the full model alone again for the last 10% of the run (the low-learning-rate end of the schedule): the
    # sub-models' pull on the shared weights stops before the full model's final annealing
    "nested_delayed_anneal": {
        "pretrain.elastic.layer_sampling": "nested",
        "pretrain.elastic.expert_sampling": "nested",
        "pretrain.sampling.elastic_start": 0.5,
        "pretrain.sampling.ramp": 0.1,
        "pretrain.sampling.elastic_end": 0.9,
    },
    "nested_delayed_light_anneal": {
        "pretrain.elastic.layer_sampling": "nested",
        "pretrain.elastic.expert_sampling": "nested",
        "pretrain.sampling.elastic_start": 0.5,
        "pretrain.sampling.ramp": 0.1,
        "pretrain.sampling.elastic_end": 0.9,
        "pretrain.sampling.subnet_lm_weight": 0.3,
        "pretrain.sampling.distill_weight": 0.3,
    },
    # in-place distillation kept at full weight, the sub-models' own LM loss light: is it the LM loss of the
    # sub-models that pulls the shared weights away from the full model, or any sub-model loss?
    "nested_delayed_kd_anneal": {
        "pretrain.elastic.layer_sampling": "nested",
        "pretrain.elastic.expert_sampling": "nested",
        "pretrain.sampling.elastic_start": 0.5,
        "pretrain.sampling.ramp": 0.1,
        "pretrain.sampling.elastic_end": 0.9,
        "pretrain.sampling.subnet_lm_weight": 0.3,
        "pretrain.sampling.distill_weight": 1.0,
    },
    # ... no sub-model LM loss at all (sub-models learn from the full model's logits only, as Once-for-All and
    # BigNAS train them), and the same with a longer full-model-alone end (the last 20%)
    "nested_delayed_kd0_anneal": {
        "pretrain.elastic.layer_sampling": "nested",
        "pretrain.elastic.expert_sampling": "nested",
        "pretrain.sampling.elastic_start": 0.5,
        "pretrain.sampling.ramp": 0.1,
        "pretrain.sampling.elastic_end": 0.9,
        "pretrain.sampling.subnet_lm_weight": 0.0,
        "pretrain.sampling.distill_weight": 1.0,
    },
    "nested_delayed_kd_anneal80": {
        "pretrain.elastic.layer_sampling": "nested",
        "pretrain.elastic.expert_sampling": "nested",
        "pretrain.sampling.elastic_start": 0.5,
        "pretrain.sampling.ramp": 0.1,
        "pretrain.sampling.elastic_end": 0.8,
        "pretrain.sampling.subnet_lm_weight": 0.3,
        "pretrain.sampling.distill_weight": 1.0,
    },
    # gradient surgery for the full model (NASViT): the sub-models' conflicting gradient components are removed
    "nested_delayed_surgery": {
        "pretrain.elastic.layer_sampling": "nested",
        "pretrain.elastic.expert_sampling": "nested",
        "pretrain.sampling.elastic_start": 0.5,
        "pretrain.sampling.ramp": 0.1,
        "pretrain.sampling.project_conflicts": True,
    },
    # elastify a trained parent: the full model alone for 90% of the tokens, then a 10% elastic phase with its own
    # learning-rate schedule (Flextron: 7.63%)
    "elastify": {
        "pretrain.elastic.layer_sampling": "nested",
        "pretrain.elastic.expert_sampling": "nested",
        "pretrain.sampling.elastic_start": 0.9,
        "pretrain.sampling.elastic_lr": 0.3,
    },
}


# Distillation after extraction; combine with a training recipe as `--recipe nested+kl_only` (the elastic run is
# the cached one of `nested`, only the distillations run again).
RECIPES.update(
    {
        "kl_only": {"extract.ce_weight": 0.0},  # Minitron distils with logit KL alone
        "kd_t2": {"extract.temperature": 2.0},
        "distill_lr_low": {"extract.optim.lr": 3.0e-4},  # NVIDIA's guidance: about 1/5 of the pre-training peak
    }
)
# Compute fractions of a twin's training at which distillation also measures the member: the budget curve.
BUDGET_CURVE = (0.005, 0.01, 0.02, 0.03, 0.04)


def recipe_overrides(name: str) -> dict[str, object]:
    """The config overrides of a recipe name such as `nested_delayed+kl_only`."""
    overrides: dict[str, object] = dict(NEUTRAL)
    for part in name.split("+"):
        if part not in RECIPES:
            raise SystemExit(f"--recipe: unknown recipe {part!r}; known: {', '.join(sorted(RECIPES))}")
        overrides.update(RECIPES[part])
    return overrides
