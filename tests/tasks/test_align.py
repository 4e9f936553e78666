"""SFT: the loss counts assistant tokens only, and fine-tuning raises held-out exact match; DPO and GRPO start
from it."""

import copy
from pathlib import Path

import pytest
import torch

from models.config import MoEConfig
from models.losses import IGNORE_INDEX, masked_lm_loss
from models.moe import ElasticMoE
from tasks.align.config import DPOConfig, GRPOConfig, SFTConfig
from tasks.align.dpo import preference_pairs, run_dpo
from tasks.align.grpo import run_grpo
from tasks.align.sft import collate, encode, exact_match, generate_reply, run_sft
from tasks.data.config import TaskMixConfig
from tasks.data.corpus import PreparedData
from tasks.data.task_mix import Example, as_conversation, corpus_passages, generate_splits


@pytest.fixture(scope="module")
def tokenizer(small_data: PreparedData):
    return small_data.chat_tokenizer()


def _model() -> ElasticMoE:
    torch.manual_seed(0)
    config = MoEConfig(
        vocab_size=400,
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        n_experts=4,
        top_k=2,
        expert_ffn_dim=64,
        max_seq_len=128,
    )
    return ElasticMoE(config)


def test_targets_cover_only_the_reply(tokenizer) -> None:
    encoded = encode(as_conversation(Example("copy", "Repeat: king queen", "king queen")), tokenizer, 128)
    trained = [t for t in encoded.targets if t != IGNORE_INDEX]
    assert tokenizer.decode(trained, skip_special_tokens=False) == "king queen<|end|>"
    # each target is the next token of the sequence
    for position, target in enumerate(encoded.targets):
        if target != IGNORE_INDEX:
            assert encoded.tokens[position + 1] == target
    tokens, targets = collate([encoded, encode(as_conversation(Example("copy", "Repeat: a", "a")), tokenizer, 128)], 1)
    assert tokens.shape == targets.shape and (targets[1, -3:] == IGNORE_INDEX).all()


def test_masked_loss_ignores_prompt_positions() -> None:
    logits = torch.randn(1, 4, 9)
    targets = torch.tensor([[IGNORE_INDEX, 3, IGNORE_INDEX, 5]])
    expected = -(torch.log_softmax(logits[0, 1], -1)[3] + torch.log_softmax(logits[0, 3], -1)[5]) / 2
    torch.testing.assert_close(masked_lm_loss(logits, targets), expected)


@pytest.fixture(scope="module")
def sft_run(tokenizer, small_corpus: Path):
    """A small model fine-tuned on the copy task: the starting point of the DPO tests."""
    passages = corpus_passages("\n".join(p.read_text() for p in sorted(small_corpus.iterdir())))
    config = SFTConfig(
        task_mix=TaskMixConfig(tasks=("copy",), train_per_task=400, test_per_task=30),
        steps=300,
        optim={"lr": 3e-3},
        replay={"batch_size": 0},  # no corpus to replay here
        batch_size=32,
    )
    train, test = generate_splits(config.task_mix, passages)
    model = _model()
    return model, run_sft(config, model, tokenizer, train, test), train, test


def test_sft_raises_held_out_exact_match(sft_run, tokenizer) -> None:
    model, result, _, test = sft_run
    assert result.accuracy_before["copy"] == 0.0
    assert result.accuracy_after["copy"] >= 0.3
    assert sum(result.losses[-20:]) / 20 < 0.2 * result.losses[0]
    assert exact_match(model, tokenizer, test, 16) == result.accuracy_after  # the model was tuned in place


def test_dpo_prefers_chosen_on_held_out_pairs_without_losing_accuracy(sft_run, tokenizer) -> None:
    model, sft, train, test = sft_run
    policy = copy.deepcopy(model)
    result = run_dpo(DPOConfig(steps=60, optim={"lr": 5e-5}, batch_size=16), policy, tokenizer, train[:200], test)
    assert sum(result.train_pair_kinds.values()) == 200 and result.train_pair_kinds["on_policy"] > 0
    assert result.held_out.reward_accuracy > 0.5 and result.held_out.margin > 0
    assert result.accuracy_after["overall"] >= sft.accuracy_after["overall"]
    assert sum(result.losses[-10:]) / 10 < result.losses[0]


def test_preference_pairs_reject_the_models_own_mistakes(sft_run, tokenizer) -> None:
    model, _, _, test = sft_run
    pairs, kinds = preference_pairs(model, tokenizer, test, 16, seed=0)
    assert kinds["on_policy"] + kinds["corrupted"] == len(test)
    for pair, example in zip(pairs, test, strict=True):
        assert pair.chosen == example.answer and pair.rejected != example.answer
        if pair.rejected_source == "on_policy":
            assert pair.rejected == generate_reply(model, tokenizer, example.prompt, 16).strip()


def test_user_files_are_checked_before_any_compute(tmp_path: Path) -> None:
    from pydantic import ValidationError

    from tasks.pipeline_config import load_pipeline_config

    bad = tmp_path / "sft.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]}\n')
    expected = "sft.jsonl:1: line: Value error, the last message must be the assistant's"
    with pytest.raises(ValidationError, match=expected):
        load_pipeline_config("tiny", {"sft.extra_jsonl": str(bad)})
    with pytest.raises(ValidationError, match="does not exist"):
        load_pipeline_config("tiny", {"dpo.extra_jsonl": str(tmp_path / "missing.jsonl")})
    good = tmp_path / "prefs.jsonl"
    good.write_text('{"prompt": "2+2?", "chosen": "4", "rejected": "5"}\n')
    assert load_pipeline_config("tiny", {"dpo.extra_jsonl": str(good)}).dpo.extra_jsonl == str(good)


def test_user_conversations_are_trained_on(tokenizer) -> None:
    model = _model()
    extra = [as_conversation(Example("user", "Who wrote Hamlet?", "Shakespeare"))]
    config = SFTConfig(
        task_mix=TaskMixConfig(tasks=("copy",), train_per_task=1, test_per_task=1),
        steps=40,
        optim={"lr": 3e-3},
        replay={"batch_size": 0},
    )
    train = [Example("copy", "Repeat: king", "king")]
    run_sft(config, model, tokenizer, train, train, extra)

    assert generate_reply(model, tokenizer, "Who wrote Hamlet?", 8).strip() == "Shakespeare"


def test_conversations_cut_before_their_reply_are_left_out_or_refused(tokenizer) -> None:
    """A conversation cut at max_len before the assistant speaks has no target: a batch of only such would train on
    a NaN loss. They are left out, and when nothing is left the run is refused naming sft.max_len."""
    long_question = Example("user", "word " * 60, "yes")
    short = Example("copy", "Repeat: king", "king")
    # seed 1 draws the first conversation at both steps: the cut one, had it been kept
    config = SFTConfig(steps=2, batch_size=1, max_len=16, seed=1, optim={"warmup_steps": 1}, replay={"batch_size": 0})
    model = _model()
    run_sft(config, model, tokenizer, [long_question, short], [short])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with pytest.raises(ValueError, match="sft.max_len=16: every conversation is cut before its reply"):
        run_sft(config, _model(), tokenizer, [long_question], [short])


def test_grpo_learns_from_groups_with_spread_and_keeps_accuracy(sft_run, tokenizer) -> None:
    model, sft, train, test = sft_run
    policy = copy.deepcopy(model)
    config = GRPOConfig(
        enabled=True,
        steps=12,
        prompts_per_step=4,
        group_size=6,
        optim={"lr": 5e-5},
        replay={"batch_size": 0},
        eval_interval=6,
    )
    result = run_grpo(config, policy, tokenizer, train[:200], test)
    useful = [m["useful_groups"] for m in result.metrics]
    assert sum(useful) > 0  # the SFT model solves some samples and not others: there is signal
    assert [h["step"] for h in result.held_out] == [0, 6, 12]
    assert result.accuracy_before == sft.accuracy_after  # pass@1 is the same greedy exact match SFT reports
    assert result.accuracy_after["overall"] >= sft.accuracy_after["overall"] - 0.1
    assert any(not torch.equal(a, b) for a, b in zip(policy.parameters(), model.parameters(), strict=True))
