"""GRPO's math on hand-computed cases: group advantages, the clipped surrogate (GRPO and DAPO averaging, symmetric
and asymmetric clipping), the k3 KL estimate; and sampled groups with the KV cache."""

import math

import pytest
import torch

from models.generate import greedy_generate, sample_group
from models.losses import clipped_policy_loss, group_advantages, group_weights, kl_to_reference
from models.moe import ElasticMoE
from models.sampling import Sampler, SamplingParams, choice_generators


def test_group_advantages_centre_and_scale_within_each_group() -> None:
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    std = math.sqrt(4 * 0.25 / 3)  # the sample standard deviation of (1, 0, 0, 1)
    expected = torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(group_advantages(rewards, scale=False), expected)
    torch.testing.assert_close(group_advantages(rewards), expected / torch.tensor([[std + 1e-4], [1.0]]))
    assert group_advantages(rewards)[1].abs().max() == 0  # equal rewards: no signal


def test_clipped_surrogate_by_hand() -> None:
    ratios = torch.tensor([[1.5, 0.5], [1.5, 1.0]])
    logprobs, old = torch.log(ratios), torch.zeros(2, 2)
    advantages = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[True, True], [True, False]])
    # row 0 (A = +1): min(1.5, clip 1.2) -> -1.2; min(0.5, 0.8) -> -0.5. Row 1 (A = -1): min(-1.5, -1.2) -> +1.5
    grpo = clipped_policy_loss(logprobs, old, advantages, mask)
    assert grpo.item() == pytest.approx(((-1.2 - 0.5) / 2 + 1.5) / 2)
    dapo = clipped_policy_loss(logprobs, old, advantages, mask, token_level=True)
    assert dapo.item() == pytest.approx((-1.2 - 0.5 + 1.5) / 3)
    asymmetric = clipped_policy_loss(logprobs, old, advantages, mask, clip_low=0.2, clip_high=0.28)
    assert asymmetric.item() == pytest.approx(((-1.28 - 0.5) / 2 + 1.5) / 2)
    # on-policy (ratio 1) the gradient is the advantage-weighted score function, averaged per answer
    current = torch.zeros(2, 2, requires_grad=True)
    clipped_policy_loss(current, old, advantages, mask).backward()
    torch.testing.assert_close(current.grad, torch.tensor([[-0.25, -0.25], [0.5, 0.0]]))


@pytest.mark.parametrize("token_level", [False, True])
def test_groups_weighed_into_a_step_give_the_loss_of_the_whole_batch_at_once(token_level: bool) -> None:
    """GRPO computes each rollout group's loss on its own: weighed by group_weights they must sum to the loss of
    every answer of the step in one batch, per answer (GRPO) or per token (DAPO, where a group of long answers
    counts for more)."""
    generator = torch.Generator().manual_seed(0)
    groups = []
    for length in (2, 6):  # one group of short answers, one of long ones (two answers each)
        mask = torch.zeros(2, 6, dtype=torch.bool)
        mask[:, :length] = True
        groups.append((torch.randn(2, 6, generator=generator), torch.randn(2, generator=generator), mask))
    old = torch.zeros(2, 6)
    per_group = torch.stack([clipped_policy_loss(lp, old, a, m, token_level=token_level) for lp, a, m in groups])
    weights = group_weights(torch.stack([m.sum() for _, _, m in groups]), token_level)
    logprobs, advantages, masks = (torch.cat(parts) for parts in zip(*groups, strict=True))
    whole = clipped_policy_loss(logprobs, torch.zeros(4, 6), advantages, masks, token_level=token_level)
    torch.testing.assert_close((per_group * weights).sum(), whole)


def test_k3_kl_is_zero_at_the_reference_and_positive_elsewhere() -> None:
    mask = torch.tensor([[True, True]])
    assert kl_to_reference(torch.zeros(1, 2), torch.zeros(1, 2), mask).item() == 0
    value = kl_to_reference(torch.zeros(1, 2), torch.tensor([[math.log(2.0), 0.0]]), mask)
    assert value.item() == pytest.approx((2 - math.log(2) - 1) / 2)


@torch.no_grad()
def test_a_sampled_group_repeats_with_its_seeds_and_greedy_rows_match_greedy_generation(
    tiny_supernet: ElasticMoE,
) -> None:
    model = tiny_supernet.eval()
    vocab = model.config.vocab_size
    prompt = [3, 4, 5, 6]

    def group(params: SamplingParams, seed: int | None) -> list[list[int]]:
        samplers = [Sampler(params, vocab, prompt, g) for g in choice_generators(seed, 4)]
        return sample_group(model, prompt, samplers, 8, end_ids=set())

    hot = SamplingParams(temperature=1.5)
    assert group(hot, 1) == group(hot, 1)
    assert len({tuple(a) for a in group(hot, 1)}) > 1
    expected = greedy_generate(model, torch.tensor([prompt]), 8)[0, len(prompt) :].tolist()
    assert group(SamplingParams(), None) == [expected] * 4
    first = expected[0]
    ended = sample_group(model, prompt, [Sampler(SamplingParams(), vocab, prompt)], 8, end_ids={first})
    assert ended == [[first]]  # the end token ends the answer and stays in it
