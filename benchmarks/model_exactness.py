"""Print the model's exactness figures: extraction vs masked supernet, expert paths, transformers parity.

    .venv/bin/python benchmarks/model_exactness.py [--config tiny] [--specs 200]

Numbers, not asserts: the tests assert tolerances; this prints the measured maxima for notes and README.
"""

from __future__ import annotations

import argparse
import random

import torch
from transformers import Ernie4_5_MoeConfig, Ernie4_5_MoeForCausalLM

from models.accounting import subnet_cost
from models.extract import extract_subnet
from models.hf import from_hf_state_dict, hf_config_dict, to_hf_state_dict
from models.moe import EXPERT_PATHS, ElasticMoE
from tasks.pipeline_config import load_pipeline_config


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--specs", type=int, default=200)
    args = parser.parse_args()
    torch.manual_seed(0)
    pretrain = load_pipeline_config(args.config).pretrain
    config = pretrain.model
    supernet = ElasticMoE(config).eval()
    for layer in supernet.layers[config.first_dense_layers :]:
        layer.mlp.gate.e_score_correction_bias.normal_(0.0, 0.05)
    tokens = torch.randint(0, config.vocab_size, (2, min(64, config.max_seq_len)))
    rng = random.Random(0)

    worst_logit, worst_count = 0.0, 0
    for _ in range(args.specs):
        spec = pretrain.elastic.sample(config, supernet.importance(), rng)
        sub = extract_subnet(supernet, spec).eval()
        worst_logit = max(worst_logit, (supernet(tokens, subnet=spec).logits - sub(tokens).logits).abs().max().item())
        worst_count = max(worst_count, abs(sub.num_parameters() - subnet_cost(config, spec).total_params))
    print(
        f"extraction over {args.specs} sampled sub-models: max |logit diff| = {worst_logit:.3e}, "
        f"max |param count - accounting| = {worst_count}"
    )

    reference = supernet(tokens).logits
    for impl in EXPERT_PATHS:
        other = ElasticMoE(config.model_copy(update={"expert_impl": impl})).eval()
        other.load_state_dict(supernet.state_dict())
        print(
            f"expert path {impl:<10} vs default: max |logit diff| = "
            f"{(other(tokens).logits - reference).abs().max().item():.3e}"
        )

    hf = Ernie4_5_MoeForCausalLM(Ernie4_5_MoeConfig(**hf_config_dict(config))).eval()
    hf.load_state_dict(to_hf_state_dict(supernet), strict=False)
    print(
        f"ours -> transformers Ernie4_5_MoeForCausalLM: max |logit diff| = "
        f"{(hf(tokens).logits - reference).abs().max().item():.3e}"
    )
    back = from_hf_state_dict(hf.config.to_dict(), hf.state_dict()).eval()
    print(f"transformers -> ours: max |logit diff| = {(back(tokens).logits - reference).abs().max().item():.3e}")
    cost = subnet_cost(config)
    print(
        f"supernet: {cost.total_params:,} params, {cost.active_params:,} active, "
        f"{cost.forward_flops_per_token:,} forward FLOPs/token at seq {config.max_seq_len}"
    )


if __name__ == "__main__":
    main()
