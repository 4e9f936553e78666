"""The sampler's math on hand-made logits: greedy, bias, penalties, temperature, top-k/p, min-p, seeds,
log-probabilities, and the ranges it refuses."""

import numpy as np
import pytest
from pydantic import ValidationError

from models.sampling import Sampler, SamplingParams, choice_generators, log_softmax

PROBS = np.array([0.5, 0.3, 0.15, 0.05])
LOGITS = np.log(PROBS).astype(np.float32)


def draws(params: SamplingParams, logits: np.ndarray = LOGITS, count: int = 4000) -> np.ndarray:
    """Token frequencies over `count` independent first draws (fresh counts each time, one generator)."""
    rng = np.random.default_rng(0)
    tokens = [Sampler(params, logits.size, [], rng).choose(logits).token_id for _ in range(count)]
    return np.bincount(tokens, minlength=logits.size) / count


def test_greedy_takes_the_argmax_after_the_bias() -> None:
    assert Sampler(SamplingParams(), 4, []).choose(LOGITS).token_id == 0
    banned = SamplingParams(logit_bias={0: -100})
    assert Sampler(banned, 4, []).choose(LOGITS).token_id == 1


def test_allowed_token_ids_leave_only_those_tokens_greedy_or_sampled() -> None:
    assert Sampler(SamplingParams(allowed_token_ids=(2, 3)), 4, []).choose(LOGITS).token_id == 2
    np.testing.assert_allclose(
        draws(SamplingParams(temperature=1.0, allowed_token_ids=(2, 3))), [0, 0, 0.75, 0.25], atol=0.03
    )
    with pytest.raises(ValueError, match="token ids"):
        Sampler(SamplingParams(allowed_token_ids=(4,)), 4, [])


def test_a_bad_word_bans_its_last_token_only_after_the_rest_of_it() -> None:
    sampler = Sampler(SamplingParams(bad_words_ids=((1,), (0, 0, 2))), 4, [0, 0])  # the prompt does not count
    assert sampler.choose(LOGITS).token_id == 0  # nothing generated yet: (0, 0, 2) is not begun
    assert sampler.choose(LOGITS).token_id == 0
    assert sampler.adjusted(LOGITS)[[1, 2]].tolist() == [-np.inf, -np.inf]  # 0, 0 generated: 2 would end it
    assert sampler.choose(LOGITS).token_id == 0  # 1 is banned everywhere, 2 after 0, 0
    assert np.isfinite(Sampler(SamplingParams(bad_words_ids=((0, 0, 2),)), 4, []).adjusted(LOGITS)).all()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_bans_that_leave_no_allowed_token_give_way_so_only_allowed_tokens_are_generated(temperature: float) -> None:
    """min_tokens bans the ending tokens; when those are the only tokens allowed (or bad words ban every allowed
    one), every logit would be -inf: the argmax of that is token 0 and its probabilities NaN, neither allowed."""
    ending_only = SamplingParams(temperature=temperature, seed=0, allowed_token_ids=(3,))
    assert Sampler(ending_only, 4, []).choose(LOGITS, banned=(3,)).token_id == 3
    all_bad = SamplingParams(temperature=temperature, seed=0, allowed_token_ids=(2, 3), bad_words_ids=((2,), (3,)))
    assert Sampler(all_bad, 4, []).choose(LOGITS).token_id in (2, 3)
    some_left = SamplingParams(temperature=temperature, seed=0, allowed_token_ids=(1, 3))
    assert Sampler(some_left, 4, []).choose(LOGITS, banned=(3,)).token_id == 1  # a ban that leaves one still holds


def test_a_vanishing_temperature_is_greedy_not_garbage() -> None:
    """1e-320 is a valid temperature (>= 0): dividing the logits by it overflowed to inf - inf = NaN."""
    with np.errstate(all="raise"):
        tokens = {Sampler(SamplingParams(temperature=1e-320, seed=s), 4, []).choose(LOGITS).token_id for s in range(8)}
    assert tokens == {0}


def test_temperature_one_draws_the_model_distribution_and_lower_sharpens_it() -> None:
    np.testing.assert_allclose(draws(SamplingParams(temperature=1.0)), PROBS, atol=0.03)
    sharpened = PROBS**2 / (PROBS**2).sum()  # temperature 0.5 squares the probabilities
    np.testing.assert_allclose(draws(SamplingParams(temperature=0.5)), sharpened, atol=0.03)


def test_top_k_top_p_and_min_p_cut_the_tail() -> None:
    assert draws(SamplingParams(temperature=1.0, top_k=1), count=200).tolist() == [1, 0, 0, 0]
    top_two = draws(SamplingParams(temperature=1.0, top_k=2))
    np.testing.assert_allclose(top_two, [0.5 / 0.8, 0.3 / 0.8, 0, 0], atol=0.03)
    # top_p: the smallest most-likely set with at least that mass (0.5 + 0.3 >= 0.6)
    np.testing.assert_allclose(draws(SamplingParams(temperature=1.0, top_p=0.6)), top_two, atol=0.03)
    assert draws(SamplingParams(temperature=1.0, top_p=0.5), count=200).tolist() == [1, 0, 0, 0]
    # min_p 0.5: tokens below half the top probability (0.25) go
    np.testing.assert_allclose(draws(SamplingParams(temperature=1.0, min_p=0.5)), top_two, atol=0.03)


def test_a_seed_repeats_and_other_seeds_differ() -> None:
    logits = np.zeros(50, dtype=np.float32)

    def sequence(seed: int) -> list[int]:
        sampler = Sampler(SamplingParams(temperature=1.0, seed=seed), 50, [])
        return [sampler.choose(logits).token_id for _ in range(20)]

    assert sequence(7) == sequence(7)
    assert sequence(7) != sequence(8)
    first, second = (g.integers(1 << 30) for g in choice_generators(7, 2))
    assert first != second  # the n choices of one seeded request differ
    assert [g.integers(1 << 30) for g in choice_generators(7, 2)] == [first, second]


def test_penalties_follow_openai_and_vllm() -> None:
    logits = np.array([2.0, 1.0, -1.0, 0.0], dtype=np.float32)
    sampler = Sampler(SamplingParams(frequency_penalty=0.5, presence_penalty=0.25), 4, [])
    for token in (0, 0, 1):
        sampler.generated_counts[token] += 1
    # OpenAI: logit - count * frequency - (count > 0) * presence
    np.testing.assert_allclose(sampler.adjusted(logits), [2 - 1.0 - 0.25, 1 - 0.5 - 0.25, -1, 0])
    repeat = Sampler(SamplingParams(repetition_penalty=2.0), 4, [0, 2])
    # vLLM: tokens seen in the prompt or output: positive logits divided, negative multiplied
    np.testing.assert_allclose(repeat.adjusted(logits), [1.0, 1.0, -2.0, 0.0])
    np.testing.assert_array_equal(repeat.adjusted(logits, banned=(1,)), [1.0, -np.inf, -2.0, 0.0])


def test_logprobs_are_the_models_own_and_the_best_alternatives_come_first() -> None:
    sampled = Sampler(SamplingParams(logprobs=2, logit_bias={3: 100}), 4, []).choose(LOGITS)
    assert sampled.token_id == 3  # the bias chose it; its logprob is still the model's
    assert sampled.logprob == pytest.approx(np.log(0.05), abs=1e-6)
    assert [t for t, _ in sampled.top_logprobs] == [0, 1]
    np.testing.assert_allclose([lp for _, lp in sampled.top_logprobs], np.log([0.5, 0.3]), atol=1e-6)
    assert np.exp(log_softmax(LOGITS)).sum() == pytest.approx(1.0)
    assert Sampler(SamplingParams(), 4, []).choose(LOGITS).logprob is None


def test_out_of_range_controls_are_refused_by_name() -> None:
    for field, value in (("top_p", 5), ("min_p", 3), ("presence_penalty", 2.5), ("temperature", -1), ("logprobs", 21)):
        with pytest.raises(ValidationError, match=field):
            SamplingParams(**{field: value})
    with pytest.raises(ValidationError, match="logit_bias"):
        SamplingParams(logit_bias={1: 101})
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 3\]"):
        Sampler(SamplingParams(logit_bias={4: 1.0}), 4, [])
